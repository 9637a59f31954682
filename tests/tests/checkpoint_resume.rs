//! A node killed mid-run resumes from its newest checkpoint that verifies.

mod common;
use common::{binary, checkpointing_node, Nodes};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn checkpoints(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let round = name.strip_prefix("ckpt-r")?.get(..8)?.parse().ok()?;
                    Some((round, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn node(dir: &Path, extra: &[&str]) -> Command {
    checkpointing_node("ckpt-test", dir, extra)
}

#[test]
fn killed_node_resumes_from_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // A long run, killed (SIGKILL) once it has written a few checkpoints.
    // (Killed however the test ends.)
    let mut running = Nodes(vec![node(dir.path(), &["--steps", "100000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while checkpoints(dir.path()).last().map(|c| c.0).unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "no checkpoints written");
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = &mut running.0[0];
    child.kill().unwrap();
    child.wait().unwrap();

    // Damage the newest checkpoint, as a crash during its write might have.
    let all = checkpoints(dir.path());
    let (newest_round, newest) = all.last().unwrap().clone();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let (good_round, good) = all
        .iter()
        .rev()
        .find(|c| c.0 < newest_round)
        .cloned()
        .expect("an older checkpoint survives");
    // The samples it says were trained (its metadata is JSON).
    let good_samples: f64 = String::from_utf8_lossy(&std::fs::read(&good).unwrap())
        .split_once("\"samples\":")
        .and_then(|(_, rest)| rest.split([',', '}']).next())
        .and_then(|n| n.parse().ok())
        .expect("the checkpoint names its samples");

    // Resume: training continues from the newest checkpoint that verifies.
    let target_steps = (good_round + 3) * 10;
    let out = node(dir.path(), &["--steps", &target_steps.to_string()])
        .arg("--resume")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed: {stderr}");
    let mut rounds = Vec::new();
    let mut finished = None;
    let mut rate = 0.0;
    for line in BufReader::new(&out.stdout[..]).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        match v["event"].as_str() {
            Some("round") => {
                rounds.push(v["round"].as_u64().unwrap());
                rate = v["samples_per_s"].as_f64().unwrap();
            }
            Some("finished") => finished = Some(v),
            _ => {}
        }
    }
    assert_eq!(
        rounds,
        vec![good_round + 1, good_round + 2, good_round + 3],
        "resume did not continue after round {good_round}"
    );
    let finished = finished.expect("a finished event");
    assert_eq!(finished["steps"].as_u64().unwrap(), target_steps);
    // Throughput counts this run's samples over this run's training time,
    // not the checkpoint's samples too.
    let trained = rate * finished["training_s"].as_f64().unwrap();
    let expected = finished["samples"].as_f64().unwrap() - good_samples;
    assert!(
        (trained - expected).abs() < 0.01 * expected,
        "samples/s x training time = {trained}, trained this run: {expected}"
    );
    assert!(
        stderr.contains("skipping checkpoint"),
        "the damaged file was not reported: {stderr}"
    );
    // The checkpoint written at the end holds the final model.
    let last = checkpoints(dir.path()).last().unwrap().1.clone();
    let bytes = std::fs::read(&last).unwrap();
    let digest = finished["model_digest"].as_str().unwrap();
    assert!(
        String::from_utf8_lossy(&bytes).contains(digest),
        "final checkpoint does not hold the final model"
    );
    // ... and the local Adam moments. Their step count went on from the
    // checkpoint's (it would be 30 had the resume started with fresh moments).
    let text = String::from_utf8_lossy(&bytes);
    let time: u64 = text
        .split_once("\"optim\":{\"time\":")
        .and_then(|(_, rest)| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("final checkpoint has no optimizer state");
    assert_eq!(
        time, target_steps,
        "optimizer state not carried across the resume"
    );
}

#[test]
fn resume_from_empty_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["node", "--no-mdns", "--resume"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no valid checkpoint"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// A checkpoint that cannot be written mid-run (the directory was taken away
/// here; a full disk in life) is reported and training goes on; only the
/// run's final checkpoint failing fails the run.
#[test]
fn failed_checkpoint_mid_run_does_not_stop_training() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("ckpt");
    let mut child = Command::new(binary())
        .args(["node", "--swarm", "ckpt-fail-test", "--no-mdns", "--events"])
        .args([
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--linger-secs",
            "0",
        ])
        .args([
            "--steps",
            "50",
            "--average-every",
            "10",
            "--checkpoint-every",
            "2",
            // Nothing is written for 5 s after round 1, while the test
            // puts a file where the directory was.
            "--misbehave",
            "lag:2:5",
        ])
        .arg("--checkpoint-dir")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rounds = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"].as_str() == Some("round") {
            let round = v["round"].as_u64().unwrap();
            if round == 1 {
                // No checkpoint is due at round 1: none is being written.
                std::fs::remove_dir_all(&dir).unwrap();
                std::fs::write(&dir, b"in the way").unwrap();
            }
            rounds.push(round);
        }
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        rounds,
        vec![1, 2, 3, 4, 5],
        "training stopped early: {stderr}"
    );
    assert!(
        stderr.contains("checkpoint not written; training goes on"),
        "the failed checkpoints were not reported: {stderr}"
    );
    assert!(
        !out.status.success(),
        "the final checkpoint failed: {stderr}"
    );
    assert!(
        stderr.contains("is a file, not a checkpoint directory"),
        "the final error does not say why: {stderr}"
    );
    assert_eq!(std::fs::read(&dir).unwrap(), b"in the way");
}

#[test]
fn another_swarms_checkpoints_are_neither_resumed_nor_pruned() {
    let dir = tempfile::tempdir().unwrap();
    // Swarm `ckpt-test` writes checkpoints of rounds 1 to 3.
    let out = node(dir.path(), &["--steps", "30"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let ours = checkpoints(dir.path());
    assert_eq!(ours.len(), 3, "{ours:?}");
    // Resuming them as another swarm is refused, naming both swarms.
    let out = checkpointing_node("other-swarm", dir.path(), &["--steps", "30"])
        .arg("--resume")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("of swarm `ckpt-test`, not `other-swarm`"),
        "{err}"
    );
    // Another swarm checkpointing into the same directory prunes only its own.
    let out = checkpointing_node("other-swarm", dir.path(), &["--steps", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for (_, path) in &ours {
        assert!(path.exists(), "{} was deleted", path.display());
    }
    // A new run of `ckpt-test` (not resuming) into that directory is refused
    // before it trains (its checkpoints used to fail one by one behind the
    // earlier run's round 3, and one of the round it ended on would replace
    // that run's), saying why.
    let out = node(dir.path(), &["--steps", "20"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds checkpoints of swarm `ckpt-test` (the newest of round 3)")
            && err.contains("--resume")
            && !err.contains("round finished"),
        "{err}"
    );
    assert_eq!(checkpoints(dir.path()).len(), 6, "files changed");
}
