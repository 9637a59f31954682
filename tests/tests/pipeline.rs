//! Pipeline (model-parallel) training across processes: a character-level
//! language model cut into two stages, each held by two peers.

mod common;
use common::{bootstrap_address, next_event, run, run_testnet, spawn_node, Events, Nodes};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Flags every pipeline node of these tests shares: a short run of the
/// bundled Austen text, with more micro-batches per step than the default
/// `--max-in-flight` (stages + 1) lets into the pipeline at once, so every
/// test runs the 1F1B schedule.
const PIPELINE: &[&str] = &[
    "--model",
    "char-lm",
    "--stages",
    "2",
    "--micro-batches",
    "4",
    "--batch-size",
    "8",
    "--average-every",
    "5",
];

/// Runs a three-node, three-stage testnet of eight micro-batches per step
/// with `--max-in-flight window`; returns its summary line.
fn three_stage_testnet(window: &str) -> serde_json::Value {
    let summary = run_testnet(&[
        "testnet",
        "--nodes",
        "3",
        "--model",
        "char-lm",
        "--stages",
        "3",
        "--micro-batches",
        "8",
        "--batch-size",
        "16",
        "--average-every",
        "2",
        "--steps",
        "6",
        "--max-in-flight",
        window,
        "--timeout-secs",
        "300",
    ]);
    eprintln!("--max-in-flight {window}: {summary}");
    summary
}

#[test]
fn one_forward_one_backward_bounds_the_activations_every_stage_holds() {
    // 1F1B with two micro-batches in flight: each stage before the last
    // holds at most two micro-batches' activations, the last none.
    let bounded = three_stage_testnet("2");
    let held = &bounded["peak_held_micro_batches"];
    assert_eq!(
        held[0], 2,
        "the first stage fills its window of two: {held}"
    );
    assert!(held[1].as_u64().unwrap() <= 2, "the middle stage: {held}");
    assert_eq!(held[2], 0, "the last stage back-propagates at once: {held}");
    let initial = bounded["initial_val_loss"].as_f64().unwrap();
    let fin = bounded["val_loss"].as_f64().unwrap();
    assert!(
        fin < initial - 1.0,
        "loss fell only from {initial} to {fin}"
    );
    assert_eq!(bounded["tokens"], 6 * 16 * 128);
    // Six steps averaged every two: three rounds on every stage. A lone
    // later-stage replica used to run a fourth, closing round, which
    // numbered its checkpoints apart from the first stage's.
    assert_eq!(bounded["rounds"], 3, "{bounded}");
    // GPipe (the whole step in flight) holds every micro-batch of the step.
    let gpipe = three_stage_testnet("8");
    let held = &gpipe["peak_held_micro_batches"];
    assert_eq!(
        held[0], 8,
        "GPipe's first stage holds its whole step: {held}"
    );
    assert!(
        held[1].as_u64().unwrap() > 2,
        "GPipe's middle stage: {held}"
    );
}

