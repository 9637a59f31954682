//! The MNIST models, generic over burn's `Backend`.
//!
//! Both take a batch of flattened, normalised images `[batch, 784]` and return
//! logits `[batch, 10]`, so data handling, the loss and the averaging path do
//! not care which one runs. [`Model`] is the one type the rest of `train` uses.

use std::fmt;
use std::str::FromStr;

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::data::{IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES};
use super::params;
use super::TrainError;

/// Which network to train; every peer of a swarm must pick the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// Multi-layer perceptron 784-256-256-10: fast on a CPU, ~98% on MNIST.
    Mlp,
    /// Small convolutional network: fewer parameters to exchange, slower steps.
    Cnn,
}

impl ModelKind {
    /// Every model, in the order help texts list them.
    pub const ALL: [ModelKind; 2] = [ModelKind::Mlp, ModelKind::Cnn];

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
        }
    }

    /// Builds this model on `device` with weights drawn from `seed` by
    /// [`params::seeded_init`], so every peer (on any backend) that uses the same
    /// seed starts from bit-identical parameters.
    pub fn init<B: Backend>(self, device: &B::Device, seed: u64) -> Model<B> {
        let model = match self {
            ModelKind::Mlp => Model::Mlp(MlpConfig::new().init(device)),
            ModelKind::Cnn => Model::Cnn(CnnConfig::new().init(device)),
        };
        params::seeded_init(model, seed)
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        ModelKind::ALL
            .into_iter()
            .find(|k| k.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = ModelKind::ALL.iter().map(|k| k.name()).collect();
                TrainError::InvalidSetting(format!(
                    "unknown model {s:?}; valid models are: {}",
                    names.join(", ")
                ))
            })
    }
}

/// Shape of the [`Mlp`]; the defaults are the MNIST network peers agree on.
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Input features (flattened pixels).
    #[config(default = 784)]
    pub input: usize,
    /// Width of each of the two hidden layers.
    #[config(default = 256)]
    pub hidden: usize,
    /// Output classes.
    #[config(default = 10)]
    pub classes: usize,
}

impl MlpConfig {
    /// Builds the network on `device` with burn's default (process-RNG) weights;
    /// use [`ModelKind::init`] for seeded, reproducible weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        Mlp {
            fc1: LinearConfig::new(self.input, self.hidden).init(device),
            fc2: LinearConfig::new(self.hidden, self.hidden).init(device),
            fc3: LinearConfig::new(self.hidden, self.classes).init(device),
            activation: Relu::new(),
        }
    }
}

/// Two hidden ReLU layers: the default model, quick enough to step on a CPU.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    fc3: Linear<B>,
    activation: Relu,
}

impl<B: Backend> Mlp<B> {
    /// Logits `[batch, classes]` for flattened images `[batch, input]`.
    pub fn forward(&self, images: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = self.activation.forward(self.fc1.forward(images));
        let x = self.activation.forward(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

/// Shape of the [`Cnn`]: one 5x5 convolution, ReLU, 2x2 max pooling, then a
/// linear layer (28 -> 24 -> 12 pixels a side).
#[derive(Config, Debug)]
pub struct CnnConfig {
    /// Channels of the convolution.
    #[config(default = 16)]
    pub channels: usize,
    /// Side of the square convolution kernel.
    #[config(default = 5)]
    pub kernel: usize,
    /// Output classes.
    #[config(default = 10)]
    pub classes: usize,
}

impl CnnConfig {
    /// Builds the network on `device` with burn's default (process-RNG) weights;
    /// use [`ModelKind::init`] for seeded, reproducible weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Cnn<B> {
        let side = (IMAGE_SIDE + 1 - self.kernel) / 2;
        Cnn {
            conv: Conv2dConfig::new([1, self.channels], [self.kernel, self.kernel]).init(device),
            fc: LinearConfig::new(self.channels * side * side, self.classes).init(device),
            activation: Relu::new(),
        }
    }
}

/// A small convolutional network for 28x28 digits (23,466 parameters by default).
///
/// Written for CPU speed on burn-ndarray, whose convolution and pooling
/// kernels index element by element (seconds per step in a test build): the
/// input gradient of a convolution, needed from a second conv layer on, is a
/// naive transposed convolution, and max pooling is as slow as the rest of
/// the step together. So there is one convolution, on the input (which needs
/// no gradient), computed as im2col + matmul over the weights of a standard
/// [`Conv2d`] (same layout and result as `Conv2d::forward`; a test checks it),
/// and 2x2 max pooling is an elementwise max of shifted slices.
#[derive(Module, Debug)]
pub struct Cnn<B: Backend> {
    conv: Conv2d<B>,
    fc: Linear<B>,
    activation: Relu,
}

impl<B: Backend> Cnn<B> {
    /// Logits `[batch, classes]` for flattened 28x28 images `[batch, 784]`.
    pub fn forward(&self, images: Tensor<B, 2>) -> Tensor<B, 2> {
        let [batch, _] = images.dims();
        let x = images.reshape([batch, IMAGE_SIDE, IMAGE_SIDE]);
        let y = self.activation.forward(self.convolve(x));
        let [_, oh, ow, channels] = y.dims();
        // 2x2 max pooling, channels last: split each spatial axis into
        // (half, 2) and keep the larger of each pair.
        let y = y.reshape([batch, oh / 2, 2, ow / 2, 2, channels]);
        let pair = |t: Tensor<B, 6>, dim: usize| {
            let mut lo: [std::ops::Range<usize>; 6] = t.dims().map(|d| 0..d);
            let mut hi = lo.clone();
            lo[dim] = 0..1;
            hi[dim] = 1..2;
            t.clone().slice(lo).max_pair(t.slice(hi))
        };
        let y = pair(pair(y, 2), 4);
        self.fc
            .forward(y.reshape([batch, (oh / 2) * (ow / 2) * channels]))
    }

    /// `self.conv` (valid padding, stride 1, one input channel) applied to
    /// images `[batch, h, w]`, returning channels last `[batch, oh, ow, out]`.
    /// Every `k x k` patch becomes a row of `[batch * oh * ow, k * k]`, which
    /// is multiplied by the weights `[k * k, out]`.
    fn convolve(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, h, w] = x.dims();
        let [out, _, k, _] = self.conv.weight.val().dims();
        let (oh, ow) = (h + 1 - k, w + 1 - k);
        let mut shifted = Vec::with_capacity(k * k);
        for kh in 0..k {
            for kw in 0..k {
                let s = x.clone().slice([0..batch, kh..kh + oh, kw..kw + ow]);
                shifted.push(s.unsqueeze_dim::<4>(3));
            }
        }
        // Patch column kh*k + kw matches the weight's [out, 1, kh, kw] layout.
        let patches = Tensor::cat(shifted, 3).reshape([batch * oh * ow, k * k]);
        let weight = self.conv.weight.val().reshape([out, k * k]).transpose();
        let mut y = patches.matmul(weight);
        if let Some(bias) = &self.conv.bias {
            y = y + bias.val().unsqueeze::<2>();
        }
        y.reshape([batch, oh, ow, out])
    }
}

/// Either MNIST model behind one type, so the task, the optimizer and the
/// parameter exchange are written once.
#[derive(Module, Debug)]
pub enum Model<B: Backend> {
    /// The [`Mlp`].
    Mlp(Mlp<B>),
    /// The [`Cnn`].
    Cnn(Cnn<B>),
}

impl<B: Backend> Model<B> {
    /// Logits `[batch, 10]` for flattened, normalised images `[batch, 784]`.
    pub fn forward(&self, images: Tensor<B, 2>) -> Tensor<B, 2> {
        debug_assert_eq!(images.dims()[1], IMAGE_PIXELS);
        let logits = match self {
            Model::Mlp(m) => m.forward(images),
            Model::Cnn(m) => m.forward(images),
        };
        debug_assert_eq!(logits.dims()[1], NUM_CLASSES);
        logits
    }

