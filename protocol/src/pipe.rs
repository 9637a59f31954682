//! Messages of pipeline (model-parallel) training.
//!
//! A model cut into stages trains as a pipeline: a first-stage peer embeds a
//! micro-batch of token windows and sends the activations to a replica of the
//! next stage, and so on to the last stage, which computes the loss and sends
//! the gradient with respect to its input back to whoever sent it the
//! micro-batch. Tokens travel with every micro-batch (a few hundred bytes) so
//! the last stage takes its targets from them and no stage needs the data
//! set but the first. Stage replicas average their parameters with the
//! ordinary averaging protocol, wrapped in [`crate::wire::Message::StageAvg`]
//! so that only replicas of the same stage take part.

use crate::tensor::{Encoding, Payload, TensorError};
use serde::{Deserialize, Serialize};

/// Most token ids one micro-batch may carry (bounds what a peer can make us hold).
pub const MAX_TOKENS: usize = 1 << 20;
/// Most stages a model may be cut into.
pub const MAX_STAGES: u32 = 256;

/// A micro-batch's activations on their way to the next stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PipeForward {
    /// The sender's id for this micro-batch; the answer quotes it.
    pub id: u64,
    /// The stage these activations are for. A receiver holding another
    /// stage drops them: they were sent before it moved (or by a peer that
    /// moved and whose new hello has not arrived, which this tells apart
    /// from a micro-batch for a stage the receiver no longer holds).
    pub to_stage: u32,
    /// Training (keep the graph and send a gradient back) or evaluation (loss only).
    pub train: bool,
    /// The micro-batch's token windows, each `context + 1` ids.
    pub tokens: Vec<u32>,
    /// The sending stage's output, flat `[windows, context, width]`.
    pub activations: Payload,
}

/// The answer to a [`PipeForward`], flowing back towards the first stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PipeBackward {
    /// The id the [`PipeForward`] carried.
    pub id: u64,
    /// The micro-batch's mean loss in nats per predicted token.
    pub loss: f32,
    /// Tokens the loss was measured on (to weight means across micro-batches).
    pub predicted: u32,
    /// d loss / d the receiver's output (empty in evaluation).
    pub grad: Payload,
}

/// Where a pipeline peer stands in the run, announced by gossip.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StagePhase {
    /// Holds its stage again from its own checkpoint (`--resume`) and is
    /// still finding out where the run goes on from: not serving
    /// micro-batches yet, and no proof that the run trained past its step,
    /// but a sign to a node starting beside it that the run is in progress.
    Resuming,
    /// Taking training steps (or serving them).
    Training,
    /// Finished training and its stage's final averaging; now only evaluates.
    Trained,
    /// Finished everything, including evaluation.
    Done,
}

/// A pipeline peer's announcement of which stage it serves, repeated by
/// gossip so peers that join later learn where to route micro-batches.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageHello {
    /// The stage this peer holds.
    pub stage: u32,
    /// Stages the model is cut into (peers disagreeing on it cannot work together).
    pub stages: u32,
    /// How far the peer is.
    pub phase: StagePhase,
    /// Optimizer steps the peer has taken in this run: a node starting
    /// while peers announce steps has joined a run in progress.
    pub step: u64,
    /// The peer's measured micro-batches per second of compute on its stage,
    /// in thousandths, coarsened (0: not measured yet); a joining peer
    /// balances stages by it.
    pub throughput: u32,
}

/// A stage's parameters after one of its averaging rounds: kept by the
/// peers of every other stage as the backup a new peer (or a spare) loads
/// when the stage has lost every replica (the payload's blake3 digest is
/// checked on decode).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StageState {
    /// The stage these parameters belong to.
    pub stage: u32,
    /// Stages the model is cut into.
    pub stages: u32,
    /// The stage's averaging round that produced them.
    pub round: u64,
    /// The stage's optimizer step count at that round.
    pub step: u64,
    /// The run's length in optimizer steps as the first stage planned it, so
    /// a peer taking the first stage over ends the run where it was meant to
    /// end; 0 from a later stage, which does not plan the run.
    pub total_steps: u64,
    /// The stage's flat parameters.
    pub params: Payload,
    /// The sender's final parameters for the run: the other replicas of its
    /// stage adopt them, so a final averaging round one of them saw only in
    /// part cannot leave the stage's replicas disagreeing.
    pub last: bool,
}

/// A node taking over a stage asks the peers of the other stages for its backup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageStateRequest {
    /// The stage wanted.
    pub stage: u32,
    /// Stages the model is cut into.
    pub stages: u32,
}

