//! The swarm's answer equals the closed-form least-squares solution.

use linear_regression::{relative_error, run_swarm, Problem};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_match_closed_form_least_squares() {
    let problem = Arc::new(Problem::synthetic(2000, 8, 0.1, 42));
    let exact = problem.closed_form();
    // Sanity of the reference itself: residual ~ noise variance.
    assert!(
        (problem.mse(&exact) - 0.01).abs() < 0.003,
        "mse {}",
        problem.mse(&exact)
    );
    let outcome = run_swarm(problem.clone(), 4, 80, 0.5)
        .await
        .expect("swarm runs");
    assert_eq!(outcome.learned.len(), 4);
    for (i, learned) in outcome.learned.iter().enumerate() {
        let err = relative_error(learned, &exact);
        assert!(
            err <= 1e-3,
            "node {i}: relative error {err:.3e} > 1e-3 ({learned:?} vs {exact:?})"
        );
    }
    for r in &outcome.reports {
        assert_eq!(r.rounds, 80);
        assert!(
            r.complete_rounds >= 70,
            "only {} complete rounds",
            r.complete_rounds
        );
    }
}

#[test]
fn closed_form_recovers_noiseless_model() {
    let p = Problem::synthetic(200, 3, 0.0, 1);
    let sol = p.closed_form();
    let want = [1.0, -1.0, 3.0, 0.75];
    assert!(relative_error(&sol, &want) < 1e-9, "{sol:?}");
}
