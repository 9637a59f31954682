//! The raw-quinn bound: without `--max-udp-payload` its packets grow to the
//! size our node's transport reaches on loopback, so our node is set against
//! the same transport; with another size (1472: quinn's defaults, as libp2p's
//! own QUIC transport keeps them), path-MTU discovery stops there and the line
//! says it is not that bound.

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
fn the_bound_sends_our_nodes_loopback_packets_unless_asked_for_others() {
    let default = quinn(&[]);
    assert_eq!(default["impl"], "raw-quinn-pattern", "{default}");
    assert_eq!(default["max_udp_payload"], 65527, "{default}");
    let mtu = default["path_mtu"].as_u64().expect("path_mtu");
    assert!(mtu > 9000, "{default}");

    let quinn_default = quinn(&["--max-udp-payload", "1472"]);
    assert_eq!(
        quinn_default["impl"], "raw-quinn-pattern-other-packets",
        "{quinn_default}"
    );
    let mtu = quinn_default["path_mtu"].as_u64().expect("path_mtu");
    assert!((1200..=1472).contains(&mtu), "{quinn_default}");

    // Above the size where quinn's offload batches would overflow, too.
    for payload in [6000u64, 9000] {
        let other = quinn(&["--max-udp-payload", &payload.to_string()]);
        assert_eq!(other["impl"], "raw-quinn-pattern-other-packets", "{other}");
        assert_eq!(other["max_udp_payload"], payload, "{other}");
        assert_eq!(other["path_mtu"], payload, "{other}");
        assert_eq!(other["rounds_timed"], 2, "{other}");
    }
}
