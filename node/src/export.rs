//! `p2ptrain export`: a checkpoint's parameters as a safetensors file, named
//! and laid out the way PyTorch's modules expect, so a PyTorch user can load
//! what the swarm trained without our code.
//!
//! Checkpoints hold one flat vector; its layout (names, shapes, order) comes
//! from the model's own definition ([`crate::train::layout`]). Two burn
//! conventions differ from PyTorch's and are converted: a `Linear` weight is
//! stored `[in, out]` (PyTorch: `[out, in]`, so it is transposed), and a
//! `LayerNorm`'s `gamma`/`beta` are PyTorch's `weight`/`bias`.

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::driver::parse_stage_model_name;
use crate::train::layout::{char_lm_stage_layout, mnist_layout, ParamInfo, ParamRole};
use crate::train::lm::CharLmConfig;
use crate::train::model::ModelKind;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a checkpoint could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint could not be read or failed its checks.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint holds a model export does not know the layout of.
    #[error("cannot export model `{model}`: export knows mlp, cnn and char-lm stage checkpoints")]
    Unsupported {
        /// The checkpoint's model name.
        model: String,
    },
    /// The parameters do not fill the model's layout (another version's model).
    #[error(
        "checkpoint of `{model}` holds {got} parameters, but this version's {model} has {want}"
    )]
    SizeMismatch {
        /// The checkpoint's model name.
        model: String,
        /// Parameters in the checkpoint.
        got: usize,
        /// Parameters the layout needs.
        want: usize,
    },
    /// The directory holds no checkpoint itself, but directories in it do
    /// (a testnet's, one per node).
    #[error(
        "{} holds no checkpoint itself, but {} do (one per node, as a testnet writes them): export one of them",
        dir.display(),
        nodes.iter().map(|n| n.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    PerNode {
        /// The directory named.
        dir: PathBuf,
        /// The directories in it that hold checkpoints.
        nodes: Vec<PathBuf>,
    },
    /// The output exists and `--force` was not given.
    #[error("{} exists; pass --force to replace it", .0.display())]
    Exists(PathBuf),
    /// The output is a checkpoint (the one exported, say) or a run record:
    /// never replaced, `--force` or not.
    #[error("{} is a checkpoint or a run record; export writes over neither, --force or not: give another --out", .0.display())]
    WouldReplaceRunData(PathBuf),
    /// Writing the output failed (nothing was left at the output path).
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The safetensors encoder refused the tensors.
    #[error("cannot encode safetensors: {0}")]
    Encode(String),
}

/// One tensor as PyTorch names and lays it out.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    /// Module path, e.g. `fc1.weight`.
    pub name: String,
    /// PyTorch's shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// Tensors written.
    pub tensors: usize,
    /// Values written.
    pub values: usize,
}

/// The layout of the model a checkpoint's metadata names.
pub fn layout_of(model: &str) -> Result<Vec<ParamInfo>, ExportError> {
    if let Ok(kind) = model.parse::<ModelKind>() {
        return Ok(mnist_layout(kind));
    }
    if let Some((stage, stages)) = parse_stage_model_name(model) {
        return char_lm_stage_layout(&CharLmConfig::default(), stage as usize, stages as usize)
            .map_err(|_| ExportError::Unsupported {
                model: model.to_string(),
            });
    }
    Err(ExportError::Unsupported {
        model: model.to_string(),
    })
}

/// Cuts `params` along `layout` into PyTorch-named, PyTorch-shaped tensors.
pub fn torch_tensors(
    model: &str,
    layout: &[ParamInfo],
    params: &[f32],
) -> Result<Vec<TorchTensor>, ExportError> {
    let want: usize = layout.iter().map(ParamInfo::len).sum();
    if want != params.len() {
        return Err(ExportError::SizeMismatch {
            model: model.to_string(),
            got: params.len(),
            want,
        });
    }
    let mut offset = 0;
    let mut out = Vec::with_capacity(layout.len());
    for p in layout {
        let values = &params[offset..offset + p.len()];
        offset += p.len();
        out.push(match (p.role, p.shape.as_slice()) {
            (ParamRole::LinearWeight, &[d_in, d_out]) => TorchTensor {
                name: p.name.clone(),
                shape: vec![d_out, d_in],
                values: transpose(values, d_in, d_out),
            },
            (ParamRole::NormGamma, _) => renamed(p, values, "weight"),
            (ParamRole::NormBeta, _) => renamed(p, values, "bias"),
            _ => TorchTensor {
                name: p.name.clone(),
                shape: p.shape.clone(),
                values: values.to_vec(),
            },
        });
    }
    Ok(out)
}

