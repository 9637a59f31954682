//! The seam between the pipeline driver and one pipeline stage's compute.
//!
//! A model cut into stages trains as a pipeline: the first stage turns token
//! windows into activations, middle stages turn activations into
//! activations, the last stage turns activations into a loss. Micro-batches
//! flow forward stage by stage over the network and the loss's gradient
//! with respect to each stage's input flows back. The driver moves flat
//! `f32` vectors and token windows between peers and never sees a tensor;
//! a [`StageTask`] keeps each in-flight micro-batch's autodiff graph until
//! its gradient comes back (or the driver tells it to forget it).

use crate::task::{OptimState, TaskError};

/// Which part of the model a stage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    /// This stage's index, from 0 (embedding side) to `count - 1` (loss side).
    pub index: usize,
    /// Stages the model is cut into.
    pub count: usize,
}

impl StageSpec {
    /// The whole model in one stage (no pipeline).
    pub fn whole() -> Self {
        Self { index: 0, count: 1 }
    }
    /// The stage that reads token windows.
    pub fn is_first(&self) -> bool {
        self.index == 0
    }
    /// The stage that computes the loss.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// What a stage's forward pass produced for one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Forward {
    /// A non-last stage's output activations, flat `[batch, context, width]`,
    /// to send to the next stage. The graph is kept until
    /// [`StageTask::backward`] or [`StageTask::forget`] for this micro-batch.
    Activations(Vec<f32>),
    /// The last stage's result: the micro-batch's mean loss in nats per token
    /// and, in training, the gradient with respect to the stage's input of
    /// the micro-batch's share of the step's loss (its loss divided by the
    /// micro-batches per step) (flat `[batch, context, width]`; empty when the last
    /// stage is also the first, or in evaluation). The last stage has
    /// already accumulated its own parameter gradients.
    Loss {
        /// Mean cross-entropy over the micro-batch's predicted tokens, in nats.
        loss: f32,
        /// Predicted tokens in the micro-batch (to weight means across micro-batches).
        tokens: usize,
        /// d loss / d input of this stage.
        grad_input: Vec<f32>,
    },
}

/// One pipeline stage's local learner: a contiguous slice of a model's
/// layers, its optimizer, and (for the first stage) the token data.
///
/// Runs on the compute thread. Gradients accumulate over micro-batches until
/// [`StageTask::apply_step`], so a step's update is the mean over the
/// micro-batches of one batch, as in the unsplit model.
pub trait StageTask: Send + 'static {
    /// Which slice of the model this is.
    fn spec(&self) -> StageSpec;
    /// Length of this stage's flat parameter vector (what its replicas average).
    fn num_params(&self) -> usize;
    /// This stage's parameters, flattened in a fixed order; the stages'
    /// vectors concatenated in stage order are the whole model's vector.
    fn params(&self) -> Vec<f32>;
    /// Replaces this stage's parameters; validates length and finiteness first.
    fn set_params(&mut self, values: &[f32]) -> Result<(), TaskError>;
    /// Values in one activation vector for a micro-batch of `windows` windows.
    fn activation_len(&self, windows: usize) -> usize;
    /// Training windows in the data set (for sharding across first-stage replicas).
    fn num_train_windows(&self) -> usize;
    /// First stage: restricts sampling to this peer's shard of the windows.
    fn set_shard(&mut self, shard: crate::task::Shard);
    /// First stage: the next training micro-batch, `windows * (context + 1)`
    /// token ids (each window's inputs followed by the one-token-shifted targets).
    fn next_train_tokens(&mut self) -> Result<Vec<u32>, TaskError>;
    /// First stage: moves the window order on by `count` micro-batches, as
    /// if they had been drawn, so a stage resumed from its checkpoint goes
    /// on where its passes over its shard stood instead of at their start;
    /// returns the micro-batches moved past (0 without a shard).
    fn skip_micro_batches(&mut self, count: u64) -> u64;
    /// First stage: the held-out micro-batches, in a fixed order, each as
    /// [`StageTask::next_train_tokens`] lays them out.
    fn eval_tokens(&self) -> Vec<Vec<u32>>;
    /// Runs this stage on micro-batch `id`. `tokens` travel with every
    /// micro-batch (the first stage embeds them, the last takes its targets
    /// from them); `input` is the previous stage's activations (`None` for
    /// the first stage). With `train` false nothing is kept for backward.
    fn forward(
        &mut self,
        id: u64,
        tokens: &[u32],
        input: Option<&[f32]>,
        train: bool,
    ) -> Result<Forward, TaskError>;
    /// Non-last stages: back-propagates `grad_output` (d loss / d this
    /// stage's output) for micro-batch `id`, accumulates parameter
    /// gradients, and returns d loss / d input (`None` for the first stage).
    fn backward(&mut self, id: u64, grad_output: &[f32]) -> Result<Option<Vec<f32>>, TaskError>;
    /// Drops micro-batch `id`'s saved graph: its gradient will never come.
    fn forget(&mut self, id: u64);
    /// Micro-batches whose graphs this stage keeps for their backward pass
    /// right now: what its activation memory grows with, and what the
    /// pipeline schedule bounds.
    fn graphs_held(&self) -> usize;
    /// One optimizer step with the mean of the gradients accumulated since
    /// the last step; returns the micro-batches it covered (0: nothing to do).
    fn apply_step(&mut self) -> Result<usize, TaskError>;
    /// The stage's optimizer state (Adam's moments), so a checkpoint resumes
    /// the run where it stopped rather than with fresh moments; `None`
    /// before the first step.
    fn optim_state(&self) -> Option<OptimState>;
    /// Restores the optimizer state a checkpoint of this stage holds;
    /// validates lengths and values first.
    fn set_optim_state(&mut self, state: &OptimState) -> Result<(), TaskError>;
}
