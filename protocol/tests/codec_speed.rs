//! Encode/decode speed and compressed size of every codec on 10M values.
//!
//! Ignored by default (it measures, it does not check much); run with
//! `cargo test -p p2ptrain-protocol --test codec_speed -- --ignored --nocapture`
//! (add `--release` for optimised figures).

use p2ptrain_protocol::rng::Rng;
use p2ptrain_protocol::tensor::{Encoding, ErrorFeedback, Payload};
use std::time::Instant;

const N: usize = 10_000_000;

/// Parameter-like values: mostly small, a few larger ones.
fn values() -> Vec<f32> {
    let mut rng = Rng::new(10);
    (0..N)
        .map(|_| {
            let u = (rng.next_f64() * 2.0 - 1.0) as f32;
            if rng.chance(0.001) {
                u * 5.0
            } else {
                u * 0.05
            }
        })
        .collect()
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn codec_speed_10m_values() {
    let x = values();
    let f32_bytes = (N * 4) as f64;
    println!(
        "{:<12} {:>10} {:>10} {:>11} {:>8} {:>12}",
        "codec", "encode ms", "decode ms", "validate ms", "size", "max abs err"
    );
    let codecs = [
        Encoding::F32,
        Encoding::F16,
        Encoding::Bf16,
        Encoding::Int8 { block: 64 },
        Encoding::Int8 { block: 4096 },
        Encoding::TopK {
            k: (N / 100) as u32,
        },
    ];
    for enc in codecs {
        let t = Instant::now();
        let p = Payload::encode(&x, enc);
        let encode = t.elapsed();
        let t = Instant::now();
        p.validate().expect("valid");
        let validate = t.elapsed();
        let t = Instant::now();
        let y = p.decode().expect("decode");
        let decode = t.elapsed();
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "{:<12} {:>10.0} {:>10.0} {:>11.0} {:>7.3}x {:>12.3e}",
            enc.to_string(),
            encode.as_secs_f64() * 1e3,
            decode.as_secs_f64() * 1e3,
            validate.as_secs_f64() * 1e3,
            p.bytes.len() as f64 / f32_bytes,
            err
        );
    }
    let mut ef = ErrorFeedback::new();
    let _ = ef.compress(&x, (N / 100) as u32);
    let t = Instant::now();
    let p = ef.compress(&x, (N / 100) as u32);
    println!(
        "{:<12} {:>10.0} {:>10} {:>11} {:>7.3}x",
        "topk+ef",
        t.elapsed().as_secs_f64() * 1e3,
        "-",
        "-",
        p.bytes.len() as f64 / f32_bytes
    );
}
