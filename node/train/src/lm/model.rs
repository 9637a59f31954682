//! The character-level transformer, as a list of layers any contiguous
//! slice of which is a module of its own (a pipeline stage).
//!
//! Layers: 0 = byte embedding + learned positions, 1..=blocks = pre-norm
//! transformer blocks with causal self-attention, blocks + 1 = final norm and
//! the 256-way output head. A stage's fields are in layer order, so the
//! stages' flat parameter vectors concatenated in stage order are the whole
//! model's vector.

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use p2ptrain_protocol::rng::Rng;
use std::ops::Range;

/// Byte vocabulary.
pub const VOCAB: usize = 256;

/// Shape of the model; peers of one swarm must agree on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Characters of context.
    pub context: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Hidden width of each block's feed-forward layer.
    pub ff: usize,
}

impl Shape {
    /// Layers of the layer list (embedding, blocks, head).
    pub fn layers(&self) -> usize {
        self.blocks + 2
    }
}

/// A contiguous slice of the model's layers.
#[derive(Module, Debug)]
pub struct LmStage<B: Backend> {
    embed: Option<Embedding<B>>,
    positions: Option<Embedding<B>>,
    blocks: Vec<TransformerEncoder<B>>,
    norm: Option<LayerNorm<B>>,
    head: Option<Linear<B>>,
}

impl<B: Backend> LmStage<B> {
    /// The layers `layers` (a range of the layer list) with weights drawn from `seed`.
    pub fn new(shape: &Shape, layers: Range<usize>, seed: u64, device: &B::Device) -> Self {
        let has = |l: usize| layers.contains(&l);
        let block = TransformerEncoderConfig::new(shape.width, shape.ff, shape.heads, 1)
            .with_norm_first(true)
            .with_dropout(0.0);
        // One seeded stream per layer, so any cut of the layer list (and every
        // replica of a stage) starts from the same weights as the whole model.
        let init = |layer: usize| SeededInit {
            rng: Rng::new(seed ^ (layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        };
        let head = shape.blocks + 1;
        let (embed, positions) = if has(0) {
            let mut i = init(0);
            (
                Some(
                    EmbeddingConfig::new(VOCAB, shape.width)
                        .init(device)
                        .map(&mut i),
                ),
                Some(
                    EmbeddingConfig::new(shape.context, shape.width)
                        .init(device)
                        .map(&mut i),
                ),
            )
        } else {
            (None, None)
        };
        let (norm, head_linear) = if has(head) {
            let mut i = init(head);
            (
                Some(LayerNormConfig::new(shape.width).init(device).map(&mut i)),
                Some(
                    LinearConfig::new(shape.width, VOCAB)
                        .init(device)
                        .map(&mut i),
                ),
            )
        } else {
            (None, None)
        };
        LmStage {
            embed,
            positions,
            blocks: (1..=shape.blocks)
                .filter(|l| has(*l))
                .map(|l| block.init(device).map(&mut init(l)))
                .collect(),
            norm,
            head: head_linear,
        }
    }

    /// Whether this stage embeds tokens.
    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    /// Whether this stage ends in the output head.
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// First stage: token ids `[windows, context]` to the residual stream.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [windows, context] = tokens.dims();
        let device = tokens.device();
        let (Some(embed), Some(positions)) = (&self.embed, &self.positions) else {
            unreachable!("embed is only called on the first stage");
        };
        let pos = Tensor::<B, 1, Int>::arange(0..context as i64, &device)
            .reshape([1, context])
            .repeat_dim(0, windows);
        embed.forward(tokens) + positions.forward(pos)
    }

    /// The blocks and (last stage) the head: residual stream to residual
    /// stream, or to logits `[windows, context, 256]`.
    pub fn run(&self, mut x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [windows, context, _] = x.dims();
        if !self.blocks.is_empty() {
            let mask = generate_autoregressive_mask::<B>(windows, context, &x.device());
            for block in &self.blocks {
                x = block.forward(TransformerEncoderInput::new(x).mask_attn(mask.clone()));
            }
        }
        if let (Some(norm), Some(head)) = (&self.norm, &self.head) {
            x = head.forward(norm.forward(x));
        }
        x
    }
}

/// Token ids as an int tensor `[rows, cols]`.
pub fn token_tensor<B: Backend>(
    ids: Vec<i64>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids, [rows, cols]), device)
}

/// Deterministic initialisation independent of burn's global RNG: matrices
/// uniform in ±1/sqrt(fan in); vectors keep a constant initialisation (layer
/// norm scale 1, offset 0) and are otherwise zeroed (biases).
struct SeededInit {
    rng: Rng,
}

impl<B: Backend> ModuleMapper<B> for SeededInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let device = tensor.device();
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if D == 1 {
            let current = tensor
                .clone()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default();
            let first = current.first().copied().unwrap_or(0.0);
            if current.iter().all(|v| *v == first) {
                current
            } else {
                vec![0.0; n]
            }
        } else {
            let bound = 1.0 / (dims[0].max(1) as f32).sqrt();
            (0..n)
                .map(|_| ((2.0 * self.rng.next_f64() - 1.0) as f32) * bound)
                .collect()
        };
        let fresh = Tensor::<B, D>::from_data(TensorData::new(values, dims), &device);
        let fresh = if tensor.is_require_grad() {
            fresh.require_grad()
        } else {
            fresh
        };
        Param::from_mapped_value(id, fresh, mapper)
    }
}