    /// Which model this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Model::Mlp(_) => ModelKind::Mlp,
            Model::Cnn(_) => ModelKind::Cnn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    #[test]
    fn model_kind_parses_and_prints() {
        assert_eq!("mlp".parse::<ModelKind>().unwrap(), ModelKind::Mlp);
        assert_eq!(" CNN ".parse::<ModelKind>().unwrap(), ModelKind::Cnn);
        assert_eq!(ModelKind::Cnn.to_string(), "cnn");
        let msg = "resnet".parse::<ModelKind>().unwrap_err().to_string();
        assert!(msg.contains("resnet") && msg.contains("mlp, cnn"), "{msg}");
    }

    #[test]
    fn both_models_map_784_to_10() {
        let device = Default::default();
        for kind in ModelKind::ALL {
            let model = kind.init::<B>(&device, 1);
            assert_eq!(model.kind(), kind);
            let out = model.forward(Tensor::zeros([3, IMAGE_PIXELS], &device));
            assert_eq!(out.dims(), [3, NUM_CLASSES]);
        }
        let mlp = ModelKind::Mlp.init::<B>(&device, 1);
        assert_eq!(
            mlp.num_params(),
            784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
        );
        let cnn = ModelKind::Cnn.init::<B>(&device, 1);
        assert_eq!(cnn.num_params(), 16 * 25 + 16 + 16 * 12 * 12 * 10 + 10);
    }

    #[test]
    fn cnn_pooling_matches_burn_max_pool() {
        use burn::nn::pool::MaxPool2dConfig;
        let device = Default::default();
        let Model::Cnn(cnn) = ModelKind::Cnn.init::<B>(&device, 4) else {
            unreachable!("asked for a CNN")
        };
        let x = Tensor::<B, 2>::random(
            [3, IMAGE_PIXELS],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        // Reference: burn's conv + ReLU + MaxPool2d, flattened channels last.
        let conv = cnn
            .conv
            .forward(x.clone().reshape([3, 1, IMAGE_SIDE, IMAGE_SIDE]));
        let pooled = MaxPool2dConfig::new([2, 2])
            .init()
            .forward(burn::tensor::activation::relu(conv))
            .permute([0, 2, 3, 1])
            .reshape([3, 12 * 12 * 16]);
        let reference = cnn.fc.forward(pooled).into_data();
        reference.assert_approx_eq::<f32>(&cnn.forward(x).into_data(), Default::default());
    }

    #[test]
    fn cnn_im2col_matches_burn_conv2d() {
        let device = Default::default();
        let Model::Cnn(cnn) = ModelKind::Cnn.init::<B>(&device, 4) else {
            unreachable!("asked for a CNN")
        };
        let x = Tensor::<B, 4>::random(
            [2, 1, IMAGE_SIDE, IMAGE_SIDE],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let ours = cnn
            .convolve(x.clone().reshape([2, IMAGE_SIDE, IMAGE_SIDE]))
            .into_data();
        let burns = cnn.conv.forward(x).permute([0, 2, 3, 1]).into_data();
        ours.assert_approx_eq::<f32>(&burns, burn::tensor::Tolerance::default());
    }
}
