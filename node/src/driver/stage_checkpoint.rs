//! A pipeline stage's checkpoints: written every few of the stage's
//! averaging rounds (and at the end), and read back by `--resume`, so a
//! pipeline run that stopped everywhere (every machine rebooted, say) goes
//! on from where its stages last averaged instead of from scratch.
//!
//! A stage checkpoint is an ordinary checkpoint file (see [`crate::checkpoint`])
//! whose model name says which stage of how many it holds
//! ([`super::stage_model_name`]), with the stage's Adam moments beside its
//! parameters.
//!
//! Beside its own stage a node saves the backups it holds of other stages
//! (parameters only), each in a subdirectory `backup-stage-<S>` of the
//! checkpoint directory, and `--resume` holds them again: a stage whose
//! machines are gone for good (none of them resumed) is then taken over by
//! a new node from a resumed node's copy, as in a run that never stopped.

use super::{Driver, NodeConfig, NodeError};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta, RunMismatch};
use crate::stage_compute::StageCompute;
use crate::task::OptimState;
use p2ptrain_protocol::pipe::StageState;
use p2ptrain_protocol::tensor;
use std::path::{Path, PathBuf};
use tracing::{debug, info, warn};

/// Where a pipeline node writes its stage's checkpoints, and how often.
#[derive(Debug, Clone)]
pub struct StageCheckpoints {
    /// Directory of checkpoint files.
    pub dir: PathBuf,
    /// Write one every this many of the stage's averaging rounds (and one
    /// when the run ends).
    pub every_rounds: u64,
}

/// A stage checkpoint a pipeline node resumes from.
#[derive(Debug, Clone)]
pub struct StageResume {
    /// The stage it holds.
    pub stage: u32,
    /// The stage's averaging round that produced it.
    pub round: u64,
    /// The stage's optimizer steps at that round.
    pub step: u64,
    /// Tokens the run had trained on, as this node counted them.
    pub samples: u64,
    /// The stage's flat parameters.
    pub params: Vec<f32>,
    /// The stage's Adam moments, if the checkpoint holds them.
    pub optim: Option<OptimState>,
    /// Backups of other stages saved beside the checkpoint, as this node
    /// held them when it last checkpointed (see
    /// [`StageResume::read_saved_backups`]).
    pub backups: Vec<StageState>,
}

/// How many rounds a saved backup of another stage may be past the node's
/// own checkpoint: the stages' rounds keep in step, within one or two.
const MAX_ROUNDS_AHEAD: u64 = 2;

/// The subdirectory of checkpoint directory `dir` holding stage `stage`'s backups.
fn backup_dir(dir: &Path, stage: u32) -> PathBuf {
    dir.join(format!("backup-stage-{stage}"))
}

/// Why a checkpoint cannot resume this pipeline node.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StageResumeError {
    /// The checkpoint is a whole model's, not a stage's.
    #[error("the newest checkpoint in {dir} is of model `{model}`, not a char-lm stage: pass --model {model} to resume it, or --resume a directory a pipeline node checkpointed into")]
    NotAStage {
        /// The directory read.
        dir: String,
        /// The model it names.
        model: String,
    },
    /// The checkpoint's stage comes from a model cut otherwise.
    #[error("the newest checkpoint in {dir} holds stage {stage} of {theirs}, but --stages is {ours}: pass --stages {theirs} to resume it")]
    StageCount {
        /// The directory read.
        dir: String,
        /// The stage it holds.
        stage: u32,
        /// Stages it was cut into.
        theirs: u32,
        /// Stages this node was told.
        ours: u32,
    },
    /// The checkpoint is of another swarm, or another averaging period.
    #[error(transparent)]
    Run(#[from] RunMismatch),
}

impl StageResume {
    /// The stage `ckpt` (the newest valid one in `dir`) holds, if it fits a
    /// node of `swarm` cutting the model into `stages` and averaging every
    /// `average_every` steps (checkpoints that do not say fit any).
    pub fn from_checkpoint(
        ckpt: Checkpoint,
        dir: &std::path::Path,
        swarm: &str,
        (stages, average_every): (u32, u64),
    ) -> Result<Self, StageResumeError> {
        let Some((stage, theirs)) = super::parse_stage_model_name(&ckpt.meta.model) else {
            return Err(StageResumeError::NotAStage {
                dir: dir.display().to_string(),
                model: ckpt.meta.model,
            });
        };
        if theirs != stages {
            return Err(StageResumeError::StageCount {
                dir: dir.display().to_string(),
                stage,
                theirs,
                ours: stages,
            });
        }
        ckpt.meta.check_run(dir, swarm, average_every)?;
        Ok(StageResume {
            stage,
            round: ckpt.meta.round,
            step: ckpt.meta.step,
            samples: ckpt.meta.samples,
            params: ckpt.params,
            optim: ckpt.optim,
            backups: Vec::new(),
        })
    }