#[test]
fn four_peers_two_stages_learn_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().to_str().unwrap();
    let mut args = vec!["testnet", "--checkpoint-dir", ckpt, "--nodes", "4"];
    args.extend(PIPELINE);
    args.extend(["--steps", "60", "--timeout-secs", "600"]);
    let summary = run_testnet(&args);
    eprintln!("{summary}");
    assert_eq!(summary["stages"], 2);
    assert_eq!(summary["stage_peers"], serde_json::json!([2, 2]));
    let initial = summary["initial_val_loss"].as_f64().unwrap();
    let fin = summary["val_loss"].as_f64().unwrap();
    // Bytes drawn uniformly cost 8 bits; a model that learned anything about
    // English text is far below its random start.
    assert!(initial > 6.0, "initial loss {initial} bits/char");
    assert!(
        fin < initial - 2.0,
        "loss fell only from {initial} to {fin}"
    );
    // Replicas of each stage averaged into the same parameters.
    assert_eq!(summary["models_agree"], true);
    assert!(summary["activation_bytes_per_step"].as_f64().unwrap() > 0.0);
    // The default window, stages + 1 = 3 of the 4 micro-batches per step.
    assert_eq!(
        summary["peak_held_micro_batches"],
        serde_json::json!([3, 0])
    );
    let bubble = summary["bubble"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&bubble), "bubble {bubble}");

    // The stages' final checkpoints make a whole model that writes text.
    let out = run(&[
        "sample",
        "--from",
        ckpt,
        "--prompt",
        "Mr. Darcy",
        "--chars",
        "80",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("sample: {text}");
    assert!(text.starts_with("Mr. Darcy") && text.len() > 80, "{text}");
}

fn spawn(i: usize, swarm: &str, boot: Option<&str>, tx: Events) -> Child {
    spawn_with(i, swarm, "4", boot, tx)
}

fn spawn_with(i: usize, swarm: &str, min_peers: &str, boot: Option<&str>, tx: Events) -> Child {
    let mut args = vec!["--swarm", swarm, "--min-peers", min_peers, "--steps", "80"];
    args.extend(PIPELINE);
    args.extend(["--stage-timeout-secs", "3", "--join-window-secs", "2"]);
    args.extend(["--reduce-timeout-secs", "4", "--linger-secs", "1"]);
    if let Some(b) = boot {
        args.extend(["--bootstrap", b]);
    }
    spawn_node(i, &args, tx)
}

#[test]
fn training_goes_on_when_a_stage_replica_is_killed() {
    let swarm = format!("pipe-kill-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    let mut nodes = Nodes(vec![spawn(0, &swarm, None, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(600);
    let boot = bootstrap_address(&rx, deadline);
    for i in 1..4 {
        nodes.0.push(spawn(i, &swarm, Some(&boot), tx.clone()));
    }
    let mut stage_of = [None; 4];
    let mut killed = None;
    let mut finished = Vec::new();
    let mut first_stage_rounds_after_kill = 0;
    while finished.len() < 3 {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("started") => stage_of[i] = v["stage"].as_u64(),
            Some("round")
                if killed.is_none() && stage_of[i] == Some(0) && v["round"].as_u64() >= Some(2) =>
            {
                // Kill one replica of the last stage mid-run.
                let victim = (0..4).find(|j| stage_of[*j] == Some(1)).unwrap();
                nodes.0[victim].kill().unwrap();
                killed = Some(victim);
            }
            Some("round") if killed.is_some() && stage_of[i] == Some(0) => {
                first_stage_rounds_after_kill += 1
            }
            Some("finished") if Some(i) != killed => finished.push(v),
            _ => {}
        }
    }
    let victim = killed.expect("no first-stage round was reported");
    for (i, c) in nodes.0.iter_mut().enumerate() {
        if i != victim {
            assert!(c.wait().unwrap().success(), "node {i} failed");
        }
    }
    assert!(
        first_stage_rounds_after_kill >= 4,
        "{first_stage_rounds_after_kill}"
    );
    let first: Vec<_> = finished
        .iter()
        .filter(|f| f["pipeline"]["stage"] == 0)
        .collect();
    assert_eq!(first.len(), 2);
    for f in &first {
        first_stage_learned(f);
    }
    // The victim's in-flight micro-batches were sent to the surviving replica.
    let resent: u64 = first
        .iter()
        .map(|f| f["pipeline"]["resent"].as_u64().unwrap())
        .sum();
    eprintln!("micro-batches resent after the kill: {resent}");
}

/// What a run that lost every replica of one stage and refilled it ended with.
struct Refilled {
    /// The node that took the emptied stage over: its final report.
    taker: serde_json::Value,
    /// The final report of a node that kept its stage throughout.
    stayer: serde_json::Value,
    /// First-stage rounds reported after the emptied stage was refilled.
    first_rounds_after: usize,
}

/// Two nodes, one per stage; once the first stage reports round 2 the only
/// replica of `stage` is killed and a new node is started (bootstrapping
/// from the survivor), which must take the emptied stage over. Waits for the
/// survivor and the new node to finish successfully, and checks the new node
/// took `stage`.
fn new_peer_after_losing_stage(tag: &str, stage: u64) -> Refilled {
    let swarm = format!("pipe-{tag}-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    let mut nodes = Nodes(vec![spawn_with(0, &swarm, "2", None, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(600);
    let boot = bootstrap_address(&rx, deadline);
    nodes
        .0
        .push(spawn_with(1, &swarm, "2", Some(&boot), tx.clone()));
    let mut addr_of: [Option<String>; 3] = [Some(boot), None, None];
    let mut stage_of = [None; 3];
    let mut victim = None;
    let mut finished: [Option<serde_json::Value>; 3] = [None, None, None];
    let mut first_rounds_after = 0;
    while finished.iter().filter(|f| f.is_some()).count() < 2 {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("listening") if addr_of[i].is_none() => {
                addr_of[i] = v["addrs"][0].as_str().map(String::from)
            }
            Some("started") => stage_of[i] = v["stage"].as_u64(),
            Some("round")
                if victim.is_none() && stage_of[i] == Some(0) && v["round"].as_u64() >= Some(2) =>
            {
                let v = (0..2).find(|j| stage_of[*j] == Some(stage)).unwrap();
                nodes.0[v].kill().unwrap();
                victim = Some(v);
                let survivor = addr_of[1 - v].clone().expect("the survivor's address");
                nodes
                    .0
                    .push(spawn_with(2, &swarm, "2", Some(&survivor), tx.clone()));
            }
            Some("round") if stage_of[2].is_some() && stage_of[i] == Some(0) => {
                first_rounds_after += 1
            }
            Some("finished") if Some(i) != victim => finished[i] = Some(v),
            _ => {}
        }
    }
    let survivor = 1 - victim.expect("no first-stage round was reported");
    assert_eq!(
        stage_of[2],
        Some(stage),
        "the new peer took {:?}",
        stage_of[2]
    );
    for i in [survivor, 2] {
        assert!(nodes.0[i].wait().unwrap().success(), "node {i} failed");
    }
    Refilled {
        taker: finished[2].take().unwrap(),
        stayer: finished[survivor].take().unwrap(),
        first_rounds_after,
    }
}

/// Four nodes, two per stage; once the first stage reports round 2 every
/// replica of `stage` is killed, and a replica of the other stage must move
/// to the emptied one. Waits for the two survivors to finish successfully, and
/// checks the mover took `stage`.
fn spare_after_losing_stage(tag: &str, stage: u64) -> Refilled {
    let swarm = format!("pipe-{tag}-{}", std::process::id());
    let (tx, rx) = mpsc::channel();
    let mut nodes = Nodes(vec![spawn(0, &swarm, None, tx.clone())]);
    let deadline = Instant::now() + Duration::from_secs(600);
    let boot = bootstrap_address(&rx, deadline);
    for i in 1..4 {
        nodes.0.push(spawn(i, &swarm, Some(&boot), tx.clone()));
    }
    let mut stage_of = [None; 4];
    let mut killed: Vec<usize> = Vec::new();
    let mut mover = None;
    let mut first_rounds_after = 0;
    let mut finished: [Option<serde_json::Value>; 4] = [None, None, None, None];
    while finished.iter().filter(|f| f.is_some()).count() < 2 {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("started") => {
                let stage = v["stage"].as_u64();
                if stage_of[i].is_some() && stage != stage_of[i] {
                    mover = Some(i);
                }
                stage_of[i] = stage;
            }
            Some("round")
                if killed.is_empty()
                    && stage_of[i] == Some(0)
                    && v["round"].as_u64() >= Some(2) =>
            {
                // Node 0 may be among the dead: it bootstraps nobody any
                // more, so the gap is filled from inside the swarm.
                for (j, s) in stage_of.iter().enumerate() {
                    if *s == Some(stage) {
                        nodes.0[j].kill().unwrap();
                        killed.push(j);
                    }
                }
            }
            Some("round") if mover.is_some() && stage_of[i] == Some(0) => first_rounds_after += 1,
            Some("finished") if !killed.contains(&i) => finished[i] = Some(v),
            _ => {}
        }
    }
    assert_eq!(killed.len(), 2, "stages were {stage_of:?}");
    let mover = mover.expect("no replica moved to the emptied stage");
    assert_eq!(stage_of[mover], Some(stage), "stages were {stage_of:?}");
    let stayer = (0..4).find(|j| !killed.contains(j) && *j != mover).unwrap();
    for i in [mover, stayer] {
        assert!(nodes.0[i].wait().unwrap().success(), "node {i} failed");
    }
    Refilled {
        taker: finished[mover].take().unwrap(),
        stayer: finished[stayer].take().unwrap(),
        first_rounds_after,
    }
}

