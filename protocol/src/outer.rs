//! The outer optimizer of DiLoCo (local SGD with an outer Nesterov step).
//!
//! Between synchronisations every peer takes H local (inner) optimizer steps
//! from the same round-start parameters `s`. A round then averages the
//! *pseudo-gradient* `g = s - p` (round start minus current parameters)
//! across the swarm, and every peer applies one step of SGD with Nesterov
//! momentum to `s`, as in the DiLoCo paper and PyTorch's
//! `SGD(nesterov=True)`:
//!
//! ```text
//! v = mu * v + g
//! p = s - lr * (g + mu * v)
//! ```
//!
//! With `lr = 1` and `mu = 0` this is `p = s - mean(s - p_i) = mean(p_i)`:
//! plain parameter averaging. Peers that start a round from the same `s` and
//! `v` and receive the same averaged `g` end it with the same parameters and
//! momentum, so the momentum buffer is part of the swarm's shared state.
//!
//! Pure functions over `f32` slices; no I/O.

/// Why an outer step cannot be taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OuterError {
    /// A setting is out of its valid range.
    #[error("{name} must be {want}, got {got}")]
    BadSetting {
        /// The setting (`outer learning rate`, `outer momentum`).
        name: &'static str,
        /// The valid range, in words.
        want: &'static str,
        /// The value given.
        got: f32,
    },
    /// Two vectors that must have one entry per parameter differ in length.
    #[error("{what} has {got} values but the model has {want} parameters")]
    Length {
        /// Which vector.
        what: &'static str,
        /// Parameters of the model.
        want: usize,
        /// Values given.
        got: usize,
    },
    /// A value that the step would use is NaN or infinite.
    #[error("{what} value {index} is not finite")]
    NotFinite {
        /// Which vector.
        what: &'static str,
        /// Index of the first bad value.
        index: usize,
    },
}

/// Settings of the outer optimizer; all peers of a swarm must use the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OuterConfig {
    /// Outer learning rate (DiLoCo uses 0.7).
    pub lr: f32,
    /// Nesterov momentum (DiLoCo uses 0.9; 0 turns momentum off).
    pub momentum: f32,
}

impl OuterConfig {
    /// Checks that the settings make a sound optimizer, naming the bad one.
    pub fn validate(&self) -> Result<(), OuterError> {
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return Err(OuterError::BadSetting {
                name: "outer learning rate",
                want: "in (0, 10]",
                got: self.lr,
            });
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(OuterError::BadSetting {
                name: "outer momentum",
                want: "in [0, 1)",
                got: self.momentum,
            });
        }
        Ok(())
    }
}

/// `start - current`, the pseudo-gradient a peer contributes to a round.
pub fn pseudo_gradient(start: &[f32], current: &[f32]) -> Result<Vec<f32>, OuterError> {
    same_len("current parameters", start.len(), current.len())?;
    Ok(start.iter().zip(current).map(|(s, p)| s - p).collect())
}

/// The outer optimizer's state: its settings and the momentum buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct OuterOptimizer {
    config: OuterConfig,
    momentum: Vec<f32>,
}

impl OuterOptimizer {
    /// A fresh optimizer for `num_params` parameters (momentum zero).
    pub fn new(config: OuterConfig, num_params: usize) -> Result<OuterOptimizer, OuterError> {
        config.validate()?;
        Ok(OuterOptimizer {
            config,
            momentum: vec![0.0; num_params],
        })
    }

    /// The settings.
    pub fn config(&self) -> OuterConfig {
        self.config
    }

    /// The momentum buffer, to save in checkpoints and serve to joiners.
    pub fn momentum(&self) -> &[f32] {
        &self.momentum
    }

    /// Replaces the momentum buffer (from a checkpoint or a download);
    /// refuses one of the wrong length or with a non-finite value.
    pub fn set_momentum(&mut self, momentum: Vec<f32>) -> Result<(), OuterError> {
        same_len("momentum", self.momentum.len(), momentum.len())?;
        finite("momentum", &momentum)?;
        self.momentum = momentum;
        Ok(())
    }

