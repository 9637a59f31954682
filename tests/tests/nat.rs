//! Peers behind home routers: two nodes, each behind its own NAT (network
//! namespaces with iptables masquerading and a router firewall that drops
//! unsolicited inbound traffic), join a swarm whose only reachable member
//! runs `--relay`. AutoNAT must find them unreachable, they must reserve on
//! the relay, reach each other through it, and train and average together.
//! Where hole punching can work, DCUtR must turn the relayed path into a
//! direct one; where it cannot (the routers drop each other's traffic),
//! tensors must flow through the relay. All traffic stays inside the
//! namespaces. Needs root, `ip netns` and iptables; skips with a message
//! where they are missing.

mod common;

use common::{binary, next_event, one_swarm, spawn_events, Nodes};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The relay's address on the "internet" bridge.
const RELAY_IP: &str = "10.77.0.1";
const PORT: &str = "4001";

/// Runs `cmd args`, panicking with its output if it fails.
fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why namespaces with NAT cannot be built here, if they cannot. `tag` keeps
/// the probe namespaces of tests running at once apart (with one name, one
/// test found the other's probe and skipped itself).
fn unavailable(tag: &str) -> Option<String> {
    let probe = format!("p2pt-probe-{tag}-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
        }
        Ok(o) => {
            return Some(format!(
                "`ip netns add` failed (root needed): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("no `ip` command (iproute2): {e}")),
    }
    match Command::new("iptables").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no working `iptables` (Debian package iptables)".into()),
    }
}

/// The namespaces of one scenario, deleted (with their links) on drop.
struct Topology {
    names: Vec<String>,
}

impl Topology {
    fn ns(&self, role: &str) -> &str {
        self.names
            .iter()
            .find(|n| n.starts_with(&format!("p2pt{role}")))
            .expect("a namespace of that role")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// The "internet" (a bridge in namespace `pub` holding the relay at
/// 10.77.0.1) and two homes, each behind a router that masquerades and
/// firewalls like a home router: `home1` behind `nat1` (10.77.0.2) and
/// `home2` behind `nat2` (10.77.0.3). Like two routers with the same factory
/// settings, both homes are 192.168.1.2 on 192.168.1.0/24, and every node
/// keeps the same port: the address one home announces is, seen from the
/// other, its own socket (a dial there reaches itself). With
/// `punchable` false the routers also drop traffic between the two homes'
/// public addresses, so no direct path can exist between them.
fn build(tag: &str, punchable: bool) -> Topology {
    let name = |role: &str| format!("p2pt{role}{tag}");
    let topo = Topology {
        names: ["pub", "nat1", "nat2", "home1", "home2"]
            .iter()
            .map(|r| name(r))
            .collect(),
    };
    let exec = |ns: &str, args: &[&str]| {
        let mut all = vec!["netns", "exec", ns];
        all.extend(args);
        sh("ip", &all);
    };
    for n in &topo.names {
        sh("ip", &["netns", "add", n]);
        exec(n, &["ip", "link", "set", "lo", "up"]);
    }
    let public = name("pub");
    exec(&public, &["ip", "link", "add", "br0", "type", "bridge"]);
    exec(
        &public,
        &["ip", "addr", "add", "10.77.0.1/24", "dev", "br0"],
    );
    exec(&public, &["ip", "link", "set", "br0", "up"]);
    for i in 1..=2 {
        let (nat, home) = (name(&format!("nat{i}")), name(&format!("home{i}")));
        // Link names are global until moved, so they carry the tag too.
        let (up, wan, lan, inner) = (
            format!("pu{i}{tag}"),
            format!("wa{i}{tag}"),
            format!("la{i}{tag}"),
            format!("ho{i}{tag}"),
        );
        let public_ip = format!("10.77.0.{}", i + 1);
        let other_public = format!("10.77.0.{}", 4 - i);
        sh(
            "ip",
            &["link", "add", &up, "type", "veth", "peer", "name", &wan],
        );
        sh("ip", &["link", "set", &up, "netns", &public]);
        sh("ip", &["link", "set", &wan, "netns", &nat]);
        exec(&public, &["ip", "link", "set", &up, "master", "br0"]);
        exec(&public, &["ip", "link", "set", &up, "up"]);
        exec(
            &nat,
            &["ip", "addr", "add", &format!("{public_ip}/24"), "dev", &wan],
        );
        exec(&nat, &["ip", "link", "set", &wan, "up"]);
        sh(
            "ip",
            &["link", "add", &lan, "type", "veth", "peer", "name", &inner],
        );
        sh("ip", &["link", "set", &lan, "netns", &nat]);
        sh("ip", &["link", "set", &inner, "netns", &home]);
        exec(&nat, &["ip", "addr", "add", "192.168.1.1/24", "dev", &lan]);
        exec(&nat, &["ip", "link", "set", &lan, "up"]);
        exec(
            &home,
            &["ip", "addr", "add", "192.168.1.2/24", "dev", &inner],
        );
        exec(&home, &["ip", "link", "set", &inner, "up"]);
        exec(
            &home,
            &["ip", "route", "add", "default", "via", "192.168.1.1"],
        );
        exec(&nat, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let ipt = |rule: &[&str]| {
            let mut all = vec!["iptables"];
            all.extend(rule);
            exec(&nat, &all);
        };
        ipt(&[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &wan,
            "-j",
            "MASQUERADE",
        ]);
        // A home router's firewall: only answers to what went out come in.
        for chain in ["FORWARD", "INPUT"] {
            ipt(&[
                "-A",
                chain,
                "-i",
                &wan,
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ]);
            ipt(&["-A", chain, "-i", &wan, "-j", "DROP"]);
        }
        if !punchable {
            ipt(&[
                "-I",
                "FORWARD",
                "-o",
                &wan,
                "-d",
                &other_public,
                "-j",
                "DROP",
            ]);
        }
    }
    topo
}

/// Starts a node in namespace `ns`, listening on every address of it.
fn spawn_in(
    ns: &str,
    index: usize,
    swarm: &str,
    extra: &[&str],
    tx: common::Events,
) -> std::process::Child {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        binary(),
        "node",
        "--no-mdns",
        "--events",
    ])
    .args(["--listen", &format!("/ip4/0.0.0.0/udp/{PORT}/quic-v1")])
    .args(["--swarm", swarm, "--min-peers", "3", "--steps", "60"])
    .args(["--average-every", "10", "--linger-secs", "5"])
    .args(["--wait-peers-secs", "90"])
    .args(extra);
    spawn_events(index, c, tx)
}

/// Runs the relay and the two homes to the end; returns their final reports
/// (relay first) and the relay's and homes' peer ids.
fn train_across_nats(tag: &str, punchable: bool) -> Option<(Vec<serde_json::Value>, Vec<String>)> {
    // One scenario at a time: two 3-node swarms at once on a 2-core machine
    // slow each other down past the timeouts being tested.
    let _turn = one_swarm();
    if let Some(why) = unavailable(tag) {
        eprintln!("skipped: cannot build NAT namespaces here: {why}");
        return None;
    }
    let topo = build(tag, punchable);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("relay.key");
    let out = Command::new(binary())
        .args(["id", "--key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let relay_id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let swarm = format!("nat-{tag}");
    let boot = format!("/ip4/{RELAY_IP}/udp/{PORT}/quic-v1/p2p/{relay_id}");
    let (tx, rx) = mpsc::channel();
    let key_arg = key.to_str().unwrap();
    let mut nodes = Nodes(vec![spawn_in(
        topo.ns("pub"),
        0,
        &swarm,
        &["--relay", "--key", key_arg],
        tx.clone(),
    )]);
    for i in 1..=2 {
        nodes.0.push(spawn_in(
            topo.ns(&format!("home{i}")),
            i,
            &swarm,
            &["--bootstrap", &boot],
            tx.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut finished: [Option<serde_json::Value>; 3] = [None, None, None];
    while finished.iter().any(Option::is_none) {
        let (i, v) = next_event(&rx, deadline);
        if v["event"] == "finished" {
            finished[i] = Some(v);
        }
    }
    for (i, c) in nodes.0.iter_mut().enumerate() {
        assert!(c.wait().unwrap().success(), "node {i} failed");
    }
    let reports: Vec<serde_json::Value> = finished.into_iter().map(Option::unwrap).collect();
    let ids = reports
        .iter()
        .map(|r| r["peer_id"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(ids[0], relay_id);
    Some((reports, ids))
}

/// What every scenario must show: the relay is public, the homes private,
/// each home reaches the relay directly, and all three trained the same
/// model together.
fn check_swarm(reports: &[serde_json::Value], ids: &[String]) {
    assert_eq!(reports[0]["reachability"], "public", "{}", reports[0]);
    for r in &reports[1..] {
        assert_eq!(r["reachability"], "private", "{r}");
        assert_eq!(
            r["paths"][&ids[0]], "direct",
            "a home dials the relay out: {r}"
        );
        assert!(r["steps"].as_u64().unwrap() > 0, "{r}");
        assert!(r["complete_rounds"].as_u64().unwrap() >= 1, "{r}");
    }
    let digest = &reports[0]["model_digest"];
    for r in reports {
        assert_eq!(&r["model_digest"], digest, "models differ: {reports:?}");
        assert!(r["test_accuracy"].as_f64().unwrap() > 0.5, "{r}");
    }
}

/// Asserts how the homes reached each other, as each reports it (a home
/// that finished first may have left before the other reported, so one
/// report may lack the other; at least one must have it).
fn assert_home_to_home_path(reports: &[serde_json::Value], ids: &[String], want: &str) {
    let seen: Vec<&str> = [(1, 2), (2, 1)]
        .iter()
        .filter_map(|&(a, b)| reports[a]["paths"][&ids[b]].as_str())
        .collect();
    assert!(!seen.is_empty(), "the homes never connected: {reports:?}");
    assert!(
        seen.iter().all(|p| *p == want),
        "wanted {want} paths between the homes, got {seen:?}: {reports:?}"
    );
}

#[test]
fn nodes_behind_nats_train_through_a_relay_and_punch_a_direct_path() {
    let tag = format!("{}p", std::process::id() % 100_000);
    let Some((reports, ids)) = train_across_nats(&tag, true) else {
        return;
    };
    check_swarm(&reports, &ids);
    // DCUtR replaced the relayed connection.
    assert_home_to_home_path(&reports, &ids, "direct");
}

#[test]
fn tensors_flow_through_the_relay_when_no_direct_path_exists() {
    let tag = format!("{}r", std::process::id() % 100_000);
    let Some((reports, ids)) = train_across_nats(&tag, false) else {
        return;
    };
    check_swarm(&reports, &ids);
    assert_home_to_home_path(&reports, &ids, "relay");
    // The homes exchanged their parts of every all-reduce through the relay.
    for r in &reports[1..] {
        assert!(r["bytes_sent"].as_u64().unwrap() > 100_000, "{r}");
    }
}
