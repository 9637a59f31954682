//! A burn module's float parameters as one flat `Vec<f32>`, and back.
//!
//! Peers exchange and average flat vectors; the order is burn's module visit
//! order (struct fields in declaration order, e.g. `fc1.weight, fc1.bias,
//! fc2.weight, ...`), which is fixed by the model's source code and so the
//! same on every peer that runs the same model.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::task::TaskError;
use p2ptrain_protocol::rng::Rng;

/// Number of float values [`flatten`] returns for `module`.
pub fn num_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    module.num_params()
}

/// Copies every float parameter of `module` into one vector, in visit order.
///
/// # Panics
/// If the backend cannot read a tensor back (a lost device); there is no
/// sensible way to continue training then.
pub fn flatten<B: Backend, M: Module<B>>(module: &M) -> Vec<f32> {
    let mut values = Vec::new();
    flatten_into(module, &mut values);
    values
}

/// [`flatten`] into `out`, replacing what it held: a caller that reads the
/// parameters every round reuses one model-sized buffer instead of having
/// the allocator map (and the kernel zero) a fresh one each time.
///
/// # Panics
/// As [`flatten`].
pub fn flatten_into<B: Backend, M: Module<B>>(module: &M, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(module.num_params());
    module.visit(&mut Collector { values: out });
}

/// Returns `module` with its float parameters replaced by `values` (same order
/// as [`flatten`]), keeping each parameter's id, shape, dtype, device and
/// whether it requires a gradient, so the optimizer's state still matches.
pub fn write<B: Backend, M: Module<B>>(module: M, values: &[f32]) -> Result<M, TaskError> {
    let expected = module.num_params();
    if values.len() != expected {
        return Err(TaskError::ParamLength {
            expected,
            got: values.len(),
        });
    }
    Ok(module.map(&mut Writer { values, offset: 0 }))
}

/// Returns `module` with fresh weights drawn from `seed`, independent of the
/// backend and of burn's process-global RNG.
///
/// Each parameter is uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]` (burn's
/// and PyTorch's default for linear and convolution layers), where `fan_in`
/// is the first dimension of a 2-D weight (burn's `Linear` stores
/// `[d_input, d_output]`), the product of all but the first dimension of a
/// 3-D or larger weight (`Conv2d` stores `[out, in, kh, kw]`), and for a 1-D
/// bias that of the weight visited just before it.
pub fn seeded_init<B: Backend, M: Module<B>>(module: M, seed: u64) -> M {
    module.map(&mut SeededInit {
        rng: Rng::new(seed),
        last_fan_in: None,
    })
}

struct Collector<'a> {
    values: &'a mut Vec<f32>,
}

impl<B: Backend> ModuleVisitor<B> for Collector<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let data = param
            .val()
            .try_into_data()
            .expect("reading model parameters back from the compute device failed")
            .convert::<f32>();
        let values = data
            .as_slice::<f32>()
            .expect("tensor data was converted to f32 just above");
        self.values.extend_from_slice(values);
    }
}

struct Writer<'a> {
    values: &'a [f32],
    offset: usize,
}

impl<B: Backend> ModuleMapper<B> for Writer<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let n = param.val().shape().num_elements();
        // `write` checked the total length, so this slice is in bounds.
        let chunk = self.values[self.offset..self.offset + n].to_vec();
        self.offset += n;
        replace(param, chunk)
    }
}

struct SeededInit {
    rng: Rng,
    last_fan_in: Option<usize>,
}

impl<B: Backend> ModuleMapper<B> for SeededInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dims = param.val().dims();
        let fan_in = match D {
            1 => self.last_fan_in.unwrap_or(dims[0]),
            2 => dims[0],
            _ => dims[1..].iter().product(),
        };
        if D >= 2 {
            self.last_fan_in = Some(fan_in);
        }
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let n: usize = dims.iter().product();
        let values = (0..n)
            .map(|_| (2.0 * unit_f32(&mut self.rng) - 1.0) * bound)
            .collect();
        replace(param, values)
    }
}

/// Uniform in [0, 1) with 24 random bits, every value exact in f32, so the
/// initial weights are bit-identical on every platform.
fn unit_f32(rng: &mut Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Swaps a parameter's tensor for one holding `values`, keeping everything else.
fn replace<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
    values: Vec<f32>,
) -> Param<Tensor<B, D>> {
    let (id, old, mapper) = param.consume();
    let device = old.device();
    let dtype = old.dtype();
    let require_grad = old.is_require_grad();
    let data = TensorData::new(values, old.shape());
    let mut tensor = Tensor::<B, D>::from_data(data, (&device, dtype));
    if require_grad {
        tensor = tensor.require_grad();
    }
    Param::from_mapped_value(id, tensor, mapper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Model, ModelKind};
    use burn::backend::{Autodiff, NdArray};
    use burn::optim::GradientsParams;

    type AD = Autodiff<NdArray>;

    /// Shape and require-grad flag of every float parameter, in visit order.
    struct Shapes(Vec<(Vec<usize>, bool)>);
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            self.0.push((t.dims().to_vec(), t.is_require_grad()));
        }
    }
    fn shapes<B: Backend, M: Module<B>>(m: &M) -> Vec<(Vec<usize>, bool)> {
        let mut s = Shapes(Vec::new());
        m.visit(&mut s);
        s.0
    }

    #[test]
    fn round_trip_keeps_shapes_and_grad() {
        let device = Default::default();
        for kind in ModelKind::ALL {
            let model: Model<AD> = kind.init(&device, 3);
            let before = shapes(&model);
            assert!(before.iter().all(|(_, grad)| *grad));
            let values = flatten(&model);
            assert_eq!(values.len(), num_params(&model));
            let changed: Vec<f32> = values
                .iter()
                .enumerate()
                .map(|(i, v)| v + i as f32)
                .collect();
            let model = write(model, &changed).unwrap();
            assert_eq!(flatten(&model), changed);
            assert_eq!(shapes(&model), before);

            // The written model still trains: every parameter receives a gradient.
            let x = Tensor::<AD, 2>::ones([2, 784], &device);
            let loss = model.forward(x).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            assert_eq!(grads.len(), before.len());
        }
    }

    #[test]
    fn write_rejects_wrong_length() {
        let model: Model<NdArray> = ModelKind::Mlp.init(&Default::default(), 1);
        let n = num_params(&model);
        let err = write(model, &vec![0.0; n - 1]).unwrap_err();
        assert!(
            matches!(err, TaskError::ParamLength { got, expected } if got == n - 1 && expected == n)
        );
    }

    #[test]
    fn seeded_init_is_reproducible_and_bounded() {
        let device = Default::default();
        let a = flatten(&ModelKind::Mlp.init::<NdArray>(&device, 42));
        let b = flatten(&ModelKind::Mlp.init::<AD>(&device, 42));
        let c = flatten(&ModelKind::Mlp.init::<NdArray>(&device, 43));
        assert_eq!(a, b, "same seed, different backends: same weights");
        assert_ne!(a, c);
        // fc1.weight then fc1.bias: both bounded by 1/sqrt(784).
        let bound = 1.0 / 28.0;
        assert!(a[..784 * 256 + 256].iter().all(|v| v.abs() <= bound));
        assert!(a[..784 * 256].iter().any(|v| v.abs() > 0.9 * bound));
        // fc3.weight is bounded by 1/sqrt(256), looser than fc1's.
        let fc3 = 784 * 256 + 256 + 256 * 256 + 256;
        assert!(a[fc3..fc3 + 2560].iter().any(|v| v.abs() > bound));
    }
}
