//! MNIST classification as a [`Task`] the driver can step, read and overwrite.
//!
//! The step is burn's custom-training-loop shape: forward, cross-entropy,
//! `backward`, `GradientsParams::from_grads`, `optim.step`. Generic over any
//! `AutodiffBackend`; [`super::backend`] picks the concrete one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::{GradientsParams, Optimizer};

use crate::adam::TrainOptimizer;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use super::data::{MnistData, IMAGE_PIXELS, NUM_CLASSES};
use super::model::{Model, ModelKind};
use super::{optim_state, panic_message, params, TrainError};
use crate::task::{validate_params, EvalStats, OptimState, Shard, StepStats, Task, TaskError};
use p2ptrain_protocol::rng::Rng;

/// Test images per evaluation batch: large enough to amortise per-call
/// overhead, small enough to keep the activations in cache-sized memory.
const EVAL_BATCH: usize = 500;

/// An MNIST learner: a model, its Adam optimizer, the data and this peer's shard.
pub struct MnistTask<B: AutodiffBackend> {
    model: Model<B>,
    optim: TrainOptimizer<Model<B>, B>,
    data: Arc<MnistData>,
    device: B::Device,
    batch_size: usize,
    lr: f64,
    num_params: usize,
    /// Training sample indices this peer trains on.
    shard: Vec<usize>,
    /// Seed of the shard's per-pass shuffles.
    shard_seed: u64,
    /// The shard in this pass's order.
    order: Vec<usize>,
    /// Next position in `order`.
    cursor: usize,
    /// Passes over the shard started so far (each gets its own shuffle).
    pass: u64,
    /// Clears Adam moments before they turn subnormal.
    flush: optim_state::TinyMomentFlush,
}

impl<B: AutodiffBackend> MnistTask<B> {
    /// Builds the model from `seed` (identical on every peer and backend with
    /// the same seed), an Adam optimizer with learning rate `lr`, and a shard
    /// holding the whole training set until the driver calls `set_shard`.
    pub fn new(
        kind: ModelKind,
        data: Arc<MnistData>,
        batch_size: usize,
        lr: f64,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        check_settings(batch_size, lr)?;
        if data.num_train() == 0 || data.num_test() == 0 {
            return Err(TrainError::InvalidSetting(
                "the MNIST data holds no training or no test samples".into(),
            ));
        }
        let model: Model<B> = kind.init(device, seed);
        let num_params = params::num_params(&model);
        let shard: Vec<usize> = (0..data.num_train()).collect();
        let mut task = Self {
            model,
            optim: crate::adam::optimizer(),
            data,
            device: device.clone(),
            batch_size,
            lr,
            num_params,
            shard,
            shard_seed: seed,
            order: Vec::new(),
            cursor: 0,
            pass: 0,
            flush: optim_state::TinyMomentFlush::default(),
        };
        task.start_pass();
        Ok(task)
    }

    /// The model being trained (for checkpoints and inspection).
    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    /// Runs one sample through the model and reads the logits back: a cheap
    /// first use of the device, so a broken GPU setup fails at start-up.
    pub fn probe(&self) -> Result<(), TaskError> {
        let model = self.model.valid();
        guarded(|| {
            let (x, _) = batch_tensors::<B::InnerBackend>(
                &self.data.test_images,
                &self.data.test_labels,
                0..1,
                &self.device,
            );
            read_f32(model.forward(x)).map(|_| ())
        })?
    }