/// Checks a first-stage node that kept its stage through the run: all 80
/// steps, and the validation loss fell well below its start.
fn first_stage_learned(report: &serde_json::Value) {
    assert_eq!(report["pipeline"]["stage"], 0, "{report}");
    assert_eq!(report["steps"], 80, "{report}");
    let p = &report["pipeline"];
    let (initial, fin) = (
        p["initial_val_bpc"].as_f64().unwrap(),
        p["val_bpc"].as_f64().unwrap(),
    );
    assert!(
        fin < initial - 1.0,
        "loss fell only from {initial} to {fin}"
    );
}

/// The step a node that took its stage over resumed from; checks it loaded
/// a backup taken after at least one averaging round and trained on from it.
fn resumed_at(report: &serde_json::Value) -> u64 {
    let resumed = report["pipeline"]["resumed_at_step"]
        .as_u64()
        .expect("a resumed step");
    assert!(resumed >= 5, "resumed at step {resumed}");
    assert!(
        report["steps"].as_u64().unwrap() > resumed,
        "no step taken after the takeover: {report}"
    );
    resumed
}

/// Checks a node that took the first stage over mid-run: it finished the
/// run as planned (80 steps) and the model it evaluated learned the text
/// (uniform bytes cost 8 bits per character, the untrained model about 8).
fn first_stage_taken_over(report: &serde_json::Value) -> u64 {
    let p = &report["pipeline"];
    assert_eq!(p["stage"], 0, "{report}");
    assert_eq!(report["steps"], 80, "{report}");
    assert!(p["initial_val_bpc"].is_null(), "{report}");
    let fin = p["val_bpc"].as_f64().expect("a validation loss");
    assert!(
        fin < 6.5,
        "validation loss {fin} bits/char after the takeover"
    );
    resumed_at(report)
}

