//! Adam's moment estimates as flat vectors, and back.
//!
//! burn keeps an optimizer's state keyed by each parameter's `ParamId`, which
//! is drawn afresh every time a model is built, so its own record cannot be
//! reloaded into a restarted process. We store the moments instead in the
//! same order as [`crate::params::flatten`] (burn's module visit order), which
//! depends only on the model's source, and re-key them to the current
//! model's ids on import.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamState, AdaptiveMomentumState, Optimizer};

use crate::adam::{FusedAdam, TrainOptimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::task::{OptimState, TaskError};

type Records<B> = HashMap<ParamId, AdaptorRecord<FusedAdam, B>>;

/// Reads the Adam moments of every parameter of `model` from `optim`, in
/// visit order; `None` before the first step (the optimizer holds no state).
///
/// # Panics
/// If the backend cannot read a tensor back (a lost device), like `params::flatten`.
pub fn export<B, M>(optim: &TrainOptimizer<M, B>, model: &M) -> Option<OptimState>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let records: Records<B> = optim.to_record().into_iter().collect();
    if records.is_empty() {
        return None;
    }
    let n = model.num_params();
    let mut out = Exporter::<B> {
        records: &records,
        state: OptimState {
            time: 0,
            moment_1: Vec::with_capacity(n),
            moment_2: Vec::with_capacity(n),
        },
    };
    model.visit(&mut out);
    Some(out.state)
}

/// Returns `optim` holding `state`'s moments for `model`'s parameters.
/// Checks lengths and finiteness (and that second moments are not negative)
/// first, so a damaged state never reaches the optimizer.
pub fn import<B, M>(
    optim: TrainOptimizer<M, B>,
    model: &M,
    state: &OptimState,
) -> Result<TrainOptimizer<M, B>, TaskError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    state.validate(model.num_params())?;
    let mut importer = Importer::<B> {
        state,
        offset: 0,
        records: HashMap::new(),
    };
    model.visit(&mut importer);
    Ok(optim.load_record(importer.records.into_iter().collect()))
}

/// Moments below this magnitude are set to zero by [`flush_tiny_moments`]:
/// far below anything that moves a step (Adam divides by `sqrt(m2) + 1e-8`),
/// and ~170 decays by Adam's beta1 of 0.9 above the subnormal range.
pub const TINY_MOMENT: f32 = 1e-30;

/// Steps between two [`flush_tiny_moments`] calls: fewer than the ~170 steps
/// a first moment takes to decay from [`TINY_MOMENT`] into the subnormal
/// range, so none gets there.
pub const FLUSH_EVERY: u64 = 100;

/// Zeroes the Adam moments of `optim` smaller than [`TINY_MOMENT`] (nothing
/// changes when there are none).
///
/// Why: a parameter whose gradient stops (an MNIST pixel that is almost
/// always blank) keeps a first moment that shrinks by 0.9 per step until it
/// is subnormal, and subnormal arithmetic takes microcode assists, ~25x
/// slower per value on the x86 machines we measured. After ~1,500 steps 15%
/// of the MLP's first moments were subnormal and a step took 1.5x as long.
/// Flushing the CPU's subnormals would need `unsafe` MXCSR writes, which the
/// workspace forbids (and Rust calls undefined behaviour), so the values are
/// cleared here instead, every [`FLUSH_EVERY`] steps ([`TinyMomentFlush`]).
/// On an error `optim` is left with fresh moments.
pub fn flush_tiny_moments<B, M>(
    optim: &mut TrainOptimizer<M, B>,
    model: &M,
) -> Result<(), TaskError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let Some(mut state) = export(optim, model) else {
        return Ok(());
    };
    let mut flushed = 0usize;
    for v in state.moment_1.iter_mut().chain(state.moment_2.iter_mut()) {
        if *v != 0.0 && v.abs() < TINY_MOMENT {
            *v = 0.0;
            flushed += 1;
        }
    }
    if flushed == 0 {
        return Ok(());
    }
    let taken = std::mem::replace(optim, crate::adam::optimizer());
    *optim = import(taken, model, &state)?;
    Ok(())
}

/// Counts a learner's optimizer steps and runs [`flush_tiny_moments`] every
/// [`FLUSH_EVERY`] of them.
#[derive(Debug, Default)]
pub struct TinyMomentFlush {
    steps: u64,
}

impl TinyMomentFlush {
    /// Starts as if `steps` optimizer steps had been taken (tests only).
    #[cfg(test)]
    pub(crate) fn after(steps: u64) -> Self {
        TinyMomentFlush { steps }
    }

    /// Call after each optimizer step of `optim` on `model`.
    pub fn after_step<B, M>(
        &mut self,
        optim: &mut TrainOptimizer<M, B>,
        model: &M,
    ) -> Result<(), TaskError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
    {
        self.steps += 1;
        if self.steps.is_multiple_of(FLUSH_EVERY) {
            flush_tiny_moments(optim, model)?;
        }
        Ok(())
    }
}

struct Exporter<'a, B: AutodiffBackend> {
    records: &'a Records<B>,
    state: OptimState,
}

fn to_f32<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.try_into_data()
        .expect("reading optimizer state back from the compute device failed")
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("tensor data was converted to f32 just above")
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Exporter<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let n = param.val().shape().num_elements();
        match self.records.get(&param.id) {
            Some(record) => {
                let AdamState { momentum } = record.clone().into_state::<D>();
                self.state.time = self.state.time.max(momentum.time as u64);
                self.state.moment_1.extend(to_f32(momentum.moment_1));
                self.state.moment_2.extend(to_f32(momentum.moment_2));
            }
            // A parameter that never received a gradient has no state yet.
            None => {
                self.state.moment_1.extend(std::iter::repeat_n(0.0, n));
                self.state.moment_2.extend(std::iter::repeat_n(0.0, n));
            }
        }
    }
}

struct Importer<'a, B: AutodiffBackend> {
    state: &'a OptimState,
    offset: usize,
    records: Records<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Importer<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let shape = value.shape();
        let device = value.device();
        let n = shape.num_elements();
        // `validate` checked the total length, so these slices are in bounds.
        let range = self.offset..self.offset + n;
        self.offset += n;
        let tensor = |values: &[f32]| {
            Tensor::<B::InnerBackend, D>::from_data(
                TensorData::new(values[range.clone()].to_vec(), shape.clone()),
                &device,
            )
        };
        let momentum = AdaptiveMomentumState::new(
            self.state.time as usize,
            tensor(&self.state.moment_1),
            tensor(&self.state.moment_2),
        );
        self.records.insert(
            param.id,
            AdaptorRecord::from_state(AdamState::new(momentum)),
        );
    }
}