    /// Shuffles the shard for the pass `self.pass`.
    fn start_pass(&mut self) {
        self.order.clone_from(&self.shard);
        // A distinct stream per pass, none equal to the weights' `Rng::new(seed)`.
        Rng::new(self.shard_seed ^ (self.pass + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .shuffle(&mut self.order);
        self.cursor = 0;
    }

    /// The next batch's sample indices: up to `batch_size`, never crossing a
    /// pass boundary, so every shard sample is seen exactly once per pass.
    fn next_batch(&mut self) -> Vec<usize> {
        if self.cursor >= self.order.len() {
            self.pass += 1;
            self.start_pass();
        }
        let end = (self.cursor + self.batch_size).min(self.order.len());
        let batch = self.order[self.cursor..end].to_vec();
        self.cursor = end;
        batch
    }
}

/// Rejects settings no training run can use.
pub(crate) fn check_settings(batch_size: usize, lr: f64) -> Result<(), TrainError> {
    if batch_size == 0 {
        return Err(TrainError::InvalidSetting(
            "batch size is 0; use a positive batch size such as 64".into(),
        ));
    }
    if !(lr.is_finite() && lr > 0.0) {
        return Err(TrainError::InvalidSetting(format!(
            "learning rate {lr} is not a finite positive number; try 0.001"
        )));
    }
    Ok(())
}

/// Runs `f`, turning a backend panic (lost device, out of memory) into an error
/// the driver can log, instead of killing the compute thread.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, TaskError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| TaskError::Backend(panic_message(&*p)))
}

/// Copies the chosen samples into an image tensor `[n, 784]` and a label tensor `[n]`.
fn batch_tensors<B: Backend>(
    images: &[f32],
    labels: &[u8],
    indices: impl ExactSizeIterator<Item = usize>,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let n = indices.len();
    let mut pixels = Vec::with_capacity(n * IMAGE_PIXELS);
    let mut targets = Vec::with_capacity(n);
    for i in indices {
        pixels.extend_from_slice(&images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]);
        targets.push(i64::from(labels[i]));
    }
    let x = Tensor::from_data(TensorData::new(pixels, [n, IMAGE_PIXELS]), device);
    let y = Tensor::from_data(TensorData::new(targets, [n]), device);
    (x, y)
}

/// Reads a float tensor back as `f32`s, reporting a failed device read as an error.
fn read_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, TaskError> {
    let data = t
        .try_into_data()
        .map_err(|e| TaskError::Backend(format!("reading a result from the device: {e:?}")))?
        .convert::<f32>();
    data.into_vec::<f32>()
        .map_err(|e| TaskError::Backend(format!("converting a result to f32: {e:?}")))
}

/// Sum of the cross-entropy losses and the number of correct argmax
/// predictions for `logits` (row-major `[n, 10]`) against `labels`.
fn score(logits: &[f32], labels: &[u8]) -> (f64, usize) {
    let mut loss = 0.0f64;
    let mut correct = 0;
    for (row, &label) in logits.chunks_exact(NUM_CLASSES).zip(labels) {
        let (best, max) =
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                });
        let sum_exp: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        loss += sum_exp.ln() - f64::from(row[usize::from(label)] - max);
        if best == usize::from(label) {
            correct += 1;
        }
    }
    (loss, correct)
}

impl<B: AutodiffBackend> Task for MnistTask<B> {
    fn num_params(&self) -> usize {
        self.num_params
    }

    fn params_into(&self, out: &mut Vec<f32>) {
        params::flatten_into(&self.model, out);
    }

    /// Overwrites the weights (after averaging). Adam's moment estimates are
    /// kept: they are keyed by parameter id, which `params::write` preserves.
    fn set_params(&mut self, values: &[f32]) -> Result<(), TaskError> {
        validate_params(self.num_params, values)?;
        let model = self.model.clone();
        self.model = guarded(|| params::write(model, values))??;
        Ok(())
    }

    fn num_train_samples(&self) -> usize {
        self.data.num_train()
    }