#[test]
fn a_new_peer_takes_over_a_stage_that_lost_every_replica() {
    let run = new_peer_after_losing_stage("takeover", 1);
    assert!(run.first_rounds_after >= 4, "{}", run.first_rounds_after);
    first_stage_learned(&run.stayer);
    // The new peer continued from the dead stage's backup, not from scratch.
    let resumed = resumed_at(&run.taker);
    eprintln!("took over at step {resumed}: {}", run.taker);
}

#[test]
fn a_new_peer_takes_over_the_first_stage_when_it_lost_every_replica() {
    // The first stage owns the data and plans the run: the new peer takes
    // both over from the backup the last stage holds.
    let run = new_peer_after_losing_stage("first", 0);
    assert_eq!(run.stayer["pipeline"]["stage"], 1, "{}", run.stayer);
    let resumed = first_stage_taken_over(&run.taker);
    eprintln!("took the first stage over at step {resumed}: {}", run.taker);
}

#[test]
fn a_spare_replica_moves_to_a_stage_that_lost_every_replica() {
    let run = spare_after_losing_stage("spare", 1);
    first_stage_learned(&run.stayer);
    assert_eq!(run.taker["pipeline"]["stage"], 1, "{}", run.taker);
    let resumed = resumed_at(&run.taker);
    eprintln!("moved to stage 1 at step {resumed}: {}", run.taker);
}

