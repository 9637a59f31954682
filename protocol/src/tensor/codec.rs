//! The byte layouts of each [`Encoding`]: encoding, content checks and decoding.
//!
//! `check` and `decode` run after the envelope checks (parameters, byte length, digest) and
//! report the same first error for the same input; both still use only checked access, so
//! a length slip can never turn into a panic.

use super::half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use super::{Encoding, TensorError};

/// Encodes `values` (at most `u32::MAX` of them) in `encoding`, whose top-k `k` is already
/// clamped to the length. An invalid int8 block yields no bytes, which fails the length
/// check of the receiver.
pub(super) fn encode(values: &[f32], encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::F32 => super::f32_le_bytes(values),
        Encoding::F16 => encode_u16(values, f32_to_f16),
        Encoding::Bf16 => encode_u16(values, f32_to_bf16),
        Encoding::Int8 { block } => {
            if encoding.validate().is_err() {
                return Vec::new();
            }
            let block = block as usize;
            let blocks = values.len().div_ceil(block);
            let mut out = vec![0u8; blocks * 4 + values.len()];
            let (scales, quants) = out.split_at_mut(blocks * 4);
            // The scales of a group of blocks first, then their values: each scale ends in
            // two divisions, and side by side they overlap instead of stalling every block
            // (int8 encoding ~25% faster at the default block). A group stays in L1.
            let group = (INT8_GROUP_VALUES / block).clamp(1, INT8_GROUP_BLOCKS);
            let mut group_scales = [0f32; INT8_GROUP_BLOCKS];
            for ((group_values, scale_dst), quant_dst) in values
                .chunks(block * group)
                .zip(scales.as_chunks_mut::<4>().0.chunks_mut(group))
                .zip(quants.chunks_mut(block * group))
            {
                for (scale, chunk) in group_scales.iter_mut().zip(group_values.chunks(block)) {
                    *scale = int8_scale(chunk);
                }
                for (((chunk, quant), scale), dst) in group_values
                    .chunks(block)
                    .zip(quant_dst.chunks_mut(block))
                    .zip(&group_scales)
                    .zip(scale_dst)
                {
                    *dst = scale.to_le_bytes();
                    int8_quantize_block(chunk, *scale, quant);
                }
            }
            out
        }
        Encoding::TopK { k } => top_k_bytes(values, &top_k_indices(values, k)),
    }
}

/// Values per group of int8 blocks whose scales [`encode`] computes together (16 KiB).
const INT8_GROUP_VALUES: usize = 4096;

/// The most blocks in such a group.
const INT8_GROUP_BLOCKS: usize = 64;

/// One u16 bit pattern per value.
fn encode_u16(values: &[f32], convert: fn(f32) -> u16) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 2];
    for (dst, v) in out.as_chunks_mut::<2>().0.iter_mut().zip(values) {
        *dst = convert(*v).to_le_bytes();
    }
    out
}

/// The int8 scale of one block: the smallest f32 not below `max|x| / 127` (so every value
/// quantises into -127..=127 and a block with any non-zero value has a non-zero scale),
/// capped so that `127 * scale` stays finite. NaN if the block holds a non-finite value,
/// so the payload is refused like an `F32` one with NaN would be.
pub(super) fn int8_scale(block: &[f32]) -> f32 {
    // One branch-free pass over the bit patterns: with the sign bit cleared, finite values
    // order like their magnitudes and every infinity or NaN lies above them all, so one
    // maximum gives both the largest magnitude and the finiteness verdict. Cleared of the
    // sign bit, the patterns are non-negative as i32 too, and a signed comparison is what
    // baseline x86-64 (SSE2) has natively. Written as one plain fold, which the loop
    // vectoriser takes (about 2x faster here than eight hand-kept lanes, which it left scalar).
    let max_bits = block
        .iter()
        .map(|x| (x.to_bits() & 0x7fff_ffff) as i32)
        .fold(0, i32::max);
    // Non-negative, so the conversion back is lossless.
    let max_bits = max_bits.unsigned_abs();
    if max_bits >= f32::INFINITY.to_bits() {
        return f32::NAN;
    }
    scale_for_max(f32::from_bits(max_bits))
}

