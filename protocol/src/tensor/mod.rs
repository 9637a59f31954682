//! Flat tensor payloads, their compression codecs, and how vectors are cut into parts.
//!
//! Peers exchange parameter (or gradient) vectors as [`Payload`]s: a value count, an
//! [`Encoding`], the encoded bytes and the blake3 digest of those bytes. A receiver checks
//! length, digest and content ([`Payload::decode`], [`Payload::validate`]) before a value
//! touches its model. [`split_ranges`] fixes how a vector is cut into contiguous parts,
//! identically on every peer.
//!
//! # Codecs and their error bounds
//! [`Payload::encode`] compresses, [`Payload::decode`] restores; [`quantize`] gives the values
//! a receiver will decode without building the payload. For finite input:
//!
//! | encoding | bytes for `len` values | error of a decoded value `y` against the input `x` |
//! |---|---|---|
//! | [`Encoding::F32`] | `4 len` | none (bit-exact) |
//! | [`Encoding::F16`] | `2 len` | `\|y-x\| <= 2^-11 \|x\|` for `2^-14 <= \|x\| <= 65504`; `<= 2^-25` below; saturates at ±65504 |
//! | [`Encoding::Bf16`] | `2 len` | `\|y-x\| <= 2^-8 \|x\|` for normal `x` (saturates at ±3.39e38) |
//! | [`Encoding::Int8`] | `len + 4 ceil(len/block)` | `\|y-x\| <= scale (1/2 + 2^-16)` (+ half an ulp of `y`); `scale`: the block's `max\|x\|/127` rounded up to an f32 |
//! | [`Encoding::TopK`] | `8 k` | kept entries exact, every other entry decodes to 0 |
//!
//! Finite input never decodes to a non-finite value (f16/bf16 saturate instead of
//! overflowing). Non-finite input yields a payload that receivers refuse, as with `F32`
//! (except an entry top-k drops).
//!
//! Top-k is meant for pseudo-gradients with error feedback ([`ErrorFeedback`]), where what is
//! dropped this round is sent later; it is no way to average parameters.

mod bytes;
mod codec;
mod feedback;
mod half;
#[cfg(test)]
mod tests;

pub(crate) use bytes::with_shared_frame;
pub use bytes::Bytes;
pub use feedback::ErrorFeedback;
pub use half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// Largest int8 block: bounds the values one scale covers (larger blocks lose precision to
/// one outlier) and keeps hostile block sizes out.
pub const MAX_INT8_BLOCK: u32 = 65_536;

/// Block size `int8` means without an explicit `:BLOCK`: small enough that one outlier costs
/// little precision, large enough that scales cost only 4 bytes per 64 values (~6%).
pub const DEFAULT_INT8_BLOCK: u32 = 64;

/// How a payload's values are encoded in its bytes. The swarm picks one (`--compression`);
/// new codecs may come, so matches outside this crate must keep a wildcard arm.
///
/// Byte layouts (all little-endian):
/// - `F32`: `len` × f32.
/// - `F16`, `Bf16`: `len` × u16 bit patterns.
/// - `Int8 { block }`: `ceil(len / block)` × f32 scales, then `len` × i8; value `i` decodes
///   to `q[i] * scale[i / block]`.
/// - `TopK { k }`: `k` × (u32 index, f32 value), indices strictly ascending; absent indices
///   decode to 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Encoding {
    /// Each value is a little-endian IEEE-754 `f32` (4 bytes): exact, the default.
    F32,
    /// IEEE-754 binary16 (2 bytes): 11 significant bits, range ±65504. Halves traffic for
    /// values of moderate range (parameters, normalised gradients).
    F16,
    /// bfloat16 (2 bytes): 8 significant bits, the full f32 range. Halves traffic when the
    /// range matters more than precision.
    Bf16,
    /// Blockwise absmax int8: per `block` values one f32 scale (the block's max |x| / 127,
    /// rounded up to an f32) and each value rounded to the nearest multiple of it. About 4x
    /// smaller than f32; the error is relative to the block's largest value.
    Int8 {
        /// Values per scale, in `1..=MAX_INT8_BLOCK`.
        block: u32,
    },
    /// Sparse: the `k` largest-magnitude values with their indices (8 bytes each), the rest
    /// zero. Only useful with error feedback on gradients; `k <= len`.
    TopK {
        /// Number of entries kept.
        k: u32,
    },
}