#[test]
fn a_spare_replica_moves_to_the_first_stage_when_it_lost_every_replica() {
    let run = spare_after_losing_stage("spare-first", 0);
    assert!(run.first_rounds_after >= 4, "{}", run.first_rounds_after);
    assert_eq!(run.stayer["pipeline"]["stage"], 1, "{}", run.stayer);
    let resumed = first_stage_taken_over(&run.taker);
    eprintln!("moved to the first stage at step {resumed}: {}", run.taker);
}

/// A pipeline node of `swarm` of `peers` nodes training `steps` steps in
/// rounds of 5 that checkpoints every round; `extra` says where
/// (`--checkpoint-dir DIR` or `--resume DIR`).
fn spawn_checkpointing(
    i: usize,
    swarm: &str,
    (peers, steps): (&str, &str),
    boot: Option<&str>,
    extra: &[&str],
    tx: Events,
) -> Child {
    let mut args = vec!["--swarm", swarm, "--min-peers", peers, "--steps", steps];
    args.extend(PIPELINE);
    args.extend(["--checkpoint-every", "1", "--linger-secs", "1"]);
    args.extend(["--stage-timeout-secs", "3", "--reduce-timeout-secs", "4"]);
    args.extend(extra);
    if let Some(b) = boot {
        args.extend(["--bootstrap", b]);
    }
    spawn_node(i, &args, tx)
}

/// Starts one [checkpointing](spawn_checkpointing) node of 30 steps per
/// directory, node `i` with `flag dirs[i]`, the others bootstrapping from
/// the first.
fn start_checkpointing(
    swarm: &str,
    flag: &str,
    dirs: &[String],
    deadline: Instant,
) -> (Nodes, mpsc::Receiver<(usize, serde_json::Value)>) {
    let (tx, rx) = mpsc::channel();
    let peers = dirs.len().to_string();
    let spawn = |i: usize, boot: Option<&str>| {
        let shape = (peers.as_str(), "30");
        spawn_checkpointing(i, swarm, shape, boot, &[flag, &dirs[i]], tx.clone())
    };
    let mut nodes = Nodes(vec![spawn(0, None)]);
    let boot = bootstrap_address(&rx, deadline);
    for i in 1..dirs.len() {
        nodes.0.push(spawn(i, Some(&boot)));
    }
    (nodes, rx)
}

/// `n` fresh directories (removed when the first value drops) and their paths.
fn temp_dirs(n: usize) -> (Vec<tempfile::TempDir>, Vec<String>) {
    let tmp: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let dirs = tmp
        .iter()
        .map(|d| d.path().to_str().unwrap().to_owned())
        .collect();
    (tmp, dirs)
}

/// The rounds of the checkpoints in `dir`, from their file names.
fn checkpoint_rounds(dir: &str) -> Vec<(u64, std::path::PathBuf)> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let round = name.strip_prefix("ckpt-r")?.get(..8)?.parse().ok()?;
            Some((round, e.path()))
        })
        .collect()
}