/// The int8 scale of a block whose largest magnitude is `max` (finite, not negative).
fn scale_for_max(max: f32) -> f32 {
    let exact = f64::from(max) / 127.0;
    let mut scale = exact as f32;
    if f64::from(scale) < exact {
        scale = scale.next_up();
    }
    while !scale_is_valid(scale) {
        scale = scale.next_down();
    }
    scale
}

/// What a receiver accepts as a scale: finite, not negative (nor -0), and `127 * scale`
/// finite, so that every decoded value is finite.
fn scale_is_valid(scale: f32) -> bool {
    scale.is_finite() && scale.is_sign_positive() && (scale * 127.0).is_finite()
}

/// Quantises the finite values of one block, whose scale is `scale` (from [`int8_scale`]),
/// into `out`, one two's-complement byte each, every one in -127..=127.
///
/// Each value becomes `x * (1 / scale)` in f32, rounded to the nearest integer (ties to
/// even). The f32 reciprocal and product stray from `x / scale` by at most `127 * 2^-23`,
/// so the decoded error stays within `scale * (1/2 + 2^-16)`. This is what the encoder
/// promises (receivers check only the range), and it is 2x faster than dividing each
/// value in f64, which baseline x86-64 does two values at a time. A scale so small that
/// its reciprocal overflows (a subnormal block) divides instead, and an all-zero block
/// (scale 0) gives zeros.
fn int8_quantize_block(block: &[f32], scale: f32, out: &mut [u8]) {
    let inverse = 1.0 / scale;
    if inverse.is_finite() {
        for (q, x) in out.iter_mut().zip(block) {
            *q = int8_round(*x * inverse);
        }
    } else if scale > 0.0 {
        for (q, x) in out.iter_mut().zip(block) {
            *q = int8_round((f64::from(*x) / f64::from(scale)) as f32);
        }
    } else {
        out.fill(0);
    }
}

/// `q` rounded to the nearest integer (ties to even) and clamped to -127..=127, as a two's
/// complement byte.
///
/// Branch-free, so the loops around it vectorise. Adding [`ROUNDING_SHIFT`] rounds it (the
/// FPU rounds the sum ties to even, where `round_ties_even` would call the C library's
/// `rint` on baseline x86-64) and leaves the integer in the sum's low mantissa bits: the low
/// byte is the result, with no float-to-int conversion (whose saturation kept these loops
/// ~2x slower).
#[inline]
fn int8_round(q: f32) -> u8 {
    // Compare-and-select rather than `clamp`, which also carries NaN through: these are
    // single min/max instructions. Values are finite here.
    let q = if q > 127.0 { 127.0 } else { q };
    let q = if q < -127.0 { -127.0 } else { q };
    let [low, ..] = (q + ROUNDING_SHIFT).to_bits().to_le_bytes();
    low
}

/// 1.5 * 2^23: the sum with any `|q| <= 127` lies in [2^23, 2^24), where f32 holds integers
/// exactly and nothing finer, so its bit pattern is `0x4b4...` plus `2^22 + round(q)`.
const ROUNDING_SHIFT: f32 = 12_582_912.0;

/// The values `quants` (checked: no -128) decode to with their blocks' `scales`.
fn int8_dequantize(scales: &[[u8; 4]], quants: &[u8], block: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(quants.len());
    for (scale, chunk) in scales.iter().zip(quants.chunks(block.max(1))) {
        out.extend(int8_block_values(scale, chunk));
    }
    out
}

/// The values of one int8 block with its little-endian `scale`.
fn int8_block_values<'a>(scale: &[u8; 4], quants: &'a [u8]) -> impl Iterator<Item = f32> + 'a {
    let scale = f32::from_le_bytes(*scale);
    quants
        .iter()
        .map(move |q| f32::from(i8::from_le_bytes([*q])) * scale)
}

