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
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
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

/// Shape of the [`Cnn`]: two 3x3 convolutions with 2x2 max pooling, then one
/// linear layer (28 -> 26 -> 13 -> 11 -> 5 pixels a side).
#[derive(Config, Debug)]
pub struct CnnConfig {
    /// Channels of the first convolution.
    #[config(default = 16)]
    pub channels1: usize,
    /// Channels of the second convolution.
    #[config(default = 32)]
    pub channels2: usize,
    /// Output classes.
    #[config(default = 10)]
    pub classes: usize,
}

/// Side of the feature map entering the CNN's linear layer.
const CNN_FINAL_SIDE: usize = ((IMAGE_SIDE - 2) / 2 - 2) / 2;

impl CnnConfig {
    /// Builds the network on `device` with burn's default (process-RNG) weights;
    /// use [`ModelKind::init`] for seeded, reproducible weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Cnn<B> {
        Cnn {
            conv1: Conv2dConfig::new([1, self.channels1], [3, 3]).init(device),
            conv2: Conv2dConfig::new([self.channels1, self.channels2], [3, 3]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc: LinearConfig::new(
                self.channels2 * CNN_FINAL_SIDE * CNN_FINAL_SIDE,
                self.classes,
            )
            .init(device),
            activation: Relu::new(),
        }
    }
}

/// A small convolutional network for 28x28 digits (12,810 parameters by default).
#[derive(Module, Debug)]
pub struct Cnn<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    pool: MaxPool2d,
    fc: Linear<B>,
    activation: Relu,
}

impl<B: Backend> Cnn<B> {
    /// Logits `[batch, classes]` for flattened 28x28 images `[batch, 784]`.
    pub fn forward(&self, images: Tensor<B, 2>) -> Tensor<B, 2> {
        let [batch, _] = images.dims();
        let x = images.reshape([batch, 1, IMAGE_SIDE, IMAGE_SIDE]);
        let x = self
            .pool
            .forward(self.activation.forward(self.conv1.forward(x)));
        let x = self
            .pool
            .forward(self.activation.forward(self.conv2.forward(x)));
        self.fc.forward(x.flatten(1, 3))
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
        assert_eq!(cnn.num_params(), 12_810);
    }
}
