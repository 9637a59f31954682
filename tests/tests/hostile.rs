//! A hostile peer inside the swarm (it holds the secret, or there is none):
//! one of four nodes corrupts every averaging payload it sends. The plain
//! mean lets it wreck the model; the robust rules keep the swarm training.

mod common;
use common::run_testnet;

/// Runs a 4-node testnet on the bundled data with the last node hostile;
/// returns its summary line.
fn testnet_with_hostile(aggregation: &str, misbehave: &str) -> serde_json::Value {
    let summary = run_testnet(&[
        "testnet",
        "--nodes",
        "4",
        "--hostile",
        "1",
        "--misbehave",
        misbehave,
        "--aggregation",
        aggregation,
        "--timeout-secs",
        "300",
    ]);
    eprintln!("{aggregation} against {misbehave}: {summary}");
    summary
}

/// The lowest test accuracy over the nodes of [`testnet_with_hostile`].
fn hostile_testnet(aggregation: &str, misbehave: &str) -> f64 {
    testnet_with_hostile(aggregation, misbehave)["test_accuracy_min"]
        .as_f64()
        .unwrap()
}

#[test]
fn robust_aggregation_keeps_training_through_a_hostile_peer() {
    // The attack is real: with the plain mean a sign-flipping peer ruins
    // the model (a clean run reaches ~92%).
    let mean = hostile_testnet("mean", "flip");
    assert!(
        mean < 0.7,
        "the plain mean survived a flipping peer: {mean}"
    );
    let trimmed = hostile_testnet("trimmed-mean", "flip");
    assert!(
        trimmed >= 0.85,
        "trimmed mean under a flipping peer: {trimmed}"
    );
    // Inflating its reduced part by 45% a round stays inside the distance
    // bound; only the norm check stops it compounding: without it the worst
    // node ended at ~73%, with it at 85-89% (the hostile node's own model is
    // the lowest: the others refuse its part).
    let inflated = hostile_testnet("trimmed-mean", "scale:1.45");
    assert!(
        inflated >= 0.80,
        "trimmed mean under a peer inflating by 45%: {inflated}"
    );
    let clipped = hostile_testnet("centered-clip", "scale:10");
    assert!(
        clipped >= 0.80,
        "centered clip under a scaling peer: {clipped}"
    );
}

#[test]
fn one_peer_claiming_a_far_round_does_not_end_the_others_run() {
    // The hostile node's Progress says it reached round 2^64 - 2. Believed,
    // that ends every other node's run after its first round (the swarm
    // "is past the end"); a single member's claim must not move the swarm.
    let summary = testnet_with_hostile("mean", "claim-ahead");
    // Every node trains its whole shard of the bundled ~30,000 images (a
    // run ended after one round of 10 steps would train a tenth of that).
    let samples = summary["samples"].as_u64().unwrap();
    assert!(samples >= 27_000, "{summary}");
    assert_eq!(summary["models_agree"], true, "{summary}");
    assert!(
        summary["test_accuracy_min"].as_f64().unwrap() >= 0.85,
        "{summary}"
    );
}
