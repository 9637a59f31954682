//! Linear regression by distributed gradient descent over a real p2ptrain swarm.
//!
//! The background document's example, done right: its serial sample added the
//! gradient instead of subtracting it. Here each of N in-process nodes holds a
//! shard of the data, computes the gradient of its share of the least-squares
//! loss with burn, takes one step, and the swarm averages parameters after
//! every step over QUIC — the same averaging path MNIST uses. Because each
//! node weights its loss by its shard's share of the data, the mean of the
//! nodes' steps is exactly one full-batch gradient-descent step, so the swarm
//! converges to the closed-form least-squares solution.

use burn::backend::{Autodiff, NdArray};
use burn::nn::{Linear, LinearConfig};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer, Sgd, SgdConfig};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use p2ptrain_node::driver::{self, Budget, FinalReport, NodeConfig, NodeEvent, Schedule};
use p2ptrain_node::net::settings::RunSettings;
use p2ptrain_node::net::NetConfig;
use p2ptrain_node::task::{validate_params, EvalStats, Shard, StepStats, Task, TaskError};
use p2ptrain_node::train::params;
use p2ptrain_protocol::averaging::Aggregation;
use p2ptrain_protocol::rng::Rng;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Backend = Autodiff<NdArray>;

/// A least-squares problem `y = X w + b + noise`.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Row-major `n x d` features.
    pub x: Vec<f64>,
    /// Targets.
    pub y: Vec<f64>,
    /// Samples.
    pub n: usize,
    /// Features.
    pub d: usize,
}

