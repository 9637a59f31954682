//! Runs a pipeline stage's [`StageTask`] on its own OS thread.
//!
//! The stage's model is built on that thread once the swarm has said which
//! stage this peer holds, so its tensors never cross threads; the driver
//! then sends one command at a time and awaits the answer, and the async
//! runtime keeps moving micro-batches while a forward or backward runs.

use crate::compute::{ComputeError, ComputeGone};
use crate::task::{OptimState, Shard, TaskError};
use p2ptrain_train::stage::{Forward, StageSpec, StageTask};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Builds a stage's task on the compute thread, given the stage it holds;
/// shared, because a node that moves to another stage builds again.
pub type StageFactory = std::sync::Arc<
    dyn Fn(StageSpec) -> Result<Box<dyn StageTask>, TaskError> + Send + Sync + 'static,
>;

/// Commands queue at most this deep; the driver awaits each answer.
const QUEUE_DEPTH: usize = 4;

/// The most micro-batches whose graphs a stage kept at once (see
/// [`StageTask::graphs_held`]), recorded by its compute thread.
#[derive(Clone, Debug, Default)]
struct PeakGraphs(Arc<AtomicUsize>);

impl PeakGraphs {
    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn record(&self, held: usize) {
        self.0.fetch_max(held, Ordering::Relaxed);
    }
}

type Reply<T> = oneshot::Sender<T>;

enum Command {
    Forward {
        id: u64,
        tokens: Vec<u32>,
        input: Option<Vec<f32>>,
        train: bool,
        reply: Reply<Result<Forward, TaskError>>,
    },
    Backward(u64, Vec<f32>, Reply<Result<Option<Vec<f32>>, TaskError>>),
    Forget(u64),
    ApplyStep(Reply<Result<usize, TaskError>>),
    Params(Reply<Vec<f32>>),
    SetParams(Vec<f32>, Reply<Result<(), TaskError>>),
    SetShard(Shard, Reply<()>),
    NextTrainTokens(Reply<Result<Vec<u32>, TaskError>>),
    SkipMicroBatches(u64, Reply<u64>),
    EvalTokens(Reply<Vec<Vec<u32>>>),
    OptimState(Reply<Option<OptimState>>),
    SetOptimState(OptimState, Reply<Result<(), TaskError>>),
}

/// Handle to a stage's compute thread. Dropping it ends the thread.
pub struct StageCompute {
    commands: std_mpsc::SyncSender<Command>,
    /// Which stage the thread holds.
    pub spec: StageSpec,
    /// Length of this stage's parameter vector.
    pub num_params: usize,
    /// Training windows in the data set, for sharding the first stage.
    pub num_train_windows: usize,
    peak_graphs: PeakGraphs,
}

impl StageCompute {
    /// Starts a thread that builds the stage with `factory` and then serves
    /// commands; fails if the thread cannot start or the stage cannot be built.
    pub async fn spawn(
        factory: StageFactory,
        spec: StageSpec,
        name: String,
    ) -> Result<StageCompute, ComputeError> {
        let peak = PeakGraphs::default();
        let peak_graphs = peak.clone();
        let (tx, rx) = std_mpsc::sync_channel(QUEUE_DEPTH);
        let (built_tx, built_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || match factory(spec) {
                Ok(task) => {
                    let _ = built_tx.send(Ok((task.num_params(), task.num_train_windows())));
                    serve(task, rx, &peak);
                }
                Err(e) => {
                    let _ = built_tx.send(Err(e));
                }
            })
            .map_err(|_| ComputeGone)?;
        let (num_params, num_train_windows) = built_rx.await.map_err(|_| ComputeGone)??;
        Ok(StageCompute {
            commands: tx,
            spec,
            num_params,
            num_train_windows,
            peak_graphs,
        })
    }

