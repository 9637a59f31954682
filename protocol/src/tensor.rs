//! Flat tensor payloads and how vectors are cut into parts.
//!
//! Peers exchange parameter (or gradient) vectors as [`Payload`]s: a value count, an
//! [`Encoding`], the encoded bytes and the blake3 digest of those bytes. A receiver checks
//! length, digest and finiteness ([`Payload::decode`]) before a value touches its model.
//! [`split_ranges`] fixes how a vector is cut into contiguous parts, identically on every peer.

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::ops::Range;

/// How a payload's values are encoded in its bytes. More codecs (f16/bf16, int8, top-k) come
/// later, so matches outside this crate must keep a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Encoding {
    /// Each value is a little-endian IEEE-754 `f32` (4 bytes).
    F32,
}

/// Raw bytes that serialize as one length-prefixed blob (`serialize_bytes`), not element by
/// element, so large tensors encode and decode with a single copy.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    /// Prints only the length: a tensor's bytes in a log line help nobody.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

/// Accepts a byte string (binary formats) or a sequence of integers (self-describing formats
/// such as JSON) as [`Bytes`].
struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes(v.to_vec()))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        // Never trust a claimed length for pre-allocation.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element::<u8>()? {
            out.push(byte);
        }
        Ok(Bytes(out))
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

/// Why a received payload was refused.
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
        /// Position of the first non-finite value.
        index: usize,
    },
}

impl Payload {
    /// Encodes `values` as little-endian `f32` bytes with their blake3 digest.
    ///
    /// A slice longer than `u32::MAX` values cannot be described by `len`; it produces a
    /// payload that fails [`Payload::decode`] rather than a silently truncated one.
    pub fn from_f32(values: &[f32]) -> Payload {
        let bytes: Vec<u8> = values
            .iter()
            .map(|v| v.to_le_bytes())
            .collect::<Vec<[u8; 4]>>()
            .into_flattened();
        let digest = *blake3::hash(&bytes).as_bytes();
        Payload {
            len: u32::try_from(values.len()).unwrap_or(u32::MAX),
            encoding: Encoding::F32,
            bytes: Bytes(bytes),
            digest,
        }
    }

    /// Checks length, digest and finiteness without allocating the decoded values, so a
    /// codec can refuse a bad message before any state sees it.
    pub fn validate(&self) -> Result<(), TensorError> {
        let chunks = self.checked_f32_bytes()?;
        match chunks
            .iter()
            .position(|c| !f32::from_le_bytes(*c).is_finite())
        {
            Some(index) => Err(TensorError::NonFinite { index }),
            None => Ok(()),
        }
    }

    /// Decodes the values after checking that the byte length equals `len * 4`, the digest
    /// matches and every value is finite.
    pub fn decode(&self) -> Result<Vec<f32>, TensorError> {
        let chunks = self.checked_f32_bytes()?;
        let out: Vec<f32> = chunks.iter().map(|c| f32::from_le_bytes(*c)).collect();
        match out.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(TensorError::NonFinite { index }),
            None => Ok(out),
        }
    }

    /// The bytes as 4-byte groups, after the length and digest checks.
    fn checked_f32_bytes(&self) -> Result<&[[u8; 4]], TensorError> {
        match self.encoding {
            Encoding::F32 => {}
        }
        let expected = u64::from(self.len) * 4;
        let got = self.bytes.0.len() as u64;
        if expected != got {
            return Err(TensorError::LengthMismatch { expected, got });
        }
        if blake3::hash(&self.bytes.0).as_bytes() != &self.digest {
            return Err(TensorError::DigestMismatch);
        }
        let (chunks, rest) = self.bytes.0.as_chunks::<4>();
        if !rest.is_empty() {
            // Unreachable after the length check; refuse rather than ignore the tail.
            return Err(TensorError::LengthMismatch { expected, got });
        }
        Ok(chunks)
    }
}