    /// Trains on `shard.indices` from now on, in an order drawn from `shard.seed`.
    ///
    /// The shard already held goes on where its pass stands: the driver
    /// hands the shard over again whenever the swarm's membership changed,
    /// even back to what it was (a peer reconnecting), and starting over
    /// would replay the pass's first batches at every such change. A new
    /// shard starts a pass numbered on from the last, in an order of its own.
    ///
    /// `shard.peers` is not used to rescale the loss: peers average
    /// parameters, not gradients, and Adam's update does not change when the
    /// loss is multiplied by a constant.
    fn set_shard(&mut self, shard: Shard) {
        let total = self.data.num_train();
        let before = shard.indices.len();
        let indices: Vec<usize> = shard
            .indices
            .into_iter()
            .filter_map(|i| usize::try_from(i).ok().filter(|&i| i < total))
            .collect();
        if indices == self.shard && shard.seed == self.shard_seed {
            return;
        }
        self.shard = indices;
        if self.shard.len() != before {
            tracing::warn!(
                dropped = before - self.shard.len(),
                total,
                "shard held sample indices beyond the training set; ignored them"
            );
        }
        self.shard_seed = shard.seed;
        self.pass += 1;
        self.start_pass();
    }

    /// Whole passes (each sample once; batches never cross a pass) move the
    /// pass count on, the rest the cursor within the pass that follows.
    fn skip_samples(&mut self, samples: u64) {
        let len = self.shard.len() as u64;
        if len == 0 || samples == 0 {
            return;
        }
        // Where the current pass stands counts too.
        let done = samples.saturating_add(self.cursor as u64);
        self.pass = self.pass.saturating_add(done / len);
        self.start_pass();
        self.cursor = (done % len) as usize;
    }

    fn train_step(&mut self) -> Result<StepStats, TaskError> {
        if self.shard.is_empty() {
            return Err(TaskError::EmptyShard);
        }
        let batch = self.next_batch();
        let samples = batch.len();
        let (x, y) = batch_tensors::<B>(
            &self.data.train_images,
            &self.data.train_labels,
            batch.into_iter(),
            &self.device,
        );
        // Step a clone (tensors are reference-counted, so this is cheap): if the
        // backend panics mid-step, `self.model` still holds the last good weights.
        let model = self.model.clone();
        let (model, loss) = guarded(|| {
            let logits = model.forward(x);
            let loss = CrossEntropyLoss::new(None, &self.device).forward(logits, y);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let model = self.optim.step(self.lr, model, grads);
            (model, read_f32(loss))
        })?;
        let loss = loss?.first().copied().unwrap_or(f32::NAN);
        self.model = model;
        guarded(|| self.flush.after_step(&mut self.optim, &self.model))??;
        Ok(StepStats { loss, samples })
    }

    fn evaluate(&mut self) -> Result<EvalStats, TaskError> {
        let model = self.model.valid();
        let data = &self.data;
        let total = data.num_test();
        let (loss, correct) = guarded(|| -> Result<(f64, usize), TaskError> {
            let (mut loss, mut correct) = (0.0f64, 0usize);
            for start in (0..total).step_by(EVAL_BATCH) {
                let end = (start + EVAL_BATCH).min(total);
                let (x, _) = batch_tensors::<B::InnerBackend>(
                    &data.test_images,
                    &data.test_labels,
                    start..end,
                    &self.device,
                );
                let logits = read_f32(model.forward(x))?;
                let (l, c) = score(&logits, &data.test_labels[start..end]);
                loss += l;
                correct += c;
            }
            Ok((loss, correct))
        })??;
        Ok(EvalStats {
            loss: (loss / total as f64) as f32,
            accuracy: Some(correct as f32 / total as f32),
            samples: total,
        })
    }

    fn optim_state(&self) -> Option<OptimState> {
        optim_state::export(&self.optim, &self.model)
    }