impl Encoding {
    /// Checks the parameters that do not depend on the vector: the int8 block size. Lets a
    /// CLI or config refuse a bad `--compression` before any payload is built.
    pub fn validate(self) -> Result<(), TensorError> {
        match self {
            Encoding::Int8 { block } if block == 0 || block > MAX_INT8_BLOCK => {
                Err(TensorError::BadBlock { block })
            }
            _ => Ok(()),
        }
    }

    /// The exact byte count of `len` values in this encoding, or why no payload of `len`
    /// values can have this encoding (bad block size, `k > len`). Lets senders size messages
    /// against the wire limit and receivers check lengths before anything else.
    pub fn encoded_bytes(self, len: u32) -> Result<u64, TensorError> {
        self.validate()?;
        let len64 = u64::from(len);
        Ok(match self {
            Encoding::F32 => len64 * 4,
            Encoding::F16 | Encoding::Bf16 => len64 * 2,
            Encoding::Int8 { block } => len64 + len64.div_ceil(u64::from(block)) * 4,
            Encoding::TopK { k } => {
                if k > len {
                    return Err(TensorError::TooManyEntries { k, len });
                }
                u64::from(k) * 8
            }
        })
    }

    /// Whether every value travels (all but top-k): only dense encodings can carry
    /// parameters to be averaged.
    pub fn is_dense(self) -> bool {
        !matches!(self, Encoding::TopK { .. })
    }
}

impl fmt::Display for Encoding {
    /// The `--compression` spelling, which [`Encoding::from_str`] parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encoding::F32 => f.write_str("f32"),
            Encoding::F16 => f.write_str("f16"),
            Encoding::Bf16 => f.write_str("bf16"),
            Encoding::Int8 { block } => write!(f, "int8:{block}"),
            Encoding::TopK { k } => write!(f, "topk:{k}"),
        }
    }
}

/// Why a `--compression` value could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid compression {input:?}: {reason}; expected f32, f16, bf16, int8, \
     int8:BLOCK (BLOCK in 1..={MAX_INT8_BLOCK}) or topk:K"
)]
pub struct ParseEncodingError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for Encoding {
    type Err = ParseEncodingError;

    /// Parses `f32`, `f16`, `bf16`, `int8` (block [`DEFAULT_INT8_BLOCK`]), `int8:BLOCK` or
    /// `topk:K`, so the node's `--compression` flag and config file share one spelling.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseEncodingError {
            input: s.to_owned(),
            reason,
        };
        let number = |text: &str, what: &str| {
            text.parse::<u32>()
                .map_err(|e| err(format!("{what} {text:?} is not a number: {e}")))
        };
        let encoding = match s.split_once(':') {
            None => match s {
                "f32" => Encoding::F32,
                "f16" => Encoding::F16,
                "bf16" => Encoding::Bf16,
                "int8" => Encoding::Int8 {
                    block: DEFAULT_INT8_BLOCK,
                },
                "topk" => return Err(err("topk needs the number of entries kept".into())),
                _ => return Err(err("unknown codec".into())),
            },
            Some(("int8", block)) => Encoding::Int8 {
                block: number(block, "block size")?,
            },
            Some(("topk", k)) => Encoding::TopK {
                k: number(k, "entry count")?,
            },
            Some(_) => return Err(err("only int8 and topk take a parameter".into())),
        };
        encoding.validate().map_err(|e| err(e.to_string()))?;
        Ok(encoding)
    }
}

/// An encoded vector of values with its digest: the unit peers send to each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Number of values (not bytes).
    pub len: u32,
    /// How `bytes` encodes the values.
    pub encoding: Encoding,
    /// The encoded values.
    pub bytes: Bytes,
    /// blake3 of `bytes`, so corruption or tampering is caught before use.
    pub digest: [u8; 32],
}

