//! Tests of payloads, every codec's error bound, hostile input and the error feedback.

use super::*;

/// Bit patterns, so comparisons tell -0.0 from 0.0 and compare NaNs.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

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
    assert_eq!(p.bytes.len(), 28);
    assert_eq!(p.bytes[..4], 0.0f32.to_le_bytes());
    assert_eq!(p.digest, *blake3::hash(&p.bytes).as_bytes());
    let back = p.decode().expect("valid payload");
    assert_eq!(bits(&back), bits(&values));
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
    p.bytes.make_mut().push(0);
    p.digest = *blake3::hash(&p.bytes).as_bytes();
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
    p.bytes.make_mut()[5] ^= 0x10;
    assert_eq!(p.decode(), Err(TensorError::DigestMismatch));
    assert_eq!(p.validate(), Err(TensorError::DigestMismatch));
    let mut p = Payload::from_f32(&[1.0]);
    p.digest[31] ^= 1;
    assert_eq!(p.decode(), Err(TensorError::DigestMismatch));
}

/// `validate` remembers a passed content check so `decode` skips it, but only for the same
/// bytes, value count and encoding: bytes changed afterwards, or read as another encoding,
/// are checked again.
#[test]
fn a_passed_content_check_holds_only_for_what_it_checked() {
    let values = [1.0f32, -2.0, 3.5, 0.25];
    let p = Payload::from_f32(&values);
    assert!(!p.bytes.checked_as(4, Encoding::F32));
    assert_eq!(p.validate(), Ok(()));
    assert!(p.bytes.checked_as(4, Encoding::F32));
    assert!(!p.bytes.checked_as(4, Encoding::F16));
    assert_eq!(bits(&p.decode().expect("valid")), bits(&values));
    // A clone shares the bytes and the verdict.
    assert!(p.clone().bytes.checked_as(4, Encoding::F32));

    // Changed after the check: a NaN (with a matching digest) is refused again.
    let mut bad = p.clone();
    bad.bytes.make_mut()[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    bad.digest = *blake3::hash(&bad.bytes).as_bytes();
    assert!(!bad.bytes.checked_as(4, Encoding::F32));
    assert_eq!(bad.decode(), Err(TensorError::NonFinite { index: 1 }));

    // Checked as f32, read as int8: 16 bytes are 8 int8 values in blocks of 4 (two scales).
    // Their own content check finds the -128 the f32 check never looked for.
    let mut bytes = Vec::new();
    bytes.extend(1.0f32.to_le_bytes());
    bytes.extend(1.0f32.to_le_bytes());
    bytes.extend([1, 2, 0x80, 3, 4, 5, 6, 7]);
    let mut relabelled = forge(4, Encoding::F32, bytes);
    assert_eq!(relabelled.validate(), Ok(()));
    relabelled.len = 8;
    relabelled.encoding = Encoding::Int8 { block: 4 };
    assert_eq!(
        relabelled.decode(),
        Err(TensorError::Int8OutOfRange { index: 2 })
    );
    assert_eq!(
        relabelled.validate(),
        Err(TensorError::Int8OutOfRange { index: 2 })
    );
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
    for n in [0usize, 1, 1023, 1024, 1025, 16383, 16384, 16385, 40000] {
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        assert_eq!(
            digest_f32(&values),
            Payload::from_f32(&values).digest,
            "n={n}"
        );
        let bytes = f32_le_bytes(&values);
        assert_eq!(bytes.len(), n * 4);
        assert_eq!(digest_f32(&values), *blake3::hash(&bytes).as_bytes());
        if let Some(v) = values.last() {
            assert_eq!(bytes[bytes.len() - 4..], v.to_le_bytes());
        }
    }
    assert_ne!(digest_f32(&[1.0]), digest_f32(&[1.0, 0.0]));
}

#[test]
fn f32_le_bytes_into_replaces_what_the_buffer_held_and_keeps_its_allocation() {
    let mut out = vec![0xaa_u8; 9000 * 4];
    let kept = out.as_ptr();
    for n in [9000usize, 1025, 1024, 1, 0, 2049] {
        let values: Vec<f32> = (0..n).map(|i| (i as f32).sin() * 1e3 - 0.25).collect();
        f32_le_bytes_into(&values, &mut out);
        let want: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(out, want, "n={n}");
        assert_eq!(out, f32_le_bytes(&values), "n={n}");
        // Never more than the buffer already held: no new allocation.
        assert_eq!(out.as_ptr(), kept, "n={n}");
    }
}

#[test]
fn bytes_serialize_as_one_length_prefixed_blob() {
    let encoded = postcard::to_allocvec(&Bytes::from(vec![9, 8, 7])).expect("encode");
    assert_eq!(encoded, vec![3, 9, 8, 7]);
    let big = Bytes::from(vec![0xAA; 300]);
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

// ---------------------------------------------------------------------------------------
// Codecs
// ---------------------------------------------------------------------------------------

use crate::rng::Rng;

const ENCODINGS: [Encoding; 9] = [
    Encoding::F32,
    Encoding::F16,
    Encoding::Bf16,
    Encoding::Int8 { block: 1 },
    Encoding::Int8 { block: 7 },
    Encoding::Int8 { block: 64 },
    Encoding::Int8 {
        block: MAX_INT8_BLOCK,
    },
    Encoding::TopK { k: 0 },
    Encoding::TopK { k: 5 },
];

/// A payload with a correct digest over arbitrary bytes, as a hostile peer would send.
fn forge(len: u32, encoding: Encoding, bytes: Vec<u8>) -> Payload {
    Payload {
        len,
        encoding,
        digest: *blake3::hash(&bytes).as_bytes(),
        bytes: Bytes::from(bytes),
    }
}

/// Values spanning many magnitudes, signs, zeros and an outlier or two.
fn spread(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.range(0..10) {
            0 => 0.0,
            1 => (rng.next_f64() * 2.0 - 1.0) as f32 * 1e4,
            2 => (rng.next_f64() * 2.0 - 1.0) as f32 * 1e-3,
            _ => (rng.next_f64() * 2.0 - 1.0) as f32,
        })
        .collect()
}

/// Half an ulp of `y`: the rounding error of the one f32 product int8 decoding performs.
fn half_ulp(y: f32) -> f64 {
    let exp = ((y.to_bits() >> 23) & 0xff) as i32;
    2f64.powi(exp.max(1) - 151)
}

/// The int8 scales of a payload (the first `ceil(len / block)` f32s of its body).
fn int8_scales(p: &Payload) -> Vec<f32> {
    let Encoding::Int8 { block } = p.encoding else {
        panic!("not int8");
    };
    let blocks = (p.len as usize).div_ceil(block as usize);
    p.bytes[..blocks * 4]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

#[test]
fn from_f32_is_encode_f32() {
    let values = [1.0, -2.5, 3e-40, 0.0];
    assert_eq!(
        Payload::from_f32(&values),
        Payload::encode(&values, Encoding::F32)
    );
}

#[test]
fn every_encoding_roundtrips_and_quantize_matches_decode_bitwise() {
    let mut rng = Rng::new(1);
    for n in [0usize, 1, 2, 6, 7, 8, 63, 64, 65, 200, 1000] {
        let values = spread(&mut rng, n);
        for enc in ENCODINGS {
            let p = Payload::encode(&values, enc);
            assert_eq!(p.len as usize, n);
            assert_eq!(
                p.bytes.len() as u64,
                p.encoding.encoded_bytes(p.len).expect("valid"),
                "{enc} n={n}"
            );
            assert_eq!(p.digest, *blake3::hash(&p.bytes).as_bytes());
            assert_eq!(p.validate(), Ok(()), "{enc} n={n}");
            let back = p.decode().expect("honest payload decodes");
            assert_eq!(back.len(), n);
            assert!(back.iter().all(|v| v.is_finite()));
            let q = quantize(&values, enc);
            assert_eq!(bits(&q), bits(&back), "quantize != decode for {enc} n={n}");
            let mut kept = values.clone();
            let same = Payload::encode_keeping_decoded(&mut kept, enc);
            assert_eq!(same, p, "{enc} n={n}");
            assert_eq!(bits(&kept), bits(&back), "kept != decode for {enc} n={n}");
            // Floating-point codecs and top-k are idempotent: re-encoding decoded values
            // changes nothing. (Int8 is not: the scale of a decoded block may move by an ulp.)
            if !matches!(enc, Encoding::Int8 { .. }) {
                assert_eq!(
                    Payload::encode(&back, p.encoding)
                        .decode()
                        .map(|v| bits(&v)),
                    Ok(bits(&back)),
                    "{enc} n={n}"
                );
            }
            // Postcard carries every encoding.
            let wire = postcard::to_allocvec(&p).expect("encode");
            assert_eq!(postcard::from_bytes::<Payload>(&wire), Ok(p));
        }
    }
}

#[test]
fn f32_payload_layout_is_unchanged_on_the_wire() {
    // The F32 variant keeps tag 0, so F32 payloads are byte-identical to before the codecs.
    let wire = postcard::to_allocvec(&Payload::from_f32(&[1.0])).expect("encode");
    assert_eq!(wire[..2], [1, 0]);
    assert_eq!(wire[2], 4);
}

#[test]
fn encoded_sizes_follow_the_layouts() {
    assert_eq!(Encoding::F32.encoded_bytes(10), Ok(40));
    assert_eq!(Encoding::F16.encoded_bytes(10), Ok(20));
    assert_eq!(
        Encoding::Bf16.encoded_bytes(u32::MAX),
        Ok(2 * u64::from(u32::MAX))
    );
    assert_eq!(Encoding::Int8 { block: 64 }.encoded_bytes(0), Ok(0));
    assert_eq!(Encoding::Int8 { block: 64 }.encoded_bytes(64), Ok(64 + 4));
    assert_eq!(Encoding::Int8 { block: 64 }.encoded_bytes(65), Ok(65 + 8));
    assert_eq!(
        Encoding::Int8 { block: 1 }.encoded_bytes(u32::MAX),
        Ok(5 * u64::from(u32::MAX))
    );
    assert_eq!(Encoding::TopK { k: 3 }.encoded_bytes(10), Ok(24));
    assert_eq!(
        Encoding::TopK { k: 11 }.encoded_bytes(10),
        Err(TensorError::TooManyEntries { k: 11, len: 10 })
    );
    assert_eq!(
        Encoding::Int8 { block: 0 }.encoded_bytes(10),
        Err(TensorError::BadBlock { block: 0 })
    );
    assert!(Encoding::F32.is_dense() && Encoding::Int8 { block: 8 }.is_dense());
    assert!(!Encoding::TopK { k: 1 }.is_dense());
}

#[test]
fn f16_error_is_within_2_pow_minus_11_relative() {
    let mut rng = Rng::new(2);
    // Log-uniform over the f16 normal range [2^-14, 65504], both signs.
    let values: Vec<f32> = (0..100_000)
        .map(|_| {
            let m = 2f64.powf(rng.next_f64() * 29.99 - 14.0).min(65504.0) as f32;
            if rng.chance(0.5) {
                m
            } else {
                -m
            }
        })
        .collect();
    let back = Payload::encode(&values, Encoding::F16)
        .decode()
        .expect("decode");
    for (x, y) in values.iter().zip(&back) {
        let err = (f64::from(*x) - f64::from(*y)).abs();
        assert!(err <= f64::from(x.abs()) * 2f64.powi(-11), "{x} -> {y}");
    }
    // Below the normal range the error is at most half the subnormal spacing, 2^-25.
    let tiny: Vec<f32> = (0..10_000)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * 2f32.powi(-14))
        .collect();
    let back = quantize(&tiny, Encoding::F16);
    for (x, y) in tiny.iter().zip(&back) {
        assert!(
            (f64::from(*x) - f64::from(*y)).abs() <= 2f64.powi(-25),
            "{x}"
        );
    }
    // Beyond 65504 it saturates instead of producing infinity.
    let big = [65504.0, 65520.0, -1e9, f32::MAX, f32::MIN];
    let back = Payload::encode(&big, Encoding::F16)
        .decode()
        .expect("finite");
    assert_eq!(back, vec![65504.0, 65504.0, -65504.0, 65504.0, -65504.0]);
}

#[test]
fn bf16_error_is_within_2_pow_minus_8_relative() {
    let mut rng = Rng::new(3);
    let values: Vec<f32> = (0..100_000)
        .map(|_| {
            // Log-uniform over most of the f32 normal range.
            let m = 2f64.powf(rng.next_f64() * 250.0 - 125.0) as f32;
            if rng.chance(0.5) {
                m
            } else {
                -m
            }
        })
        .collect();
    let back = Payload::encode(&values, Encoding::Bf16)
        .decode()
        .expect("decode");
    for (x, y) in values.iter().zip(&back) {
        let err = (f64::from(*x) - f64::from(*y)).abs();
        assert!(err <= f64::from(x.abs()) * 2f64.powi(-8), "{x} -> {y}");
    }
    let back = Payload::encode(&[f32::MAX, f32::MIN], Encoding::Bf16)
        .decode()
        .expect("saturates, stays finite");
    assert!(back.iter().all(|v| v.is_finite() && v.abs() > 3.38e38));
}

#[test]
fn int8_error_is_within_half_a_scale_and_the_reciprocals_slack_per_block() {
    let mut rng = Rng::new(4);
    for block in [1u32, 2, 7, 64, 256, 4096, MAX_INT8_BLOCK] {
        // At least 9,000 values, so the encoder's groups of blocks (4096 values) repeat.
        let n = (block as usize * 3 + 5).clamp(9_000, 150_000);
        let mut values = spread(&mut rng, n);
        // Per-block character: all-zero blocks, tiny (subnormal) blocks, huge blocks, outliers.
        for (b, chunk) in values.chunks_mut(block as usize).enumerate() {
            match b % 5 {
                1 => chunk.fill(0.0),
                2 => chunk.iter_mut().for_each(|v| *v *= 1e-40),
                // spread() is within ±1e4: up to 3.4e38, exercising the scale cap.
                3 => chunk.iter_mut().for_each(|v| *v *= 3.4e34),
                4 => chunk[0] = 1e6,
                _ => {}
            }
        }
        let p = Payload::encode(&values, Encoding::Int8 { block });
        let back = p.decode().expect("decode");
        let scales = int8_scales(&p);
        for ((chunk, got), scale) in values
            .chunks(block as usize)
            .zip(back.chunks(block as usize))
            .zip(&scales)
        {
            let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = f64::from(*scale);
            // The scale is max|x|/127, rounded up to an f32 (capped so 127 s stays finite).
            if (f64::from(max) / 127.0) * 127.0 < f64::from(f32::MAX) * 0.999 {
                assert!(
                    s * 127.0 >= f64::from(max),
                    "block {block}: scale too small"
                );
                assert!(
                    f64::from(scale.next_down()) < f64::from(max) / 127.0 || max == 0.0,
                    "block {block}: scale not the smallest"
                );
            }
            assert_eq!(max == 0.0, *scale == 0.0);
            for (x, y) in chunk.iter().zip(got) {
                let err = (f64::from(*x) - f64::from(*y)).abs();
                // Half a scale, and what the encoder's f32 reciprocal adds (see the table).
                let bound = s * (0.5 + 2f64.powi(-16)) + half_ulp(*y);
                assert!(
                    err <= bound,
                    "block {block}: {x} -> {y}, err {err} > {bound} (scale {s})"
                );
                assert!(y.abs() <= max || (f64::from(y.abs()) - f64::from(max)) <= bound);
            }
        }
    }
}

#[test]
fn int8_scale_is_capped_so_extreme_blocks_stay_finite() {
    let values = [f32::MAX, -f32::MAX, 1.0, f32::MAX.next_down()];
    let p = Payload::encode(&values, Encoding::Int8 { block: 4 });
    let scale = int8_scales(&p)[0];
    assert!((scale * 127.0).is_finite(), "127 * scale overflows");
    assert!(
        scale.next_up() * 127.0 == f32::INFINITY,
        "the cap is the largest valid scale"
    );
    let back = p.decode().expect("finite");
    for (x, y) in values.iter().zip(&back) {
        let err = (f64::from(*x) - f64::from(*y)).abs();
        assert!(err <= f64::from(scale) * 0.5 + half_ulp(*y), "{x} -> {y}");
    }
}

#[test]
fn top_k_keeps_the_largest_entries_exactly_and_zeroes_the_rest() {
    let mut rng = Rng::new(5);
    for (n, k) in [
        (100usize, 10u32),
        (100, 0),
        (100, 100),
        (37, 1),
        (1000, 999),
    ] {
        let values = spread(&mut rng, n);
        let p = Payload::encode(&values, Encoding::TopK { k });
        assert_eq!(p.encoding, Encoding::TopK { k });
        let back = p.decode().expect("decode");
        let kept: Vec<usize> = (0..n).filter(|&i| back[i] != 0.0).collect();
        for i in 0..n {
            assert!(back[i] == 0.0 || back[i].to_bits() == values[i].to_bits());
        }
        // Every kept magnitude is at least every dropped one.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
        let mut want: Vec<usize> = order[..k as usize].to_vec();
        want.sort_unstable();
        let want_nonzero: Vec<usize> = want.iter().copied().filter(|&i| values[i] != 0.0).collect();
        assert_eq!(kept, want_nonzero, "n={n} k={k}");
    }
    // k beyond the length is clamped; ties keep the lower index.
    let p = Payload::encode(&[1.0, -2.0], Encoding::TopK { k: 9 });
    assert_eq!(p.encoding, Encoding::TopK { k: 2 });
    assert_eq!(p.decode(), Ok(vec![1.0, -2.0]));
    let p = Payload::encode(&[3.0, -3.0, 3.0, 1.0], Encoding::TopK { k: 2 });
    assert_eq!(p.decode(), Ok(vec![3.0, -3.0, 0.0, 0.0]));
}

#[test]
fn top_k_of_exactly_the_nonzero_count_selects_what_the_full_selection_does() {
    let mut rng = Rng::new(9);
    for density in [1usize, 7, 50] {
        let mut v: Vec<f32> = spread(&mut rng, 400);
        for (i, x) in v.iter_mut().enumerate() {
            if i % density != 0 {
                *x = if i % 3 == 0 { -0.0 } else { 0.0 };
            }
        }
        v[5] = f32::NAN;
        v[6] = f32::from_bits(1); // subnormal, still nonzero
        let k = v.iter().filter(|x| **x != 0.0).count();
        let fast = super::codec::top_k_indices(&v, k as u32);
        assert_eq!(fast, super::codec::select_top_k(&v, 400, k));
        assert_eq!(fast.len(), k);
    }
}

#[test]
fn error_feedback_telescopes_sent_plus_residual_equals_inputs() {
    let mut rng = Rng::new(6);
    let n = 1000;
    for k in [1u32, 10, 100, 1000] {
        let mut ef = ErrorFeedback::new();
        let mut sent = vec![0f64; n];
        let mut input = vec![0f64; n];
        for _ in 0..50 {
            let x: Vec<f32> = spread(&mut rng, n);
            let p = ef.compress(&x, k);
            assert_eq!(p.encoding, Encoding::TopK { k });
            let y = p.decode().expect("decode");
            for i in 0..n {
                sent[i] += f64::from(y[i]);
                input[i] += f64::from(x[i]);
            }
        }
        let residual = ef.residual();
        assert_eq!(residual.len(), n);
        for i in 0..n {
            let lhs = sent[i] + f64::from(residual[i]);
            // Each round adds one f32 rounding of (x + residual): |sum| ~ 1e4 * 50 rounds.
            assert!(
                (lhs - input[i]).abs() <= 1e-6 * 50.0 * 1e4,
                "k={k} i={i}: {lhs} vs {}",
                input[i]
            );
        }
        if k == n as u32 {
            assert!(
                residual.iter().all(|r| *r == 0.0),
                "k = len sends everything"
            );
        }
    }
}

#[test]
fn error_feedback_eventually_sends_every_value() {
    // A constant small signal on every index is sent at least once within n/k rounds plus
    // change, because what is not sent accumulates.
    let n = 64;
    let mut ef = ErrorFeedback::new();
    let mut ever = vec![false; n];
    let x: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 1e-3).collect();
    for _ in 0..(n / 4 + 2) {
        let y = ef.compress(&x, 4).decode().expect("decode");
        for (e, v) in ever.iter_mut().zip(&y) {
            *e |= *v != 0.0;
        }
    }
    assert!(ever.iter().all(|e| *e), "{ever:?}");
}