/// Indices of the `k` largest-magnitude values, ascending. Ties in magnitude keep the lower
/// index, so every peer selects the same entries; NaN ranks above every number (and so is
/// kept, making the payload refused). Vectors longer than `u32::MAX` select nothing: a
/// payload cannot describe them anyway.
pub(super) fn top_k_indices(values: &[f32], k: u32) -> Vec<u32> {
    let Ok(n) = u32::try_from(values.len()) else {
        return Vec::new();
    };
    let k = k.min(n) as usize;
    if k == 0 {
        return Vec::new();
    }
    // Exactly k nonzero values (a sparsified part sent losslessly, see
    // `AveragingConfig::sparse`): every zero ranks below them, so they are the selection.
    let nonzero = || (0..n).filter(|&i| values.get(i as usize).is_some_and(|v| *v != 0.0));
    if nonzero().count() == k {
        return nonzero().collect();
    }
    select_top_k(values, n, k)
}

/// [`top_k_indices`] by selection over all `n` indices, for `0 < k <= n`.
pub(super) fn select_top_k(values: &[f32], n: u32, k: usize) -> Vec<u32> {
    let magnitude = |i: u32| values.get(i as usize).map_or(0.0, |v| v.abs());
    let mut idx: Vec<u32> = (0..n).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            magnitude(b).total_cmp(&magnitude(a)).then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// The top-k body: `(index, values[index])` for each of `indices` (ascending, in range).
pub(super) fn top_k_bytes(values: &[f32], indices: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; indices.len() * 8];
    for (dst, &i) in out.as_chunks_mut::<8>().0.iter_mut().zip(indices) {
        let v = values.get(i as usize).copied().unwrap_or(0.0);
        let [a, b, c, d] = i.to_le_bytes();
        let [e, f, g, h] = v.to_le_bytes();
        *dst = [a, b, c, d, e, f, g, h];
    }
    out
}

/// The values a receiver decodes from `encode(values, encoding)`, for a valid encoding and
/// finite values.
pub(super) fn quantize(values: &[f32], encoding: Encoding) -> Vec<f32> {
    match encoding {
        Encoding::F32 => values.to_vec(),
        Encoding::F16 => values.iter().map(|v| f16_to_f32(f32_to_f16(*v))).collect(),
        Encoding::Bf16 => values
            .iter()
            .map(|v| bf16_to_f32(f32_to_bf16(*v)))
            .collect(),
        Encoding::Int8 { block } => {
            // Through the bytes, so it is the decoder's answer by construction. An invalid
            // block encodes to no bytes (callers check first): the values stay as they are.
            let bytes = encode(values, encoding);
            let blocks = values.len().div_ceil(block.max(1) as usize);
            match bytes.split_at_checked(blocks * 4) {
                Some((scales, quants)) if quants.len() == values.len() => {
                    int8_dequantize(scales.as_chunks::<4>().0, quants, block as usize)
                }
                _ => values.to_vec(),
            }
        }
        Encoding::TopK { k } => {
            let mut out = vec![0f32; values.len()];
            for i in top_k_indices(values, k) {
                if let (Some(dst), Some(v)) = (out.get_mut(i as usize), values.get(i as usize)) {
                    *dst = *v;
                }
            }
            out
        }
    }
}

/// The byte length the envelope checked, reported again if a slice turns out short.
fn mismatch(bytes: &[u8], expected: usize) -> TensorError {
    TensorError::LengthMismatch {
        expected: expected as u64,
        got: bytes.len() as u64,
    }
}

/// Splits an int8 body into its scales and values, after checking every scale.
fn int8_parts(bytes: &[u8], len: u32, block: u32) -> Result<(&[[u8; 4]], &[u8]), TensorError> {
    let blocks = (len as usize).div_ceil(block.max(1) as usize);
    let Some((scales, quants)) = bytes.split_at_checked(blocks * 4) else {
        return Err(mismatch(bytes, blocks * 4 + len as usize));
    };
    let scales = scales.as_chunks::<4>().0;
    if quants.len() != len as usize || scales.len() != blocks {
        return Err(mismatch(bytes, blocks * 4 + len as usize));
    }
    for (b, s) in scales.iter().enumerate() {
        let scale = f32::from_le_bytes(*s);
        if !scale_is_valid(scale) {
            return Err(TensorError::BadScale {
                block: b,
                scale_bits: scale.to_bits(),
            });
        }
    }
    Ok((scales, quants))
}