    /// One outer step: `params` holds the round-start parameters on entry and
    /// the new parameters on return; `grad` is the swarm's averaged
    /// pseudo-gradient. Nothing changes if an input is malformed, or if the
    /// step would take a parameter or the momentum out of f32's range (finite
    /// but huge averaged values, as a hostile member can send).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), OuterError> {
        let n = self.momentum.len();
        same_len("round-start parameters", n, params.len())?;
        same_len("pseudo-gradient", n, grad.len())?;
        finite("pseudo-gradient", grad)?;
        let OuterConfig { lr, momentum: mu } = self.config;
        // Checked before anything is written, with the same arithmetic.
        let overflow = params
            .iter()
            .zip(&self.momentum)
            .zip(grad)
            .position(|((p, v), g)| {
                let (p, v) = nesterov(lr, mu, *p, *v, *g);
                !(p.is_finite() && v.is_finite())
            });
        if let Some(index) = overflow {
            return Err(OuterError::NotFinite {
                what: "outer step's result",
                index,
            });
        }
        for ((p, v), g) in params.iter_mut().zip(&mut self.momentum).zip(grad) {
            (*p, *v) = nesterov(lr, mu, *p, *v, *g);
        }
        Ok(())
    }
}

/// One parameter's Nesterov step: its new value and momentum.
fn nesterov(lr: f32, mu: f32, p: f32, v: f32, g: f32) -> (f32, f32) {
    let v = mu * v + g;
    (p - lr * (g + mu * v), v)
}

fn same_len(what: &'static str, want: usize, got: usize) -> Result<(), OuterError> {
    if want == got {
        Ok(())
    } else {
        Err(OuterError::Length { what, want, got })
    }
}