/// Why a received payload was refused (or an encoding cannot describe a vector).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The byte count does not match the declared value count.
    #[error(
        "payload carries {got} bytes but its header declares {expected} bytes; \
         the sender's encoder or the transport is broken"
    )]
    LengthMismatch {
        /// Bytes implied by `len` and the encoding.
        expected: u64,
        /// Bytes actually present.
        got: u64,
    },
    /// The bytes do not hash to the declared digest.
    #[error("payload bytes do not match their blake3 digest: corrupted or tampered in transit")]
    DigestMismatch,
    /// A value is NaN or infinite; averaging it in would poison every peer's model.
    #[error("payload value at index {index} is NaN or infinite; the sender's model has diverged")]
    NonFinite {
        /// Position (in the decoded vector) of the first non-finite value.
        index: usize,
    },
    /// A payload decoded into a place for another number of values.
    #[error("payload carries {len} values where {want} are expected")]
    WrongCount {
        /// Values the payload declares.
        len: u32,
        /// Values the place holds.
        want: usize,
    },
    /// An int8 block size of 0 or above [`MAX_INT8_BLOCK`].
    #[error(
        "int8 block size {block} is outside 1..={MAX_INT8_BLOCK}; choose a block in that range"
    )]
    BadBlock {
        /// The block size given.
        block: u32,
    },
    /// A top-k payload that claims more entries than the vector has values.
    #[error("top-k payload keeps {k} entries of a {len}-value vector; k cannot exceed the length")]
    TooManyEntries {
        /// Entries claimed.
        k: u32,
        /// Values in the vector.
        len: u32,
    },
    /// An int8 block scale that is NaN, infinite, negative, or so large that 127 × scale
    /// overflows: no encoder produces it, and it would decode to non-finite values.
    #[error(
        "int8 block {block} has scale {} (bits {scale_bits:#010x}); a scale must be finite, \
         non-negative and at most f32::MAX / 127",
        f32::from_bits(*.scale_bits)
    )]
    BadScale {
        /// Index of the block.
        block: usize,
        /// The scale's f32 bits (kept as bits so the error stays `Eq`).
        scale_bits: u32,
    },
    /// An int8 value of -128: encoders use the symmetric range -127..=127.
    #[error("int8 value at index {index} is -128, outside the symmetric range -127..=127")]
    Int8OutOfRange {
        /// Position of the value.
        index: usize,
    },
    /// A top-k entry whose index is not below the vector length.
    #[error("top-k entry {entry} names index {index}, beyond the {len}-value vector")]
    IndexOutOfRange {
        /// Position of the entry in the payload.
        entry: usize,
        /// The index it names.
        index: u32,
        /// Values in the vector.
        len: u32,
    },
    /// A top-k entry whose index does not exceed the previous entry's (unsorted or duplicate).
    #[error(
        "top-k entry {entry} names index {index}, not above the previous entry's; \
         indices must be strictly ascending"
    )]
    IndicesNotAscending {
        /// Position of the entry in the payload.
        entry: usize,
        /// The index it names.
        index: u32,
    },
}

impl Payload {
    /// Encodes `values` as little-endian `f32` bytes with their blake3 digest: the exact
    /// encoding, kept as a shortcut for [`Payload::encode`]`(values, Encoding::F32)`.
    ///
    /// A slice longer than `u32::MAX` values cannot be described by `len`; it produces a
    /// payload that fails [`Payload::decode`] rather than a silently truncated one.
    pub fn from_f32(values: &[f32]) -> Payload {
        Payload::encode(values, Encoding::F32)
    }

    /// Encodes `values` with `encoding`, digest over the encoded bytes. See the module docs
    /// for each codec's error bound.
    ///
    /// Never panics. A top-k `k` above the length is clamped to it (the payload's encoding
    /// says the `k` used); ties in magnitude keep the lower index. An int8 block outside
    /// `1..=MAX_INT8_BLOCK` (see [`Encoding::validate`]), or a slice longer than `u32::MAX`
    /// values, produces a payload that fails [`Payload::decode`] instead of a wrong one.
    pub fn encode(values: &[f32], encoding: Encoding) -> Payload {
        let Ok(len) = u32::try_from(values.len()) else {
            // One byte is never a valid body for u32::MAX values in any encoding.
            return Payload::sealed(u32::MAX, encoding, vec![0]);
        };
        let encoding = match encoding {
            Encoding::TopK { k } => Encoding::TopK { k: k.min(len) },
            other => other,
        };
        Payload::sealed(len, encoding, codec::encode(values, encoding))
    }

