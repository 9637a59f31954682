//! A data-parallel node's DiLoCo state: the round-start snapshot and the
//! outer optimizer (see [`p2ptrain_protocol::outer`]).
//!
//! A round contributes the pseudo-gradient `start - current` to the
//! all-reduce, and the averaged pseudo-gradient moves the round start by one
//! outer Nesterov step. The momentum buffer is shared swarm state (every
//! member computes it from the same averaged pseudo-gradients), so it travels
//! with the parameters: the served state is `parameters ++ momentum`, and
//! checkpoints keep it.
//!
//! With top-k (`--compression topk:FRACTION`) a node sends only the largest
//! entries of its pseudo-gradient each round and carries the rest in an
//! error-feedback residual into the next one, so nothing it learned is lost,
//! only delayed. The residual is local: it is not served, not checkpointed,
//! and it is dropped when the model is replaced from outside.

use p2ptrain_protocol::outer::{pseudo_gradient, OuterConfig, OuterError, OuterOptimizer};
use p2ptrain_protocol::tensor::ErrorFeedback;
use tracing::warn;

/// The round-start parameters and the outer optimizer of one node.
#[derive(Debug)]
pub(super) struct Diloco {
    outer: OuterOptimizer,
    /// Parameters at the start of the current round; `None` until known
    /// (at start, or after parameters were installed from elsewhere).
    start: Option<Vec<f32>>,
    /// Top-k with error feedback: entries sent per round and the residual.
    top_k: Option<(u32, ErrorFeedback)>,
}

impl Diloco {
    /// Fresh state (zero momentum) for a model of `num_params` parameters;
    /// with `top_k`, each round sends that fraction (in (0, 1]) of the
    /// pseudo-gradient's entries, at least one.
    pub(super) fn new(
        config: OuterConfig,
        num_params: usize,
        top_k: Option<f64>,
    ) -> Result<Diloco, OuterError> {
        let entries = |fraction: f64| {
            let k = (fraction.clamp(0.0, 1.0) * num_params as f64).ceil();
            (k as u32).max(1)
        };
        Ok(Diloco {
            outer: OuterOptimizer::new(config, num_params)?,
            start: None,
            top_k: top_k.map(|f| (entries(f), ErrorFeedback::new())),
        })
    }

    /// Whether the round-start snapshot must be taken before training on.
    pub(super) fn needs_start(&self) -> bool {
        self.start.is_none()
    }

    /// Records `params` as the start of the coming round.
    pub(super) fn begin(&mut self, params: Vec<f32>) {
        self.start = Some(params);
    }

    /// The round-start parameters, if known (robust rules screen reduced
    /// pseudo-gradients around them).
    pub(super) fn start(&self) -> Option<&[f32]> {
        self.start.as_deref()
    }

    /// Forgets the snapshot: the model's parameters were replaced from outside.
    /// The residual goes too: it was progress relative to a model that is gone.
    pub(super) fn forget_start(&mut self) {
        self.start = None;
        self.forget_residual();
    }

    /// What this node contributes to the round: `start - current`, or with
    /// top-k its largest entries after adding what earlier rounds held back.
    pub(super) fn pseudo_gradient(&mut self, current: &[f32]) -> Result<Vec<f32>, OuterError> {
        // Without a snapshot (never happens in the loop), the round start is
        // the current model: a zero pseudo-gradient moves nobody.
        let start = self.start.as_deref().unwrap_or(current);
        let g = pseudo_gradient(start, current)?;
        Ok(match self.top_k.as_mut() {
            Some((k, feedback)) => feedback.sparsify(&g, *k),
            None => g,
        })
    }

    /// What top-k has held back and not sent yet (empty without top-k, or
    /// before the first round).
    #[cfg(test)]
    pub(super) fn residual(&self) -> &[f32] {
        self.top_k.as_ref().map_or(&[], |(_, f)| f.residual())
    }

    fn forget_residual(&mut self) {
        if let Some((_, feedback)) = self.top_k.as_mut() {
            feedback.reset();
        }
    }

    /// Applies the swarm's averaged pseudo-gradient to the round start and
    /// returns the new parameters, which also start the next round.
    ///
    /// An average that is not finite, or whose step would overflow, can only
    /// come from a hostile or broken member: the round is skipped (the round
    /// start carries on, momentum unchanged) rather than the model lost.
    /// Every member that got the same average skips alike, so models agree.
    pub(super) fn finish(
        &mut self,
        averaged: &[f32],
        current: &[f32],
    ) -> Result<Vec<f32>, OuterError> {
        let mut params = self.start.take().unwrap_or_else(|| current.to_vec());
        match self.outer.step(&mut params, averaged) {
            Ok(()) => {}
            Err(e @ OuterError::NotFinite { .. }) => {
                warn!(error = %e, "outer step skipped: the averaged pseudo-gradient is unusable");
            }
            Err(e) => return Err(e),
        }
        self.start = Some(params.clone());
        Ok(params)
    }

    /// The momentum buffer (for checkpoints).
    pub(super) fn momentum(&self) -> &[f32] {
        self.outer.momentum()
    }

    /// Restores the momentum buffer (from a checkpoint).
    pub(super) fn set_momentum(&mut self, momentum: Vec<f32>) -> Result<(), OuterError> {
        self.outer.set_momentum(momentum)
    }

