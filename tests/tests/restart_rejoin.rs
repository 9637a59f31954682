//! A peer killed mid-run and restarted with `--resume` (same identity)
//! resumes from its checkpoint, finds the swarm ahead, downloads the model
//! the swarm vouches for and ends with the swarm's model.

mod common;
use common::{bootstrap_address, next_event, spawn_averaging_node, Events, Nodes};
use std::path::Path;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts node `i` (its events tagged `i`) with the key of `identity`.
fn spawn(i: usize, identity: usize, swarm: &str, extra: &[&str], dir: &Path, tx: Events) -> Child {
    let key = dir.join(format!("node-{identity}.key"));
    let mut args = vec!["--key", key.to_str().unwrap()];
    args.extend(extra);
    spawn_averaging_node(i, swarm, "2", "600", &args, tx)
}

#[test]
fn a_restarted_peer_resumes_then_downloads_the_swarms_model() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().unwrap();
    let swarm = format!("restart-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    // Node 0 stalls before its round 13, so the restart (at its round 12)
    // meets the swarm however long its start takes on a busy machine.
    let stall = ["--misbehave", "lag:13:10"];
    let mut nodes = Nodes(vec![spawn(0, 0, &swarm, &stall, dir.path(), tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(150);
    let boot = bootstrap_address(&rx, deadline);
    let b_args = [
        "--bootstrap",
        &boot,
        "--checkpoint-dir",
        ckpt,
        "--checkpoint-every",
        "1",
    ];
    nodes
        .0
        .push(spawn(1, 1, &swarm, &b_args, dir.path(), tx.clone()));
    let mut killed = false;
    let mut restarted = false;
    let mut synced = None;
    let mut first_round_after = None;
    let mut finals = Vec::new();
    while finals.len() < 2 {
        let (i, v) = next_event(&rx, deadline);
        let round = v["round"].as_u64();
        match v["event"].as_str() {
            Some("round") if i == 0 && round == Some(4) && !killed => {
                nodes.0[1].kill().unwrap();
                nodes.0[1].wait().unwrap();
                killed = true;
            }
            Some("round") if i == 0 && round == Some(12) && killed && !restarted => {
                let mut args = b_args.to_vec();
                args.extend(["--resume", ckpt]);
                nodes
                    .0
                    .push(spawn(2, 1, &swarm, &args, dir.path(), tx.clone()));
                restarted = true;
            }
            Some("synced") if i == 2 => synced = Some(v),
            Some("round") if i == 2 && first_round_after.is_none() => first_round_after = round,
            Some("finished") => finals.push((i, v["rounds"].as_u64(), v["model_digest"].clone())),
            _ => {}
        }
    }
    eprintln!("restarted peer synced: {synced:?}; its first round after: {first_round_after:?}");
    let synced = synced.expect("the restarted peer never downloaded the swarm's model");
    // It resumed from a checkpoint of round <= 4, asked the swarm at once
    // and caught up by download before training a round of its own.
    let round = synced["round"].as_u64().unwrap();
    assert!(round >= 12, "{synced}");
    assert!(first_round_after > Some(round), "{first_round_after:?}");
    assert_eq!(synced["avoided"].as_object().unwrap().len(), 0);
    // It ends with the swarm, with the swarm's model.
    assert_eq!(finals.len(), 2);
    assert!(
        finals.iter().all(|f| f.0 != 1),
        "the killed process reported"
    );
    assert_eq!(
        (finals[0].1, &finals[0].2),
        (finals[1].1, &finals[1].2),
        "{finals:?}"
    );
    assert_eq!(finals[0].1, Some(60));
    // Node 0 and the restarted process exit cleanly (index 1 is the killed one).
    for i in [0, 2] {
        assert!(nodes.0[i].wait().unwrap().success(), "node {i} failed");
    }
}