#[test]
fn a_pipeline_stopped_everywhere_resumes_from_its_stage_checkpoints() {
    let swarm = format!("pipe-resume-{}", std::process::id());
    let (_tmp, dirs) = temp_dirs(4);
    let deadline = Instant::now() + Duration::from_secs(600);

    // First run, two replicas per stage: every node is killed once a
    // first-stage replica has averaged three rounds (15 steps), with no
    // warning and nothing written at the end.
    let (nodes, rx) = start_checkpointing(&swarm, "--checkpoint-dir", &dirs, deadline);
    let mut stage_of = [None; 4];
    let mut fresh_losses: Vec<Vec<f64>> = vec![Vec::new(); 4];
    while fresh_losses.iter().all(|l| l.len() < 3) {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("started") => stage_of[i] = v["stage"].as_u64(),
            Some("round") if stage_of[i] == Some(0) => {
                fresh_losses[i].push(v["loss"].as_f64().unwrap())
            }
            _ => {}
        }
    }
    drop(nodes);
    let first: Vec<usize> = (0..4).filter(|i| stage_of[*i] == Some(0)).collect();
    assert_eq!(first.len(), 2, "stages {stage_of:?}");
    // One first-stage replica is made to have died between its peers'
    // checkpoints: its newest is one round behind the other's.
    let newest = |i: usize| {
        checkpoint_rounds(&dirs[i])
            .iter()
            .map(|c| c.0)
            .max()
            .unwrap()
    };
    let (ahead, behind) = if newest(first[0]) >= newest(first[1]) {
        (first[0], first[1])
    } else {
        (first[1], first[0])
    };
    let top = newest(ahead);
    for (round, path) in checkpoint_rounds(&dirs[behind]) {
        if round >= top {
            std::fs::remove_file(path).unwrap();
        }
    }
    assert_eq!(newest(behind), top - 1);

    // Second run: the same flags with --resume; each node holds the stage its
    // directory holds again and the run goes on to its 30 steps.
    let (mut nodes, rx) = start_checkpointing(&swarm, "--resume", &dirs, deadline);
    let mut resumed_losses: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut finished: Vec<Option<serde_json::Value>> = vec![None; 4];
    while finished.iter().any(|f| f.is_none()) {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("started") => assert_eq!(v["stage"].as_u64(), stage_of[i], "node {i} moved"),
            Some("round") => resumed_losses[i].push(v["loss"].as_f64().unwrap()),
            Some("finished") => finished[i] = Some(v),
            _ => {}
        }
    }
    for (i, c) in nodes.0.iter_mut().enumerate() {
        assert!(c.wait().unwrap().success(), "node {i} failed");
    }
    eprintln!("fresh first-stage round losses: {fresh_losses:?}");
    eprintln!("resumed round losses: {resumed_losses:?}");
    let report = |i: usize| finished[i].as_ref().unwrap();
    let at = |i: usize| report(i)["pipeline"]["resumed_at_step"].as_u64().unwrap();
    for i in 0..4 {
        assert!(at(i) >= 5, "node {i}: {}", report(i));
    }
    // The replica one round behind either resumed from its own checkpoint
    // and stepped to the other's step and round, or (where it heard the
    // other train before it chose) took the stage's backup: one a stage-1
    // peer saved at the other's step, or a newer one.
    let stepped = at(behind) + 5 == at(ahead);
    assert!(stepped || at(behind) >= at(ahead), "{}", report(behind));
    // The replica ahead resumed from its own checkpoint: its window order
    // goes on past the 4 micro-batches of each step it had trained.
    let skipped = |i: usize| report(i)["pipeline"]["skipped_micro_batches"].as_u64();
    assert_eq!(skipped(ahead), Some(at(ahead) * 4), "{}", report(ahead));
    // The one behind moved past its own checkpoint's steps, or took a backup.
    let behind_ckpt_step = at(ahead) - 5;
    assert!(
        [Some(behind_ckpt_step * 4), Some(0)].contains(&skipped(behind)),
        "{}",
        report(behind)
    );
    // Either way both end the run together, having averaged together.
    for i in [ahead, behind] {
        assert_eq!(report(i)["steps"], 30, "{}", report(i));
        assert!(
            report(i)["complete_rounds"].as_u64() >= Some(1),
            "{}",
            report(i)
        );
    }
    if stepped || at(behind) == at(ahead) {
        assert_eq!(resumed_losses[behind].len(), resumed_losses[ahead].len());
    }
    assert_eq!(
        report(ahead)["model_digest"],
        report(behind)["model_digest"]
    );
    // Trained parameters (and Adam's moments) came back: the first round
    // after resuming starts well below where the untrained model started.
    let fresh = fresh_losses[ahead][0].max(fresh_losses[behind][0]);
    for i in [ahead, behind] {
        assert!(
            resumed_losses[i][0] < fresh - 0.5,
            "node {i} resumed at loss {} against a fresh start's {fresh}",
            resumed_losses[i][0]
        );
    }
    let fin = report(ahead)["pipeline"]["val_bpc"]
        .as_f64()
        .expect("a validation loss");
    assert!(fin < 6.5, "validation loss {fin} bits/char after resuming");

    // A stage checkpoint resumes only a pipeline cut the same way, and says
    // which flags would resume it.
    let refused = |extra: &[&str], wanted: &str| {
        let d = &dirs[ahead];
        let mut args = vec!["node", "--no-mdns", "--swarm", &swarm, "--resume", d];
        args.extend(extra);
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(wanted), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    };
    refused(
        &["--model", "char-lm", "--stages", "3"],
        "holds stage 0 of 2, but --stages is 3: pass --stages 2",
    );
    refused(
        &[],
        "stage 0 of 2 of a char-lm pipeline: pass --model char-lm --stages 2",
    );
}

