//! Top-k compression with error feedback.

use super::codec::{top_k_bytes, top_k_indices};
use super::{Encoding, Payload};

/// Top-k sparsification with error feedback, for pseudo-gradients (DiLoCo-style outer
/// gradients) sent every round: what top-k drops is not lost but carried in a residual and
/// added to the next round's input, so every value is eventually sent and the sum of what
/// was sent tracks the sum of the inputs:
///
/// `Σ_t decode(compress(x_t)) = Σ_t x_t − residual` (up to f32 rounding of the additions).
///
/// Holds one residual per value; deterministic (ties in magnitude keep the lower index), so
/// a peer that replays its inputs reproduces its payloads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Starts with an empty residual (it is sized by the first [`ErrorFeedback::compress`]).
    pub fn new() -> Self {
        ErrorFeedback::default()
    }

    /// What has been dropped and not yet sent, per value: the caller's view of the lag.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Forgets the residual, e.g. after the model was replaced by a downloaded one.
    pub fn reset(&mut self) {
        self.residual.clear();
    }

    /// Adds the residual to `values`, sends the `k` largest-magnitude sums (clamped to the
    /// length) as an [`Encoding::TopK`] payload and keeps the rest as the new residual.
    ///
    /// A change of vector length resets the residual to zeros first: a residual of another
    /// vector means nothing for this one. Values must be finite (a NaN is selected first,
    /// giving a payload receivers refuse). A slice longer than `u32::MAX` values yields a
    /// payload that fails decode and leaves the residual untouched.
    pub fn compress(&mut self, values: &[f32], k: u32) -> Payload {
        let Some(kept) = self.take_top_k(values, k) else {
            return Payload::encode(values, Encoding::TopK { k });
        };
        let bytes = top_k_bytes(&kept.dense, &kept.indices);
        Payload::sealed(
            values.len() as u32,
            Encoding::TopK {
                k: kept.indices.len() as u32,
            },
            bytes,
        )
    }

    /// [`ErrorFeedback::compress`] without the payload: the same selection and residual
    /// update, returned as a dense vector that is zero outside the `k` entries sent. For a
    /// caller whose transport packs nonzeros itself (sparse averaging, see
    /// `AveragingConfig::sparse`). A slice longer than `u32::MAX` values comes back as it is
    /// and leaves the residual untouched.
    pub fn sparsify(&mut self, values: &[f32], k: u32) -> Vec<f32> {
        match self.take_top_k(values, k) {
            Some(kept) => kept.dense,
            None => values.to_vec(),
        }
    }

    /// Adds `values` to the residual, picks its `k` largest-magnitude entries, moves them
    /// out of the residual and returns them; `None` for a vector no payload can describe.
    fn take_top_k(&mut self, values: &[f32], k: u32) -> Option<Kept> {
        u32::try_from(values.len()).ok()?;
        if self.residual.len() != values.len() {
            self.residual = vec![0.0; values.len()];
        }
        for (r, v) in self.residual.iter_mut().zip(values) {
            *r += *v;
        }
        let indices = top_k_indices(&self.residual, k);
        let mut dense = vec![0.0; values.len()];
        for &i in &indices {
            if let (Some(r), Some(d)) =
                (self.residual.get_mut(i as usize), dense.get_mut(i as usize))
            {
                *d = std::mem::take(r);
            }
        }
        Some(Kept { indices, dense })
    }
}

/// The entries one round sends: their indices (ascending) and the vector with only them set.
struct Kept {
    indices: Vec<u32>,
    dense: Vec<f32>,
}