    /// [`Payload::encode`], leaving in `values` what receivers decode from it (what
    /// [`quantize`] gives), read back from the bytes: cheaper than quantising a second time,
    /// and for f32 the input itself, untouched. A reducer keeps these as its result.
    pub fn encode_keeping_decoded(values: &mut [f32], encoding: Encoding) -> Payload {
        let payload = Payload::encode(values, encoding);
        if encoding == Encoding::F32 {
            return payload;
        }
        // Bytes that do not decode (non-finite input, f16/bf16 overflow of finite input, an
        // int8 block out of range) are refused by receivers too: keep `quantize`'s answer.
        let decoded = codec::decode(&payload.bytes, payload.len, payload.encoding, false)
            .unwrap_or_else(|_| quantize(values, encoding));
        if decoded.len() == values.len() {
            values.copy_from_slice(&decoded);
        }
        payload
    }

    /// Wraps encoded bytes with their digest.
    fn sealed(len: u32, encoding: Encoding, bytes: Vec<u8>) -> Payload {
        let bytes = Bytes::from(bytes);
        let digest = bytes.blake3();
        Payload {
            len,
            encoding,
            bytes,
            digest,
        }
    }

    /// Runs every check [`Payload::decode`] runs without allocating the decoded values, so
    /// the wire codec can refuse a bad message before any state sees it: encoding
    /// parameters, byte length, digest, then content (finiteness, int8 scales and range,
    /// top-k indices). Agrees with `decode` on every input.
    pub fn validate(&self) -> Result<(), TensorError> {
        self.check_envelope()?;
        if !self.bytes.checked_as(self.len, self.encoding) {
            codec::check(&self.bytes, self.len, self.encoding)?;
            self.bytes.mark_checked(self.len, self.encoding);
        }
        Ok(())
    }

    /// Decodes the values after the checks of [`Payload::validate`]. The result has `len`
    /// values, all finite.
    ///
    /// It allocates `len` values; a top-k payload can declare a large `len` in few bytes,
    /// so a receiver that knows how many values to expect compares `len` first.
    ///
    /// Bytes that passed [`Payload::validate`] for this `len` and encoding (a received
    /// message was) are not checked for content a second time.
    pub fn decode(&self) -> Result<Vec<f32>, TensorError> {
        self.check_envelope()?;
        let checked = self.bytes.checked_as(self.len, self.encoding);
        codec::decode(&self.bytes, self.len, self.encoding, checked)
    }

    /// [`Payload::decode`] into `out` (which must hold `len` values) instead of a new
    /// vector: a received reduced part goes straight to its place in the averaged model,
    /// without a part-sized allocation and a second copy. On an error `out` is left as it
    /// was: every check runs before the first value is written.
    pub fn decode_into(&self, out: &mut [f32]) -> Result<(), TensorError> {
        self.check_envelope()?;
        if out.len() != self.len as usize {
            return Err(TensorError::WrongCount {
                len: self.len,
                want: out.len(),
            });
        }
        let checked = self.bytes.checked_as(self.len, self.encoding);
        codec::decode_into(&self.bytes, self.encoding, checked, out)
    }

    /// The values of an f32 payload as they lie in its bytes (little-endian), after the
    /// checks of [`Payload::validate`]; `Ok(None)` for other encodings. A reducer sums a
    /// received part from here instead of decoding a copy of it first.
    pub fn f32_le(&self) -> Result<Option<&[[u8; 4]]>, TensorError> {
        if self.encoding != Encoding::F32 {
            return Ok(None);
        }
        self.validate()?;
        Ok(Some(self.bytes.as_chunks::<4>().0))
    }

    /// Encoding parameters, byte length against `len`, digest.
    fn check_envelope(&self) -> Result<(), TensorError> {
        let expected = self.encoding.encoded_bytes(self.len)?;
        let got = self.bytes.len() as u64;
        if expected != got {
            return Err(TensorError::LengthMismatch { expected, got });
        }
        if self.bytes.blake3() != self.digest {
            return Err(TensorError::DigestMismatch);
        }
        Ok(())
    }
}

/// The values a receiver decodes from [`Payload::encode`]`(values, encoding)`, bit for bit,
/// without hashing or checking (int8 goes through its bytes, the other encodings value by
/// value): what a reducer keeps when its encoded result cannot be read back, and the
/// reference that codec tests and simulations compare against.
///
/// Meant for finite values (for which the equality above holds). An encoding that cannot
/// describe `values` (int8 block out of range, more than `u32::MAX` values) leaves them
/// unchanged.
pub fn quantize(values: &[f32], encoding: Encoding) -> Vec<f32> {
    if encoding.validate().is_err() || u32::try_from(values.len()).is_err() {
        return values.to_vec();
    }
    codec::quantize(values, encoding)
}

