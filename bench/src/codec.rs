//! CPU cost of one all-reduce part on its way through our stack, without the
//! network: `Payload::encode` (codec and blake3 digest), `wire::encode`
//! (postcard framing), `wire::decode_shared` (parsing and validation: digest and
//! finiteness) and `Payload::decode`. In a butterfly round among N peers
//! each node goes through each of these about 2(N-1) times for parts of
//! len/N values, so this shows how much of a round is spent off the wire.

use std::sync::Arc;
use std::time::Instant;

use p2ptrain_protocol::averaging::AvgMessage;
use p2ptrain_protocol::tensor::{Encoding, Payload};
use p2ptrain_protocol::wire::{self, Message};
use serde_json::json;

use crate::util::{emit, median};

/// Flags of `p2ptrain-bench codec`.
#[derive(Debug, clap::Args)]
pub struct CodecArgs {
    /// Values in the part.
    #[arg(long, default_value_t = 5_000_000)]
    pub values: usize,
    /// Codec: f32, f16, bf16, int8 or int8:BLOCK.
    #[arg(long, default_value = "f32")]
    pub compression: String,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
}

/// Times the four stages and prints one `codec` JSON line (median milliseconds).
pub fn run(args: &CodecArgs) -> anyhow::Result<()> {
    let encoding: Encoding = args
        .compression
        .parse()
        .map_err(|e| anyhow::anyhow!("--compression: {e}"))?;
    let values: Vec<f32> = (0..args.values)
        .map(|j| (j % 1024) as f32 / 1024.0 - 0.5)
        .collect();
    let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for rep in 0..=args.reps {
        let t0 = Instant::now();
        let payload = Payload::encode(&values, encoding);
        let t1 = Instant::now();
        let bytes = wire::encode(&Message::Avg(AvgMessage::Part {
            round: 1,
            part: 0,
            payload,
        }))?;
        let t2 = Instant::now();
        // As the node decodes a received frame.
        let Message::Avg(AvgMessage::Part { payload, .. }) = wire::decode_shared(Arc::new(bytes))?
        else {
            anyhow::bail!("decoded another message kind");
        };
        let t3 = Instant::now();
        let decoded = payload.decode()?;
        let t4 = Instant::now();
        anyhow::ensure!(decoded.len() == values.len(), "decoded length differs");
        if rep > 0 {
            for (i, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4)].iter().enumerate() {
                t[i].push((*b - *a).as_secs_f64() * 1e3);
            }
        }
    }
    let [enc, wenc, wdec, dec] = t.map(|v| median(&v));
    emit(&json!({
        "bench": "codec",
        "impl": "p2ptrain",
        "values": args.values,
        "compression": args.compression,
        "payload_encode_ms": enc,
        "wire_encode_ms": wenc,
        "wire_decode_ms": wdec,
        "payload_decode_ms": dec,
        "total_ms": enc + wenc + wdec + dec,
    }));
    Ok(())
}
