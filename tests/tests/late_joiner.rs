//! A node that joins a swarm already training takes part in its rounds.

mod common;
use common::{bootstrap_address, next_event, spawn_averaging_node, Events, Nodes};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn spawn(
    i: usize,
    swarm: &str,
    min_peers: &str,
    steps: &str,
    boot: Option<&str>,
    tx: Events,
) -> Child {
    let extra = match boot {
        Some(b) => vec!["--bootstrap", b],
        None => vec![],
    };
    spawn_averaging_node(i, swarm, min_peers, steps, &extra, tx)
}

#[test]
fn late_joiner_averages_with_the_swarm() {
    let swarm = format!("late-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    let mut nodes = Nodes(vec![spawn(0, &swarm, "2", "400", None, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(180);
    let boot = bootstrap_address(&rx, deadline);
    nodes
        .0
        .push(spawn(1, &swarm, "2", "400", Some(&boot), tx.clone()));
    let mut late_started = false;
    let mut late_rounds = Vec::new();
    // The late joiner's (step, run_step, total_steps) per round.
    let mut late_steps = Vec::new();
    let mut early_rounds_after_join = Vec::new();
    let mut finished = 0;
    let mut finals = Vec::new();
    let mut digests: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut synced: Option<serde_json::Value> = None;
    while finished < 3 {
        let (i, v) = next_event(&rx, deadline);
        if i < 2 && v["event"] == "round" {
            digests.insert(
                v["round"].as_u64().unwrap(),
                v["model_digest"].as_str().unwrap().to_string(),
            );
        }
        match v["event"].as_str() {
            // The joiner waits for both members (--min-peers 3), so it syncs
            // before its first step; with --min-peers 1 it may start before
            // it has heard of anyone, train one round alone, then sync.
            Some("round") if i < 2 && !late_started && v["round"].as_u64() == Some(4) && i == 0 => {
                nodes
                    .0
                    .push(spawn(2, &swarm, "3", "60", Some(&boot), tx.clone()));
                late_started = true;
            }
            Some("synced") if i == 2 => synced = Some(v),
            Some("round") if i == 2 => {
                late_rounds.push((v["round"].as_u64().unwrap(), v["peers"].as_u64().unwrap()));
                late_steps.push((
                    v["step"].as_u64().unwrap(),
                    v["run_step"].as_u64().unwrap(),
                    v["total_steps"].as_u64().unwrap(),
                ));
            }
            Some("round") if late_started && !late_rounds.is_empty() => early_rounds_after_join
                .push((v["round"].as_u64().unwrap(), v["peers"].as_u64().unwrap())),
            Some("finished") => {
                finals.push((v["rounds"].as_u64().unwrap(), v["model_digest"].clone()));
                finished += 1
            }
            _ => {}
        }
    }
    eprintln!("late joiner rounds (round, group): {late_rounds:?}; synced: {synced:?}");
    // Its progress counts the rounds it downloaded, not only its own steps.
    let &(step, run_step, total) = late_steps.first().expect("the late joiner trained");
    assert!(
        step < run_step && run_step <= total,
        "late joiner's first round: step {step}, run_step {run_step} of {total}"
    );
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
    // It took on the swarm's run length (40 rounds) from the model it
    // downloaded, not its own --steps 60, so all three end together with
    // the same model.
    assert!(
        finals.iter().all(|f| *f == (40, finals[0].1.clone())),
        "{finals:?}"
    );
    for c in &mut nodes.0 {
        assert!(c.wait().unwrap().success());
    }
}