fn finite(what: &'static str, values: &[f32]) -> Result<(), OuterError> {
    match crate::tensor::first_non_finite(values) {
        Some(index) => Err(OuterError::NotFinite { what, index }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(lr: f32, momentum: f32, n: usize) -> OuterOptimizer {
        OuterOptimizer::new(OuterConfig { lr, momentum }, n).unwrap()
    }

    #[test]
    fn pseudo_gradient_is_start_minus_current() {
        assert_eq!(
            pseudo_gradient(&[1.0, 2.0, -1.0], &[0.5, 2.5, -1.0]).unwrap(),
            vec![0.5, -0.5, 0.0]
        );
        assert!(matches!(
            pseudo_gradient(&[1.0], &[1.0, 2.0]),
            Err(OuterError::Length {
                want: 1,
                got: 2,
                ..
            })
        ));
    }

    /// Two steps with lr 0.5, mu 0.9, computed by hand:
    /// step 1: g = 1: v = 1, p = 2 - 0.5 * (1 + 0.9) = 1.05;
    /// step 2: g = 2: v = 0.9 + 2 = 2.9, p = 1.05 - 0.5 * (2 + 2.61) = -1.255.
    #[test]
    fn nesterov_matches_hand_computed_values() {
        let mut o = opt(0.5, 0.9, 2);
        let mut p = vec![2.0, 0.0];
        o.step(&mut p, &[1.0, -1.0]).unwrap();
        assert!((p[0] - 1.05).abs() < 1e-6, "{p:?}");
        assert!((p[1] - 0.95).abs() < 1e-6, "{p:?}");
        assert_eq!(o.momentum(), &[1.0, -1.0]);
        o.step(&mut p, &[2.0, 0.0]).unwrap();
        assert!((p[0] - -1.255).abs() < 1e-6, "{p:?}");
        // g = 0, v = -0.9: p = 0.95 - 0.5 * (0 - 0.81) = 1.355.
        assert!((p[1] - 1.355).abs() < 1e-6, "{p:?}");
        assert!((o.momentum()[0] - 2.9).abs() < 1e-6);
        assert!((o.momentum()[1] - -0.9).abs() < 1e-6);
    }

    #[test]
    fn a_step_that_would_overflow_changes_nothing() {
        let mut o = opt(1.0, 0.9, 2);
        let mut p = vec![1.0, 2.0];
        o.step(&mut p, &[0.5, 0.5]).unwrap();
        let (before_p, before_v) = (p.clone(), o.momentum().to_vec());
        // Finite, but momentum plus gradient, or the move, leaves f32's range.
        for grad in [[0.0, f32::MAX], [-f32::MAX, 0.0]] {
            let err = o.step(&mut p, &grad).unwrap_err();
            assert!(
                matches!(
                    err,
                    OuterError::NotFinite {
                        what: "outer step's result",
                        ..
                    }
                ),
                "{err}"
            );
            assert_eq!(p, before_p);
            assert_eq!(o.momentum(), &before_v[..]);
        }
        // A non-finite gradient is refused before anything is computed.
        assert!(o.step(&mut p, &[f32::INFINITY, 0.0]).is_err());
        assert_eq!(p, before_p);
    }

    #[test]
    fn without_momentum_it_is_plain_sgd_on_the_pseudo_gradient() {
        let mut o = opt(0.7, 0.0, 1);
        let mut p = vec![1.0];
        o.step(&mut p, &[0.5]).unwrap();
        assert!((p[0] - 0.65).abs() < 1e-6);
        assert_eq!(o.momentum(), &[0.5]);
    }

    /// lr 1, mu 0: applying the mean pseudo-gradient to the shared round
    /// start gives the mean of the peers' parameters (plain averaging).
    #[test]
    fn lr_one_without_momentum_is_parameter_averaging() {
        let start = [0.3f32, -1.2, 4.0, 0.0];
        let peers = [
            [0.1f32, -1.0, 3.5, 0.2],
            [0.5, -1.5, 4.25, -0.1],
            [0.2, -1.1, 4.1, 0.05],
        ];
        let grads: Vec<Vec<f32>> = peers
            .iter()
            .map(|p| pseudo_gradient(&start, p).unwrap())
            .collect();
        let mean_grad: Vec<f32> = (0..start.len())
            .map(|i| grads.iter().map(|g| g[i]).sum::<f32>() / 3.0)
            .collect();
        let mean_params: Vec<f32> = (0..start.len())
            .map(|i| peers.iter().map(|p| p[i]).sum::<f32>() / 3.0)
            .collect();
        let mut p = start.to_vec();
        opt(1.0, 0.0, start.len()).step(&mut p, &mean_grad).unwrap();
        for (a, b) in p.iter().zip(&mean_params) {
            assert!((a - b).abs() < 1e-6, "{p:?} vs {mean_params:?}");
        }
    }

    /// Peers with the same start and momentum that apply the same averaged
    /// pseudo-gradient stay bit-identical, round after round.
    #[test]
    fn peers_with_the_same_state_stay_identical() {
        let mut a = opt(0.7, 0.9, 3);
        let mut b = a.clone();
        let (mut pa, mut pb) = (vec![1.0, 2.0, 3.0], vec![1.0, 2.0, 3.0]);
        for r in 0..5 {
            let g = [0.1 * r as f32, -0.2, 0.05];
            a.step(&mut pa, &g).unwrap();
            b.step(&mut pb, &g).unwrap();
        }
        assert_eq!(pa, pb);
        assert_eq!(a, b);
    }

    #[test]
    fn bad_inputs_are_refused_without_changing_state() {
        let mut o = opt(0.7, 0.9, 2);
        let mut p = vec![1.0, 1.0];
        assert!(matches!(
            o.step(&mut p, &[1.0]),
            Err(OuterError::Length {
                what: "pseudo-gradient",
                ..
            })
        ));
        assert!(matches!(
            o.step(&mut p, &[1.0, f32::NAN]),
            Err(OuterError::NotFinite { index: 1, .. })
        ));
        assert_eq!(p, vec![1.0, 1.0]);
        assert_eq!(o.momentum(), &[0.0, 0.0]);
        assert!(o.set_momentum(vec![0.0]).is_err());
        assert!(o.set_momentum(vec![0.0, f32::INFINITY]).is_err());
        assert!(o.set_momentum(vec![0.5, 0.5]).is_ok());
    }

    #[test]
    fn settings_are_checked() {
        for (lr, mu) in [
            (0.0, 0.9),
            (-1.0, 0.0),
            (f32::NAN, 0.0),
            (0.7, 1.0),
            (0.7, -0.1),
        ] {
            let err = OuterConfig { lr, momentum: mu }.validate().unwrap_err();
            assert!(err.to_string().contains("outer"), "{err}");
        }
        assert!(OuterConfig {
            lr: 1.0,
            momentum: 0.0
        }
        .validate()
        .is_ok());
    }
}
