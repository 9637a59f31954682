//! DiLoCo: three node processes average pseudo-gradients every 10 local
//! steps and take an outer Nesterov step, against per-step averaging.

mod common;
use common::binary;
use std::process::Command;
use std::time::Instant;

/// Runs `p2ptrain testnet` on three nodes for 50 local steps with `extra`
/// flags and returns its JSON summary.
fn testnet(extra: &[&str]) -> serde_json::Value {
    let started = Instant::now();
    let out = Command::new(binary())
        .args([
            "testnet",
            "--nodes",
            "3",
            "--steps",
            "50",
            "--timeout-secs",
            "300",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("testnet starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "testnet {extra:?} failed:\n{stderr}\n{stdout}"
    );
    let last = stdout.lines().last().expect("a summary line");
    let summary: serde_json::Value = serde_json::from_str(last).expect("summary is JSON");
    eprintln!(
        "{extra:?}: {summary} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        summary["models_agree"], true,
        "{extra:?}: nodes ended with different models"
    );
    summary
}

/// Same steps, same data: DiLoCo with H = 10 learns about as well as
/// averaging after every step, every node ends with the same model (so the
/// outer momentum stayed identical on all of them), and it sends at least
/// five times fewer bytes.
#[test]
fn diloco_matches_per_step_averaging_with_a_fifth_of_the_traffic() {
    let per_step = testnet(&["--average-every", "1"]);
    let diloco = testnet(&["--sync-every", "10", "--outer-lr", "0.7"]);
    assert_eq!(
        diloco["rounds"], 5,
        "--sync-every 10 over 50 steps is 5 rounds"
    );
    assert_eq!(per_step["rounds"], 50);
    let acc = |s: &serde_json::Value| s["test_accuracy"].as_f64().expect("an accuracy");
    let (a_step, a_diloco) = (acc(&per_step), acc(&diloco));
    assert!(a_diloco >= 0.8, "DiLoCo reached only {a_diloco}");
    assert!(
        a_diloco >= a_step - 0.04,
        "DiLoCo accuracy {a_diloco} is more than 4 points below per-step averaging's {a_step}"
    );
    let bytes = |s: &serde_json::Value| s["bytes_sent"].as_u64().expect("bytes_sent");
    let (b_step, b_diloco) = (bytes(&per_step), bytes(&diloco));
    assert!(b_diloco > 0);
    assert!(
        b_diloco * 5 <= b_step,
        "DiLoCo sent {b_diloco} bytes, per-step averaging {b_step}: less than 5x fewer"
    );
}

/// Bad DiLoCo flags stop the node with a message naming the flag.
#[test]
fn bad_outer_flags_are_refused_by_name() {
    for (args, want) in [
        (&["--outer-lr", "0"][..], "outer learning rate"),
        (&["--outer-lr", "abc"][..], "not a number"),
        (
            &["--outer-lr", "0.7", "--outer-momentum", "1"][..],
            "outer momentum",
        ),
        (&["--outer-momentum", "0.5"][..], "--outer-lr"),
        (
            &["--outer-lr", "0.7", "--model", "char-lm"][..],
            "--outer-lr",
        ),
    ] {
        let out = common::run(&[&["node", "--no-mdns"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