/// Values checked at a time by [`first_non_finite`]: a branch-free pass over a block
/// vectorises, an early exit per value does not (10M values: ~10 ms before, ~1 ms after).
const FINITE_BLOCK: usize = 1024;

/// The index of the first NaN or infinity in `values`, if any. Every vector a peer
/// averages, sends or installs goes through this, so it is built to be fast.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    first_bad_bits(
        values.len(),
        |i| values[i].to_bits(),
        values
            .chunks(FINITE_BLOCK)
            .map(|block| block.iter().fold(true, |ok, v| ok & v.is_finite())),
    )
}

/// [`first_non_finite`] of little-endian f32 bytes, without decoding them first.
pub(crate) fn first_non_finite_le(values: &[[u8; 4]]) -> Option<usize> {
    first_bad_bits(
        values.len(),
        |i| u32::from_le_bytes(values[i]),
        values.chunks(FINITE_BLOCK).map(|block| {
            block
                .iter()
                .fold(true, |ok, b| ok & finite_bits(u32::from_le_bytes(*b)))
        }),
    )
}

/// Whether f32 `bits` encode a finite value (exponent not all ones).
fn finite_bits(bits: u32) -> bool {
    bits & 0x7f80_0000 != 0x7f80_0000
}

/// The first index whose bits are not finite, searching only the first block whose
/// `blocks_ok` entry is false.
fn first_bad_bits(
    len: usize,
    bits: impl Fn(usize) -> u32,
    mut blocks_ok: impl Iterator<Item = bool>,
) -> Option<usize> {
    let block = blocks_ok.position(|ok| !ok)?;
    let start = block * FINITE_BLOCK;
    (start..len.min(start + FINITE_BLOCK)).find(|&i| !finite_bits(bits(i)))
}

/// The little-endian bytes of `values` (the f32 wire encoding, and how models are
/// stored and served).
pub fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    f32_le_bytes_into(values, &mut out);
    out
}

/// [`f32_le_bytes`] into `out`, replacing what it held: a node serving its model
/// after every round writes into the buffer of the state it stops serving
/// instead of having a fresh one mapped and zeroed.
///
/// Values go through a small stack buffer that compiles to plain copies on
/// little-endian machines, so `out` is written once and never zero-filled first.
pub fn f32_le_bytes_into(values: &[f32], out: &mut Vec<u8>) {
    const BATCH: usize = 1024;
    out.clear();
    out.reserve(values.len() * 4);
    let mut staged = [[0u8; 4]; BATCH];
    for batch in values.chunks(BATCH) {
        for (dst, v) in staged.iter_mut().zip(batch) {
            *dst = v.to_le_bytes();
        }
        out.extend_from_slice(staged[..batch.len()].as_flattened());
    }
}

/// blake3 of the little-endian bytes of `values`: the same digest [`Payload::from_f32`]
/// computes, used to compare whole models across peers without sending them.
pub fn digest_f32(values: &[f32]) -> [u8; 32] {
    // 16 Ki values (64 KiB) per update: blake3 hashes at most as many of its 1 KiB
    // chunks side by side as one update holds (4 at the old 4 KiB, against the 8 or
    // 16 its SIMD paths take); still small enough for the stack and the L2 cache.
    // Not measured apart: the round-level A/B showed no difference beyond noise.
    const BATCH: usize = 16 * 1024;
    let mut hasher = blake3::Hasher::new();
    let mut buf = [[0u8; 4]; BATCH];
    for batch in values.chunks(BATCH) {
        for (dst, v) in buf.iter_mut().zip(batch) {
            *dst = v.to_le_bytes();
        }
        let filled = &buf[..batch.len()];
        hasher.update(filled.as_flattened());
    }
    *hasher.finalize().as_bytes()
}

/// Cuts `0..len` into `parts` contiguous ranges whose sizes differ by at most one (the first
/// `len % parts` ranges are one longer), covering `0..len` exactly. Every peer computes the
/// same cut, so "part k" means the same values everywhere. If `len < parts` the trailing
/// ranges are empty; `parts == 0` is treated as 1.
pub fn split_ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let base = len / parts;
    let extra = len % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for k in 0..parts {
        let size = base + usize::from(k < extra);
        out.push(start..start + size);
        start += size;
    }
    out
}
