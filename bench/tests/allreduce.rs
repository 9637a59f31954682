//! The averaging benchmark through the real stack (node processes, libp2p QUIC, the
//! driver), with parts small enough that every member's share travels as several parts:
//! the exact mean must come back in every round, and the per-peer send queue must not
//! stall a round.

mod common;

/// Runs `p2ptrain-bench allreduce` and returns its result line.
fn allreduce(peers: usize, values: usize, part_values: usize) -> serde_json::Value {
    let (peers, values, part_values) = (
        peers.to_string(),
        values.to_string(),
        part_values.to_string(),
    );
    common::allreduce_line(&[
        "allreduce",
        "--rounds",
        "3",
        "--timeout-secs",
        "120",
        "--peers",
        &peers,
        "--values",
        &values,
        "--part-values",
        &part_values,
    ])
}

#[test]
fn several_parts_per_member_average_exactly_over_quic() {
    for peers in [2, 3] {
        // 300,000 values, 20,000 per part: 7 parts per member of a pair, 5 of a trio.
        let r = allreduce(peers, 300_000, 20_000);
        assert_eq!(r["all_rounds_complete"], true, "{r}");
        assert_eq!(r["max_abs_err"], 0.0, "{r}");
        assert_eq!(r["peers"], peers, "{r}");
        // Every value travels twice (part and reduced part), nothing is sent again.
        let bound = r["bound_bytes_per_peer"].as_f64().expect("bound");
        let sent = r["bytes_sent_per_peer_round"].as_f64().expect("sent");
        assert!(sent >= bound && sent < bound * 1.05, "{r}");
    }
}
