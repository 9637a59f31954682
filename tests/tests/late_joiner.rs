//! A node that joins a swarm already training takes part in its rounds.

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

type Events = mpsc::Sender<(usize, serde_json::Value)>;

fn spawn(
    i: usize,
    swarm: &str,
    min_peers: &str,
    steps: &str,
    boot: Option<&str>,
    tx: Events,
) -> Child {
    let mut cmd = Command::new(binary());
    cmd.args([
        "node",
        "--swarm",
        swarm,
        "--no-mdns",
        "--events",
        "--min-peers",
        min_peers,
    ])
    .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--steps", steps])
    .args([
        "--average-every",
        "10",
        "--join-window-secs",
        "3",
        "--linger-secs",
        "1",
    ])
    .env(
        "RUST_LOG",
        std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(b) = boot {
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
fn late_joiner_averages_with_the_swarm() {
    let swarm = format!("late-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    let mut nodes = Nodes(vec![spawn(0, &swarm, "2", "400", None, tx.clone())]);
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
    nodes
        .0
        .push(spawn(1, &swarm, "2", "400", Some(&boot), tx.clone()));
    let mut late_started = false;
    let mut late_rounds = Vec::new();
    let mut early_rounds_after_join = Vec::new();
    let mut finished = 0;
    let mut digests: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut synced: Option<serde_json::Value> = None;
    while finished < 3 {
        let (i, v) = next(&rx);
        if i < 2 && v["event"] == "round" {
            digests.insert(
                v["round"].as_u64().unwrap(),
                v["model_digest"].as_str().unwrap().to_string(),
            );
        }
        match v["event"].as_str() {
            Some("round") if i < 2 && !late_started && v["round"].as_u64() == Some(4) && i == 0 => {
                nodes
                    .0
                    .push(spawn(2, &swarm, "1", "60", Some(&boot), tx.clone()));
                late_started = true;
            }
            Some("synced") if i == 2 => synced = Some(v),
            Some("round") if i == 2 => {
                late_rounds.push((v["round"].as_u64().unwrap(), v["peers"].as_u64().unwrap()))
            }
            Some("round") if late_started && !late_rounds.is_empty() => early_rounds_after_join
                .push((v["round"].as_u64().unwrap(), v["peers"].as_u64().unwrap())),
            Some("finished") => finished += 1,
            _ => {}
        }
    }
    eprintln!("late joiner rounds (round, group): {late_rounds:?}; synced: {synced:?}");
    // It downloaded the swarm's model: the digest it received is what the
    // early nodes held after that round.
    let synced = synced.expect("the late joiner never downloaded the swarm's model");
    let round = synced["round"].as_u64().unwrap();
    assert_eq!(
        Some(synced["model_digest"].as_str().unwrap()),
        digests.get(&round).map(String::as_str),
        "downloaded model differs from the swarm's model of round {round}"
    );
    // The late joiner numbered its rounds like the swarm (not from 1) and
    // averaged in groups of three.
    assert!(
        late_rounds[0].0 > 4,
        "late joiner started at round {}",
        late_rounds[0].0
    );
    let grouped = late_rounds.iter().filter(|r| r.1 == 3).count();
    assert!(grouped >= late_rounds.len() - 1, "{late_rounds:?}");
    assert!(
        early_rounds_after_join.iter().any(|r| r.1 == 3),
        "{early_rounds_after_join:?}"
    );
    for c in &mut nodes.0 {
        assert!(c.wait().unwrap().success());
    }
}