    /// Reads the backups of the other stages saved in `dir` beside this
    /// checkpoint: the newest valid one per stage, of this swarm, cut and
    /// averaging period, and of about this checkpoint's round (stages step
    /// together, so a copy rounds ahead is another run's, left in the
    /// directory). Backups are a convenience for the swarm, so one that is
    /// missing or does not fit is skipped (with a warning), never a reason
    /// to refuse the resume.
    pub fn read_saved_backups(
        &mut self,
        dir: &Path,
        swarm: &str,
        (stages, average_every): (u32, u64),
    ) {
        for stage in (0..stages).filter(|s| *s != self.stage) {
            let sub = backup_dir(dir, stage);
            if !sub.is_dir() {
                continue;
            }
            let fits = |c: &Checkpoint| {
                if c.meta.round > self.round.saturating_add(MAX_ROUNDS_AHEAD) {
                    return Err(format!(
                        "round {} is past this node's checkpoint (round {}): another run's? move it away",
                        c.meta.round, self.round
                    ));
                }
                if c.meta.model != super::stage_model_name(stage, stages) {
                    return Err(format!(
                        "holds `{}`, not stage {stage} of {stages}",
                        c.meta.model
                    ));
                }
                c.meta
                    .check_run(&sub, swarm, average_every)
                    .map_err(|e| e.to_string())
            };
            match checkpoint::load_latest(&sub)
                .map_err(|e| e.to_string())
                .and_then(|c| fits(&c).map(|()| c))
            {
                Ok(c) => self.backups.push(StageState {
                    stage,
                    stages,
                    round: c.meta.round,
                    step: c.meta.step,
                    // Only a first-stage backup plans the run; a node that
                    // takes a stage over from disk plans it from its flags.
                    total_steps: 0,
                    params: tensor::Payload::from_f32(&c.params),
                    last: false,
                }),
                Err(e) => {
                    warn!(dir = %sub.display(), error = %e, "saved backup of another stage not used")
                }
            }
        }
    }
}

/// What one stage checkpoint records besides the parameters.
pub(super) struct StagePoint {
    pub stage: u32,
    pub stages: u32,
    pub round: u64,
    pub step: u64,
    pub samples: u64,
    /// [`checkpoint::params_digest`] of the parameters saved, which the
    /// caller has computed for its report anyway.
    pub params_digest: String,
}

impl Driver {
    /// Writes `values` (the stage's parameters after its round) with the
    /// stage's optimizer state as the checkpoint of `at`, off the event loop.
    pub(super) async fn save_stage(
        &mut self,
        config: &NodeConfig,
        to: &StageCheckpoints,
        compute: &StageCompute,
        at: StagePoint,
        values: &[f32],
    ) -> Result<PathBuf, NodeError> {
        let optim = self.pump(compute.optim_state()).await??;
        let meta = CheckpointMeta {
            swarm: config.net.swarm.clone(),
            model: super::stage_model_name(at.stage, at.stages),
            round: at.round,
            step: at.step,
            samples: at.samples,
            params_digest: at.params_digest,
            average_every: Some(config.schedule.average_every),
        };
        let (dir, values) = (to.dir.clone(), values.to_vec());
        let path = self
            .write_off_loop(&to.dir, move || {
                checkpoint::save_with_optim(&dir, &meta, &values, optim.as_ref())
            })
            .await?;
        debug!(path = %path.display(), stage = at.stage, round = at.round, "stage checkpoint written");
        Ok(path)
    }