#[test]
fn error_feedback_is_deterministic_and_resets_on_length_change() {
    let mut rng = Rng::new(7);
    let inputs: Vec<Vec<f32>> = (0..5).map(|_| spread(&mut rng, 300)).collect();
    let mut a = ErrorFeedback::new();
    let mut b = ErrorFeedback::new();
    for x in &inputs {
        assert_eq!(a.compress(x, 7), b.compress(x, 7));
    }
    assert_eq!(a, b);
    assert!(a.residual().iter().any(|r| *r != 0.0));
    let p = a.compress(&[5.0, 1.0], 1);
    assert_eq!(p.decode(), Ok(vec![5.0, 0.0]));
    assert_eq!(a.residual(), &[0.0, 1.0]);
    a.reset();
    assert!(a.residual().is_empty());
}

#[test]
fn sparsify_sends_what_compress_sends_and_keeps_the_same_residual() {
    let mut rng = Rng::new(8);
    let inputs: Vec<Vec<f32>> = (0..6).map(|_| spread(&mut rng, 500)).collect();
    let mut packed = ErrorFeedback::new();
    let mut dense = ErrorFeedback::new();
    for x in &inputs {
        let y = dense.sparsify(x, 25);
        assert_eq!(y.iter().filter(|v| **v != 0.0).count(), 25);
        assert_eq!(packed.compress(x, 25).decode(), Ok(y));
        assert_eq!(packed, dense);
    }
    // What was sent plus what is left is what came in (here exactly: small integers).
    let mut ef = ErrorFeedback::new();
    let sent = ef.sparsify(&[4.0, -1.0, 2.0, 0.0], 2);
    assert_eq!(sent, vec![4.0, 0.0, 2.0, 0.0]);
    assert_eq!(ef.residual(), &[0.0, -1.0, 0.0, 0.0]);
    let sent = ef.sparsify(&[0.0, -1.0, 0.5, 0.0], 1);
    assert_eq!(sent, vec![0.0, -2.0, 0.0, 0.0]);
    assert_eq!(ef.residual(), &[0.0, 0.0, 0.5, 0.0]);
}