/// The first int8 value of -128, if any.
fn int8_range(quants: &[u8]) -> Result<(), TensorError> {
    // Honest payloads have none: a branch-free pass per block vectorises (the early exit of
    // a plain `position` tested one byte at a time, half of an int8 decode), and only a
    // block with one is searched.
    let has_min = |block: &[u8]| block.iter().fold(false, |seen, &q| seen | (q == 0x80));
    for (b, block) in quants.chunks(INT8_RANGE_BLOCK).enumerate() {
        if has_min(block) {
            let at = block.iter().position(|&q| q == 0x80).unwrap_or(0);
            return Err(TensorError::Int8OutOfRange {
                index: b * INT8_RANGE_BLOCK + at,
            });
        }
    }
    Ok(())
}

/// Bytes [`int8_range`] checks at a time.
const INT8_RANGE_BLOCK: usize = 4096;

/// Walks a top-k body, checking each entry in order, and hands the valid ones to `put`.
fn top_k_entries(bytes: &[u8], len: u32, mut put: impl FnMut(u32, f32)) -> Result<(), TensorError> {
    let (pairs, rest) = bytes.as_chunks::<8>();
    if !rest.is_empty() {
        return Err(mismatch(bytes, pairs.len() * 8));
    }
    let mut prev: Option<u32> = None;
    for (entry, &[a, b, c, d, e, f, g, h]) in pairs.iter().enumerate() {
        let index = u32::from_le_bytes([a, b, c, d]);
        let value = f32::from_le_bytes([e, f, g, h]);
        if index >= len {
            return Err(TensorError::IndexOutOfRange { entry, index, len });
        }
        if prev.is_some_and(|p| index <= p) {
            return Err(TensorError::IndicesNotAscending { entry, index });
        }
        if !value.is_finite() {
            return Err(TensorError::NonFinite {
                index: index as usize,
            });
        }
        prev = Some(index);
        put(index, value);
    }
    Ok(())
}

/// The first non-finite value's index, if any.
fn first_non_finite_of(values: impl Iterator<Item = f32>) -> Result<(), TensorError> {
    let mut values = values;
    match values.position(|v| !v.is_finite()) {
        Some(index) => Err(TensorError::NonFinite { index }),
        None => Ok(()),
    }
}

/// The content checks of [`decode`], without allocating.
pub(super) fn check(bytes: &[u8], len: u32, encoding: Encoding) -> Result<(), TensorError> {
    match encoding {
        Encoding::F32 => {
            let chunks = exact_chunks::<4>(bytes, len)?;
            match super::first_non_finite_le(chunks) {
                Some(index) => Err(TensorError::NonFinite { index }),
                None => Ok(()),
            }
        }
        Encoding::F16 => {
            let chunks = exact_chunks::<2>(bytes, len)?;
            first_non_finite_of(chunks.iter().map(|c| f16_to_f32(u16::from_le_bytes(*c))))
        }
        Encoding::Bf16 => {
            let chunks = exact_chunks::<2>(bytes, len)?;
            first_non_finite_of(chunks.iter().map(|c| bf16_to_f32(u16::from_le_bytes(*c))))
        }
        Encoding::Int8 { block } => {
            let (_, quants) = int8_parts(bytes, len, block)?;
            int8_range(quants)
        }
        Encoding::TopK { .. } => top_k_entries(bytes, len, |_, _| {}),
    }
}