/// Content of a pipeline message that no honest peer sends.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PipeError {
    /// More token ids than [`MAX_TOKENS`].
    #[error("micro-batch carries {count} token ids, more than the maximum of {max}")]
    TooManyTokens {
        /// Ids carried.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A NaN, infinite or negative loss (cross-entropy is never negative).
    #[error("micro-batch loss {loss} is not a finite, non-negative number")]
    BadLoss {
        /// The loss.
        loss: f32,
    },
    /// An answer claiming its loss covers no tokens, or more than the
    /// micro-batch sent: the loss would weigh nothing, or too much, in the
    /// mean a first stage reports.
    #[error(
        "answer says its loss covers {predicted} tokens; the micro-batch sent {sent} token ids"
    )]
    PredictedOutOfRange {
        /// Tokens the answer claims.
        predicted: u32,
        /// Token ids the micro-batch carried.
        sent: usize,
    },
    /// A stage index outside the model's stages, or a stage count out of range.
    #[error("stage {stage} of {stages} is out of range (at most {MAX_STAGES} stages)")]
    BadStage {
        /// Announced stage.
        stage: u32,
        /// Announced stage count.
        stages: u32,
    },
    /// A stage's parameters claiming a run length they cannot have: one from
    /// a later stage (which does not plan the run), or a first stage's step
    /// past its own plan.
    #[error("stage {stage} parameters at step {step} of a run of {total_steps} steps")]
    StepsOutOfRun {
        /// The stage.
        stage: u32,
        /// Its claimed step.
        step: u64,
        /// Its claimed run length.
        total_steps: u64,
    },
    /// A payload that fails its own checks.
    #[error(transparent)]
    Payload(#[from] TensorError),
    /// A sparse (top-k) payload. Pipeline tensors are dense; a sparse one's
    /// length is not backed by the bytes sent, so a few bytes could claim
    /// gigabytes of values for the receiver to allocate.
    #[error("a pipeline {what} must be dense, not {encoding:?}")]
    SparsePayload {
        /// Which tensor.
        what: &'static str,
        /// Its encoding.
        encoding: Encoding,
    },
}

/// Checks a pipeline tensor: its own checks, and dense.
fn check_dense(what: &'static str, payload: &Payload) -> Result<(), PipeError> {
    if !payload.encoding.is_dense() {
        return Err(PipeError::SparsePayload {
            what,
            encoding: payload.encoding,
        });
    }
    Ok(payload.validate()?)
}

impl PipeForward {
    /// Checks sizes and the payload's digest and content.
    pub fn validate(&self) -> Result<(), PipeError> {
        if self.tokens.len() > MAX_TOKENS {
            return Err(PipeError::TooManyTokens {
                count: self.tokens.len(),
                max: MAX_TOKENS,
            });
        }
        check_dense("activation", &self.activations)
    }
}

impl PipeBackward {
    /// Checks the loss and the payload.
    pub fn validate(&self) -> Result<(), PipeError> {
        if !self.loss.is_finite() || self.loss < 0.0 {
            return Err(PipeError::BadLoss { loss: self.loss });
        }
        check_dense("gradient", &self.grad)
    }

    /// Checks that the answer can belong to a micro-batch of `sent` token
    /// ids: each window of `context + 1` ids predicts `context` of them, so
    /// an honest count is at least one and below `sent`.
    pub fn fits(&self, sent: usize) -> Result<(), PipeError> {
        if self.predicted == 0 || self.predicted as usize >= sent {
            return Err(PipeError::PredictedOutOfRange {
                predicted: self.predicted,
                sent,
            });
        }
        Ok(())
    }
}

/// Checks a stage index against a stage count.
fn check_stage(stage: u32, stages: u32) -> Result<(), PipeError> {
    if stages == 0 || stages > MAX_STAGES || stage >= stages {
        return Err(PipeError::BadStage { stage, stages });
    }
    Ok(())
}

impl StageHello {
    /// Checks the stage is within the announced count.
    pub fn validate(&self) -> Result<(), PipeError> {
        check_stage(self.stage, self.stages)
    }
}

impl StageState {
    /// Checks the stage, the run length it claims (only the first stage
    /// plans one, and its step is within it; 0 says none, as in a stage's
    /// final parameters), and the parameters' digest and content.
    pub fn validate(&self) -> Result<(), PipeError> {
        check_stage(self.stage, self.stages)?;
        let planned = self.total_steps != 0;
        if planned && (self.stage != 0 || self.step > self.total_steps) {
            return Err(PipeError::StepsOutOfRun {
                stage: self.stage,
                step: self.step,
                total_steps: self.total_steps,
            });
        }
        check_dense("stage state", &self.params)
    }
}

