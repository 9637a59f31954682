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

/// A testnet ended by SIGTERM (a supervisor, `kill`) stops its nodes too:
/// they no longer hold their status-page ports. Before, the nodes trained on.
#[test]
fn a_testnet_stopped_by_sigterm_stops_its_nodes() {
    testnet_stopped_by("-TERM", "stopped by SIGTERM", 20_000);
}

/// Ctrl-C (SIGINT) too, at once: the nodes, which would finish their round
/// on a SIGINT of their own, are killed with the testnet's handles.
#[test]
fn a_testnet_stopped_by_ctrl_c_stops_its_nodes() {
    testnet_stopped_by("-INT", "stopped by SIGINT", 40_000);
}

/// Starts a two-node testnet, sends it `signal` once both train, and checks
/// it stops its nodes and says `said`. Its status pages take the first two
/// free ports from `ports_from` (each test its own range: they run at once).
fn testnet_stopped_by(signal: &str, said: &str, ports_from: u16) {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::process::Stdio;
    use std::time::Duration;
    // Two free ports in a row for the nodes' status pages.
    let port = (ports_from..ports_from + 20_000)
        .step_by(7)
        .find(|p| {
            TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && TcpListener::bind(("127.0.0.1", *p + 1)).is_ok()
        })
        .expect("two free ports");
    let metrics = format!("127.0.0.1:{port}");
    let mut testnet = Command::new(binary())
        .args(["testnet", "--nodes", "2", "--steps", "1000000"])
        .args(["--metrics", &metrics, "--timeout-secs", "300"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("testnet starts");
    // Should an assertion fail first, the testnet still stops its nodes
    // (a SIGKILL would leave them training).
    struct StopOnDrop(u32);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.to_string()])
                .status();
        }
    }
    let _stop = StopOnDrop(testnet.id());
    let stderr = testnet.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut training = 0;
    for line in lines.by_ref() {
        let line = line.unwrap();
        training += usize::from(line.contains("training with"));
        if training == 2 {
            break;
        }
    }
    assert_eq!(training, 2, "the nodes never started training");
    let bound = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    assert!(
        !bound(port) && !bound(port + 1),
        "the nodes serve their pages"
    );
    let kill = Command::new("kill")
        .args([signal, &testnet.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = testnet.wait().unwrap();
    assert!(!status.success());
    let freed = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        bound(port) && bound(port + 1)
    });
    assert!(
        freed,
        "the nodes still hold their ports after the testnet ended"
    );
    // The nodes share the testnet's stderr: it ends now that they are gone.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains(said)), "{rest:?}");
}
