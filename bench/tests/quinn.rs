//! The raw-quinn bound: without `--max-udp-payload` it keeps the packet size
//! libp2p-quic uses, so our node is set against the same transport; with it,
//! path-MTU discovery reaches the larger size and the line says it is not that
//! bound.

mod common;

/// Runs `p2ptrain-bench quinn` on two processes and returns its result line.
fn quinn(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "quinn",
        "--peers",
        "2",
        "--values",
        "300000",
        "--rounds",
        "3",
        "--timeout-secs",
        "120",
    ];
    args.extend_from_slice(extra);
    common::allreduce_line(&args)
}

#[test]
fn the_bound_keeps_libp2p_packet_sizes_unless_asked_for_larger_ones() {
    let default = quinn(&[]);
    assert_eq!(default["impl"], "raw-quinn-pattern", "{default}");
    assert!(default["max_udp_payload"].is_null(), "{default}");
    let mtu = default["path_mtu"].as_u64().expect("path_mtu");
    assert!((1200..=1472).contains(&mtu), "{default}");

    // Above the size where quinn's offload batches would overflow, too.
    for payload in [6000u64, 9000] {
        let large = quinn(&["--max-udp-payload", &payload.to_string()]);
        assert_eq!(large["impl"], "raw-quinn-pattern-larger-packets", "{large}");
        assert_eq!(large["max_udp_payload"], payload, "{large}");
        assert_eq!(large["path_mtu"], payload, "{large}");
        assert_eq!(large["rounds_timed"], 2, "{large}");
    }
}
