//! Helpers shared by the whole-system tests.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Path of the `p2ptrain` binary built for these tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_p2ptrain-under-test")
}

/// Runs the binary with `args`, with a bounded time, and returns its output.
pub fn run(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary under test starts")
}