#[test]
fn hostile_payloads_are_refused_with_the_reason() {
    let f16 = |bits: &[u16]| -> Vec<u8> { bits.iter().flat_map(|b| b.to_le_bytes()).collect() };
    let int8 = |scales: &[f32], q: &[i8]| -> Vec<u8> {
        let mut out: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        out.extend(q.iter().map(|v| v.to_le_bytes()[0]));
        out
    };
    let topk = |pairs: &[(u32, f32)]| -> Vec<u8> {
        pairs
            .iter()
            .flat_map(|(i, v)| i.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect()
    };
    let i8b = |block| Encoding::Int8 { block };
    let tk = |k| Encoding::TopK { k };
    let cases: Vec<(Payload, TensorError)> = vec![
        (
            forge(2, Encoding::F16, vec![0; 3]),
            TensorError::LengthMismatch {
                expected: 4,
                got: 3,
            },
        ),
        (
            forge(2, Encoding::F16, f16(&[0x3c00, 0x7c00])),
            TensorError::NonFinite { index: 1 },
        ),
        (
            forge(1, Encoding::F16, f16(&[0xfe00])),
            TensorError::NonFinite { index: 0 },
        ),
        (
            forge(2, Encoding::Bf16, f16(&[0x3f80, 0xff80])),
            TensorError::NonFinite { index: 1 },
        ),
        (
            forge(1, Encoding::Bf16, f16(&[0x7fc1])),
            TensorError::NonFinite { index: 0 },
        ),
        (forge(3, i8b(0), vec![]), TensorError::BadBlock { block: 0 }),
        (
            forge(3, i8b(MAX_INT8_BLOCK + 1), int8(&[1.0], &[1, 2, 3])),
            TensorError::BadBlock {
                block: MAX_INT8_BLOCK + 1,
            },
        ),
        (
            // Two blocks of 2 need two scales; one is missing.
            forge(3, i8b(2), int8(&[1.0], &[1, 2, 3])),
            TensorError::LengthMismatch {
                expected: 11,
                got: 7,
            },
        ),
        (
            forge(3, i8b(2), int8(&[1.0, f32::NAN], &[1, 2, 3])),
            TensorError::BadScale {
                block: 1,
                scale_bits: f32::NAN.to_bits(),
            },
        ),
        (
            forge(2, i8b(2), int8(&[f32::INFINITY], &[1, 2])),
            TensorError::BadScale {
                block: 0,
                scale_bits: f32::INFINITY.to_bits(),
            },
        ),
        (
            forge(2, i8b(2), int8(&[-1.0], &[1, 2])),
            TensorError::BadScale {
                block: 0,
                scale_bits: (-1.0f32).to_bits(),
            },
        ),
        (
            forge(2, i8b(2), int8(&[-0.0], &[0, 0])),
            TensorError::BadScale {
                block: 0,
                scale_bits: (-0.0f32).to_bits(),
            },
        ),
        (
            // 127 * f32::MAX overflows: would decode to infinity.
            forge(2, i8b(2), int8(&[f32::MAX], &[127, 1])),
            TensorError::BadScale {
                block: 0,
                scale_bits: f32::MAX.to_bits(),
            },
        ),
        (
            forge(3, i8b(4), int8(&[1.0], &[1, -128, 3])),
            TensorError::Int8OutOfRange { index: 1 },
        ),
        (
            forge(3, tk(4), topk(&[(0, 1.0), (1, 1.0), (2, 1.0), (2, 1.0)])),
            TensorError::TooManyEntries { k: 4, len: 3 },
        ),
        (
            forge(3, tk(1), topk(&[(3, 1.0)])),
            TensorError::IndexOutOfRange {
                entry: 0,
                index: 3,
                len: 3,
            },
        ),
        (
            forge(3, tk(1), topk(&[(u32::MAX, 1.0)])),
            TensorError::IndexOutOfRange {
                entry: 0,
                index: u32::MAX,
                len: 3,
            },
        ),
        (
            forge(5, tk(3), topk(&[(0, 1.0), (3, 1.0), (2, 1.0)])),
            TensorError::IndicesNotAscending { entry: 2, index: 2 },
        ),
        (
            forge(5, tk(2), topk(&[(1, 1.0), (1, 2.0)])),
            TensorError::IndicesNotAscending { entry: 1, index: 1 },
        ),
        (
            forge(5, tk(2), topk(&[(1, 1.0), (4, f32::NAN)])),
            TensorError::NonFinite { index: 4 },
        ),
        (
            forge(5, tk(1), {
                let mut b = topk(&[(1, 1.0)]);
                b.push(0);
                b
            }),
            TensorError::LengthMismatch {
                expected: 8,
                got: 9,
            },
        ),
    ];
    for (p, want) in cases {
        assert_eq!(p.validate(), Err(want.clone()), "validate {p:?}");
        assert_eq!(p.decode(), Err(want.clone()), "decode {p:?}");
        assert!(!want.to_string().is_empty());
    }
    // The messages name the problem.
    let msg = TensorError::BadScale {
        block: 2,
        scale_bits: f32::NAN.to_bits(),
    }
    .to_string();
    assert!(msg.contains("block 2") && msg.contains("NaN"), "{msg}");
    let msg = TensorError::IndicesNotAscending { entry: 3, index: 9 }.to_string();
    assert!(msg.contains("strictly ascending"), "{msg}");
}

#[test]
fn non_finite_input_gives_payloads_that_are_refused() {
    for enc in [
        Encoding::F32,
        Encoding::F16,
        Encoding::Bf16,
        Encoding::Int8 { block: 2 },
        Encoding::TopK { k: 1 },
    ] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let p = Payload::encode(&[1.0, bad, 2.0], enc);
            assert!(p.decode().is_err(), "{enc} accepted {bad}");
            assert_eq!(p.validate(), p.decode().map(|_| ()));
            let mut kept = vec![1.0, bad, 2.0];
            let same = Payload::encode_keeping_decoded(&mut kept, enc);
            assert_eq!(same, p, "{enc} with {bad}");
            let quantized = quantize(&[1.0, bad, 2.0], enc);
            assert_eq!(bits(&kept), bits(&quantized), "{enc} with {bad}");
        }
    }
    // An invalid int8 block gives a payload that names the problem.
    let p = Payload::encode(&[1.0], Encoding::Int8 { block: 0 });
    assert_eq!(p.decode(), Err(TensorError::BadBlock { block: 0 }));
}