    fn set_optim_state(&mut self, state: &OptimState) -> Result<(), TaskError> {
        // Checked before the running optimizer is taken out: a refused
        // state leaves the moments as they were.
        state.validate(self.num_params)?;
        let optim = std::mem::replace(&mut self.optim, crate::adam::optimizer());
        self.optim = guarded(|| optim_state::import(optim, &self.model, state))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::load_bundled;
    use burn::backend::{Autodiff, NdArray};
    use std::sync::OnceLock;
    use std::time::Instant;

    type AD = Autodiff<NdArray>;

    fn bundled() -> Arc<MnistData> {
        static DATA: OnceLock<Arc<MnistData>> = OnceLock::new();
        DATA.get_or_init(|| Arc::new(load_bundled().expect("bundled MNIST loads")))
            .clone()
    }

    fn task(kind: ModelKind, batch: usize, seed: u64) -> MnistTask<AD> {
        task_lr(kind, batch, seed, 1e-3)
    }

    fn task_lr(kind: ModelKind, batch: usize, seed: u64, lr: f64) -> MnistTask<AD> {
        MnistTask::new(kind, bundled(), batch, lr, seed, &Default::default()).unwrap()
    }

    #[test]
    fn same_seed_same_params_different_seed_differs() {
        let a = task(ModelKind::Mlp, 8, 5);
        let b = task(ModelKind::Mlp, 8, 5);
        let c = task(ModelKind::Mlp, 8, 6);
        assert_eq!(a.params(), b.params());
        assert_ne!(a.params(), c.params());
        assert_eq!(a.num_params(), a.params().len());
        assert_eq!(a.num_train_samples(), 10_000);
    }

    #[test]
    fn rejects_bad_settings() {
        let new = |batch, lr| {
            MnistTask::<AD>::new(ModelKind::Mlp, bundled(), batch, lr, 0, &Default::default())
                .err()
                .map(|e| e.to_string())
        };
        assert!(new(0, 1e-3).unwrap().contains("batch size is 0"));
        assert!(new(8, f64::NAN).unwrap().contains("learning rate"));
        assert!(new(8, -1.0).unwrap().contains("learning rate"));
        assert!(new(8, 1e-3).is_none());
    }

    #[test]
    fn set_params_validates_and_applies() {
        let mut t = task(ModelKind::Mlp, 8, 1);
        let n = t.num_params();
        assert!(matches!(
            t.set_params(&vec![0.0; n + 1]),
            Err(TaskError::ParamLength { .. })
        ));
        let mut bad = vec![0.0; n];
        bad[7] = f32::NAN;
        assert!(matches!(
            t.set_params(&bad),
            Err(TaskError::NonFinite { index: 7 })
        ));
        let values: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 1e-3).collect();
        t.set_params(&values).unwrap();
        assert_eq!(t.params(), values);
        // Still trainable after an overwrite (the optimizer state keys on param ids).
        t.train_step().unwrap();
        assert_ne!(t.params(), values);
    }

    #[test]
    fn moments_near_the_subnormal_range_are_flushed_and_nothing_else_changes() {
        let mut t = task(ModelKind::Mlp, 8, 4);
        t.train_step().unwrap();
        let mut state = t.optim_state().unwrap();
        state.moment_1[0] = 1e-35;
        state.moment_1[1] = -1e-31;
        state.moment_1[2] = 1e-20;
        state.moment_2[3] = f32::from_bits(1); // the smallest subnormal
        t.set_optim_state(&state).unwrap();
        optim_state::flush_tiny_moments(&mut t.optim, &t.model).unwrap();
        let flushed = t.optim_state().unwrap();
        let mut want = state.clone();
        want.moment_1[0] = 0.0;
        want.moment_1[1] = 0.0;
        want.moment_2[3] = 0.0;
        assert_eq!(flushed, want, "only the tiny moments became zero");
        // Nothing tiny: the optimizer comes back as it was.
        optim_state::flush_tiny_moments(&mut t.optim, &t.model).unwrap();
        assert_eq!(t.optim_state().unwrap(), want);
        // Training flushes on its own every FLUSH_EVERY steps. A parameter
        // without gradient (a weight of an always-blank corner pixel) keeps
        // a tiny first moment unless flushed.
        let idle = state.moment_1.iter().position(|v| *v == 0.0).unwrap();
        state.moment_1[idle] = 1e-35;
        t.set_optim_state(&state).unwrap();
        t.flush = optim_state::TinyMomentFlush::after(optim_state::FLUSH_EVERY - 1);
        t.train_step().unwrap();
        let m1 = t.optim_state().unwrap().moment_1;
        assert!(
            m1.iter()
                .all(|v| *v == 0.0 || v.abs() >= optim_state::TINY_MOMENT),
            "a tiny first moment survived the periodic flush"
        );
    }

