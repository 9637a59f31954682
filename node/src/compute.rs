//! Runs a [`Task`] on its own OS thread so training never stalls the network.
//!
//! The driver sends commands over a bounded channel and awaits each answer on
//! a oneshot; the async runtime only ever waits, it never computes.

use crate::task::{EvalStats, OptimState, Shard, StepStats, Task, TaskError};
use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

/// Commands queue at most this deep; the driver issues one at a time anyway.
const QUEUE_DEPTH: usize = 4;

type Reply<T> = oneshot::Sender<T>;

enum Command {
    Train(u64, Reply<Result<Vec<StepStats>, TaskError>>),
    Params(Reply<Vec<f32>>),
    SetParams(Vec<f32>, Reply<Result<(), TaskError>>),
    SetShard(Shard, Reply<()>),
    SkipSamples(u64, Reply<()>),
    Evaluate(Reply<Result<EvalStats, TaskError>>),
    OptimState(Reply<Option<OptimState>>),
    SetOptimState(OptimState, Reply<Result<(), TaskError>>),
}

/// The compute thread stopped (it panicked or was shut down).
#[derive(Debug, thiserror::Error)]
#[error("the compute thread has stopped (a training step panicked; see the log above)")]
pub struct ComputeGone;

/// Errors from a compute command.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The task reported a problem.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The thread is gone.
    #[error(transparent)]
    Gone(#[from] ComputeGone),
}

/// Handle to the compute thread. Dropping it ends the thread after its current command.
pub struct Compute {
    commands: std_mpsc::SyncSender<Command>,
    /// Length of the parameter vector, fixed for the task's life.
    pub num_params: usize,
    /// Size of the full training set.
    pub num_train_samples: usize,
}

