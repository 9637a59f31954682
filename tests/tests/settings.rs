//! Peers of one swarm whose shared settings differ never train together,
//! and a node waiting for peers in vain names what to change.

mod common;
use common::{binary, bootstrap_address, spawn_node, Nodes};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts node 0 of `swarm` with `first`, then runs a second node with
/// `second` bootstrapped from it; returns whether each succeeded and the
/// second's stderr.
fn pair(swarm: &str, first: &[&str], second: &[&str]) -> (bool, bool, String) {
    let (tx, rx) = mpsc::channel();
    let common = ["--swarm", swarm, "--min-peers", "2", "--steps", "10"];
    let mut a: Vec<&str> = common.to_vec();
    a.extend(["--wait-peers-secs", "20"]);
    a.extend(first);
    let mut nodes = Nodes(vec![spawn_node(0, &a, tx)]);
    let boot = bootstrap_address(&rx, Instant::now() + Duration::from_secs(60));
    let out = Command::new(binary())
        .args([
            "node",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ])
        .args(common)
        .args(["--wait-peers-secs", "10", "--bootstrap", &boot])
        .args(second)
        .env("RUST_LOG", "error")
        .output()
        .expect("the binary under test starts");
    let first_ok = nodes.0[0].wait().unwrap().success();
    (
        first_ok,
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn peers_with_other_shared_settings_never_train_together_and_are_named() {
    let swarm = format!("settings-{}", std::process::id());
    // DiLoCo against plain averaging, and another model: averaged together
    // they would mix pseudo-gradients with parameters (before: both nodes
    // trained to 20-40% accuracy and exited 0).
    let (a_ok, b_ok, said) = pair(&swarm, &[], &["--outer-lr", "0.7", "--model", "cnn"]);
    assert!(!a_ok && !b_ok, "they trained together: {said}");
    assert!(said.contains("run other settings"), "{said}");
    assert!(said.contains("--model: mlp there, cnn here"), "{said}");
    assert!(
        said.contains("--outer-lr/--outer-momentum: plain there, diloco:0.7:0.9 here"),
        "{said}"
    );
}

#[test]
fn a_node_given_a_copied_key_file_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let key = key.to_str().unwrap();
    let swarm = format!("settings-key-{}", std::process::id());
    let (_, b_ok, said) = pair(&swarm, &["--key", key], &["--key", key]);
    assert!(!b_ok, "{said}");
    assert!(said.contains("each machine needs its own --key"), "{said}");
}
