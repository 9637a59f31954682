//! Nodes find each other by mDNS alone, on a private LAN of network namespaces.
//!
//! Each node runs in its own Linux network namespace whose only link is a veth
//! pair to a bridge in one more namespace: a LAN with multicast and nothing
//! else. No namespace is connected to the host's, so no traffic can leave the
//! machine, and the nodes cannot reach each other over loopback either. The
//! nodes get no `--bootstrap` address; they must discover each other by mDNS
//! and then train together.
//!
//! Needs root and iproute2 (`ip netns`); skips with a message on stderr where
//! either is missing or namespaces cannot be created (a container without
//! CAP_SYS_ADMIN).

mod common;
use common::binary;
use serde_json::Value;
use std::io::{BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Nodes on the LAN.
const NODES: usize = 3;
/// Everything (discovery, training, evaluation, linger) must be over by then.
const DEADLINE: Duration = Duration::from_secs(120);

/// Runs `ip ARGS`; the error names the command and says why it failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Effective user id, from `/proc/self/status`; `None` off Linux.
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// Why the test cannot run here, if it cannot.
fn cannot_run() -> Option<String> {
    match euid() {
        None => return Some("no /proc/self/status (not Linux?)".into()),
        Some(0) => {}
        Some(uid) => return Some(format!("network namespaces need root (uid is {uid})")),
    }
    if let Err(e) = Command::new("ip").arg("-V").output() {
        return Some(format!("iproute2 `ip` not usable: {e}"));
    }
    None
}

/// The namespaces and node processes of one run. Dropping it kills the
/// processes and deletes the namespaces, so a failed assertion or a timeout
/// leaves nothing behind.
#[derive(Default)]
struct Lan {
    /// Namespaces created so far, in order.
    namespaces: Vec<String>,
    /// Node processes (`ip netns exec` execs the node, so these are the nodes).
    children: Vec<Child>,
}

impl Lan {
    /// Creates namespace `name` with `lo` up.
    fn add_namespace(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// Kills every node still running.
    fn kill_all(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.kill_all();
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Builds the LAN: namespace `hub` holds bridge `br0`; node namespace `i`
/// holds `eth0` with 10.99.0.`i`/24, the other end of its veth pair enslaved
/// to the bridge. The only routes are the link's own subnet (and loopback).
fn wire(lan: &mut Lan, hub: &str, nodes: &[String]) -> Result<(), String> {
    ip(&["-n", hub, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", hub, "link", "set", "br0", "up"])?;
    for (i, ns) in nodes.iter().enumerate() {
        let port = format!("v{}", i + 1);
        let addr = format!("10.99.0.{}/24", i + 1);
        lan.add_namespace(ns)?;
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", hub,
        ])?;
        ip(&["-n", hub, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", hub, "link", "set", &port, "up"])?;
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "multicast", "on"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }
    Ok(())
}

/// What one node printed.
struct Output {
    status: Option<ExitStatus>,
    events: Vec<Value>,
    stdout: String,
    stderr: String,
}

impl Output {
    /// The node's events called `name`.
    fn events(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(&mut r).read_to_string(&mut s);
        s
    })
}

/// Nodes in separate namespaces, no `--bootstrap`: mDNS finds all peers, every
/// node trains with all of them, and they end with the same model.
#[test]
fn nodes_find_each_other_by_mdns_alone() {
    if let Some(why) = cannot_run() {
        eprintln!("skipping: {why}");
        return;
    }
    let started = Instant::now();
    let pid = std::process::id();
    let hub = format!("p2pt-mdns-{pid}-hub");
    let nodes: Vec<String> = (1..=NODES)
        .map(|i| format!("p2pt-mdns-{pid}-n{i}"))
        .collect();
    let mut lan = Lan::default();
    if let Err(e) = lan.add_namespace(&hub) {
        if lan.namespaces.is_empty() {
            eprintln!("skipping: cannot create a network namespace: {e}");
            return;
        }
        panic!("setting up namespace {hub}: {e}");
    }
    wire(&mut lan, &hub, &nodes).expect("the namespaces are wired up");

    let swarm = format!("mdns-test-{pid}");
    let n = NODES.to_string();
    let mut readers = Vec::new();
    for ns in &nodes {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, binary(), "node"])
            .args(["--swarm", &swarm])
            .args(["--listen", "/ip4/0.0.0.0/udp/0/quic-v1"])
            .args(["--min-peers", &n, "--wait-peers-secs", "60"])
            .args(["--steps", "20", "--average-every", "10", "--events"])
            .env("RUST_LOG", "warn,libp2p_mdns=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec starts");
        let out = read_all(child.stdout.take().unwrap());
        let err = read_all(child.stderr.take().unwrap());
        lan.children.push(child);
        readers.push((out, err));
    }

    // Wait for every node to exit; kill them all at the deadline or once one fails.
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; NODES];
    while statuses.iter().any(Option::is_none)
        && statuses.iter().flatten().all(ExitStatus::success)
        && started.elapsed() < DEADLINE
    {
        for (child, status) in lan.children.iter_mut().zip(&mut statuses) {
            if status.is_none() {
                *status = child.try_wait().expect("wait on a node");
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    lan.kill_all();
    let outputs: Vec<Output> = readers
        .into_iter()
        .zip(statuses)
        .map(|((out, err), status)| {
            let stdout = out.join().expect("stdout reader");
            let stderr = err.join().expect("stderr reader");
            let events = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
                .collect();
            Output {
                status,
                events,
                stdout,
                stderr,
            }
        })
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    let dump = || {
        let mut s = String::new();
        for (ns, o) in nodes.iter().zip(&outputs) {
            s += &format!("--- {ns}: {:?}\n{}\n{}\n", o.status, o.stdout, o.stderr);
        }
        s
    };

    for (ns, o) in nodes.iter().zip(&outputs) {
        if let Some(s) = o.status {
            assert!(s.success(), "node in {ns} failed: {s}\n{}", dump());
        }
    }
    for (i, (ns, o)) in nodes.iter().zip(&outputs).enumerate() {
        assert!(
            o.status.is_some(),
            "node in {ns} was still running (killed after {elapsed:.1} s)\n{}",
            dump()
        );
        let lan_addr = format!("/ip4/10.99.0.{}/", i + 1);
        let listening = o.events("listening");
        assert!(
            listening.len() == 1
                && listening[0]["addrs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a.as_str().is_some_and(|a| a.starts_with(&lan_addr))),
            "node in {ns} does not listen on {lan_addr}\n{}",
            dump()
        );
        let start = o.events("started");
        assert!(
            start.len() == 1 && start[0]["peers"] == NODES,
            "node in {ns} did not start with {NODES} peers\n{}",
            dump()
        );
        assert_eq!(o.events("finished").len(), 1, "{ns}\n{}", dump());
    }
    let round_sizes: Vec<Vec<u64>> = outputs
        .iter()
        .map(|o| {
            o.events("round")
                .iter()
                .map(|r| r["peers"].as_u64().unwrap())
                .collect()
        })
        .collect();
    assert!(
        round_sizes.iter().flatten().any(|&p| p == NODES as u64),
        "no round averaged over all {NODES} nodes: {round_sizes:?}\n{}",
        dump()
    );
    let digests: Vec<&str> = outputs
        .iter()
        .map(|o| o.events("finished")[0]["model_digest"].as_str().unwrap())
        .collect();
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "nodes ended with different models: {digests:?}\n{}",
        dump()
    );
    eprintln!(
        "{NODES} nodes in separate namespaces found each other by mDNS and trained \
         together (round group sizes per node: {round_sizes:?}) in {elapsed:.1} s"
    );
}
