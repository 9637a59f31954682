//! A swarm secret keeps peers without it out, and members train as usual.

mod common;
use common::{bootstrap_address, spawn_node, Nodes};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn secret(dir: &std::path::Path, name: &str, byte: u8) -> String {
    let path = dir.join(name);
    std::fs::write(&path, [byte; 32]).unwrap();
    path.to_str().unwrap().to_string()
}

/// Starts one node per secret file, each waiting up to `wait_secs` for all
/// of them; returns whether each trained to the end, and the model digest
/// each finished with.
fn swarm_of(swarm: &str, secrets: &[&str], wait_secs: &str) -> Vec<(bool, Option<String>)> {
    let (tx, rx) = mpsc::channel();
    let min_peers = secrets.len().to_string();
    let common = ["--swarm", swarm, "--min-peers", &min_peers, "--steps", "20"];
    let wait = ["--wait-peers-secs", wait_secs, "--linger-secs", "1"];
    let args = |s: &str| -> Vec<String> {
        let mut v: Vec<String> = common.iter().chain(&wait).map(|s| s.to_string()).collect();
        v.extend(["--secret-file".into(), s.to_string()]);
        v
    };
    let first = args(secrets[0]);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut nodes = Nodes(vec![spawn_node(0, &first, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let boot = bootstrap_address(&rx, deadline);
    for (i, s) in secrets.iter().enumerate().skip(1) {
        let mut more = args(s);
        more.extend(["--bootstrap".into(), boot.clone()]);
        let more: Vec<&str> = more.iter().map(String::as_str).collect();
        nodes.0.push(spawn_node(i, &more, tx.clone()));
    }
    drop(tx);
    let mut finished: Vec<(bool, Option<String>)> = nodes
        .0
        .iter_mut()
        .map(|c| (c.wait().unwrap().success(), None))
        .collect();
    while let Ok((i, v)) = rx.try_recv() {
        if v["event"] == "finished" {
            assert!(finished[i].0, "node {i} reported finishing but failed");
            finished[i].1 = v["model_digest"].as_str().map(str::to_string);
        }
    }
    finished
}

#[test]
fn peers_with_another_secret_never_become_members() {
    let dir = tempfile::tempdir().unwrap();
    let (s1, s2) = (secret(dir.path(), "s1", 1), secret(dir.path(), "s2", 2));
    let swarm = format!("secret-{}", std::process::id());
    // Different secrets: each waits for a second member that never comes.
    let apart = swarm_of(&format!("{swarm}-a"), &[&s1, &s2], "8");
    assert!(apart.iter().all(|(ok, _)| !ok), "{apart:?}");
    // The same secret: they train together to the end and hold one model.
    // Three of them, so each reduced part goes to two peers (sealed once
    // for both).
    // (Waiting long enough for three cold starts on a busy machine.)
    let together = swarm_of(&format!("{swarm}-b"), &[&s1, &s1, &s1], "30");
    assert!(together.iter().all(|(ok, _)| *ok), "{together:?}");
    let digest = &together[0].1;
    assert!(digest.is_some(), "{together:?}");
    assert!(together.iter().all(|(_, d)| d == digest), "{together:?}");
}

#[test]
fn an_outsider_who_copies_the_topic_name_never_becomes_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = secret(dir.path(), "s1", 1);
    let swarm = format!("secret-thief-{}", std::process::id());
    // What an outsider reads off a member's gossip subscriptions.
    let key = p2ptrain_node::net::secret::SwarmKey::from_secret(&[1u8; 32]);
    let topic = p2ptrain_node::net::topic_name(&swarm, Some(&key));
    let (tx, rx) = mpsc::channel();
    let common = ["--swarm", &swarm, "--min-peers", "2", "--steps", "20"];
    let mut member: Vec<&str> = common.to_vec();
    member.extend(["--wait-peers-secs", "8", "--secret-file", &s1]);
    let mut nodes = Nodes(vec![spawn_node(0, &member, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let boot = bootstrap_address(&rx, deadline);
    let mut thief: Vec<&str> = common.to_vec();
    thief.extend(["--wait-peers-secs", "30", "--misbehave-topic", &topic]);
    thief.extend(["--bootstrap", &boot]);
    nodes.0.push(spawn_node(1, &thief, tx));
    // The member never counts the outsider: it gives up waiting for a
    // second member instead of training with it.
    assert!(
        !nodes.0[0].wait().unwrap().success(),
        "the member accepted an outsider without the secret"
    );
    // The outsider did sit on the member's topic (it counted the member,
    // which announced that topic to it, and started).
    let mut outsider_started = false;
    while let Ok((i, v)) = rx.recv_timeout(Duration::from_secs(1)) {
        assert_ne!(
            (i, v["event"].as_str()),
            (0, Some("started")),
            "the member started training with the outsider"
        );
        outsider_started |= i == 1 && v["event"] == "started";
    }
    assert!(
        outsider_started,
        "the outsider never joined the member's topic"
    );
}