/// Random and mutated payloads: decode never panics, `validate` always agrees with
/// `decode`, and whatever is accepted has `len` finite values.
#[test]
fn codec_fuzz_never_panics_and_validate_agrees_with_decode() {
    let mut rng = Rng::new(0xc0dec);
    let mut accepted = 0u32;
    let mut cases = 0u32;
    for _ in 0..30_000 {
        let len = rng.range(0..70) as u32;
        let enc = match rng.range(0..6) {
            0 => Encoding::F32,
            1 => Encoding::F16,
            2 => Encoding::Bf16,
            3 => Encoding::Int8 {
                block: match rng.range(0..4) {
                    0 => rng.range(0..3) as u32,
                    1 => MAX_INT8_BLOCK + rng.range(0..2) as u32,
                    _ => rng.range(1..20) as u32,
                },
            },
            _ => Encoding::TopK {
                k: rng.range(0..u64::from(len) + 3) as u32,
            },
        };
        let p = if rng.chance(0.5) {
            // Arbitrary bytes of (usually) the right length, with a correct digest.
            let n = match enc.encoded_bytes(len) {
                Ok(n) if rng.chance(0.9) => n as usize,
                _ => rng.range(0..400) as usize,
            };
            let mut bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            if let Encoding::TopK { .. } = enc {
                // Make in-range, ascending indices likely so values get checked too.
                let mut next = 0u32;
                for pair in bytes.chunks_mut(8) {
                    if pair.len() == 8 && rng.chance(0.9) {
                        next += rng.range(0..3) as u32;
                        pair[..4].copy_from_slice(&next.to_le_bytes());
                    }
                }
            }
            forge(len, enc, bytes)
        } else {
            // A valid payload, then a few bytes or the header mutated (digest re-sealed).
            let values = spread(&mut rng, len as usize);
            let mut p = Payload::encode(&values, enc);
            for _ in 0..rng.range(1..4) {
                match rng.range(0..4) {
                    0 if !p.bytes.is_empty() => {
                        let at = rng.range(0..p.bytes.len() as u64) as usize;
                        p.bytes.make_mut()[at] ^= 1 << rng.range(0..8);
                    }
                    1 => p.len = (p.len + rng.range(0..3) as u32).saturating_sub(1),
                    2 => {
                        let keep = rng.range(0..p.bytes.len() as u64 + 1) as usize;
                        p.bytes.make_mut().truncate(keep);
                    }
                    _ => p.bytes.make_mut().push(rng.next_u64() as u8),
                }
            }
            p.digest = *blake3::hash(&p.bytes).as_bytes();
            p
        };
        let decoded = p.decode();
        assert_eq!(p.validate(), decoded.clone().map(|_| ()), "{p:?}");
        if let Ok(v) = decoded {
            assert_eq!(v.len(), p.len as usize);
            assert!(v.iter().all(|x| x.is_finite()));
            accepted += 1;
        }
        cases += 1;
    }
    assert!(
        accepted > cases / 20,
        "the fuzz barely reaches valid payloads"
    );
    assert!(
        accepted < cases,
        "everything accepted: checks are not running"
    );
}