impl Problem {
    /// A digest of the samples, which every node of a swarm must share.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("p2ptrain 2026 linear regression problem");
        for v in self.x.iter().chain(&self.y) {
            h.update(&v.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Gaussian features, a fixed true model, Gaussian noise; reproducible from `seed`.
    pub fn synthetic(n: usize, d: usize, noise: f64, seed: u64) -> Problem {
        let mut rng = Rng::new(seed);
        let mut gauss = move || {
            // Box-Muller.
            let u1 = rng.next_f64().max(1e-300);
            let u2 = rng.next_f64();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let w: Vec<f64> = (0..d)
            .map(|j| (j as f64 + 1.0) * if j % 2 == 0 { 1.0 } else { -0.5 })
            .collect();
        let b = 0.75;
        let mut x = Vec::with_capacity(n * d);
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let row: Vec<f64> = (0..d).map(|_| gauss()).collect();
            let t = row.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + b + noise * gauss();
            x.extend(row);
            y.push(t);
        }
        Problem { x, y, n, d }
    }

    /// The least-squares solution `[w_1..w_d, b]` from the normal equations (Cholesky, f64).
    pub fn closed_form(&self) -> Vec<f64> {
        let k = self.d + 1;
        let mut a = vec![0.0; k * k];
        let mut rhs = vec![0.0; k];
        for i in 0..self.n {
            let mut row = self.x[i * self.d..(i + 1) * self.d].to_vec();
            row.push(1.0);
            for r in 0..k {
                rhs[r] += row[r] * self.y[i];
                for c in 0..k {
                    a[r * k + c] += row[r] * row[c];
                }
            }
        }
        // Cholesky: A = L L^T.
        let mut l = vec![0.0; k * k];
        for r in 0..k {
            for c in 0..=r {
                let s: f64 = (0..c).map(|j| l[r * k + j] * l[c * k + j]).sum();
                l[r * k + c] = if r == c {
                    (a[r * k + r] - s).sqrt()
                } else {
                    (a[r * k + c] - s) / l[c * k + c]
                };
            }
        }
        let mut z = vec![0.0; k];
        for r in 0..k {
            let s: f64 = (0..r).map(|j| l[r * k + j] * z[j]).sum();
            z[r] = (rhs[r] - s) / l[r * k + r];
        }
        let mut sol = vec![0.0; k];
        for r in (0..k).rev() {
            let s: f64 = (r + 1..k).map(|j| l[j * k + r] * sol[j]).sum();
            sol[r] = (z[r] - s) / l[r * k + r];
        }
        sol
    }

    /// Mean squared error of `[w.., b]` on this data.
    pub fn mse(&self, coef: &[f64]) -> f64 {
        (0..self.n)
            .map(|i| {
                let p = self.x[i * self.d..(i + 1) * self.d]
                    .iter()
                    .zip(coef)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    + coef[self.d];
                (p - self.y[i]).powi(2)
            })
            .sum::<f64>()
            / self.n as f64
    }
}

/// One node's learner: a burn `Linear(d -> 1)` trained by plain gradient descent on its shard.
pub struct LinearTask<B: AutodiffBackend> {
    model: Linear<B>,
    optim: OptimizerAdaptor<Sgd<B::InnerBackend>, Linear<B>, B>,
    problem: Arc<Problem>,
    shard: Shard,
    lr: f64,
    device: B::Device,
    /// The parameters after the latest averaging round, for the caller to read.
    latest: Arc<Mutex<Vec<f32>>>,
}

impl<B: AutodiffBackend> LinearTask<B> {
    /// All nodes start from zero weights, so they agree without talking.
    pub fn new(
        problem: Arc<Problem>,
        lr: f64,
        device: B::Device,
        latest: Arc<Mutex<Vec<f32>>>,
    ) -> Self {
        let model = LinearConfig::new(problem.d, 1).init::<B>(&device);
        let zeros = vec![0.0; params::num_params(&model)];
        let model = params::write(model, &zeros).expect("length matches by construction");
        LinearTask {
            model,
            optim: SgdConfig::new().init(),
            shard: Shard {
                indices: (0..problem.n as u64).collect(),
                seed: 0,
                peers: 1,
            },
            problem,
            lr,
            device,
            latest,
        }
    }
}

impl<B: AutodiffBackend> Task for LinearTask<B> {
    fn num_params(&self) -> usize {
        params::num_params(&self.model)
    }

    fn params_into(&self, out: &mut Vec<f32>) {
        params::flatten_into(&self.model, out);
    }

    fn set_params(&mut self, values: &[f32]) -> Result<(), TaskError> {
        validate_params(self.num_params(), values)?;
        self.model = params::write(self.model.clone(), values)?;
        *self.latest.lock().expect("not poisoned") = values.to_vec();
        Ok(())
    }

    fn num_train_samples(&self) -> usize {
        self.problem.n
    }

    fn set_shard(&mut self, shard: Shard) {
        self.shard = shard;
    }

    /// One full-batch gradient step on the shard. The loss is this shard's share
    /// of `(1/2N) * sum (x w + b - y)^2`, scaled by the number of peers, so the
    /// swarm's average step is exactly the full-data step.
    fn train_step(&mut self) -> Result<StepStats, TaskError> {
        let p = &self.problem;
        let m = self.shard.indices.len();
        if m == 0 {
            return Err(TaskError::EmptyShard);
        }
        let mut xs = Vec::with_capacity(m * p.d);
        let mut ys = Vec::with_capacity(m);
        for &i in &self.shard.indices {
            let i = i as usize;
            xs.extend(p.x[i * p.d..(i + 1) * p.d].iter().map(|v| *v as f32));
            ys.push(p.y[i] as f32);
        }
        let x = Tensor::<B, 2>::from_data(TensorData::new(xs, [m, p.d]), &self.device);
        let y = Tensor::<B, 2>::from_data(TensorData::new(ys, [m, 1]), &self.device);
        let residual = self.model.forward(x) - y;
        let weight = self.shard.peers as f64 / (2.0 * p.n as f64);
        let loss = residual.powf_scalar(2.0).sum().mul_scalar(weight);
        let loss_value: f32 = loss.clone().into_scalar().elem();
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optim.step(self.lr, self.model.clone(), grads);
        Ok(StepStats {
            loss: loss_value,
            samples: m,
        })
    }

    fn evaluate(&mut self) -> Result<EvalStats, TaskError> {
        let coef: Vec<f64> = self.params().iter().map(|v| f64::from(*v)).collect();
        Ok(EvalStats {
            loss: self.problem.mse(&coef) as f32,
            accuracy: None,
            samples: self.problem.n,
        })
    }
}

/// What a swarm run learned.
#[derive(Debug)]
pub struct Outcome {
    /// Learned `[w.., b]` on each node after the last round.
    pub learned: Vec<Vec<f64>>,
    /// Each node's final report.
    pub reports: Vec<FinalReport>,
}

/// Runs `nodes` in-process nodes on loopback QUIC for `steps` gradient steps,
/// averaging after every step.
pub async fn run_swarm(
    problem: Arc<Problem>,
    nodes: usize,
    steps: u64,
    lr: f64,
) -> anyhow::Result<Outcome> {
    let swarm = format!("linreg-{}", std::process::id());
    let settings = RunSettings::new(
        &format!("linreg:{}", problem.d),
        &problem.digest(),
        Aggregation::Mean,
        "f32",
        None,
    );
    let config = |bootstrap: Vec<libp2p::Multiaddr>| NodeConfig {
        net: NetConfig {
            swarm: swarm.clone(),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("valid")],
            bootstrap,
            mdns: false,
            request_timeout: Duration::from_secs(10),
            key: None,
            relay: false,
            misbehave_topic: None,
            settings: settings.clone(),
        },
        stop: Default::default(),
        min_peers: nodes,
        wait_for_peers: Duration::from_secs(60),
        schedule: Schedule {
            budget: Budget::Steps(steps),
            average_every: 1,
            samples_per_step: problem.n as u64,
            eval_every: 0,
        },
        // Generous: debug builds of four swarms in one process on a busy CI
        // machine can be slow, and a straggler left out of a round would
        // take a biased step on its own shard.
        averaging: driver::network_averaging(Duration::from_secs(20), Duration::from_secs(30)),
        seed: 7,
        linger: Duration::from_secs(2),
        checkpoints: None,
        resume: None,
        misbehave: None,
        misbehave_state: driver::StateMisbehave::None,
        outer: None,
        top_k: None,
    };
    let mut handles = Vec::new();
    let mut slots = Vec::new();
    let mut boot: Option<libp2p::Multiaddr> = None;
    for i in 0..nodes {
        let latest = Arc::new(Mutex::new(Vec::new()));
        slots.push(latest.clone());
        let task: Box<dyn Task> = Box::new(LinearTask::<Backend>::new(
            problem.clone(),
            lr,
            Default::default(),
            latest,
        ));
        let (addr_tx, addr_rx) = std::sync::mpsc::sync_channel::<String>(1);
        let reporter: driver::Reporter = Box::new(move |e| {
            if let NodeEvent::Listening { addrs, .. } = e {
                if let Some(a) = addrs.first() {
                    let _ = addr_tx.try_send(a.clone());
                }
            }
        });
        let cfg = config(boot.iter().cloned().collect());
        let key = libp2p::identity::Keypair::generate_ed25519();
        handles.push(tokio::spawn(driver::run(cfg, key, task, reporter)));
        if i == 0 {
            let addr =
                tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(20)))
                    .await??;
            boot = Some(addr.parse()?);
        }
    }
    let mut reports = Vec::new();
    for h in handles {
        reports.push(h.await??);
    }
    let learned = slots
        .iter()
        .map(|s| {
            s.lock()
                .expect("not poisoned")
                .iter()
                .map(|v| f64::from(*v))
                .collect()
        })
        .collect();
    Ok(Outcome { learned, reports })
}

/// Relative error `|a - b| / |b|` in the Euclidean norm.
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm
}