impl StageStateRequest {
    /// Checks the stage is within the announced count.
    pub fn validate(&self) -> Result<(), PipeError> {
        check_stage(self.stage, self.stages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_hello_out_of_range_is_refused() {
        let ok = StageHello {
            stage: 1,
            stages: 2,
            phase: StagePhase::Training,
            step: 3,
            throughput: 2500,
        };
        assert_eq!(ok.validate(), Ok(()));
        for (stage, stages) in [(2, 2), (0, 0), (0, MAX_STAGES + 1)] {
            let bad = StageHello {
                stage,
                stages,
                ..ok
            };
            assert!(matches!(bad.validate(), Err(PipeError::BadStage { .. })));
            let request = StageStateRequest { stage, stages };
            assert!(matches!(
                request.validate(),
                Err(PipeError::BadStage { .. })
            ));
        }
    }

    #[test]
    fn stage_state_checks_its_stage_and_its_parameters() {
        let ok = StageState {
            stage: 1,
            stages: 2,
            round: 4,
            step: 20,
            total_steps: 0,
            params: Payload::from_f32(&[0.5, -1.0]),
            last: false,
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad_stage = StageState {
            stage: 2,
            ..ok.clone()
        };
        assert!(matches!(
            bad_stage.validate(),
            Err(PipeError::BadStage { .. })
        ));
        let mut tampered = ok.clone();
        tampered.params.digest[3] ^= 1;
        assert!(matches!(tampered.validate(), Err(PipeError::Payload(_))));
        let nan = StageState {
            params: Payload::from_f32(&[f32::NAN]),
            ..ok.clone()
        };
        assert!(matches!(nan.validate(), Err(PipeError::Payload(_))));
        // Only the first stage plans the run, and its step lies within it.
        let first = |step, total_steps| StageState {
            stage: 0,
            step,
            total_steps,
            ..ok.clone()
        };
        assert_eq!(first(20, 40).validate(), Ok(()));
        assert_eq!(first(40, 40).validate(), Ok(()));
        assert_eq!(
            first(20, 0).validate(),
            Ok(()),
            "final parameters plan nothing"
        );
        for bad in [
            first(u64::MAX, 40),
            StageState {
                total_steps: u64::MAX,
                ..ok
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(PipeError::StepsOutOfRun { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bad_losses_and_oversized_token_lists_are_refused() {
        for loss in [f32::NAN, f32::INFINITY, -0.5] {
            let back = PipeBackward {
                id: 1,
                loss,
                predicted: 8,
                grad: Payload::from_f32(&[1.0]),
            };
            assert!(matches!(back.validate(), Err(PipeError::BadLoss { .. })));
        }
        let fwd = PipeForward {
            id: 1,
            to_stage: 1,
            train: true,
            tokens: vec![0; MAX_TOKENS + 1],
            activations: Payload::from_f32(&[]),
        };
        assert!(matches!(
            fwd.validate(),
            Err(PipeError::TooManyTokens { .. })
        ));
    }

    #[test]
    fn an_answer_must_cover_some_but_not_all_of_the_tokens_sent() {
        let back = |predicted| PipeBackward {
            id: 1,
            loss: 2.0,
            predicted,
            grad: Payload::from_f32(&[]),
        };
        // Two windows of context 4: 10 ids sent, 8 predicted.
        assert_eq!(back(8).fits(10), Ok(()));
        assert_eq!(back(1).fits(10), Ok(()));
        for predicted in [0, 10, u32::MAX] {
            assert_eq!(
                back(predicted).fits(10),
                Err(PipeError::PredictedOutOfRange {
                    predicted,
                    sent: 10
                })
            );
        }
        assert!(
            back(0).validate().is_ok(),
            "validate alone cannot know the batch"
        );
    }

    #[test]
    fn payload_checks_apply_to_activations_and_gradients() {
        let mut payload = Payload::from_f32(&[1.0, 2.0]);
        payload.digest[0] ^= 1;
        let fwd = PipeForward {
            id: 7,
            to_stage: 1,
            train: true,
            tokens: vec![1, 2, 3],
            activations: payload.clone(),
        };
        assert!(matches!(fwd.validate(), Err(PipeError::Payload(_))));
        let back = PipeBackward {
            id: 7,
            loss: 1.0,
            predicted: 8,
            grad: payload,
        };
        assert!(matches!(back.validate(), Err(PipeError::Payload(_))));
    }

    #[test]
    fn sparse_tensors_are_refused_in_every_pipeline_message() {
        // Sixty-odd bytes that pass the payload's own checks yet claim four
        // billion values: decoding it would allocate 16 GiB.
        let mut sparse = Payload::encode(&[], Encoding::TopK { k: 0 });
        sparse.len = u32::MAX;
        assert_eq!(sparse.validate(), Ok(()));
        let fwd = PipeForward {
            id: 1,
            to_stage: 1,
            train: true,
            tokens: vec![],
            activations: sparse.clone(),
        };
        assert!(matches!(
            fwd.validate(),
            Err(PipeError::SparsePayload {
                what: "activation",
                ..
            })
        ));
        let back = PipeBackward {
            id: 1,
            loss: 1.0,
            predicted: 1,
            grad: sparse.clone(),
        };
        assert!(matches!(
            back.validate(),
            Err(PipeError::SparsePayload {
                what: "gradient",
                ..
            })
        ));
        let state = StageState {
            stage: 0,
            stages: 2,
            round: 1,
            step: 1,
            total_steps: 0,
            params: sparse,
            last: true,
        };
        let err = state.validate().unwrap_err();
        assert!(err.to_string().contains("must be dense"), "{err}");
        // Dense codecs, whose length the bytes carry, still pass.
        for encoding in [Encoding::F16, Encoding::Bf16, Encoding::Int8 { block: 64 }] {
            let fwd = PipeForward {
                activations: Payload::encode(&[1.0, -2.0], encoding),
                ..fwd.clone()
            };
            assert_eq!(fwd.validate(), Ok(()), "{encoding:?}");
        }
    }
}