#[test]
fn encodings_parse_and_print_their_cli_spelling() {
    for (text, enc) in [
        ("f32", Encoding::F32),
        ("f16", Encoding::F16),
        ("bf16", Encoding::Bf16),
        (
            "int8",
            Encoding::Int8 {
                block: DEFAULT_INT8_BLOCK,
            },
        ),
        ("int8:1", Encoding::Int8 { block: 1 }),
        ("int8:65536", Encoding::Int8 { block: 65536 }),
        ("topk:1000", Encoding::TopK { k: 1000 }),
    ] {
        assert_eq!(text.parse::<Encoding>(), Ok(enc), "{text}");
        assert_eq!(enc.to_string().parse::<Encoding>(), Ok(enc));
    }
    assert_eq!(Encoding::Int8 { block: 64 }.to_string(), "int8:64");
    for bad in [
        "",
        "F32",
        "fp16",
        "int8:0",
        "int8:65537",
        "int8:x",
        "topk",
        "f16:2",
        "int4",
    ] {
        let err = bad.parse::<Encoding>().expect_err(bad);
        assert!(err.to_string().contains("expected f32, f16"), "{err}");
    }
}

#[test]
fn the_remembered_hash_never_hides_a_change() {
    let mut p = Payload::from_f32(&[1.0, 2.0, 3.0]);
    assert_eq!(p.validate(), Ok(()));
    // A clone shares the bytes and the hash; changing the clone's bytes forgets it.
    let mut changed = p.clone();
    changed.bytes.make_mut()[0] ^= 1;
    assert_eq!(changed.decode(), Err(TensorError::DigestMismatch));
    assert_eq!(p.decode(), Ok(vec![1.0, 2.0, 3.0]));
    // The hash belongs to the bytes, not to the declared digest.
    p.digest[0] ^= 1;
    assert_eq!(p.decode(), Err(TensorError::DigestMismatch));
    assert_eq!(p.validate(), Err(TensorError::DigestMismatch));
    // Decoded from the wire, the hash is computed afresh.
    let wire = postcard::to_allocvec(&changed).expect("encode");
    let back: Payload = postcard::from_bytes(&wire).expect("decode");
    assert_eq!(back.validate(), Err(TensorError::DigestMismatch));
}

