//! Local step speed: the MNIST MLP (784-256-256-10) stepped through the same
//! `MnistTask` that `p2ptrain node` trains with (batch gather, forward,
//! cross-entropy, backward, Adam, loss read back), on burn's ndarray backend
//! or, with `--device cuda`, its CUDA backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use p2ptrain_train::backend::{build_mnist_task, DeviceKind, TaskSpec};
use p2ptrain_train::data;
use p2ptrain_train::model::ModelKind;
use serde_json::json;

use crate::util::{emit, median, process_cpu_s, quantile};

/// Flags of `p2ptrain-bench step`.
#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Directory with the MNIST IDX files; the bundled subset if left out.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Samples per step.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Which model (`mlp` or `cnn`).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Where `step` runs the step: cpu, or cuda (needs `--features cuda`).
    /// `step-breakdown` always measures the CPU path.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
}

/// Runs the step benchmark and prints one JSON line.
pub fn run(args: &StepArgs) -> anyhow::Result<()> {
    let data = match &args.data {
        Some(dir) => data::load_dir(dir).with_context(|| format!("loading {}", dir.display()))?,
        None => data::load_bundled()?,
    };
    let model: ModelKind = args.model.parse()?;
    let mut task = build_mnist_task(TaskSpec {
        model,
        data: Arc::new(data),
        batch_size: args.batch,
        lr: 1e-3,
        seed: 1,
        device: args.device,
    })?;
    for _ in 0..args.warmup {
        task.train_step()?;
    }
    let cpu0 = process_cpu_s();
    let started = Instant::now();
    let mut times = Vec::with_capacity(args.steps);
    let mut last_loss = f32::NAN;
    for _ in 0..args.steps {
        let t = Instant::now();
        last_loss = task.train_step()?.loss;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let wall = started.elapsed().as_secs_f64();
    // CPU time over wall time: how many cores the step really keeps busy.
    let cores_busy = match (cpu0, process_cpu_s()) {
        (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
        _ => None,
    };
    emit(&json!({
        "bench": "step",
        "impl": match args.device {
            DeviceKind::Cpu => "p2ptrain-burn-ndarray",
            DeviceKind::Cuda => "p2ptrain-burn-cuda",
        },
        "device": args.device.to_string(),
        "model": model.name(),
        "batch": args.batch,
        "steps": args.steps,
        "ms_median": median(&times),
        "ms_mean": times.iter().sum::<f64>() / times.len().max(1) as f64,
        "ms_p10": quantile(&times, 0.1),
        "ms_p90": quantile(&times, 0.9),
        "cores_busy": cores_busy,
        "final_loss": last_loss,
    }));
    Ok(())
}

/// Where a step's time goes: the same MLP, loss and optimizer as
/// `MnistTask`, timed phase by phase on a fixed batch, plus the floor the
/// matrix products alone set (the step's nine products on plain ndarray
/// tensors, no autodiff). Prints one `step_breakdown` JSON line.
pub fn breakdown(args: &StepArgs) -> anyhow::Result<()> {
    use burn::module::AutodiffModule;
    use burn::nn::loss::CrossEntropyLoss;
    use burn::optim::{GradientsParams, Optimizer};
    use burn::tensor::{Distribution, Int, Tensor, TensorData};

    type Inner = burn::backend::NdArray;
    type B = burn::backend::Autodiff<Inner>;
    let device = Default::default();
    let batch = args.batch;
    let mut model = ModelKind::Mlp.init::<B>(&device, 1);
    let mut optim = p2ptrain_train::adam::optimizer();
    let x = Tensor::<B, 2>::random([batch, 784], Distribution::Normal(0.0, 1.0), &device);
    let labels: Vec<i64> = (0..batch as i64).map(|i| i % 10).collect();
    let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [batch]), &device);
    let (mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let logits = model.forward(x.clone());
        let loss = CrossEntropyLoss::new(None, &device).forward(logits, y.clone());
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t2 = Instant::now();
        model = optim.step(1e-3, model, grads);
        let t3 = Instant::now();
        if i >= args.warmup {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            opt.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let _ = model.valid();

    // The products of one step: 3 forward, 3 weight gradients, 2 input gradients.
    let r = |shape: [usize; 2]| Tensor::<Inner, 2>::random(shape, Distribution::Default, &device);
    let (w1, w2, w3) = (r([784, 256]), r([256, 256]), r([256, 10]));
    let (xi, h, g, g3) = (
        r([batch, 784]),
        r([batch, 256]),
        r([batch, 256]),
        r([batch, 10]),
    );
    let mut mm = Vec::new();
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let outs = [
            xi.clone().matmul(w1.clone()).sum(),
            h.clone().matmul(w2.clone()).sum(),
            h.clone().matmul(w3.clone()).sum(),
            xi.clone().transpose().matmul(g.clone()).sum(),
            h.clone().transpose().matmul(g.clone()).sum(),
            h.clone().transpose().matmul(g3.clone()).sum(),
            g3.clone().matmul(w3.clone().transpose()).sum(),
            g.clone().matmul(w2.clone().transpose()).sum(),
        ];
        let _: Vec<f32> = outs.into_iter().map(|t| t.into_scalar()).collect();
        if i >= args.warmup {
            mm.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    emit(&json!({
        "bench": "step_breakdown",
        "impl": "p2ptrain-burn-ndarray",
        "batch": batch,
        "steps": args.steps,
        "forward_ms": median(&fwd),
        "backward_ms": median(&bwd),
        "adam_ms": median(&opt),
        "matmuls_only_ms": median(&mm),
    }));
    Ok(())
}
