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
        Ok(self.call(|r| Command::SetParams(values, r)).await??)
    }

    /// Sets this peer's data shard.
    pub async fn set_shard(&self, shard: Shard) -> Result<(), ComputeGone> {
        self.call(|r| Command::SetShard(shard, r)).await
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

/// Sends a command carrying a reply channel to a compute thread and awaits the answer.
pub(crate) async fn request<C, T>(
    commands: &std_mpsc::SyncSender<C>,
    make: impl FnOnce(oneshot::Sender<T>) -> C,
) -> Result<T, ComputeGone> {
    let (tx, rx) = oneshot::channel();
    // The queue is tiny and the driver awaits each answer, so this never blocks for long.
    commands.send(make(tx)).map_err(|_| ComputeGone)?;
    rx.await.map_err(|_| ComputeGone)
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
                let mut stats = Vec::with_capacity(steps as usize);
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
