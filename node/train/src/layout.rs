//! Names and shapes of a model's parameters, in the order of its flat vector.
//!
//! Peers and checkpoints carry parameters as one flat `Vec<f32>` (see
//! [`crate::params`]); exporting them for other tools (safetensors for
//! PyTorch) needs each tensor's name and shape back. burn's module visitor
//! reports the field path of every parameter while it walks the module in
//! the same order as [`crate::params::flatten`], so the layout comes from the
//! model's own definition and cannot drift from it.

use std::ops::Range;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::lm::model::LmStage;
use crate::lm::CharLmConfig;
use crate::model::ModelKind;
use crate::task::TaskError;

/// Which kind of layer field a parameter is, where another framework lays
/// it out or names it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// `weight` of a burn `Linear`, stored `[d_input, d_output]` (PyTorch: `[out, in]`).
    LinearWeight,
    /// `gamma` of a burn `LayerNorm` (PyTorch: `weight`).
    NormGamma,
    /// `beta` of a burn `LayerNorm` (PyTorch: `bias`).
    NormBeta,
    /// Anything laid out and named the same way in PyTorch.
    Plain,
}

/// One float parameter of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Dotted field path, e.g. `fc1.weight` or `blocks.2.mha.query.weight`.
    pub name: String,
    /// burn's shape of the tensor.
    pub shape: Vec<usize>,
    /// What kind of field it is.
    pub role: ParamRole,
}

impl ParamInfo {
    /// Values this parameter holds.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the parameter holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parameters of `module` in flat-vector order, named by their field
/// paths. Enum variants (such as `Model::Mlp`) are not part of the names.
pub fn layout<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    let mut walker = Walker::default();
    module.visit(&mut walker);
    walker.found
}

/// The layout of an MNIST model.
pub fn mnist_layout(kind: ModelKind) -> Vec<ParamInfo> {
    let model = kind.init::<burn::backend::NdArray>(&Default::default(), 0);
    layout(&model)
}

/// The layout of stage `index` of a char-lm cut into `count` stages. Block
/// names carry their index in the whole model (`blocks.3.…` is the fourth
/// block whichever stage holds it), so the stages' layouts concatenated are
/// the whole model's.
pub fn char_lm_stage_layout(
    config: &CharLmConfig,
    index: usize,
    count: usize,
) -> Result<Vec<ParamInfo>, TaskError> {
    let shape = config.shape();
    let ranges = p2ptrain_protocol::stages::cut_layers(shape.layers(), count)
        .map_err(|e| TaskError::BadInput(e.to_string()))?;
    let layers: Range<usize> = ranges.get(index).cloned().ok_or_else(|| {
        TaskError::BadInput(format!("there is no stage {index} of {count} stages"))
    })?;
    // Layer 0 is the embedding, so the first block in `layers` is block
    // `max(start, 1) - 1` of the whole model.
    let first_block = layers.start.max(1) - 1;
    let stage = LmStage::<burn::backend::NdArray>::new(&shape, layers, 0, &Default::default());
    let mut params = layout(&stage);
    for p in &mut params {
        if let Some(rest) = p.name.strip_prefix("blocks.") {
            if let Some((local, tail)) = rest.split_once('.') {
                if let Ok(local) = local.parse::<usize>() {
                    p.name = format!("blocks.{}.{tail}", first_block + local);
                }
            }
        }
    }
    Ok(params)
}

#[derive(Default)]
struct Walker {
    /// Field names entered so far, with their container's type.
    path: Vec<(String, String)>,
    found: Vec<ParamInfo>,
}

impl<B: Backend> ModuleVisitor<B> for Walker {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = self
            .path
            .iter()
            .filter(|(_, container)| !container.starts_with("Enum:"))
            .map(|(field, _)| field.as_str())
            .collect::<Vec<_>>()
            .join(".");
        let role = match self.path.last() {
            Some((field, container)) => match (container.as_str(), field.as_str()) {
                ("Struct:Linear", "weight") => ParamRole::LinearWeight,
                ("Struct:LayerNorm", "gamma") => ParamRole::NormGamma,
                ("Struct:LayerNorm", "beta") => ParamRole::NormBeta,
                _ => ParamRole::Plain,
            },
            None => ParamRole::Plain,
        };
        self.found.push(ParamInfo {
            name,
            shape: param.val().dims().to_vec(),
            role,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::num_params;

    #[test]
    fn mlp_layout_names_its_layers() {
        let l = mnist_layout(ModelKind::Mlp);
        let names: Vec<(&str, &[usize])> = l
            .iter()
            .map(|p| (p.name.as_str(), p.shape.as_slice()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("fc1.weight", &[784, 256][..]),
                ("fc1.bias", &[256][..]),
                ("fc2.weight", &[256, 256][..]),
                ("fc2.bias", &[256][..]),
                ("fc3.weight", &[256, 10][..]),
                ("fc3.bias", &[10][..]),
            ]
        );
        assert_eq!(l[0].role, ParamRole::LinearWeight);
        assert_eq!(l[1].role, ParamRole::Plain);
    }

    #[test]
    fn layouts_cover_the_flat_vector() {
        for kind in ModelKind::ALL {
            let model = kind.init::<burn::backend::NdArray>(&Default::default(), 0);
            let total: usize = mnist_layout(kind).iter().map(ParamInfo::len).sum();
            assert_eq!(total, num_params(&model), "{kind}");
        }
        let cnn = mnist_layout(ModelKind::Cnn);
        assert_eq!(cnn[0].name, "conv.weight");
        assert_eq!(cnn[0].shape, vec![16, 1, 5, 5]);
    }

    #[test]
    fn char_lm_stages_concatenate_to_the_whole_model() {
        let config = CharLmConfig::default();
        let whole = char_lm_stage_layout(&config, 0, 1).unwrap();
        let mut cut = Vec::new();
        for i in 0..3 {
            cut.extend(char_lm_stage_layout(&config, i, 3).unwrap());
        }
        assert_eq!(cut, whole);
        assert_eq!(whole[0].name, "embed.weight");
        assert!(whole.iter().any(|p| p.name.starts_with("blocks.3.")));
        assert!(whole.iter().any(|p| p.role == ParamRole::NormGamma));
        assert!(char_lm_stage_layout(&config, 3, 3).is_err());
    }
}