/// Decodes a body whose envelope (parameters, byte length, digest) has been checked,
/// refusing content no honest encoder produces. `checked`: the body already passed
/// [`check`] for this `len` and `encoding`, so its passes that only check (finiteness,
/// the int8 range) are skipped; the decoded values are the same.
pub(super) fn decode(
    bytes: &[u8],
    len: u32,
    encoding: Encoding,
    checked: bool,
) -> Result<Vec<f32>, TensorError> {
    let out: Vec<f32> = match encoding {
        Encoding::F32 => {
            let chunks = exact_chunks::<4>(bytes, len)?;
            chunks.iter().map(|c| f32::from_le_bytes(*c)).collect()
        }
        Encoding::F16 => {
            let chunks = exact_chunks::<2>(bytes, len)?;
            chunks
                .iter()
                .map(|c| f16_to_f32(u16::from_le_bytes(*c)))
                .collect()
        }
        Encoding::Bf16 => {
            let chunks = exact_chunks::<2>(bytes, len)?;
            chunks
                .iter()
                .map(|c| bf16_to_f32(u16::from_le_bytes(*c)))
                .collect()
        }
        Encoding::Int8 { block } => {
            let (scales, quants) = int8_parts(bytes, len, block)?;
            if !checked {
                int8_range(quants)?;
            }
            // Finite without a pass to check it: every scale is finite with `127 * scale`
            // finite (int8_parts), and every quantised value lies in -127..=127 (int8_range).
            return Ok(int8_dequantize(scales, quants, block as usize));
        }
        Encoding::TopK { .. } => {
            let mut out = vec![0f32; len as usize];
            top_k_entries(bytes, len, |index, value| {
                if let Some(dst) = out.get_mut(index as usize) {
                    *dst = value;
                }
            })?;
            return Ok(out);
        }
    };
    if checked {
        return Ok(out);
    }
    match super::first_non_finite(&out) {
        Some(index) => Err(TensorError::NonFinite { index }),
        None => Ok(out),
    }
}

/// [`decode`] of `out.len()` values into `out`: bodies not `checked` yet are checked whole
/// first, so a refused body leaves `out` untouched. f32 and int8 are written in place; the
/// other encodings, rare on this path, go through [`decode`].
pub(super) fn decode_into(
    bytes: &[u8],
    encoding: Encoding,
    checked: bool,
    out: &mut [f32],
) -> Result<(), TensorError> {
    let len = u32::try_from(out.len()).map_err(|_| mismatch(bytes, usize::MAX))?;
    if !checked {
        check(bytes, len, encoding)?;
    }
    match encoding {
        Encoding::F32 => {
            let chunks = exact_chunks::<4>(bytes, len)?;
            for (dst, c) in out.iter_mut().zip(chunks) {
                *dst = f32::from_le_bytes(*c);
            }
        }
        Encoding::Int8 { block } => {
            let (scales, quants) = int8_parts(bytes, len, block)?;
            let block = block.max(1) as usize;
            for ((scale, chunk), dst) in scales
                .iter()
                .zip(quants.chunks(block))
                .zip(out.chunks_mut(block))
            {
                for (d, v) in dst.iter_mut().zip(int8_block_values(scale, chunk)) {
                    *d = v;
                }
            }
        }
        _ => out.copy_from_slice(&decode(bytes, len, encoding, true)?),
    }
    Ok(())
}

