//! A peer killed with SIGKILL mid-run costs the swarm at most a round.

mod common;
use common::binary;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(
    i: usize,
    swarm: &str,
    bootstrap: Option<&str>,
    tx: mpsc::Sender<(usize, serde_json::Value)>,
) -> Child {
    let mut cmd = Command::new(binary());
    cmd.args([
        "node",
        "--swarm",
        swarm,
        "--no-mdns",
        "--events",
        "--min-peers",
        "3",
    ])
    .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
    .args(["--steps", "200", "--average-every", "10"])
    .args([
        "--join-window-secs",
        "2",
        "--reduce-timeout-secs",
        "6",
        "--linger-secs",
        "1",
    ])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send((i, v)).is_err() {
                    return;
                }
            }
        }
    });
    child
}

#[test]
fn survivors_finish_after_a_peer_is_killed_mid_run() {
    let swarm = format!("churn-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    let mut nodes = Nodes(vec![spawn(0, &swarm, None, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(180);
    let next = |rx: &mpsc::Receiver<(usize, serde_json::Value)>| {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("nodes stopped reporting")
    };
    let boot = loop {
        let (i, v) = next(&rx);
        if i == 0 && v["event"] == "listening" {
            break v["addrs"][0].as_str().unwrap().to_string();
        }
    };
    nodes.0.push(spawn(1, &swarm, Some(&boot), tx.clone()));
    nodes.0.push(spawn(2, &swarm, Some(&boot), tx.clone()));

    let mut killed_at = None;
    let mut finished = Vec::new();
    let mut rounds_after_kill = Vec::new();
    while finished.len() < 2 {
        let (i, v) = next(&rx);
        match v["event"].as_str() {
            Some("round") if i == 2 && killed_at.is_none() && v["round"].as_u64() == Some(5) => {
                nodes.0[2].kill().unwrap();
                killed_at = Some(5);
            }
            Some("round") if killed_at.is_some() && i != 2 => {
                rounds_after_kill.push((
                    v["round"].as_u64().unwrap(),
                    v["peers"].as_u64().unwrap(),
                    v["averaging_s"].as_f64().unwrap(),
                ));
            }
            Some("finished") if i != 2 => finished.push(v),
            _ => {}
        }
    }
    assert!(killed_at.is_some(), "node 2 never reached round 5");
    eprintln!("rounds after the kill (round, group, seconds): {rounds_after_kill:?}");
    for c in &mut nodes.0[..2] {
        assert!(c.wait().unwrap().success(), "a survivor failed");
    }
    // Survivors agree on the final model and trained all their steps.
    assert_eq!(finished[0]["model_digest"], finished[1]["model_digest"]);
    for f in &finished {
        assert_eq!(f["steps"], 200);
        assert_eq!(f["rounds"], 20);
    }
    // No round waited past its deadlines (join 2 s + group 4 s + reduce 6 s),
    // and the survivors went on averaging as a pair.
    for (round, _, secs) in &rounds_after_kill {
        assert!(*secs < 12.5, "round {round} took {secs} s");
    }
    let last_rounds: Vec<_> = rounds_after_kill.iter().filter(|r| r.0 >= 10).collect();
    assert!(
        !last_rounds.is_empty() && last_rounds.iter().all(|r| r.1 == 2),
        "{rounds_after_kill:?}"
    );
}
