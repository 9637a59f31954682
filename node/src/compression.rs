//! What `--compression` selects: one dense codec for every averaged vector, or top-k with
//! error feedback for DiLoCo's pseudo-gradients.
//!
//! The protocol's [`Encoding`] describes one payload (`topk:K` keeps K entries of that
//! payload); a swarm needs a setting that holds for every round and every part, so top-k is
//! given here as a fraction of the model's parameters.

use p2ptrain_protocol::tensor::Encoding;
use std::fmt;
use std::str::FromStr;

/// A swarm's `--compression` setting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compression {
    /// Every part is encoded with this dense codec (f32, f16, bf16, int8).
    Dense(Encoding),
    /// DiLoCo only: each round sends this fraction (in (0, 1]) of the pseudo-gradient's
    /// entries, the largest after adding what earlier rounds held back, as exact
    /// (index, value) pairs.
    TopK {
        /// Share of the parameters sent per round.
        fraction: f64,
    },
}

impl Compression {
    /// The dense codec: the one given, or f32 for parts too dense to send as entries.
    pub fn dense(self) -> Encoding {
        match self {
            Compression::Dense(e) => e,
            Compression::TopK { .. } => Encoding::F32,
        }
    }

    /// The top-k fraction, if this is top-k.
    pub fn top_k(self) -> Option<f64> {
        match self {
            Compression::TopK { fraction } => Some(fraction),
            Compression::Dense(_) => None,
        }
    }
}

impl fmt::Display for Compression {
    /// The spelling [`Compression::from_str`] parses back (the testnet passes it on).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Dense(e) => e.fmt(f),
            Compression::TopK { fraction } => write!(f, "topk:{fraction}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    /// `f32`, `f16`, `bf16`, `int8`, `int8:BLOCK`, or `topk:FRACTION` with FRACTION in (0, 1].
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(fraction) = s.strip_prefix("topk:") {
            let f: f64 = fraction.parse().map_err(|_| {
                format!("invalid compression {s:?}: the top-k share {fraction:?} is not a number")
            })?;
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                return Err(format!(
                    "invalid compression {s:?}: the top-k share must be in (0, 1] (0.01 sends 1% \
                     of the entries per round), got {f}"
                ));
            }
            return Ok(Compression::TopK { fraction: f });
        }
        if s == "topk" {
            return Err(
                "invalid compression \"topk\": give the share of entries sent per round, \
                 e.g. topk:0.01"
                    .into(),
            );
        }
        // Every `topk` spelling is handled above, so what parses here is a dense codec
        // whose parameters `Encoding::from_str` has validated.
        let encoding: Encoding = s.parse().map_err(|e| format!("{e}"))?;
        Ok(Compression::Dense(encoding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_bad_ones_are_named() {
        for s in [
            "f32",
            "f16",
            "bf16",
            "int8:64",
            "int8:7",
            "topk:0.01",
            "topk:1",
        ] {
            let c: Compression = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
            assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
        }
        assert_eq!(
            "int8".parse::<Compression>(),
            Ok(Compression::Dense(Encoding::Int8 { block: 64 }))
        );
        let top = "topk:0.05".parse::<Compression>().unwrap();
        assert_eq!(top.top_k(), Some(0.05));
        assert_eq!(top.dense(), Encoding::F32);
        assert_eq!(Compression::Dense(Encoding::F16).top_k(), None);
        for (bad, says) in [
            ("topk", "share of entries"),
            ("topk:0", "(0, 1]"),
            ("topk:1.5", "(0, 1]"),
            ("topk:NaN", "(0, 1]"),
            ("topk:-0.1", "(0, 1]"),
            ("topk:many", "not a number"),
            ("int8:0", "block"),
            ("zstd", "unknown codec"),
        ] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