/// The body as exactly `len` groups of `N` bytes.
fn exact_chunks<const N: usize>(bytes: &[u8], len: u32) -> Result<&[[u8; N]], TensorError> {
    let (chunks, rest) = bytes.as_chunks::<N>();
    if !rest.is_empty() || chunks.len() != len as usize {
        return Err(mismatch(bytes, len as usize * N));
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// `x / scale` rounded to the nearest integer (ties to even) and clamped, exactly.
    fn reference_quantize(x: f32, scale: f32) -> i8 {
        if scale == 0.0 {
            return 0;
        }
        (f64::from(x) / f64::from(scale))
            .round_ties_even()
            .clamp(-127.0, 127.0) as i8
    }

    /// One value through [`int8_quantize_block`].
    fn quantize_one(x: f32, scale: f32) -> i8 {
        let mut out = [0u8];
        int8_quantize_block(&[x], scale, &mut out);
        i8::from_le_bytes(out)
    }

    #[test]
    fn int8_quantisation_is_exact_rounding_except_within_its_bound_of_a_tie() {
        let mut rng = Rng::new(7);
        // 1e-40 is subnormal (its reciprocal overflows, so it divides instead).
        let scales = [1.0f32, 0.1, 3.0e-3, 1.0e-40, 2.5e36, f32::MAX / 127.0];
        let mut inexact = 0;
        let mut checked = 0;
        for &scale in &scales {
            // Exact ties (k + 0.5) * scale where representable, their neighbours, the ends,
            // and values spread over the range.
            let ties = (-128i32..=128).flat_map(|k| {
                let tie = ((f64::from(k) + 0.5) * f64::from(scale)) as f32;
                [tie, tie.next_up(), tie.next_down()]
            });
            let spread = (0..20_000).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * 127.0 * scale);
            for x in ties.chain(spread).filter(|x| x.is_finite()) {
                let got = quantize_one(x, scale);
                let want = reference_quantize(x, scale);
                checked += 1;
                if got == want {
                    continue;
                }
                // A different integer only for a quotient this close to a tie between them.
                inexact += 1;
                let exact = f64::from(x) / f64::from(scale);
                assert!(
                    (i32::from(got) - i32::from(want)).abs() == 1
                        && ((exact - exact.floor()) - 0.5).abs() <= 2f64.powi(-16),
                    "{x} / {scale}: {got}, exactly {exact}"
                );
            }
        }
        // Rare: the ties themselves round exactly at scale 1, and the neighbours of a tie
        // are the only values that close to one.
        assert!(
            inexact * 20 < checked,
            "{inexact} of {checked} rounded off the exact"
        );
        assert_eq!(quantize_one(2.5, 1.0), 2);
        assert_eq!(quantize_one(-3.5, 1.0), -4);
        assert_eq!(quantize_one(0.0, 0.0), 0);
        assert_eq!(quantize_one(-0.0, 0.0), 0);
        assert_eq!(quantize_one(1e30, 1.0), 127);
        assert_eq!(quantize_one(-1e30, 1.0), -127);
        assert_eq!(quantize_one(1.0e-40, 1.0e-40), 1);
    }

    #[test]
    fn int8_scale_follows_the_largest_magnitude_in_every_lane_and_the_tail() {
        let mut rng = Rng::new(11);
        for len in 1..=70usize {
            for _ in 0..50 {
                let block: Vec<f32> = (0..len)
                    .map(|_| {
                        let x = (rng.next_f64() * 2.0 - 1.0) as f32;
                        // Some subnormal and some large values, both signs.
                        match rng.next_u64() % 4 {
                            0 => x * 1.0e-39,
                            1 => x * 3.0e38,
                            _ => x,
                        }
                    })
                    .collect();
                let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(
                    int8_scale(&block).to_bits(),
                    scale_for_max(max).to_bits(),
                    "len {len}: {block:?}"
                );
            }
        }
    }

    #[test]
    fn int8_range_names_the_first_minus_128_wherever_it_sits() {
        let n = 3 * INT8_RANGE_BLOCK + 17;
        assert_eq!(int8_range(&vec![0x7f; n]), Ok(()));
        for at in [
            0,
            5,
            INT8_RANGE_BLOCK - 1,
            INT8_RANGE_BLOCK,
            2 * INT8_RANGE_BLOCK + 3,
            n - 1,
        ] {
            let mut quants = vec![0x81u8; n];
            quants[at] = 0x80;
            if at + 1 < n {
                quants[n - 1] = 0x80; // a later one is not the one named
            }
            assert_eq!(
                int8_range(&quants),
                Err(TensorError::Int8OutOfRange { index: at }),
                "at {at}"
            );
        }
    }

    #[test]
    fn int8_scale_refuses_non_finite_blocks_wherever_they_sit() {
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0usize, 5, 63, 64, 66] {
                let mut block = vec![0.5f32; 67];
                block[at] = bad;
                assert!(int8_scale(&block).is_nan(), "{bad} at {at}");
            }
        }
        assert_eq!(int8_scale(&[0.0, -0.0]), 0.0);
        let scale = int8_scale(&[1.0, -254.0, 3.0]);
        assert!(
            scale >= 2.0 && f64::from(scale.next_down()) < 254.0 / 127.0,
            "{scale}"
        );
    }
}