#[test]
fn a_stage_whose_machine_is_gone_is_taken_over_from_a_saved_backup() {
    let swarm = format!("pipe-gone-{}", std::process::id());
    let (_tmp, dirs) = temp_dirs(3);
    let deadline = Instant::now() + Duration::from_secs(600);

    // First run, one node per stage, killed once the first stage has
    // averaged three rounds.
    let (nodes, rx) = start_checkpointing(&swarm, "--checkpoint-dir", &dirs[..2], deadline);
    let mut stage_of = [None; 2];
    let mut fresh_losses = Vec::new();
    while fresh_losses.len() < 3 {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("started") => stage_of[i] = v["stage"].as_u64(),
            Some("round") if stage_of[i] == Some(0) => {
                fresh_losses.push(v["loss"].as_f64().unwrap())
            }
            _ => {}
        }
    }
    drop(nodes);
    let first = (0..2).find(|i| stage_of[*i] == Some(0)).unwrap();
    // Beside its own stage, the first stage's node saved the second's backup.
    let saved = std::path::Path::new(&dirs[first]).join("backup-stage-1");
    let backups = checkpoint_rounds(saved.to_str().unwrap());
    assert!(!backups.is_empty(), "no backup of stage 1 in {saved:?}");

    // Second run: the second stage's machine is gone for good. The first
    // stage's node resumes, and a new machine (no checkpoint of its own)
    // takes the second stage over from the backup the first one saved.
    let (tx, rx) = mpsc::channel();
    let shape = ("2", "30");
    let mut nodes = Nodes(vec![spawn_checkpointing(
        0,
        &swarm,
        shape,
        None,
        &["--resume", &dirs[first]],
        tx.clone(),
    )]);
    let boot = bootstrap_address(&rx, deadline);
    nodes.0.push(spawn_checkpointing(
        1,
        &swarm,
        shape,
        Some(&boot),
        &["--checkpoint-dir", &dirs[2]],
        tx,
    ));
    let mut resumed_losses = Vec::new();
    let mut finished: Vec<Option<serde_json::Value>> = vec![None; 2];
    while finished.iter().any(|f| f.is_none()) {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("round") if i == 0 => resumed_losses.push(v["loss"].as_f64().unwrap()),
            Some("finished") => finished[i] = Some(v),
            _ => {}
        }
    }
    for (i, c) in nodes.0.iter_mut().enumerate() {
        assert!(c.wait().unwrap().success(), "node {i} failed");
    }
    eprintln!("fresh first-stage losses {fresh_losses:?}, resumed {resumed_losses:?}");
    let (resumed, new) = (finished[0].as_ref().unwrap(), finished[1].as_ref().unwrap());
    assert_eq!(resumed["steps"], 30, "{resumed}");
    assert_eq!(new["pipeline"]["stage"], 1, "{new}");
    // From the newest copy saved before the stop (rounds of 5 steps).
    let saved_step = backups.iter().map(|(round, _)| round * 5).max();
    assert_eq!(
        new["pipeline"]["resumed_at_step"].as_u64(),
        saved_step,
        "the new node did not start from the saved backup: {new}"
    );
    // Both stages came back trained: a second stage started afresh under
    // the trained first one would put the loss back near the start's.
    assert!(
        resumed_losses[0] < fresh_losses[0] - 0.5,
        "resumed at loss {} against a fresh start's {}",
        resumed_losses[0],
        fresh_losses[0]
    );
    // The first node's directory alone, with its saved copy of the second
    // stage, makes a whole model.
    let out = run(&["sample", "--from", &dirs[first], "--chars", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_node_resumed_behind_a_live_replica_takes_the_stage_from_the_swarm() {
    let swarm = format!("pipe-behind-{}", std::process::id());
    let (_tmp, dirs) = temp_dirs(3);
    let dir = |i: usize| dirs[i].clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    let (tx, rx) = mpsc::channel();
    // 60 steps: the restarted node has time to rejoin before the run ends.
    let shape = ("3", "60");
    let spawn = |i: usize, boot: Option<&str>, flag: &str| {
        spawn_checkpointing(i, &swarm, shape, boot, &[flag, &dir(i)], tx.clone())
    };
    let mut nodes = Nodes(vec![spawn(0, None, "--checkpoint-dir")]);
    let boot = bootstrap_address(&rx, deadline);
    for i in 1..3 {
        nodes.0.push(spawn(i, Some(&boot), "--checkpoint-dir"));
    }
    // Three nodes on two stages: one stage has two replicas. One of them is
    // killed after the first stage's second round and restarted with
    // --resume after its fourth, while its stage's other replica trains on.
    let mut stage_of = [None; 4];
    let mut first_rounds = 0;
    let mut victim = None;
    let mut finished: Vec<(usize, serde_json::Value)> = Vec::new();
    while finished.len() < 3 {
        let (i, v) = next_event(&rx, deadline);
        match v["event"].as_str() {
            Some("started") => stage_of[i] = v["stage"].as_u64(),
            Some("round") if stage_of[i] == Some(0) && Some(i) != victim => {
                first_rounds += 1;
                if victim.is_none() && v["round"].as_u64() >= Some(2) {
                    let doubled =
                        (0..2).find(|s| stage_of.iter().filter(|x| **x == Some(*s)).count() == 2);
                    let stage = doubled.expect("a stage with two replicas");
                    let v = (0..3).rev().find(|j| stage_of[*j] == Some(stage)).unwrap();
                    nodes.0[v].kill().unwrap();
                    victim = Some(v);
                    first_rounds = 0;
                } else if victim.is_some() && first_rounds == 2 && nodes.0.len() == 3 {
                    let v = victim.unwrap();
                    stage_of[3] = stage_of[v];
                    nodes.0.push(spawn_checkpointing(
                        3,
                        &swarm,
                        shape,
                        Some(&boot),
                        &["--resume", &dir(v)],
                        tx.clone(),
                    ));
                }
            }
            Some("finished") if Some(i) != victim => finished.push((i, v)),
            _ => {}
        }
    }
    for (i, c) in nodes.0.iter_mut().enumerate() {
        if Some(i) != victim {
            assert!(c.wait().unwrap().success(), "node {i} failed");
        }
    }
    let resumed = &finished
        .iter()
        .find(|(i, _)| *i == 3)
        .expect("the resumed node finished")
        .1;
    let v = victim.unwrap();
    assert_eq!(
        resumed["pipeline"]["stage"].as_u64(),
        stage_of[v],
        "{resumed}"
    );
    // Its checkpoint was of step 10 at most; the swarm's backup was past it.
    let at = resumed["pipeline"]["resumed_at_step"].as_u64().unwrap();
    assert!(
        at >= 15,
        "resumed at step {at}: from its own stale checkpoint? {resumed}"
    );
}
