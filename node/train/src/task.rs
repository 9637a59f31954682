//! The seam between the network driver and local compute.
//!
//! The driver knows nothing about models or backends: it only moves flat
//! parameter vectors between peers and asks a [`Task`] to take steps. MNIST,
//! the linear-regression example and future models all plug in here, so the
//! same averaging path serves every one of them.

/// Errors a local learner can report to the driver.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A parameter vector from the swarm does not fit this model.
    #[error("parameter vector has {got} values but the model has {expected}; peers disagree on the model")]
    ParamLength {
        /// Values the model holds.
        expected: usize,
        /// Values that were offered.
        got: usize,
    },
    /// A parameter vector from the swarm holds NaN or infinity.
    #[error("parameter vector holds a non-finite value at index {index}")]
    NonFinite {
        /// First offending index.
        index: usize,
    },
    /// The shard handed to the task is empty, so no step can be taken.
    #[error("this peer's data shard is empty: the swarm has more peers than samples")]
    EmptyShard,
    /// Input from a peer or the driver does not fit this model (wrong sizes, unknown ids).
    #[error("input refused: {0}")]
    BadInput(String),
    /// The backend failed (device lost, out of memory, ...).
    #[error("compute backend failed: {0}")]
    Backend(String),
}

/// One local optimisation step's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean training loss over the batch.
    pub loss: f32,
    /// Samples the step consumed.
    pub samples: usize,
}

/// An evaluation on held-out data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    /// Mean loss over the held-out set.
    pub loss: f32,
    /// Fraction of correct predictions, for classifiers.
    pub accuracy: Option<f32>,
    /// Samples evaluated.
    pub samples: usize,
}

/// This peer's part of the training set, recomputed when the swarm changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// Sample indices this peer trains on, sorted.
    pub indices: Vec<u64>,
    /// Seed for this peer's sample order.
    pub seed: u64,
    /// Peers in the swarm, this one included. Tasks that want the swarm's
    /// mean gradient to equal the full-data gradient weight their loss by
    /// `indices.len() * peers / num_train_samples`.
    pub peers: usize,
}

/// More optimizer steps (or rounds) than any run takes: a larger count in a
/// restored state or checkpoint was made up, and would overflow counters.
pub const MAX_OPTIM_STEPS: u64 = 1 << 48;

/// A local optimizer's state (Adam's moment estimates), flattened in the same
/// order as the parameters, so it can be checkpointed and restored in
/// another process whose model has new parameter ids.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimState {
    /// Steps the moments have seen (Adam's bias correction depends on it).
    pub time: u64,
    /// First moments, one per parameter.
    pub moment_1: Vec<f32>,
    /// Second moments, one per parameter (never negative).
    pub moment_2: Vec<f32>,
}

impl OptimState {
    /// Checks the state fits a model of `num_params` parameters and holds
    /// only finite moments, with no negative second moment.
    pub fn validate(&self, num_params: usize) -> Result<(), TaskError> {
        for (name, v) in [("first", &self.moment_1), ("second", &self.moment_2)] {
            if v.len() != num_params {
                return Err(TaskError::BadInput(format!(
                    "optimizer state holds {} {name} moments but the model has {num_params} parameters",
                    v.len()
                )));
            }
        }
        if self.time > MAX_OPTIM_STEPS {
            return Err(TaskError::BadInput(format!(
                "optimizer state has seen {} steps, more than any run takes ({MAX_OPTIM_STEPS})",
                self.time
            )));
        }
        if let Some(i) = self.moment_1.iter().position(|x| !x.is_finite()) {
            return Err(TaskError::BadInput(format!(
                "optimizer state's first moment {i} is not finite"
            )));
        }
        if let Some(i) = self
            .moment_2
            .iter()
            .position(|x| !x.is_finite() || *x < 0.0)
        {
            return Err(TaskError::BadInput(format!(
                "optimizer state's second moment {i} is not finite or is negative"
            )));
        }
        Ok(())
    }
}

/// A local learner the driver can step, read and overwrite.
///
/// Implementations own their model, optimizer and data; all of them run on a
/// dedicated compute thread, never on the async runtime.
pub trait Task: Send + 'static {
    /// Length of the flat parameter vector exchanged with peers.
    fn num_params(&self) -> usize;
    /// Current parameters, flattened in a fixed, model-defined order.
    fn params(&self) -> Vec<f32> {
        let mut values = Vec::new();
        self.params_into(&mut values);
        values
    }
    /// [`Task::params`] into `out`, replacing what it held, so the compute
    /// thread can hand the driver the same model-sized buffer every round
    /// (a fresh one is mapped and zeroed by the kernel page by page).
    fn params_into(&self, out: &mut Vec<f32>);
    /// Replaces the parameters (after averaging); validates length and finiteness first.
    fn set_params(&mut self, values: &[f32]) -> Result<(), TaskError>;
    /// Size of the whole training set, so the driver can compute shards.
    fn num_train_samples(&self) -> usize;
    /// Restricts training to this peer's shard of the training set.
    fn set_shard(&mut self, shard: Shard);
    /// Moves the shard's sample order on by `samples`, as if they had been
    /// trained: a node resumed from its checkpoint goes on where its passes
    /// stood instead of training the start of its shard again. Tasks
    /// without a sample order ignore it.
    fn skip_samples(&mut self, samples: u64) {
        let _ = samples;
    }
    /// Runs one optimisation step on the next batch of the shard.
    fn train_step(&mut self) -> Result<StepStats, TaskError>;
    /// Evaluates the current parameters on the held-out set.
    fn evaluate(&mut self) -> Result<EvalStats, TaskError>;
    /// The local optimizer's state, for checkpoints; `None` if the task keeps
    /// none worth saving (or has not stepped yet).
    fn optim_state(&self) -> Option<OptimState> {
        None
    }
    /// Restores the optimizer's state from a checkpoint; validates it first.
    fn set_optim_state(&mut self, state: &OptimState) -> Result<(), TaskError> {
        let _ = state;
        Err(TaskError::BadInput(
            "this task keeps no optimizer state to restore".into(),
        ))
    }
}

/// Checks a parameter vector from the swarm before it touches a model.
pub fn validate_params(expected: usize, values: &[f32]) -> Result<(), TaskError> {
    if values.len() != expected {
        return Err(TaskError::ParamLength {
            expected,
            got: values.len(),
        });
    }
    if let Some(index) = p2ptrain_protocol::tensor::first_non_finite(values) {
        return Err(TaskError::NonFinite { index });
    }
    Ok(())
}
