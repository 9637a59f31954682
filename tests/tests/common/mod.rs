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

/// Runs `p2ptrain testnet` with `args` (the command name included), checks
/// it succeeded, and returns its summary: the last stdout line, as JSON.
pub fn run_testnet(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "testnet failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a summary line")).unwrap()
}

/// JSON event lines from node processes, tagged with the node's index.
pub type Events = std::sync::mpsc::Sender<(usize, serde_json::Value)>;

/// Node processes killed and reaped when the test ends, pass or fail.
pub struct Nodes(pub Vec<std::process::Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `p2ptrain node --events` with `args` on loopback (no mDNS) and
/// forwards its JSON event lines to `tx`. `TEST_LOG` sets its RUST_LOG.
pub fn spawn_node(index: usize, args: &[&str], tx: Events) -> std::process::Child {
    let mut c = Command::new(binary());
    c.args(["node", "--no-mdns", "--events"])
        .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
        .args(args);
    spawn_events(index, c, tx)
}

/// Starts `command` (a node run with `--events`, maybe under a wrapper
/// such as `ip netns exec`) and forwards its JSON event lines to `tx`.
/// `TEST_LOG` sets its RUST_LOG.
pub fn spawn_events(index: usize, mut command: Command, tx: Events) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let log = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into());
    let mut child = command
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary under test starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send((index, v)).is_err() {
                    return;
                }
            }
        }
    });
    child
}

/// A lone node of `swarm` on loopback (JSON events on stdout) that
/// checkpoints every round of 10 steps into `dir` and exits at once when
/// done; `extra` flags follow.
pub fn checkpointing_node(swarm: &str, dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.args(["node", "--swarm", swarm, "--no-mdns", "--events"])
        .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
        .args([
            "--average-every",
            "10",
            "--checkpoint-every",
            "1",
            "--linger-secs",
            "0",
        ])
        .arg("--checkpoint-dir")
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn");
    c
}

/// Starts a data-parallel node with the settings the swarm tests share
/// (rounds of 10 steps, a 3 s join window, 1 s linger), then `extra`.
pub fn spawn_averaging_node(
    index: usize,
    swarm: &str,
    min_peers: &str,
    steps: &str,
    extra: &[&str],
    tx: Events,
) -> std::process::Child {
    let mut args = vec!["--swarm", swarm, "--min-peers", min_peers, "--steps", steps];
    args.extend([
        "--average-every",
        "10",
        "--join-window-secs",
        "3",
        "--linger-secs",
        "1",
    ]);
    args.extend(extra);
    spawn_node(index, &args, tx)
}

/// The next event from any node, failing the test at `deadline`.
pub fn next_event(
    rx: &std::sync::mpsc::Receiver<(usize, serde_json::Value)>,
    deadline: std::time::Instant,
) -> (usize, serde_json::Value) {
    rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        .expect("nodes stopped reporting")
}

/// Waits for node 0's first listen address, to bootstrap the others from.
pub fn bootstrap_address(
    rx: &std::sync::mpsc::Receiver<(usize, serde_json::Value)>,
    deadline: std::time::Instant,
) -> String {
    loop {
        let (i, v) = next_event(rx, deadline);
        if i == 0 && v["event"] == "listening" {
            return v["addrs"][0].as_str().expect("an address").to_string();
        }
    }
}

/// Held by each test of a file whose swarms must run one at a time: on a
/// small machine (CI has 2 cores) parallel swarms starve each other's nodes
/// past the round deadlines those tests measure.
static ONE_SWARM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits until no other swarm of this test binary holds the lock (a test
/// that failed holding it leaves it usable).
pub fn one_swarm() -> std::sync::MutexGuard<'static, ()> {
    ONE_SWARM_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
