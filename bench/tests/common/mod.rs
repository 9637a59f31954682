//! Running `p2ptrain-bench` from its integration tests.

use std::process::Command;

/// Runs `p2ptrain-bench` with `args`, asserts it succeeded, and returns its
/// last `{"bench":"allreduce",…}` result line.
pub fn allreduce_line(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_p2ptrain-bench"))
        .args(args)
        .output()
        .expect("run p2ptrain-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.contains("\"bench\":\"allreduce\""))
        .expect("a result line");
    serde_json::from_str(line).expect("JSON")
}
