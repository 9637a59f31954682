//! The README's commands work as a newcomer types them, at the workspace root.

use std::process::Command;

/// `cargo run -- …` at the root must resolve to the p2ptrain binary: with
/// several binaries in the workspace and no default member, cargo refuses
/// with "could not determine which binary to run", which no other test sees.
#[test]
fn cargo_run_at_the_workspace_root_runs_p2ptrain() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lies in the workspace");
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["run", "--quiet", "--", "--version"])
        .output()
        .expect("cargo starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo run failed:\n{stderr}");
    assert!(stdout.starts_with("p2ptrain "), "{stdout}");
}