    /// Writes the backups this node holds of stages other than `own` into
    /// their subdirectories of the checkpoint directory, each once per
    /// round. A failed write is logged and training goes on: the backups
    /// only spare the swarm a stage lost for good.
    pub(super) async fn save_held_backups(
        &mut self,
        config: &NodeConfig,
        to: &StageCheckpoints,
        own: u32,
    ) -> Result<(), NodeError> {
        for state in self.pipe.backups_of_others(own) {
            let saved = self.pipe.backups_saved.get(&state.stage);
            if saved.is_some_and(|r| *r >= state.round) {
                continue;
            }
            // Checked against its digest when it arrived; decoded again here.
            let Ok(values) = state.params.decode() else {
                continue;
            };
            let meta = CheckpointMeta {
                swarm: config.net.swarm.clone(),
                model: super::stage_model_name(state.stage, state.stages),
                round: state.round,
                step: state.step,
                samples: 0,
                params_digest: checkpoint::params_digest(&values),
                average_every: Some(config.schedule.average_every),
            };
            let dir = backup_dir(&to.dir, state.stage);
            let target = dir.clone();
            match self
                .write_off_loop(&dir, move || checkpoint::save(&target, &meta, &values))
                .await
            {
                Ok(path) => {
                    debug!(path = %path.display(), stage = state.stage, round = state.round, "stage backup saved");
                    self.pipe.backups_saved.insert(state.stage, state.round);
                }
                Err(NodeError::Checkpoint(e)) => {
                    warn!(stage = state.stage, error = %e, "stage backup not saved; training goes on");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Holds the backups a resume read back, so a node taking over a stage
    /// that no resumed node holds can load it from this one.
    pub(super) fn hold_saved_backups(&mut self, from: &StageResume) {
        let me = self.net.local_peer_id();
        for b in &from.backups {
            info!(
                stage = b.stage,
                round = b.round,
                step = b.step,
                "holding a saved backup of another stage"
            );
            self.pipe.hold_saved_backup(me, b.clone());
        }
    }

    /// Loads a resumed stage's parameters and (where it can) optimizer
    /// state into `compute`. Moments only tune step sizes: unusable ones
    /// leave fresh moments, with a warning.
    pub(super) async fn load_stage(
        &mut self,
        from: &StageResume,
        compute: &StageCompute,
    ) -> Result<(), NodeError> {
        if from.params.len() != compute.num_params {
            return Err(NodeError::CheckpointMismatch {
                expected: compute.num_params,
                got: from.params.len(),
            });
        }
        self.pump(compute.set_params(from.params.clone())).await??;
        self.restore_stage_moments(from, compute).await
    }

    /// Loads the checkpoint's Adam moments into `compute`, also under
    /// parameters taken from the swarm's newer backup of the stage: a round
    /// or so old, they are far closer than fresh moments, whose first steps
    /// move every parameter by about the full learning rate.
    pub(super) async fn restore_stage_moments(
        &mut self,
        from: &StageResume,
        compute: &StageCompute,
    ) -> Result<(), NodeError> {
        if let Some(state) = &from.optim {
            if let Err(e) = self.pump(compute.set_optim_state(state.clone())).await? {
                warn!(error = %e, "stage checkpoint's optimizer state not restored; fresh moments");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(model: &str, swarm: &str) -> Checkpoint {
        Checkpoint {
            meta: CheckpointMeta {
                swarm: swarm.into(),
                model: model.into(),
                round: 4,
                step: 20,
                samples: 5120,
                params_digest: String::new(),
                average_every: None,
            },
            params: vec![0.5; 3],
            optim: None,
            outer_momentum: None,
        }
    }

    #[test]
    fn saved_backups_of_other_stages_come_back_if_they_fit_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let save = |stage: u32, swarm: &str, round: u64, value: f32| {
            let params = vec![value; 4];
            let meta = CheckpointMeta {
                swarm: swarm.into(),
                model: super::super::stage_model_name(stage, 3),
                round,
                step: round * 5,
                samples: 0,
                params_digest: checkpoint::params_digest(&params),
                average_every: Some(5),
            };
            checkpoint::save(&backup_dir(dir.path(), stage), &meta, &params).unwrap();
        };
        save(1, "s", 2, 1.0);
        save(1, "s", 3, 2.0); // the newest of stage 1 is read
        save(2, "s", 9, 3.0); // rounds past the checkpoint: another run's
        save(0, "s", 3, 4.0); // the node's own stage: its checkpoint has it
        let mut resume = StageResume::from_checkpoint(
            ckpt("char-lm/stage-0-of-3", "s"),
            dir.path(),
            "s",
            (3, 5),
        )
        .unwrap();
        resume.read_saved_backups(dir.path(), "s", (3, 5));
        assert_eq!(
            resume.backups,
            vec![StageState {
                stage: 1,
                stages: 3,
                round: 3,
                step: 15,
                total_steps: 0,
                params: tensor::Payload::from_f32(&[2.0; 4]),
                last: false,
            }]
        );
        // Another swarm's node, or another averaging period, reads none.
        for (swarm, every) in [("t", 5), ("s", 10)] {
            resume.backups.clear();
            resume.read_saved_backups(dir.path(), swarm, (3, every));
            assert!(resume.backups.is_empty(), "{swarm} {every}");
        }
    }

    #[test]
    fn a_stage_checkpoint_resumes_only_the_same_cut_and_swarm() {
        let dir = std::path::Path::new("runs/a");
        let ok = StageResume::from_checkpoint(ckpt("char-lm/stage-1-of-2", "s"), dir, "s", (2, 5))
            .unwrap();
        assert_eq!((ok.stage, ok.round, ok.step, ok.samples), (1, 4, 20, 5120));
        assert_eq!(ok.params, vec![0.5; 3]);
        let err = |model: &str, swarm: &str, stages: u32| {
            StageResume::from_checkpoint(ckpt(model, swarm), dir, "s", (stages, 5))
                .unwrap_err()
                .to_string()
        };
        let mlp = err("mlp", "s", 2);
        assert!(
            mlp.contains("not a char-lm stage: pass --model mlp"),
            "{mlp}"
        );
        let cut = err("char-lm/stage-1-of-3", "s", 2);
        assert!(
            cut.contains("stage 1 of 3") && cut.contains("--stages 3"),
            "{cut}"
        );
        let swarm = err("char-lm/stage-0-of-2", "other", 2);
        assert!(swarm.contains("--swarm other"), "{swarm}");
        // Written with rounds of 5 steps: resumed only with rounds of 5.
        let mut five = ckpt("char-lm/stage-0-of-2", "s");
        five.meta.average_every = Some(5);
        let every = StageResume::from_checkpoint(five.clone(), dir, "s", (2, 10)).unwrap_err();
        assert!(
            every.to_string().contains("pass --average-every 5"),
            "{every}"
        );
        assert!(StageResume::from_checkpoint(five, dir, "s", (2, 5)).is_ok());
    }
}