    /// The state served to joiners: `params` followed by the momentum.
    pub(super) fn served_state(&self, params: &[f32]) -> Vec<f32> {
        let mut state = Vec::with_capacity(params.len() * 2);
        state.extend_from_slice(params);
        state.extend_from_slice(self.outer.momentum());
        state
    }

    /// Takes on a downloaded state (`params ++ momentum`): keeps the momentum
    /// and returns the parameters, which start the next round.
    pub(super) fn install(&mut self, mut state: Vec<f32>) -> Result<Vec<f32>, OuterError> {
        let n = self.outer.momentum().len();
        if state.len() != 2 * n {
            return Err(OuterError::Length {
                what: "downloaded DiLoCo state (parameters and momentum)",
                want: 2 * n,
                got: state.len(),
            });
        }
        let momentum = state.split_off(n);
        self.outer.set_momentum(momentum)?;
        self.forget_residual();
        self.start = Some(state.clone());
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diloco(lr: f32, momentum: f32, n: usize) -> Diloco {
        Diloco::new(OuterConfig { lr, momentum }, n, None).unwrap()
    }

    #[test]
    fn a_round_steps_from_the_snapshot() {
        let mut d = diloco(0.5, 0.9, 2);
        assert!(d.needs_start());
        d.begin(vec![2.0, 0.0]);
        let g = d.pseudo_gradient(&[1.0, 1.0]).unwrap();
        assert_eq!(g, vec![1.0, -1.0]);
        let p = d.finish(&g, &[1.0, 1.0]).unwrap();
        assert!(
            (p[0] - 1.05).abs() < 1e-6 && (p[1] - 0.95).abs() < 1e-6,
            "{p:?}"
        );
        // The new parameters start the next round.
        assert!(!d.needs_start());
        assert_eq!(d.pseudo_gradient(&p).unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn an_unusable_average_skips_the_round() {
        let mut d = diloco(1.0, 0.9, 2);
        d.begin(vec![2.0, 0.0]);
        let momentum = d.momentum().to_vec();
        // Finite, but the step would overflow: the round start carries on.
        let p = d.finish(&[f32::MAX, -f32::MAX], &[1.0, 1.0]).unwrap();
        assert_eq!(p, vec![2.0, 0.0]);
        assert_eq!(d.momentum(), &momentum[..]);
        assert_eq!(d.start(), Some(&[2.0, 0.0][..]));
        // Not finite at all: skipped the same way.
        let p = d.finish(&[f32::NAN, 0.0], &[1.0, 1.0]).unwrap();
        assert_eq!(p, vec![2.0, 0.0]);
        // A gradient of the wrong size is a bug, not a peer's doing: an error.
        assert!(d.finish(&[1.0], &[1.0, 1.0]).is_err());
    }

    #[test]
    fn served_state_round_trips_through_install() {
        let mut a = diloco(0.7, 0.9, 2);
        a.begin(vec![1.0, 1.0]);
        let p = a.finish(&[0.5, -0.25], &[0.5, 1.25]).unwrap();
        let state = a.served_state(&p);
        assert_eq!(state.len(), 4);
        let mut b = diloco(0.7, 0.9, 2);
        assert_eq!(b.install(state).unwrap(), p);
        assert_eq!(b.momentum(), a.momentum());
        assert!(!b.needs_start());
        // A state of the wrong size is refused.
        assert!(b.install(vec![0.0; 3]).is_err());
    }

    #[test]
    fn top_k_sends_the_largest_entries_and_carries_the_rest() {
        let outer = OuterConfig {
            lr: 1.0,
            momentum: 0.0,
        };
        // A quarter of 4 parameters: one entry per round.
        let mut d = Diloco::new(outer, 4, Some(0.25)).unwrap();
        d.begin(vec![0.0; 4]);
        let g = d.pseudo_gradient(&[-3.0, -1.0, 0.0, 0.0]).unwrap();
        assert_eq!(g, vec![3.0, 0.0, 0.0, 0.0]);
        assert_eq!(d.residual(), &[0.0, 1.0, 0.0, 0.0]);
        // lr 1, no momentum: the model moves by exactly what was sent.
        let p = d.finish(&g, &[-3.0, -1.0, 0.0, 0.0]).unwrap();
        assert_eq!(p, vec![-3.0, 0.0, 0.0, 0.0]);
        // Next round: nothing new learned, so the held-back entry goes out.
        assert_eq!(d.pseudo_gradient(&p).unwrap(), vec![0.0, 1.0, 0.0, 0.0]);
        assert!(d.residual().iter().all(|r| *r == 0.0));
        // A model installed from elsewhere drops the residual.
        d.pseudo_gradient(&[5.0, 5.0, 5.0, 4.0]).unwrap();
        assert!(d.residual().iter().any(|r| *r != 0.0));
        d.forget_start();
        assert!(d.residual().is_empty());
        // Tiny fractions still send one entry; a fraction of 1 sends all of them.
        let mut all = Diloco::new(outer, 4, Some(1.0)).unwrap();
        all.begin(vec![0.0; 4]);
        assert_eq!(
            all.pseudo_gradient(&[1.0, 2.0, 3.0, 4.0]).unwrap(),
            vec![-1.0, -2.0, -3.0, -4.0]
        );
        let mut one = Diloco::new(outer, 4, Some(1e-9)).unwrap();
        one.begin(vec![0.0; 4]);
        let g = one.pseudo_gradient(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(g.iter().filter(|v| **v != 0.0).count(), 1);
    }
}