impl Compute {
    /// Moves `task` onto a new thread named after the node.
    pub fn spawn(task: Box<dyn Task>, name: String) -> std::io::Result<Compute> {
        let num_params = task.num_params();
        let num_train_samples = task.num_train_samples();
        let (tx, rx) = std_mpsc::sync_channel(QUEUE_DEPTH);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(task, rx))?;
        Ok(Compute {
            commands: tx,
            num_params,
            num_train_samples,
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ComputeGone> {
        request(&self.commands, make).await
    }

    /// Runs `steps` optimisation steps; returns each step's figures.
    pub async fn train(&self, steps: u64) -> Result<Vec<StepStats>, ComputeError> {
        Ok(self.call(|r| Command::Train(steps, r)).await??)
    }

    /// Current flat parameters.
    pub async fn params(&self) -> Result<Vec<f32>, ComputeGone> {
        self.call(Command::Params).await
    }

    /// Replaces the parameters after an averaging round.
    pub async fn set_params(&self, values: Vec<f32>) -> Result<(), ComputeError> {
        self.start_set_params(values).await
    }

    /// [`Compute::set_params`], handed to the compute thread before this
    /// returns, not when the future is first polled: the driver hashes the
    /// new model for serving while the thread copies it in, and awaits the
    /// future for the outcome afterwards.
    pub fn start_set_params(
        &self,
        values: Vec<f32>,
    ) -> impl std::future::Future<Output = Result<(), ComputeError>> {
        let reply = request(&self.commands, |r| Command::SetParams(values, r));
        async move { Ok(reply.await??) }
    }

    /// Sets this peer's data shard.
    pub async fn set_shard(&self, shard: Shard) -> Result<(), ComputeGone> {
        self.call(|r| Command::SetShard(shard, r)).await
    }

    /// Moves the shard's sample order on by `samples` (see `Task::skip_samples`).
    pub async fn skip_samples(&self, samples: u64) -> Result<(), ComputeGone> {
        self.call(|r| Command::SkipSamples(samples, r)).await
    }

    /// The local optimizer's state (Adam moments), for checkpoints.
    pub async fn optim_state(&self) -> Result<Option<OptimState>, ComputeGone> {
        self.call(Command::OptimState).await
    }

    /// Restores the local optimizer's state from a checkpoint.
    pub async fn set_optim_state(&self, state: OptimState) -> Result<(), ComputeError> {
        Ok(self.call(|r| Command::SetOptimState(state, r)).await??)
    }

    /// Evaluates on the held-out set.
    pub async fn evaluate(&self) -> Result<EvalStats, ComputeError> {
        Ok(self.call(Command::Evaluate).await??)
    }
}

/// Sends a command carrying a reply channel to a compute thread now, and
/// returns the future of its answer: a caller can do other work while the
/// thread runs the command (see [`Compute::start_set_params`]).
pub(crate) fn request<C, T>(
    commands: &std_mpsc::SyncSender<C>,
    make: impl FnOnce(oneshot::Sender<T>) -> C,
) -> impl std::future::Future<Output = Result<T, ComputeGone>> {
    let (tx, rx) = oneshot::channel();
    // The queue is tiny and the driver awaits each answer, so this never blocks for long.
    let sent = commands.send(make(tx));
    async move {
        sent.map_err(|_| ComputeGone)?;
        rx.await.map_err(|_| ComputeGone)
    }
}

fn serve(mut task: Box<dyn Task>, commands: std_mpsc::Receiver<Command>) {
    // The last parameter vector the driver handed back: the next `Params`
    // answer is written into it, so a round moves one model-sized buffer
    // back and forth instead of allocating a fresh one (which, above glibc's
    // mmap threshold, the kernel maps and zeroes page by page every time).
    let mut spare: Vec<f32> = Vec::new();
    while let Ok(command) = commands.recv() {
        // A dropped reply receiver just means the driver stopped waiting.
        match command {
            Command::Train(steps, reply) => {
                // Grown as steps finish: `steps` is the user's, unbounded.
                let mut stats = Vec::with_capacity((steps as usize).min(1024));
                let mut result = Ok(());
                for _ in 0..steps {
                    match task.train_step() {
                        Ok(s) => stats.push(s),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                let _ = reply.send(result.map(|()| stats));
            }
            Command::Params(reply) => {
                let mut values = std::mem::take(&mut spare);
                task.params_into(&mut values);
                let _ = reply.send(values);
            }
            Command::SetParams(values, reply) => {
                let _ = reply.send(task.set_params(&values));
                spare = values;
            }
            Command::SetShard(shard, reply) => {
                task.set_shard(shard);
                let _ = reply.send(());
            }
            Command::SkipSamples(samples, reply) => {
                task.skip_samples(samples);
                let _ = reply.send(());
            }
            Command::Evaluate(reply) => {
                let _ = reply.send(task.evaluate());
            }
            Command::OptimState(reply) => {
                let _ = reply.send(task.optim_state());
            }
            Command::SetOptimState(state, reply) => {
                let _ = reply.send(task.set_optim_state(&state));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Holds `values`; every `set_params` is reported on `seen`.
    struct Recorder {
        values: Vec<f32>,
        seen: mpsc::Sender<Vec<f32>>,
    }

    impl Task for Recorder {
        fn num_params(&self) -> usize {
            self.values.len()
        }
        fn params_into(&self, out: &mut Vec<f32>) {
            out.clear();
            out.extend_from_slice(&self.values);
        }
        fn set_params(&mut self, values: &[f32]) -> Result<(), TaskError> {
            crate::task::validate_params(self.values.len(), values)?;
            self.values.copy_from_slice(values);
            let _ = self.seen.send(values.to_vec());
            Ok(())
        }
        fn num_train_samples(&self) -> usize {
            1
        }
        fn set_shard(&mut self, _: Shard) {}
        fn train_step(&mut self) -> Result<StepStats, TaskError> {
            Ok(StepStats {
                loss: 0.0,
                samples: 1,
            })
        }
        fn evaluate(&mut self) -> Result<EvalStats, TaskError> {
            Ok(EvalStats {
                loss: 0.0,
                accuracy: None,
                samples: 0,
            })
        }
    }

    #[test]
    fn new_parameters_go_to_the_thread_before_the_future_is_polled() {
        let (seen_tx, seen) = mpsc::channel();
        let task = Recorder {
            values: vec![0.0; 3],
            seen: seen_tx,
        };
        let compute = Compute::spawn(Box::new(task), "compute-test".into()).unwrap();
        let setting = compute.start_set_params(vec![1.0, 2.0, 3.0]);
        // Not polled yet, and the thread has them already.
        let got = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, vec![1.0, 2.0, 3.0]);
        futures::executor::block_on(setting).unwrap();
        let params = futures::executor::block_on(compute.params()).unwrap();
        assert_eq!(params, vec![1.0, 2.0, 3.0]);
        // A refused vector comes back as the task's error, still eagerly sent.
        let bad = compute.start_set_params(vec![1.0, f32::NAN, 3.0]);
        let err = futures::executor::block_on(bad).unwrap_err();
        assert!(
            matches!(err, ComputeError::Task(TaskError::NonFinite { index: 1 })),
            "{err}"
        );
    }
}
