//! The character-level language model as pipeline stages ([`StageTask`]).
//!
//! One [`CharLmStage`] holds a contiguous slice of the model's layers (see
//! [`model`]), its Adam optimizer and, on the first stage, this peer's shard
//! of the text's training windows. Micro-batches in flight keep their
//! autodiff graph until their output gradient comes back; a non-last stage
//! back-propagates it through the surrogate loss `sum(output * grad)`, whose
//! parameter gradients are exactly those of the real loss. The last stage
//! divides each micro-batch's loss by the micro-batches per step, so the
//! accumulated gradient of a step is the mean over its micro-batches, as in
//! the unsplit model trained on the whole batch.

pub mod model;
pub mod text;

use crate::backend::{CpuBackend, DeviceKind};
use crate::stage::{Forward, StageSpec, StageTask};
use crate::task::{validate_params, OptimState, Shard, TaskError};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};

use crate::adam::TrainOptimizer;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use model::{token_tensor, LmStage, Shape, VOCAB};
use std::collections::HashMap;
use std::sync::Arc;
use text::{TextData, WindowSampler};

/// Micro-batches a stage keeps graphs for at once (bounds memory when
/// gradients never come back; the driver forgets stale ones).
const MAX_IN_FLIGHT: usize = 1024;

/// Settings of the language model and its training; peers of one swarm must agree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CharLmConfig {
    /// Characters of context.
    pub context: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Feed-forward hidden width.
    pub ff: usize,
    /// Text windows per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step (each loss is divided by it).
    pub micro_batches: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Seed of the initial weights and the window order.
    pub seed: u64,
    /// Held-out windows evaluated (from the start of the held-out tail), so
    /// an evaluation through a pipeline stays quick on large texts.
    pub eval_windows: usize,
}

impl Default for CharLmConfig {
    fn default() -> Self {
        CharLmConfig {
            context: 128,
            width: 128,
            blocks: 4,
            heads: 4,
            ff: 512,
            micro_batch: 8,
            micro_batches: 4,
            lr: 1e-3,
            seed: 0,
            eval_windows: 64,
        }
    }
}

impl CharLmConfig {
    /// The model's shape.
    pub fn shape(&self) -> Shape {
        Shape {
            context: self.context,
            width: self.width,
            blocks: self.blocks,
            heads: self.heads,
            ff: self.ff,
        }
    }
}

/// Builds the stage `spec` of the model on the requested device.
pub fn build_stage(
    config: &CharLmConfig,
    spec: StageSpec,
    text: Arc<TextData>,
    device: DeviceKind,
) -> Result<Box<dyn StageTask>, TaskError> {
    match device {
        DeviceKind::Cpu => {
            let device = burn::backend::ndarray::NdArrayDevice::Cpu;
            Ok(Box::new(CharLmStage::<CpuBackend>::new(
                config, spec, text, &device,
            )?))
        }
        DeviceKind::Cuda => build_cuda(config, spec, text),
    }
}

