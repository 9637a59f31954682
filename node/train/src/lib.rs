//! Local training with burn (models, data, backend selection) and the
//! [`task::Task`] seam the node's driver steps through.
//!
//! A crate of its own, not a module of `p2ptrain-node`, so the workspace can
//! optimise it in debug builds: burn's generic code is compiled here.
//!
//! Everything here is generic over burn's `Backend` except [`backend`], the one
//! place that names concrete backends (ndarray on the CPU, CUDA behind the
//! `cuda` feature). The driver sees only a `Box<dyn Task>` built by
//! [`backend::build_mnist_task`], so it never learns which model or device runs.

// Named only for its "std" feature (see the workspace Cargo.toml): burn's
// CPU backend multiplies matrices through it, and with "std" it detects
// AVX2/FMA or AVX-512 at run time instead of using SSE2 kernels.
use matrixmultiply as _;

pub mod adam;
pub mod backend;
pub mod data;
pub mod files;
pub mod layout;
pub mod lm;
pub mod mnist;
pub mod model;
pub mod optim_state;
pub mod params;
pub mod stage;
pub mod task;

use std::path::PathBuf;

/// What can go wrong while loading data or building a model and its backend.
///
/// Every message names the file or setting at fault and what to do about it,
/// because these errors reach the person who started the node.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data file exists but could not be read.
    #[error("cannot read {}: {source}; check the file's permissions or the --data directory", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A data directory lacks one of the files it needs.
    #[error(
        "{} has neither {name} nor {name}.gz; put the four MNIST IDX files there \
         (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, \
         t10k-labels-idx1-ubyte, gzipped or not) or leave --data out to use the bundled subset",
        dir.display()
    )]
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// The base name of the missing file.
        name: String,
    },
    /// The `--data` path, or a file in it, is not what it must be.
    #[error("{} {problem}", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
        /// What it is instead, and what to pass.
        problem: String,
    },
    /// A data file is not a valid IDX file of the expected kind.
    #[error("{file} is not a valid MNIST IDX file: {problem}; download it again")]
    Format {
        /// The file, as the user named it (or the bundled file's name).
        file: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An image file and its label file disagree on the number of samples.
    #[error(
        "{images} holds {image_count} images but {labels} holds {label_count} labels; \
         the two files come from different data sets"
    )]
    CountMismatch {
        /// The image file.
        images: String,
        /// Number of images it holds.
        image_count: usize,
        /// The label file.
        labels: String,
        /// Number of labels it holds.
        label_count: usize,
    },
    /// A training setting (batch size, learning rate, model or device name) is unusable.
    #[error("invalid training setting: {0}")]
    InvalidSetting(String),
    /// The binary has no CUDA backend compiled in.
    #[error("this binary was built without CUDA support; rebuild with `cargo build --release --features cuda`")]
    CudaNotCompiled,
    /// The CUDA backend is compiled in but no usable GPU, driver or library was found.
    #[error(
        "the CUDA device could not be used: {0}; check that an NVIDIA GPU and driver are \
         present (`nvidia-smi`) or run with --device cpu"
    )]
    CudaUnavailable(String),
}

/// Turns a caught panic's payload into text, so a backend that panics (as burn
/// does when a device or library is missing) becomes an ordinary error.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "the backend panicked without a message".to_string()
    }
}