    /// The most training micro-batches whose graphs the stage has kept at
    /// once for their backward pass (its activation memory, in micro-batches).
    pub fn peak_graphs_held(&self) -> usize {
        self.peak_graphs.get()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ComputeGone> {
        crate::compute::request(&self.commands, make).await
    }

    /// Runs the stage forward on micro-batch `id` (see [`StageTask::forward`]).
    pub async fn forward(
        &self,
        id: u64,
        tokens: Vec<u32>,
        input: Option<Vec<f32>>,
        train: bool,
    ) -> Result<Forward, ComputeError> {
        Ok(self
            .call(|reply| Command::Forward {
                id,
                tokens,
                input,
                train,
                reply,
            })
            .await??)
    }

    /// Back-propagates micro-batch `id` (see [`StageTask::backward`]).
    pub async fn backward(
        &self,
        id: u64,
        grad_output: Vec<f32>,
    ) -> Result<Option<Vec<f32>>, ComputeError> {
        Ok(self
            .call(|r| Command::Backward(id, grad_output, r))
            .await??)
    }

    /// Drops micro-batch `id`'s saved graph (fire and forget).
    pub fn forget(&self, id: u64) -> Result<(), ComputeGone> {
        self.commands
            .send(Command::Forget(id))
            .map_err(|_| ComputeGone)
    }

    /// Applies the accumulated gradients; returns the micro-batches covered.
    pub async fn apply_step(&self) -> Result<usize, ComputeError> {
        Ok(self.call(Command::ApplyStep).await??)
    }

    /// This stage's flat parameters.
    pub async fn params(&self) -> Result<Vec<f32>, ComputeGone> {
        self.call(Command::Params).await
    }

    /// Replaces this stage's parameters.
    pub async fn set_params(&self, values: Vec<f32>) -> Result<(), ComputeError> {
        Ok(self.call(|r| Command::SetParams(values, r)).await??)
    }

    /// Sets the first stage's shard of the training windows.
    pub async fn set_shard(&self, shard: Shard) -> Result<(), ComputeGone> {
        self.call(|r| Command::SetShard(shard, r)).await
    }

    /// The first stage's next training micro-batch of token windows.
    pub async fn next_train_tokens(&self) -> Result<Vec<u32>, ComputeError> {
        Ok(self.call(Command::NextTrainTokens).await??)
    }

    /// Moves the first stage's window order on by `count` micro-batches
    /// (see `StageTask::skip_micro_batches`).
    pub async fn skip_micro_batches(&self, count: u64) -> Result<u64, ComputeGone> {
        self.call(|r| Command::SkipMicroBatches(count, r)).await
    }

    /// The held-out micro-batches, in a fixed order.
    pub async fn eval_tokens(&self) -> Result<Vec<Vec<u32>>, ComputeGone> {
        self.call(Command::EvalTokens).await
    }

    /// The stage's optimizer state (Adam's moments), for checkpoints.
    pub async fn optim_state(&self) -> Result<Option<OptimState>, ComputeGone> {
        self.call(Command::OptimState).await
    }

    /// Restores the stage's optimizer state from a checkpoint.
    pub async fn set_optim_state(&self, state: OptimState) -> Result<(), ComputeError> {
        Ok(self.call(|r| Command::SetOptimState(state, r)).await??)
    }
}

fn serve(mut task: Box<dyn StageTask>, commands: std_mpsc::Receiver<Command>, peak: &PeakGraphs) {
    while let Ok(command) = commands.recv() {
        // A dropped reply receiver just means the driver stopped waiting.
        match command {
            Command::Forward {
                id,
                tokens,
                input,
                train,
                reply,
            } => {
                let forward = task.forward(id, &tokens, input.as_deref(), train);
                peak.record(task.graphs_held());
                let _ = reply.send(forward);
            }
            Command::Backward(id, grad, reply) => {
                let _ = reply.send(task.backward(id, &grad));
            }
            Command::Forget(id) => task.forget(id),
            Command::ApplyStep(reply) => {
                let _ = reply.send(task.apply_step());
            }
            Command::Params(reply) => {
                let _ = reply.send(task.params());
            }
            Command::SetParams(values, reply) => {
                let _ = reply.send(task.set_params(&values));
            }
            Command::SetShard(shard, reply) => {
                task.set_shard(shard);
                let _ = reply.send(());
            }
            Command::NextTrainTokens(reply) => {
                let _ = reply.send(task.next_train_tokens());
            }
            Command::SkipMicroBatches(count, reply) => {
                let _ = reply.send(task.skip_micro_batches(count));
            }
            Command::EvalTokens(reply) => {
                let _ = reply.send(task.eval_tokens());
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