#[cfg(feature = "cuda")]
fn build_cuda(
    config: &CharLmConfig,
    spec: StageSpec,
    text: Arc<TextData>,
) -> Result<Box<dyn StageTask>, TaskError> {
    use crate::backend::CudaBackend;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    // burn panics on first use when the CUDA driver or device is missing.
    let built = catch_unwind(AssertUnwindSafe(|| {
        let device = burn::backend::cuda::CudaDevice::default();
        CharLmStage::<CudaBackend>::new(config, spec, text, &device)
    }));
    match built {
        Ok(stage) => Ok(Box::new(stage?)),
        Err(_) => Err(TaskError::Backend(
            "CUDA is unavailable (no NVIDIA driver or device); use --device cpu".into(),
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn build_cuda(
    _: &CharLmConfig,
    _: StageSpec,
    _: Arc<TextData>,
) -> Result<Box<dyn StageTask>, TaskError> {
    Err(TaskError::Backend(
        "this binary was built without CUDA support; rebuild with --features cuda".into(),
    ))
}

/// A micro-batch's graph kept for its backward pass.
struct InFlight<B: AutodiffBackend> {
    /// The activations it came in with (a later stage), for their gradient.
    input: Option<Tensor<B, 3>>,
    /// What the stage sent on.
    output: Tensor<B, 3>,
    /// The stage's parameters the graph was built with: a step or an
    /// averaged model set before the backward gives the parameters new
    /// autodiff nodes, and burn finds a parameter's gradient by its node.
    built_with: LmStage<B>,
}

/// One pipeline stage of the language model with its optimizer and data.
pub struct CharLmStage<B: AutodiffBackend> {
    spec: StageSpec,
    config: CharLmConfig,
    model: Option<LmStage<B>>,
    optim: TrainOptimizer<LmStage<B>, B>,
    accumulator: GradientsAccumulator<LmStage<B>>,
    accumulated: usize,
    /// Clears Adam moments before they turn subnormal.
    flush: crate::optim_state::TinyMomentFlush,
    in_flight: HashMap<u64, InFlight<B>>,
    text: Arc<TextData>,
    sampler: WindowSampler,
    device: B::Device,
}

fn bad(msg: String) -> TaskError {
    TaskError::BadInput(msg)
}

/// Reads a tensor back from its device; a failed read is a backend error,
/// never an empty vector that would surface later as a refused micro-batch.
fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, TaskError> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| TaskError::Backend(format!("cannot read a tensor back: {e:?}")))
}

impl<B: AutodiffBackend> CharLmStage<B> {
    /// Stage `spec` of the model `config` describes, over `text`.
    pub fn new(
        config: &CharLmConfig,
        spec: StageSpec,
        text: Arc<TextData>,
        device: &B::Device,
    ) -> Result<Self, TaskError> {
        let shape = config.shape();
        if !config.width.is_multiple_of(config.heads.max(1)) || config.micro_batch == 0 {
            return Err(bad(format!(
                "width {} must be a multiple of heads {} and micro-batches need a window",
                config.width, config.heads
            )));
        }
        text.check_context(config.context)
            .map_err(|e| bad(e.to_string()))?;
        let ranges = p2ptrain_protocol::stages::cut_layers(shape.layers(), spec.count)
            .map_err(|e| bad(e.to_string()))?;
        let layers = ranges
            .get(spec.index)
            .cloned()
            .ok_or_else(|| bad(format!("stage {} of {}", spec.index, spec.count)))?;
        Ok(CharLmStage {
            spec,
            config: *config,
            model: Some(LmStage::new(&shape, layers, config.seed, device)),
            optim: crate::adam::optimizer(),
            accumulator: GradientsAccumulator::new(),
            accumulated: 0,
            flush: crate::optim_state::TinyMomentFlush::default(),
            in_flight: HashMap::new(),
            sampler: WindowSampler::new(text.train_windows(config.context), config.seed),
            text,
            device: device.clone(),
        })
    }

    fn model(&self) -> &LmStage<B> {
        self.model
            .as_ref()
            .expect("the model is only taken out inside apply_step")
    }

    fn windows_of(&self, tokens: &[u32]) -> Result<usize, TaskError> {
        let w = self.config.context + 1;
        if tokens.is_empty() || !tokens.len().is_multiple_of(w) {
            return Err(bad(format!(
                "{} token ids are not whole windows of {w}",
                tokens.len()
            )));
        }
        if let Some(t) = tokens.iter().find(|t| **t as usize >= VOCAB) {
            return Err(bad(format!("token id {t} is outside the byte vocabulary")));
        }
        // A stage's memory for a micro-batch grows with its windows (the
        // attention scores alone take windows × heads × context² values per
        // block, kept until the backward): a peer may not send more than
        // the micro-batches this node itself would.
        let windows = tokens.len() / w;
        if windows > self.config.micro_batch {
            return Err(bad(format!(
                "a micro-batch of {windows} windows, more than this stage's {} \
                 (--batch-size / --micro-batches): pipeline peers must use the same ones",
                self.config.micro_batch
            )));
        }
        Ok(windows)
    }

    /// Adds the parameter gradients of a graph built with `built_with` to
    /// those of the next step. They are taken by `built_with`'s autodiff
    /// nodes (the current model's, after a step or a `set_params` since the
    /// forward, would find none and lose them), and added by parameter id,
    /// which steps and `set_params` keep.
    fn accumulate(&mut self, grads: B::Gradients, built_with: &LmStage<B>) {
        let params = GradientsParams::from_grads(grads, built_with);
        let model = self.model.as_ref().expect("model present");
        self.accumulator.accumulate(model, params);
        self.accumulated += 1;
    }

    /// Takes the gradients accumulated since the last step, flattened in
    /// parameter order (zeros for a parameter without one), and forgets
    /// them: how the pipeline's gradients are checked against the unsplit model.
    pub fn take_gradients(&mut self) -> Result<Vec<f32>, TaskError> {
        let grads = self.accumulator.grads();
        self.accumulated = 0;
        let mut collector = GradCollector::<B> {
            grads: &grads,
            values: Vec::new(),
            error: None,
            _backend: std::marker::PhantomData,
        };
        self.model().visit(&mut collector);
        match collector.error {
            Some(e) => Err(e),
            None => Ok(collector.values),
        }
    }
}

struct GradCollector<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    values: Vec<f32>,
    /// The first read-back failure (the visitor cannot return one).
    error: Option<TaskError>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        match self.grads.get::<B::InnerBackend, D>(param.id) {
            Some(g) => match to_vec(g) {
                Ok(v) => self.values.extend(v),
                Err(e) => {
                    self.error.get_or_insert(e);
                }
            },
            None => self
                .values
                .extend(std::iter::repeat_n(0.0, param.val().shape().num_elements())),
        }
    }
}