    #[test]
    fn optimizer_state_round_trips_into_a_new_task() {
        let mut a = task(ModelKind::Mlp, 8, 4);
        assert_eq!(a.optim_state(), None, "no state before the first step");
        for _ in 0..3 {
            a.train_step().unwrap();
        }
        let state = a.optim_state().unwrap();
        assert_eq!(state.time, 3);
        assert_eq!(state.moment_1.len(), a.num_params());
        assert!(state.moment_2.iter().any(|v| *v > 0.0));
        // A new task (new parameter ids, as after a restart) with the same
        // parameters and moments takes exactly the same next step.
        let mut b = task(ModelKind::Mlp, 8, 4);
        let mut fresh = task(ModelKind::Mlp, 8, 4);
        let trained = a.params();
        for t in [&mut b, &mut fresh] {
            for _ in 0..3 {
                t.next_batch();
            }
            t.set_params(&trained).unwrap();
        }
        b.set_optim_state(&state).unwrap();
        assert_eq!(b.optim_state().unwrap(), state);
        a.train_step().unwrap();
        b.train_step().unwrap();
        fresh.train_step().unwrap();
        assert_eq!(a.params(), b.params());
        // Fresh moments take another step: the restored state mattered.
        assert_ne!(a.params(), fresh.params());
        // Bad states are refused with a clear error, and change nothing.
        let mut bad = state.clone();
        bad.moment_2[5] = -1.0;
        assert!(b
            .set_optim_state(&bad)
            .unwrap_err()
            .to_string()
            .contains("moment 5"));
        bad.moment_1.pop();
        assert!(b.set_optim_state(&bad).is_err());
    }

