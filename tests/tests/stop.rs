//! Ctrl-C or SIGTERM stops a data-parallel node at a round boundary, with
//! that round's checkpoint written and the way to resume it named.

mod common;
use common::binary;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn signal(sig: &str, pid: u32) {
    let sent = Command::new("kill").args([sig, &pid.to_string()]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill {sig} {pid}");
}

/// `p2ptrain node` of `swarm` on loopback, printing JSON events, with its
/// stdout and stderr piped by the caller.
fn loopback_node(swarm: &str) -> Command {
    let mut c = Command::new(binary());
    c.args(["node", "--no-mdns", "--events"])
        .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--swarm", swarm])
        .env("RUST_LOG", "warn");
    c
}

#[test]
fn a_stopped_node_finishes_its_round_and_writes_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let swarm = format!("stop-{}", std::process::id());
    let mut node = loopback_node(&swarm)
        .args(["--steps", "100000"])
        .args(["--average-every", "10", "--checkpoint-dir"])
        .arg(dir.path())
        // Only the stop writes a checkpoint.
        .args(["--checkpoint-every", "100000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary under test starts");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = node.stdout.take().unwrap();
    let mut stderr = node.stderr.take().unwrap();
    let mut node = KillOnDrop(node);
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        assert!(Instant::now() < deadline, "no round 3");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["event"] == "round" && v["round"] == 3 {
            signal("-INT", node.0.id());
            break;
        }
    }
    let status = node.0.wait().unwrap();
    let mut said = String::new();
    stderr.read_to_string(&mut said).unwrap();
    assert_eq!(status.code(), Some(130), "{said}");
    let d = dir.path().display().to_string();
    assert!(
        said.contains(&format!(
            "its checkpoint is in {d}: resume with --resume {d}"
        )),
        "{said}"
    );
    // The round it stopped after (the one under way when the signal came,
    // or the one after) is checkpointed.
    let rounds: Vec<u64> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("ckpt-r")?.get(..8)?.parse().ok()
        })
        .collect();
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert!((3..=5).contains(&rounds[0]), "{rounds:?}");
    assert!(
        said.contains(&format!("after round {}", rounds[0])),
        "{said}"
    );
}

#[test]
fn a_node_waiting_for_peers_stops_at_once() {
    let mut node = loopback_node("stop-waiting")
        .args(["--min-peers", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary under test starts");
    let stdout = node.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains("\"listening\"") {
            break;
        }
    }
    let asked = Instant::now();
    signal("-TERM", node.id());
    let out = node.wait_with_output().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(10));
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(
        said.contains("stopped by a signal before training"),
        "{said}"
    );
}
