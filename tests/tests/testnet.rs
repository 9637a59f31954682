//! Real node processes on loopback train MNIST together.

mod common;
use common::binary;
use std::process::Command;
use std::time::Instant;

/// Three processes, bundled data: the averaged model must reach 90% test accuracy,
/// every node must end with the same parameters, and averaging rounds must be complete.
/// A node's own settings in the user's environment (one key file, one run
/// directory) must not reach the testnet's nodes: sharing one identity, they
/// would never meet.
#[test]
fn three_nodes_reach_ninety_percent_on_bundled_data() {
    let started = Instant::now();
    let shell = tempfile::tempdir().unwrap();
    let key = shell.path().join("my-node.key");
    let run_dir = shell.path().join("my-runs");
    let out = Command::new(binary())
        .args([
            "testnet",
            "--nodes",
            "3",
            "--epochs",
            "2",
            "--timeout-secs",
            "600",
        ])
        .env("RUST_LOG", "warn")
        .env("P2PTRAIN_KEY", &key)
        .env("P2PTRAIN_RUN_DIR", &run_dir)
        .output()
        .expect("testnet starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "testnet failed:\n{stderr}\n{stdout}");
    let last = stdout.lines().last().expect("a summary line");
    let summary: serde_json::Value = serde_json::from_str(last).expect("summary is JSON");
    eprintln!("{summary} ({:.1} s)", started.elapsed().as_secs_f64());
    assert_eq!(summary["nodes"], 3);
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.90, "test accuracy {acc} < 0.90");
    assert_eq!(
        summary["models_agree"], true,
        "nodes ended with different models"
    );
    let rounds = summary["rounds"].as_u64().unwrap();
    assert!(rounds >= 5, "too few rounds: {rounds}");
    assert!(summary["bytes_sent"].as_u64().unwrap() > 0);
    assert!(summary["samples"].as_u64().unwrap() >= 20_000 - 3 * 64);
    for key in ["final_loss", "wall_s", "samples_per_s"] {
        assert!(summary[key].as_f64().is_some(), "summary lacks {key}");
    }
    assert!(
        !key.exists() && !run_dir.exists(),
        "nodes took the user's own key or run directory"
    );
    // Progress: one line per round on stderr.
    assert!(
        stderr.contains("round    1"),
        "no progress lines:\n{stderr}"
    );
}
