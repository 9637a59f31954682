//! A node raises its QUIC socket's UDP receive buffer itself
//! (node/src/net/udp_buffers.rs), seen from outside with `ss`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bootstrap_address, spawn_node, Nodes};

/// What a node asks for (`udp_buffers::WANTED_BYTES`).
const WANTED: u64 = 4 * 1024 * 1024;

/// The `rb` (receive buffer) figure `ss -m` reports for the UDP socket on `port`.
fn receive_buffer(port: u16) -> Option<u64> {
    let out = Command::new("ss")
        .args(["-u", "-a", "-n", "-m", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("rb")? + 2;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Whether this process (and so the node it starts) holds CAP_NET_ADMIN,
/// which lets a socket's buffer go past net.core.rmem_max. Root in a
/// container often does not.
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|caps| u64::from_str_radix(caps.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
    })
}

#[test]
fn a_node_raises_its_quic_sockets_receive_buffer() {
    let Some(rmem_max) = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        eprintln!("skipped: not Linux (no net.core.rmem_max)");
        return;
    };
    if Command::new("ss").arg("-V").output().is_err() {
        eprintln!("skipped: `ss` (iproute2) is not installed");
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let _nodes = Nodes(vec![spawn_node(
        0,
        &["--swarm", "udp-buffers", "--steps", "1000000"],
        tx,
    )]);
    let deadline = Instant::now() + Duration::from_secs(60);
    // The node raises the buffer before it reports the address.
    let addr = bootstrap_address(&rx, deadline);
    let port: u16 = addr
        .split('/')
        .skip_while(|p| *p != "udp")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no UDP port in {addr}"));
    let rb = receive_buffer(port).unwrap_or_else(|| panic!("ss shows no socket on port {port}"));
    // Linux reports twice what was set. Unprivileged, rmem_max caps it; with
    // CAP_NET_ADMIN the node forces it past the cap.
    let privileged = has_net_admin();
    let want = 2 * if privileged {
        WANTED
    } else {
        WANTED.min(rmem_max)
    };
    assert!(
        rb >= want,
        "receive buffer of the node's socket is {rb} bytes, want at least {want} \
         (rmem_max {rmem_max}, CAP_NET_ADMIN {privileged})"
    );
}