#[test]
fn the_first_non_finite_value_is_found_wherever_it_is() {
    let len = 3 * 1024 + 5;
    let finite: Vec<f32> = (0..len)
        .map(|i| match i % 4 {
            0 => -0.0,
            1 => f32::MIN_POSITIVE / 2.0, // subnormal
            2 => f32::MAX,
            _ => i as f32,
        })
        .collect();
    assert_eq!(first_non_finite(&finite), None);
    assert_eq!(first_non_finite(&[]), None);
    let as_le = |v: &[f32]| -> Vec<[u8; 4]> { v.iter().map(|x| x.to_le_bytes()).collect() };
    assert_eq!(super::first_non_finite_le(&as_le(&finite)), None);
    for at in [0, 1, 1023, 1024, 2047, 3 * 1024, len - 1] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = finite.clone();
            v[at] = bad;
            // A later bad value does not hide the first.
            v[len - 1] = f32::NAN;
            assert_eq!(first_non_finite(&v), Some(at), "{bad} at {at}");
            assert_eq!(super::first_non_finite_le(&as_le(&v)), Some(at));
        }
    }
}

#[test]
fn decode_into_writes_what_decode_returns_and_nothing_when_refused() {
    let mut rng = Rng::new(7);
    for n in [0usize, 1, 63, 64, 65, 1000] {
        let values = spread(&mut rng, n);
        for enc in ENCODINGS {
            let p = Payload::encode(&values, enc);
            let mut out = vec![f32::NAN; n];
            assert_eq!(p.decode_into(&mut out), Ok(()), "{enc} n={n}");
            assert_eq!(bits(&out), bits(&p.decode().expect("valid")), "{enc} n={n}");
        }
    }
    // A place of another size is refused before anything is written.
    let p = Payload::from_f32(&[1.0, 2.0]);
    let mut out = vec![9.0; 3];
    assert_eq!(
        p.decode_into(&mut out),
        Err(TensorError::WrongCount { len: 2, want: 3 })
    );
    assert_eq!(out, vec![9.0; 3]);
    // Unchecked bytes with a NaN in the middle (a correct digest over them), and an
    // int8 body with -128 after valid values: refused with `out` as it was.
    let mut bytes = f32_le_bytes(&[1.0, 2.0, f32::NAN, 4.0]);
    bytes.extend_from_slice(&5.0f32.to_le_bytes());
    let mut out = vec![7.0; 5];
    let nan = forge(5, Encoding::F32, bytes);
    assert_eq!(
        nan.decode_into(&mut out),
        Err(TensorError::NonFinite { index: 2 })
    );
    assert_eq!(out, vec![7.0; 5]);
    let mut int8 = 1.0f32.to_le_bytes().to_vec();
    int8.extend_from_slice(&[1, 2, 3, 0x80]);
    let bad = forge(4, Encoding::Int8 { block: 4 }, int8);
    let mut out = vec![7.0; 4];
    assert_eq!(
        bad.decode_into(&mut out),
        Err(TensorError::Int8OutOfRange { index: 3 })
    );
    assert_eq!(out, vec![7.0; 4]);
    // A flipped bit fails the digest, also without writing.
    let mut flipped = Payload::from_f32(&[1.0, 2.0]);
    flipped.bytes.make_mut()[0] ^= 1;
    let mut out = vec![7.0; 2];
    assert_eq!(
        flipped.decode_into(&mut out),
        Err(TensorError::DigestMismatch)
    );
    assert_eq!(out, vec![7.0; 2]);
}

#[test]
fn f32_le_gives_the_checked_values_where_they_lie_and_only_for_f32() {
    let values = [1.5f32, -2.0, 3e-40];
    let p = Payload::from_f32(&values);
    let le = p.f32_le().expect("valid").expect("an f32 payload");
    let read: Vec<f32> = le.iter().map(|b| f32::from_le_bytes(*b)).collect();
    assert_eq!(bits(&read), bits(&values));
    assert_eq!(
        Payload::encode(&values, Encoding::Bf16).f32_le(),
        Ok(None),
        "other encodings are decoded instead"
    );
    let mut bytes = f32_le_bytes(&values);
    bytes[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_eq!(
        forge(3, Encoding::F32, bytes).f32_le(),
        Err(TensorError::NonFinite { index: 1 })
    );
}
