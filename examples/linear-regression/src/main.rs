//! `cargo run -p linear-regression`: four nodes fit a line together and
//! compare it with the closed-form least-squares answer.

use linear_regression::{relative_error, run_swarm, Problem};
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let problem = Arc::new(Problem::synthetic(2000, 8, 0.1, 42));
    let exact = problem.closed_form();
    let nodes = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let steps = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(80);
    let outcome = run_swarm(problem.clone(), nodes, steps, 0.5).await?;
    println!("closed form : {}", fmt(&exact));
    for (i, learned) in outcome.learned.iter().enumerate() {
        println!(
            "node {i}      : {}  relative error {:.2e}",
            fmt(learned),
            relative_error(learned, &exact)
        );
    }
    println!(
        "mse closed form {:.6}, swarm {:.6}",
        problem.mse(&exact),
        problem.mse(&outcome.learned[0])
    );
    Ok(())
}

fn fmt(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:+.4}"))
        .collect::<Vec<_>>()
        .join(" ")
}
