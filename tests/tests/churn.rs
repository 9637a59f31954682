//! A peer killed with SIGKILL mid-run costs the swarm at most a round.

mod common;
use common::{bootstrap_address, next_event, spawn_node, Events, Nodes};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn spawn(i: usize, swarm: &str, bootstrap: Option<&str>, tx: Events) -> Child {
    let mut args = vec!["--swarm", swarm, "--min-peers", "3", "--steps", "200"];
    args.extend(["--average-every", "10", "--join-window-secs", "2"]);
    args.extend(["--reduce-timeout-secs", "6", "--linger-secs", "1"]);
    if let Some(b) = bootstrap {
        args.extend(["--bootstrap", b]);
    }
    spawn_node(i, &args, tx)
}

#[test]
fn survivors_finish_after_a_peer_is_killed_mid_run() {
    let swarm = format!("churn-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    let mut nodes = Nodes(vec![spawn(0, &swarm, None, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(180);
    let boot = bootstrap_address(&rx, deadline);
    nodes.0.push(spawn(1, &swarm, Some(&boot), tx.clone()));
    nodes.0.push(spawn(2, &swarm, Some(&boot), tx.clone()));

    let mut killed_at = None;
    let mut finished = Vec::new();
    let mut rounds_after_kill = Vec::new();
    while finished.len() < 2 {
        let (i, v) = next_event(&rx, deadline);
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
    // Survivors end at the run's last round holding the same model. A node
    // that caught up by downloading the swarm's model trained fewer steps.
    assert_eq!(finished[0]["model_digest"], finished[1]["model_digest"]);
    for f in &finished {
        assert_eq!(f["rounds"], 20);
        let steps = f["steps"].as_u64().unwrap();
        assert!((100..=200).contains(&steps), "{f}");
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