/// blake3 of the little-endian bytes of `values`: the same digest [`Payload::from_f32`]
/// computes, used to compare whole models across peers without sending them.
pub fn digest_f32(values: &[f32]) -> [u8; 32] {
    const BATCH: usize = 1024;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_roundtrips_values_bitwise() {
        let values = vec![
            0.0,
            -0.0,
            1.5,
            -3.25e-38,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
        ];
        let p = Payload::from_f32(&values);
        assert_eq!(p.len, 7);
        assert_eq!(p.bytes.0.len(), 28);
        assert_eq!(p.bytes.0[..4], 0.0f32.to_le_bytes());
        assert_eq!(p.digest, *blake3::hash(&p.bytes.0).as_bytes());
        let back = p.decode().expect("valid payload");
        let bits: Vec<u32> = back.iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, want);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn decode_names_length_mismatch() {
        let mut p = Payload::from_f32(&[1.0, 2.0]);
        p.len = 3;
        assert_eq!(
            p.decode(),
            Err(TensorError::LengthMismatch {
                expected: 12,
                got: 8
            })
        );
        let mut p = Payload::from_f32(&[1.0, 2.0]);
        p.bytes.0.push(0);
        p.digest = *blake3::hash(&p.bytes.0).as_bytes();
        assert!(matches!(
            p.decode(),
            Err(TensorError::LengthMismatch {
                expected: 8,
                got: 9
            })
        ));
    }

    #[test]
    fn decode_detects_a_flipped_bit() {
        let mut p = Payload::from_f32(&[1.0, 2.0, 3.0]);
        p.bytes.0[5] ^= 0x10;
        assert_eq!(p.decode(), Err(TensorError::DigestMismatch));
        assert_eq!(p.validate(), Err(TensorError::DigestMismatch));
        let mut p = Payload::from_f32(&[1.0]);
        p.digest[31] ^= 1;
        assert_eq!(p.decode(), Err(TensorError::DigestMismatch));
    }

    #[test]
    fn decode_rejects_nan_and_infinity_even_with_a_correct_digest() {
        for (values, index) in [
            (vec![1.0, f32::NAN], 1),
            (vec![f32::INFINITY], 0),
            (vec![0.0, 0.0, f32::NEG_INFINITY], 2),
        ] {
            let p = Payload::from_f32(&values);
            assert_eq!(p.decode(), Err(TensorError::NonFinite { index }));
            assert_eq!(p.validate(), Err(TensorError::NonFinite { index }));
        }
    }

    #[test]
    fn empty_payload_is_valid() {
        let p = Payload::from_f32(&[]);
        assert_eq!(p.decode(), Ok(vec![]));
    }

    #[test]
    fn digest_f32_matches_payload_digest_across_batch_boundaries() {
        for n in [0usize, 1, 1023, 1024, 1025, 5000] {
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
            assert_eq!(
                digest_f32(&values),
                Payload::from_f32(&values).digest,
                "n={n}"
            );
        }
        assert_ne!(digest_f32(&[1.0]), digest_f32(&[1.0, 0.0]));
    }

    #[test]
    fn bytes_serialize_as_one_length_prefixed_blob() {
        let encoded = postcard::to_allocvec(&Bytes(vec![9, 8, 7])).expect("encode");
        assert_eq!(encoded, vec![3, 9, 8, 7]);
        let big = Bytes(vec![0xAA; 300]);
        let encoded = postcard::to_allocvec(&big).expect("encode");
        // varint(300) = [0xAC, 0x02], then the raw bytes.
        assert_eq!(encoded[..2], [0xAC, 0x02]);
        assert_eq!(encoded.len(), 302);
        let back: Bytes = postcard::from_bytes(&encoded).expect("decode");
        assert_eq!(back, big);
        // A length prefix claiming more bytes than present fails instead of allocating.
        assert!(postcard::from_bytes::<Bytes>(&[0xFF, 0xFF, 0xFF, 0x0F, 1]).is_err());
    }

    #[test]
    fn payload_postcard_roundtrip() {
        let p = Payload::from_f32(&[1.0, -2.0]);
        let encoded = postcard::to_allocvec(&p).expect("encode");
        let back: Payload = postcard::from_bytes(&encoded).expect("decode");
        assert_eq!(back, p);
    }

    #[test]
    fn split_ranges_are_contiguous_balanced_and_cover_everything() {
        for len in 0..40 {
            for parts in 1..12 {
                let ranges = split_ranges(len, parts);
                assert_eq!(ranges.len(), parts);
                let mut next = 0;
                for r in &ranges {
                    assert_eq!(r.start, next, "gap in {ranges:?}");
                    next = r.end;
                }
                assert_eq!(next, len);
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{sizes:?}");
            }
        }
        assert_eq!(split_ranges(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split_ranges(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(split_ranges(5, 0), vec![0..5]);
    }
}