/// Exports the checkpoint at `checkpoint` (a file, or a directory whose
/// newest checkpoint of the run written last is taken) to `out`, atomically:
/// the file appears whole or not at all.
pub fn export_file(checkpoint: &Path, out: &Path, force: bool) -> Result<Exported, ExportError> {
    let ckpt = if checkpoint.is_dir() {
        checkpoint::load_latest_of_last_run(checkpoint).map_err(|e| match e {
            CheckpointError::NoneFound(dir, None) => {
                let nodes = checkpoint::subdirectories_with_checkpoints(&dir);
                if nodes.is_empty() {
                    CheckpointError::NoneFound(dir, None).into()
                } else {
                    ExportError::PerNode { dir, nodes }
                }
            }
            other => other.into(),
        })?
    } else {
        checkpoint::load_file(checkpoint)?
    };
    if crate::run_record::is_run_data(out) {
        return Err(ExportError::WouldReplaceRunData(out.to_path_buf()));
    }
    if out.exists() && !force {
        return Err(ExportError::Exists(out.to_path_buf()));
    }
    let (bytes, exported) = encode(&ckpt)?;
    crate::small_file::write_atomically(out, &bytes).map_err(|source| ExportError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(exported)
}

/// The safetensors bytes of a checkpoint, with its run's metadata, and
/// what they hold.
pub fn encode(ckpt: &Checkpoint) -> Result<(Vec<u8>, Exported), ExportError> {
    let layout = layout_of(&ckpt.meta.model)?;
    let tensors = torch_tensors(&ckpt.meta.model, &layout, &ckpt.params)?;
    let exported = Exported {
        tensors: tensors.len(),
        values: ckpt.params.len(),
    };
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|t| {
            let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (t.name, t.shape, bytes)
        })
        .collect();
    let mut views = Vec::with_capacity(raw.len());
    for (name, shape, bytes) in &raw {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| ExportError::Encode(e.to_string()))?;
        views.push((name.as_str(), view));
    }
    let meta = &ckpt.meta;
    let info = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("model".to_string(), meta.model.clone()),
        ("swarm".to_string(), meta.swarm.clone()),
        ("round".to_string(), meta.round.to_string()),
        ("step".to_string(), meta.step.to_string()),
        ("params_digest".to_string(), meta.params_digest.clone()),
        (
            "exported_by".to_string(),
            format!("p2ptrain {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    let bytes = safetensors::tensor::serialize(views, Some(info))
        .map_err(|e| ExportError::Encode(e.to_string()))?;
    Ok((bytes, exported))
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    t
}

fn renamed(p: &ParamInfo, values: &[f32], field: &str) -> TorchTensor {
    let name = match p.name.rsplit_once('.') {
        Some((module, _)) => format!("{module}.{field}"),
        None => field.to_string(),
    };
    TorchTensor {
        name,
        shape: p.shape.clone(),
        values: values.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, shape: &[usize], role: ParamRole) -> ParamInfo {
        ParamInfo {
            name: name.into(),
            shape: shape.to_vec(),
            role,
        }
    }

    #[test]
    fn a_testnets_checkpoint_directory_points_to_its_nodes() {
        let dir = tempfile::tempdir().unwrap();
        for node in ["node-0", "node-1"] {
            let d = dir.path().join(node);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join(format!("ckpt-r00000002-{:032}.bin", 0)), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let out = dir.path().join("model.safetensors");
        let err = export_file(dir.path(), &out, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no checkpoint itself"), "{err}");
        assert!(err.contains("node-0") && err.contains("node-1"), "{err}");
        assert!(!err.contains("empty"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn linear_weights_are_transposed_and_norms_renamed() {
        let layout = [
            info("fc.weight", &[2, 3], ParamRole::LinearWeight),
            info("fc.bias", &[3], ParamRole::Plain),
            info("norm.gamma", &[2], ParamRole::NormGamma),
            info("norm.beta", &[2], ParamRole::NormBeta),
        ];
        // burn [in=2, out=3]: row i holds input i's weights to each output.
        let params = [1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13.];
        let t = torch_tensors("m", &layout, &params).unwrap();
        assert_eq!(t[0].shape, vec![3, 2]);
        assert_eq!(t[0].values, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(t[1].values, vec![7., 8., 9.]);
        assert_eq!(
            (t[2].name.as_str(), &t[2].values[..]),
            ("norm.weight", &[10., 11.][..])
        );
        assert_eq!(
            (t[3].name.as_str(), &t[3].values[..]),
            ("norm.bias", &[12., 13.][..])
        );
    }

    #[test]
    fn a_checkpoint_of_another_size_or_model_is_refused() {
        let layout = mnist_layout(ModelKind::Mlp);
        assert!(matches!(
            torch_tensors("mlp", &layout, &[0.0; 10]),
            Err(ExportError::SizeMismatch { got: 10, .. })
        ));
        assert!(matches!(
            layout_of("linear"),
            Err(ExportError::Unsupported { .. })
        ));
        assert!(layout_of("char-lm/stage-1-of-2").is_ok());
        assert!(layout_of("char-lm/stage-9-of-2").is_err());
    }
}
