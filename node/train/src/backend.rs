//! The one place that names concrete burn backends.
//!
//! Everything else in `train` is generic over `Backend`; this module turns a
//! [`TaskSpec`] (what the user asked for) into a running `Box<dyn Task>`:
//! ndarray on the CPU, or CUDA when the crate's `cuda` feature is on.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::data::MnistData;
use super::mnist::{check_settings, MnistTask};
use super::model::ModelKind;
use super::TrainError;
use crate::task::Task;

/// The CPU training backend: burn's ndarray backend with autodiff.
pub type CpuBackend = burn::backend::Autodiff<burn::backend::NdArray>;

/// The CUDA training backend (only with the `cuda` feature).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

/// Where local training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceKind {
    /// The CPU through ndarray; always available.
    #[default]
    Cpu,
    /// The first NVIDIA GPU; needs a binary built with `--features cuda`.
    Cuda,
}

impl DeviceKind {
    /// Every device kind, in the order help texts list them.
    pub const ALL: [DeviceKind; 2] = [DeviceKind::Cpu, DeviceKind::Cuda];

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// Whether this binary can run on this kind of device at all.
    pub fn compiled_in(self) -> bool {
        match self {
            DeviceKind::Cpu => true,
            DeviceKind::Cuda => cfg!(feature = "cuda"),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceKind {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        DeviceKind::ALL
            .into_iter()
            .find(|k| k.name() == wanted)
            .ok_or_else(|| {
                TrainError::InvalidSetting(format!(
                    "unknown device {s:?}; valid devices are: cpu, cuda"
                ))
            })
    }
}

/// Everything needed to build an MNIST learner; peers of one swarm must agree
/// on `model` and `seed` (they fix the parameter layout and initial values).
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Which network.
    pub model: ModelKind,
    /// The data set, shared so several in-process peers hold one copy.
    pub data: Arc<MnistData>,
    /// Samples per local step.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Seed of the initial weights and of the default shuffle.
    pub seed: u64,
    /// Where to run.
    pub device: DeviceKind,
}

/// Builds the learner `spec` describes on the requested device, checking the
/// settings first and turning a missing GPU or driver into a [`TrainError`].
pub fn build_mnist_task(spec: TaskSpec) -> Result<Box<dyn Task>, TrainError> {
    check_settings(spec.batch_size, spec.lr)?;
    match spec.device {
        DeviceKind::Cpu => {
            let device = burn::backend::ndarray::NdArrayDevice::Cpu;
            Ok(Box::new(new_task::<CpuBackend>(spec, &device)?))
        }
        DeviceKind::Cuda => build_cuda(spec),
    }
}

/// The one call site of [`MnistTask::new`], whatever the backend.
fn new_task<B: burn::tensor::backend::AutodiffBackend>(
    spec: TaskSpec,
    device: &B::Device,
) -> Result<MnistTask<B>, TrainError> {
    MnistTask::new(
        spec.model,
        spec.data,
        spec.batch_size,
        spec.lr,
        spec.seed,
        device,
    )
}

#[cfg(feature = "cuda")]
fn build_cuda(spec: TaskSpec) -> Result<Box<dyn Task>, TrainError> {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    // burn panics when it cannot load the CUDA library or find a device, on the
    // first use rather than when the device value is made: build the model and
    // run one forward pass inside the guard so that failure surfaces here.
    let built = catch_unwind(AssertUnwindSafe(
        || -> Result<MnistTask<CudaBackend>, TrainError> {
            let device = burn::backend::cuda::CudaDevice::default();
            let task = new_task::<CudaBackend>(spec, &device)?;
            task.probe()
                .map_err(|e| TrainError::CudaUnavailable(e.to_string()))?;
            Ok(task)
        },
    ));
    match built {
        Ok(task) => Ok(Box::new(task?)),
        Err(payload) => Err(TrainError::CudaUnavailable(explain_cuda_failure(
            &super::panic_message(&*payload),
        ))),
    }
}

/// Words a CUDA start-up failure for a person. The real cause is often a panic
/// on cubecl's device thread (printed above), which reaches us only as a
/// closed channel, so name the usual culprit when we can see it is missing.
#[cfg(feature = "cuda")]
fn explain_cuda_failure(message: &str) -> String {
    if !libcuda_visible() {
        return "libcuda.so, the NVIDIA driver's library, is not in LD_LIBRARY_PATH or the \
                usual system library directories"
            .to_string();
    }
    if message.contains("RecvError") {
        return "the CUDA runtime stopped while starting (the panic message printed above \
                says why)"
            .to_string();
    }
    message.to_string()
}

/// Whether the driver library is where the dynamic loader usually finds it.
/// Only a hint for error messages: the loader also reads `/etc/ld.so.cache`.
#[cfg(feature = "cuda")]
fn libcuda_visible() -> bool {
    use std::path::PathBuf;
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/cuda/lib64",
            "/usr/lib/wsl/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.iter()
        .any(|d| d.join("libcuda.so.1").exists() || d.join("libcuda.so").exists())
}

#[cfg(not(feature = "cuda"))]
fn build_cuda(_spec: TaskSpec) -> Result<Box<dyn Task>, TrainError> {
    Err(TrainError::CudaNotCompiled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::load_bundled;

    fn spec(device: DeviceKind) -> TaskSpec {
        TaskSpec {
            model: ModelKind::Mlp,
            data: Arc::new(load_bundled().unwrap()),
            batch_size: 16,
            lr: 1e-3,
            seed: 9,
            device,
        }
    }

    #[test]
    fn device_kind_parses_and_prints() {
        assert_eq!("cpu".parse::<DeviceKind>().unwrap(), DeviceKind::Cpu);
        assert_eq!("CUDA".parse::<DeviceKind>().unwrap(), DeviceKind::Cuda);
        assert_eq!(DeviceKind::Cuda.to_string(), "cuda");
        let msg = "tpu".parse::<DeviceKind>().unwrap_err().to_string();
        assert!(msg.contains("tpu") && msg.contains("cpu, cuda"), "{msg}");
    }

    #[test]
    fn builds_a_cpu_task_that_steps() {
        let mut task = build_mnist_task(spec(DeviceKind::Cpu)).unwrap();
        assert_eq!(task.num_train_samples(), 10_000);
        let step = task.train_step().unwrap();
        assert_eq!(step.samples, 16);
        assert!(step.loss.is_finite());
    }

    #[test]
    fn rejects_bad_settings_before_touching_a_device() {
        let mut s = spec(DeviceKind::Cuda);
        s.batch_size = 0;
        let msg = build_mnist_task(s).err().unwrap().to_string();
        assert!(msg.contains("batch size"), "{msg}");
        let mut s = spec(DeviceKind::Cpu);
        s.lr = f64::INFINITY;
        assert!(build_mnist_task(s).is_err());
    }

    /// With a GPU this trains a step; without one (or without a driver) it must
    /// be a clean error, not a panic.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_builds_or_fails_cleanly() {
        match build_mnist_task(spec(DeviceKind::Cuda)) {
            Ok(mut task) => {
                let step = task.train_step().unwrap();
                assert!(step.loss.is_finite());
            }
            Err(e) => {
                assert!(matches!(e, TrainError::CudaUnavailable(_)), "{e}");
                eprintln!("no usable CUDA device here: {e}");
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        let msg = build_mnist_task(spec(DeviceKind::Cuda))
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("--features cuda"), "{msg}");
    }
}