impl<B: AutodiffBackend> StageTask for CharLmStage<B> {
    fn spec(&self) -> StageSpec {
        self.spec
    }

    fn num_params(&self) -> usize {
        self.model().num_params()
    }

    fn params(&self) -> Vec<f32> {
        crate::params::flatten(self.model())
    }

    fn set_params(&mut self, values: &[f32]) -> Result<(), TaskError> {
        validate_params(self.num_params(), values)?;
        let model = self.model.take().expect("model present");
        self.model = Some(crate::params::write(model, values)?);
        Ok(())
    }

    fn activation_len(&self, windows: usize) -> usize {
        windows * self.config.context * self.config.width
    }

    fn num_train_windows(&self) -> usize {
        self.text.train_windows(self.config.context)
    }

    fn set_shard(&mut self, shard: Shard) {
        self.sampler.reshard(shard);
    }

    fn next_train_tokens(&mut self) -> Result<Vec<u32>, TaskError> {
        let mut tokens = Vec::with_capacity(self.config.micro_batch * (self.config.context + 1));
        for _ in 0..self.config.micro_batch {
            let i = self.sampler.next_index().ok_or(TaskError::EmptyShard)?;
            let window = self.text.train_window(i as usize, self.config.context);
            tokens.extend(window.iter().map(|b| u32::from(*b)));
        }
        Ok(tokens)
    }

    fn skip_micro_batches(&mut self, count: u64) -> u64 {
        let windows = count.saturating_mul(self.config.micro_batch as u64);
        if self.sampler.skip(windows) == 0 {
            return 0;
        }
        count
    }

    fn eval_tokens(&self) -> Vec<Vec<u32>> {
        let ctx = self.config.context;
        let count = self
            .text
            .eval_windows(ctx)
            .min(self.config.eval_windows.max(1));
        let windows: Vec<usize> = (0..count).collect();
        windows
            .chunks(self.config.micro_batch)
            .map(|chunk| {
                chunk
                    .iter()
                    .flat_map(|i| self.text.eval_window(*i, ctx).iter().map(|b| u32::from(*b)))
                    .collect()
            })
            .collect()
    }

    fn forward(
        &mut self,
        id: u64,
        tokens: &[u32],
        input: Option<&[f32]>,
        train: bool,
    ) -> Result<Forward, TaskError> {
        let windows = self.windows_of(tokens)?;
        let (ctx, width) = (self.config.context, self.config.width);
        let mut inputs = Vec::with_capacity(windows * ctx);
        let mut targets = Vec::with_capacity(windows * ctx);
        for w in tokens.chunks(ctx + 1) {
            inputs.extend(w[..ctx].iter().map(|t| i64::from(*t)));
            targets.extend(w[1..].iter().map(|t| i64::from(*t)));
        }
        let model = self.model().clone();
        let (x_in, x) = if self.spec.is_first() {
            (
                None,
                model.embed(token_tensor(inputs, windows, ctx, &self.device)),
            )
        } else {
            let input = input.ok_or_else(|| bad("a later stage needs activations".into()))?;
            if input.len() != windows * ctx * width {
                return Err(bad(format!(
                    "activations hold {} values; {windows} windows need {}",
                    input.len(),
                    windows * ctx * width
                )));
            }
            if let Some(i) = input.iter().position(|v| !v.is_finite()) {
                return Err(TaskError::NonFinite { index: i });
            }
            let t = Tensor::<B, 3>::from_data(
                TensorData::new(input.to_vec(), [windows, ctx, width]),
                &self.device,
            );
            let t = if train { t.require_grad() } else { t };
            (Some(t.clone()), t)
        };
        let out = model.run(x);
        if !self.spec.is_last() {
            let activations = to_vec(out.clone())?;
            if train {
                if self.in_flight.len() >= MAX_IN_FLIGHT {
                    return Err(bad(format!(
                        "{MAX_IN_FLIGHT} micro-batches already wait for their gradient"
                    )));
                }
                self.in_flight.insert(
                    id,
                    InFlight {
                        input: x_in,
                        output: out,
                        built_with: model,
                    },
                );
            }
            return Ok(Forward::Activations(activations));
        }
        let logits = out.reshape([windows * ctx, VOCAB]);
        let targets = Tensor::from_data(TensorData::new(targets, [windows * ctx]), &self.device);
        let loss = CrossEntropyLoss::new(None, &self.device).forward(logits, targets);
        let value = to_vec(loss.clone())?.first().copied().unwrap_or(f32::NAN);
        let mut grad_input = Vec::new();
        if train {
            let grads = loss
                .div_scalar(self.config.micro_batches.max(1) as f32)
                .backward();
            if let Some(g) = x_in.as_ref().and_then(|t| t.grad(&grads)) {
                grad_input = to_vec(g)?;
            }
            self.accumulate(grads, &model);
        }
        Ok(Forward::Loss {
            loss: value,
            tokens: windows * ctx,
            grad_input,
        })
    }