    #[test]
    fn shard_cycles_and_reshuffles() {
        let mut t = task(ModelKind::Mlp, 4, 1);
        let shard = |indices: Vec<u64>, seed| Shard {
            indices,
            seed,
            peers: 2,
        };
        t.set_shard(shard(vec![3, 1, 4, 1, 5, 9, 2, 6, 99_999], 11));
        assert_eq!(t.shard.len(), 8, "out-of-range index dropped");
        let first: Vec<Vec<usize>> = (0..2).map(|_| t.next_batch()).collect();
        let second: Vec<Vec<usize>> = (0..2).map(|_| t.next_batch()).collect();
        let mut seen: Vec<usize> = first.concat();
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 1, 2, 3, 4, 5, 6, 9]);
        assert_ne!(first, second, "each pass has its own order");

        t.set_shard(shard(vec![], 0));
        assert!(matches!(t.train_step(), Err(TaskError::EmptyShard)));
        t.set_shard(shard(vec![0, 1, 2], 0));
        assert_eq!(t.train_step().unwrap().samples, 3);
    }

    #[test]
    fn a_resumed_task_goes_on_where_its_passes_stood() {
        let shard = Shard {
            indices: (0..8).collect(),
            seed: 11,
            peers: 2,
        };
        // The run before the stop: 2 passes and 3 batches of 2.
        let mut before = task(ModelKind::Mlp, 2, 1);
        before.set_shard(shard.clone());
        for _ in 0..(8 + 3) {
            before.next_batch();
        }
        let expected = before.next_batch();
        // The resumed one, told the 22 samples trained.
        let mut resumed = task(ModelKind::Mlp, 2, 1);
        resumed.set_shard(shard);
        resumed.skip_samples(22);
        assert_eq!(resumed.next_batch(), expected);
    }

    #[test]
    fn the_same_shard_again_goes_on_with_its_pass() {
        let mut t = task(ModelKind::Mlp, 2, 1);
        let shard = |indices: Vec<u64>| Shard {
            indices,
            seed: 11,
            peers: 2,
        };
        t.set_shard(shard((0..8).collect()));
        let first = t.next_batch();
        // Handed over again (membership changed and changed back): the pass
        // goes on instead of replaying its first batch.
        t.set_shard(shard((0..8).collect()));
        let mut pass = first.clone();
        for _ in 0..3 {
            pass.extend(t.next_batch());
        }
        pass.sort_unstable();
        assert_eq!(
            pass,
            (0..8).collect::<Vec<_>>(),
            "one pass, each sample once"
        );
        // A new shard starts a fresh pass in an order of its own: not the
        // order the same indices got as a first pass.
        let mut fresh = task(ModelKind::Mlp, 8, 1);
        fresh.set_shard(shard((0..8).collect()));
        t.set_shard(shard((8..16).collect()));
        t.set_shard(shard((0..8).collect()));
        assert_eq!(t.cursor, 0);
        assert_ne!(t.order, fresh.order);
    }

    #[test]
    fn score_matches_hand_computation() {
        let mut logits = vec![0.0f32; 20];
        logits[3] = 2.0; // row 0 predicts 3
        logits[10 + 7] = 1.0; // row 1 predicts 7
        let (loss, correct) = score(&logits, &[3, 2]);
        assert_eq!(correct, 1);
        let row0 = (2f64.exp() + 9.0).ln() - 2.0;
        let row1 = (1f64.exp() + 9.0).ln();
        assert!((loss - (row0 + row1)).abs() < 1e-6);
    }

    /// The acceptance test of the whole local path: the MLP learns MNIST.
    #[test]
    fn mlp_reaches_90_percent_on_bundled_subset() {
        let started = Instant::now();
        let mut t = task_lr(ModelKind::Mlp, 64, 2024, 2e-3);
        let before = t.evaluate().unwrap();
        let steps = 300;
        let train_started = Instant::now();
        let mut samples = 0;
        for _ in 0..steps {
            samples += t.train_step().unwrap().samples;
        }
        // 10,000 samples = 156 full batches + one of 16, then the next pass.
        assert_eq!(samples, 64 * (steps - 1) + 16);
        let per_step = train_started.elapsed() / steps as u32;
        let eval_started = Instant::now();
        let after = t.evaluate().unwrap();
        let eval_time = eval_started.elapsed();
        let acc = after.accuracy.unwrap();
        eprintln!(
            "mlp batch 64: {per_step:?}/step, eval of {} samples {eval_time:?}, \
             accuracy {:.3} -> {acc:.3}, loss {:.3} -> {:.3}, test wall {:?}",
            after.samples,
            before.accuracy.unwrap(),
            before.loss,
            after.loss,
            started.elapsed()
        );
        assert_eq!(after.samples, 2_000);
        assert!(acc >= 0.90, "accuracy {acc} after {steps} steps");
        assert!(after.loss < before.loss);
    }

    #[test]
    fn cnn_smoke_loss_decreases() {
        let mut t = task(ModelKind::Cnn, 32, 7);
        let started = Instant::now();
        let losses: Vec<f32> = (0..20).map(|_| t.train_step().unwrap().loss).collect();
        eprintln!(
            "cnn batch 32: {:?}/step",
            started.elapsed() / losses.len() as u32
        );
        let head: f32 = losses[..5].iter().sum::<f32>() / 5.0;
        let tail: f32 = losses[15..].iter().sum::<f32>() / 5.0;
        assert!(tail < head, "loss {head} -> {tail}");
        assert!(losses.iter().all(|l| l.is_finite()));
    }

    /// Per-step time of the MLP at batch 128 (printed; `--nocapture` to see it).
    #[test]
    fn mlp_step_time_batch_128() {
        let mut t = task(ModelKind::Mlp, 128, 3);
        t.train_step().unwrap(); // warm-up
        let steps = 20;
        let started = Instant::now();
        for _ in 0..steps {
            t.train_step().unwrap();
        }
        eprintln!("mlp batch 128: {:?}/step", started.elapsed() / steps as u32);
    }
}
