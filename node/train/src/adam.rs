//! Adam with each parameter's update fused into one pass on the CPU.
//!
//! burn's Adam applies its update as about a dozen separate tensor
//! operations per parameter, each a pass over memory with a fresh buffer; on
//! the ndarray backend that made Adam 1.47x PyTorch's fused step for the
//! MNIST MLP. [`FusedAdam`] does the same arithmetic, in the same order and
//! precision (so bit for bit the same results), in one loop over the
//! parameter, its gradient and both moments. On any other backend (CUDA) it
//! hands the step to burn's Adam, where the tensors stay on the device. Its
//! state is burn's [`AdamState`], so checkpoints and
//! [`optim_state`](crate::optim_state) see no difference.

use std::any::TypeId;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::LearningRate;
use burn::optim::{Adam, AdamConfig, AdamState, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};

/// burn's `AdamConfig` defaults, which every learner here uses.
const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

/// The CPU backend the fused loop runs on.
type Cpu = burn::backend::NdArray;

/// The optimizer every learner here uses: Adam with burn's defaults.
pub type TrainOptimizer<M, B> = OptimizerAdaptor<FusedAdam, M, B>;

/// A fresh [`TrainOptimizer`].
pub fn optimizer<B: AutodiffBackend, M: AutodiffModule<B>>() -> TrainOptimizer<M, B> {
    OptimizerAdaptor::from(FusedAdam {
        fallback: AdamConfig::new()
            .with_beta_1(BETA_1)
            .with_beta_2(BETA_2)
            .with_epsilon(EPSILON)
            .build(),
    })
}

/// Adam (no weight decay, no AMSGrad); see the module docs.
#[derive(Clone)]
pub struct FusedAdam {
    /// burn's Adam with the same settings, for backends other than ndarray.
    fallback: Adam,
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdam {
    type State<const D: usize> = AdamState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let on_cpu = TypeId::of::<B>() == TypeId::of::<Cpu>();
        let all_f32 = tensor.dtype() == DType::F32
            && grad.dtype() == DType::F32
            && state.as_ref().is_none_or(|s| {
                s.momentum.moment_1.dtype() == DType::F32
                    && s.momentum.moment_2.dtype() == DType::F32
                    && s.momentum.max_moment_2.is_none()
            });
        if !(on_cpu && all_f32) {
            return self.fallback.step(lr, tensor, grad, state);
        }
        fused_step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <Adam as SimpleOptimizer<B>>::to_device(state, device)
    }
}

/// One Adam step of one parameter as a single loop over host copies of the
/// tensors (cheap on ndarray, where they live in host memory anyway).
fn fused_step<B: Backend, const D: usize>(
    lr: LearningRate,
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    state: Option<AdamState<B, D>>,
) -> (Tensor<B, D>, Option<AdamState<B, D>>) {
    let device = tensor.device();
    let shape = tensor.shape();
    let n = shape.num_elements();
    // ndarray hands over a tensor's buffer without copying only when
    // nothing else holds it; otherwise it copies element by element through
    // a dynamic-rank iterator (~5 ns a value, more than the whole update).
    // The parameter and its gradient are still shared with the module and
    // the autodiff graph here, so one exact vectorised pass (x * 1.0) gives
    // each a buffer of its own to hand over.
    let mut params = tensor.mul_scalar(1.0).into_data();
    let grad = grad.mul_scalar(1.0).into_data();
    let (time, mut m1, mut m2) = match state {
        Some(s) => (
            s.momentum.time,
            s.momentum.moment_1.into_data(),
            s.momentum.moment_2.into_data(),
        ),
        // burn starts the moments at (1 - beta) * g, which is what the
        // update below gives from zero moments, bit for bit.
        None => (
            0,
            TensorData::new(vec![0f32; n], shape.clone()),
            TensorData::new(vec![0f32; n], shape.clone()),
        ),
    };
    let time = time.saturating_add(1);
    let t = i32::try_from(time).unwrap_or(i32::MAX);
    let bias_correction2_sqrt = (1.0 - BETA_2.powi(t)).sqrt();
    let combined_factor = bias_correction2_sqrt / (1.0 - BETA_1.powi(t));
    let denominator_eps = EPSILON * bias_correction2_sqrt;
    let lr = lr as f32;
    if let (Ok(p), Ok(g), Ok(m1s), Ok(m2s)) = (
        params.as_mut_slice::<f32>(),
        grad.as_slice::<f32>(),
        m1.as_mut_slice::<f32>(),
        m2.as_mut_slice::<f32>(),
    ) {
        for (((p, g), a), v) in p.iter_mut().zip(g).zip(m1s).zip(m2s) {
            // The operations of burn's Adam, in its order: each rounded to f32.
            *a = *a * BETA_1 + *g * (1.0 - BETA_1);
            *v = *v * BETA_2 + (*g * *g) * (1.0 - BETA_2);
            let update = (*a * combined_factor) / (v.sqrt() + denominator_eps);
            *p -= update * lr;
        }
    }
    let momentum = AdaptiveMomentumState::new(
        time,
        Tensor::from_data(m1, &device),
        Tensor::from_data(m2, &device),
    );
    (
        Tensor::from_data(params, &device),
        Some(AdamState::new(momentum)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::model::ModelKind;
    use crate::params;
    use burn::optim::{GradientsParams, Optimizer};
    use burn::tensor::{Distribution, Int};

    /// Ten steps of the MLP with burn's Adam and with ours, from the same
    /// start on the same batches: bit for bit the same parameters.
    #[test]
    fn fused_steps_equal_burns_adam_bit_for_bit() {
        type B = CpuBackend;
        let device = Default::default();
        let start = ModelKind::Mlp.init::<B>(&device, 7);
        let (mut ours, mut theirs) = (start.clone(), start);
        let mut fused = optimizer::<B, _>();
        let mut reference = AdamConfig::new().init();
        let labels: Vec<i64> = (0..32).map(|i| i % 10).collect();
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [32]), &device);
        for step in 0..10 {
            let x = Tensor::<B, 2>::random([32, 784], Distribution::Normal(0.0, 1.0), &device);
            let loss_of = |m: &crate::model::Model<B>| {
                burn::nn::loss::CrossEntropyLoss::new(None, &device)
                    .forward(m.forward(x.clone()), y.clone())
            };
            let g = GradientsParams::from_grads(loss_of(&ours).backward(), &ours);
            ours = fused.step(1e-3, ours, g);
            let g = GradientsParams::from_grads(loss_of(&theirs).backward(), &theirs);
            theirs = reference.step(1e-3, theirs, g);
            let (a, b) = (params::flatten(&ours), params::flatten(&theirs));
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "step {step}: parameters differ");
        }
    }
}