    fn backward(&mut self, id: u64, grad_output: &[f32]) -> Result<Option<Vec<f32>>, TaskError> {
        let InFlight {
            input: x_in,
            output: out,
            built_with,
        } = self
            .in_flight
            .remove(&id)
            .ok_or_else(|| bad(format!("no micro-batch {id} is waiting for its gradient")))?;
        let dims = out.dims();
        if grad_output.len() != dims.iter().product::<usize>() {
            return Err(bad(format!(
                "gradient holds {} values; the activations had {}",
                grad_output.len(),
                dims.iter().product::<usize>()
            )));
        }
        if let Some(i) = grad_output.iter().position(|v| !v.is_finite()) {
            return Err(TaskError::NonFinite { index: i });
        }
        let g =
            Tensor::<B, 3>::from_data(TensorData::new(grad_output.to_vec(), dims), &self.device);
        let grads = (out * g).sum().backward();
        let grad_input = x_in.and_then(|t| t.grad(&grads)).map(to_vec).transpose()?;
        self.accumulate(grads, &built_with);
        Ok(grad_input)
    }

    fn forget(&mut self, id: u64) {
        self.in_flight.remove(&id);
    }

    fn graphs_held(&self) -> usize {
        self.in_flight.len()
    }

    fn apply_step(&mut self) -> Result<usize, TaskError> {
        if self.accumulated == 0 {
            return Ok(0);
        }
        let grads = self.accumulator.grads();
        let model = self.model.take().expect("model present");
        let model = self.optim.step(self.config.lr, model, grads);
        self.flush.after_step(&mut self.optim, &model)?;
        self.model = Some(model);
        Ok(std::mem::take(&mut self.accumulated))
    }

    fn optim_state(&self) -> Option<OptimState> {
        crate::optim_state::export(&self.optim, self.model())
    }

    fn set_optim_state(&mut self, state: &OptimState) -> Result<(), TaskError> {
        // Checked before the running optimizer is taken out: a refused
        // state leaves the moments as they were.
        state.validate(self.num_params())?;
        let optim = std::mem::replace(&mut self.optim, crate::adam::optimizer());
        self.optim = crate::optim_state::import(optim, self.model(), state)?;
        Ok(())
    }
}

/// Generates `n` bytes after `prompt` with the whole model's parameters
/// (the stages' vectors concatenated), sampling at `temperature`.
pub fn sample(
    config: &CharLmConfig,
    params: &[f32],
    prompt: &str,
    n: usize,
    temperature: f32,
    seed: u64,
) -> Result<String, TaskError> {
    type Cpu = burn::backend::NdArray;
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    let shape = config.shape();
    let whole = LmStage::<Cpu>::new(&shape, 0..shape.layers(), config.seed, &device);
    validate_params(whole.num_params(), params)?;
    let whole = crate::params::write(whole, params)?;
    let mut rng = p2ptrain_protocol::rng::Rng::new(seed);
    let mut bytes: Vec<u8> = prompt.as_bytes().to_vec();
    if bytes.is_empty() {
        bytes.push(b'\n');
    }
    for _ in 0..n {
        let start = bytes.len().saturating_sub(shape.context);
        let window: Vec<i64> = bytes[start..].iter().map(|b| i64::from(*b)).collect();
        let len = window.len();
        let logits = whole.run(whole.embed(token_tensor(window, 1, len, &device)));
        let last = to_vec(logits.slice([0..1, len - 1..len, 0..VOCAB]))?;
        let t = temperature.max(1e-3);
        let max = last.iter().cloned().fold(f32::MIN, f32::max);
        let weights: Vec<f64> = last
            .iter()
            .map(|l| f64::from(((l - max) / t).exp()))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut pick = rng.next_f64() * total;
        let mut next = 0u8;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                next = i as u8;
                break;
            }
            pick -= w;
        }
        bytes.push(next);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests;
