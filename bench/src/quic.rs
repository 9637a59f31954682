//! The transport's bound: the butterfly all-reduce's traffic over raw quinn.
//!
//! N `quinn-node` processes on loopback each hold one quinn endpoint with the
//! TLS 1.3 configuration our node's QUIC transport uses (`libp2p-tls`
//! certificates, the node's cipher order and flow-control windows, in
//! `node/src/net/quic`) and a connection to every other process. A round
//! is two phases, as in the all-reduce (reduce-scatter, then all-gather): in
//! each, every process sends `bytes / N` to each of the N-1 others on a fresh
//! unidirectional stream and receives as much from each, and a phase ends
//! when one chunk from every other process is in. Rounds start in all
//! processes together (the coordinator's barrier), as our all-reduce starts
//! once the last member has joined. No reduction, no
//! encoding, no hashing: only the transport, so our all-reduce can be set
//! against it.
//!
//! Packets are as large as our node's transport sends between loopback
//! peers (`p2ptrain_node::net::quic`): endpoints accept 65527-byte UDP
//! payloads and path-MTU discovery climbs to loopback's 64 KiB MTU, without
//! segmentation offload. `--max-udp-payload 1472` measures quinn's defaults
//! instead, which libp2p's own QUIC transport keeps on every path (at most
//! 1452-byte packets): what an internet path allows, and context only.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::util::{emit, median};

/// Flags of `p2ptrain-bench quinn`.
#[derive(Debug, Clone, clap::Args)]
pub struct QuinnArgs {
    /// Processes.
    #[arg(long, default_value_t = 2)]
    pub peers: usize,
    /// Length of the f32 vector whose all-reduce traffic is sent.
    #[arg(long, default_value_t = 1_000_000)]
    pub values: usize,
    /// Rounds; the first is a warm-up and not counted.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Largest UDP payload the endpoints accept and path-MTU discovery may
    /// reach. The default is what our node's transport uses on loopback,
    /// the bound it is held to; 1472 keeps quinn's defaults, as libp2p's
    /// own QUIC transport does; other sizes are context too.
    #[arg(long, default_value_t = NODE_LOOPBACK_PAYLOAD,
          value_parser = clap::value_parser!(u16).range(1200..=65527))]
    pub max_udp_payload: u16,
}

/// The largest payload our node's transport lets a loopback path reach
/// (`p2ptrain_node::net::quic::LOOPBACK_PAYLOAD`, checked in a test).
pub const NODE_LOOPBACK_PAYLOAD: u16 = 65_527;

/// quinn's own limit on UDP payloads, which libp2p's QUIC transport keeps.
const QUINN_DEFAULT_PAYLOAD: u16 = 1472;

/// quinn 0.11 batches up to 10 packets into one segmentation-offload send,
/// and the kernel refuses a batch over 64 KiB: above this payload size the
/// connection would stall, so offload is turned off.
const LARGEST_OFFLOADED_PAYLOAD: u16 = 6500;

/// Flags of `p2ptrain-bench quinn-node` (one process of `quinn`).
#[derive(Debug, clap::Args)]
pub struct QuinnNodeArgs {
    /// This process's index, 0..peers.
    #[arg(long)]
    pub index: usize,
    /// Processes in all.
    #[arg(long)]
    pub peers: usize,
    /// Bytes sent to each other process per phase.
    #[arg(long)]
    pub chunk: usize,
    /// Rounds.
    #[arg(long)]
    pub rounds: u32,
    /// As for `quinn`.
    #[arg(long)]
    pub max_udp_payload: u16,
}

/// The node's TLS configurations (libp2p's certificates, AES-GCM first on
/// a CPU with AES instructions: `node/src/net/quic/tls.rs`), so the bound
/// seals and opens packets with the cipher the node's connections pick.
#[cfg(feature = "swarm")]
fn tls(
    keypair: &libp2p::identity::Keypair,
) -> anyhow::Result<(quinn::rustls::ServerConfig, quinn::rustls::ClientConfig)> {
    use p2ptrain_node::net::quic::tls;
    Ok((tls::server_config(keypair)?, tls::client_config(keypair)?))
}

/// Without the node: libp2p-tls's own configurations (ChaCha20-Poly1305).
#[cfg(not(feature = "swarm"))]
fn tls(
    keypair: &libp2p::identity::Keypair,
) -> anyhow::Result<(quinn::rustls::ServerConfig, quinn::rustls::ClientConfig)> {
    Ok((
        libp2p_tls::make_server_config(keypair)?,
        libp2p_tls::make_client_config(keypair, None)?,
    ))
}

/// An endpoint that both accepts and dials with libp2p's TLS setup.
fn endpoint(max_udp_payload: u16) -> anyhow::Result<quinn::Endpoint> {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let (server_tls, client_tls) = tls(&keypair)?;
    let mut transport = quinn::TransportConfig::default();
    // The node's windows (node/src/net/quic/config.rs).
    transport.stream_receive_window(10_000_000u32.into());
    transport.receive_window(15_000_000u32.into());
    transport.max_concurrent_uni_streams(256u32.into());
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.allow_spin(false);
    let mut endpoint_config = quinn::EndpointConfig::default();
    if max_udp_payload != QUINN_DEFAULT_PAYLOAD {
        let payload = max_udp_payload;
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(payload);
        transport.mtu_discovery_config(Some(mtu));
        transport.enable_segmentation_offload(payload <= LARGEST_OFFLOADED_PAYLOAD);
        endpoint_config.max_udp_payload_size(payload)?;
    }
    let transport = Arc::new(transport);
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    client.transport_config(transport);
    let socket = std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    socket.set_nonblocking(true)?;
    // The receive buffer a node gives its QUIC socket, so the bound is set
    // against the same socket settings (without the node, the benchmark has
    // nothing to set against it).
    #[cfg(feature = "swarm")]
    {
        use p2ptrain_node::net::udp_buffers;
        if let Err(e) = udp_buffers::raise_receive_buffer(&socket, udp_buffers::WANTED_BYTES) {
            eprintln!("quinn-node: receive buffer left at the default: {e}");
        }
    }
    let mut ep = quinn::Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Reads one line from stdin on a blocking thread (tokio's stdin needs a
/// tokio feature the rest of the workspace does not enable).
async fn read_stdin_line() -> anyhow::Result<String> {
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        anyhow::Ok(line.trim().to_string())
    })
    .await?
}

/// One process: prints its port, reads everyone's ports from stdin, connects,
/// runs each round when `go ROUND` comes on stdin, prints `{"round": r, "s":
/// seconds}` per round, then waits for a line on stdin before closing (so no
/// peer loses data in flight).
pub async fn run_node(args: QuinnNodeArgs) -> anyhow::Result<()> {
    let ep = endpoint(args.max_udp_payload)?;
    let port = ep.local_addr()?.port();
    emit(&json!({ "port": port }));
    let ports: Vec<u16> = read_stdin_line()
        .await?
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()?;
    if ports.len() != args.peers {
        bail!("got {} ports for {} peers", ports.len(), args.peers);
    }
    // Dial the higher indices, accept the lower ones (known by their port:
    // one UDP socket serves both directions of an endpoint).
    let mut conns: BTreeMap<usize, quinn::Connection> = BTreeMap::new();
    for (j, &p) in ports.iter().enumerate().skip(args.index + 1) {
        let c = ep
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, p)), "l")?
            .await?;
        conns.insert(j, c);
    }
    while conns.len() < args.peers - 1 {
        let c = ep.accept().await.context("endpoint closed")?.await?;
        let from = c.remote_address().port();
        let j = ports
            .iter()
            .position(|&p| p == from)
            .context("connection from an unknown port")?;
        conns.insert(j, c);
    }
    // One receiver per peer: streams of one connection are accepted in the
    // order they were opened, so a peer's first stream of a round is its
    // phase-1 chunk and its second its phase-2 chunk. A phase takes one
    // stream from each peer: as in the all-reduce, phase 2 cannot begin on
    // another peer's phase-2 (or next round's) chunk in place of a slow
    // peer's phase-1 chunk.
    let mut receivers = Vec::new();
    for c in conns.values() {
        let (tx, rx) = mpsc::channel::<anyhow::Result<usize>>(16);
        receivers.push(rx);
        let (c, chunk) = (c.clone(), args.chunk);
        tokio::spawn(async move {
            loop {
                let got = async {
                    let mut s = c.accept_uni().await?;
                    let data = s.read_to_end(chunk + 16).await?;
                    anyhow::Ok(data.len())
                }
                .await;
                let stop = got.is_err();
                if tx.send(got).await.is_err() || stop {
                    return;
                }
            }
        });
    }
    let payload = vec![0xA5u8; args.chunk];
    for round in 0..args.rounds {
        // Every process starts a round together, when the coordinator has
        // seen all finish the one before: otherwise early processes' chunks
        // would already be in when the last one starts its clock, and the
        // fastest process's time (which `run` takes) would leave out a
        // transfer our all-reduce has to wait for.
        let go = read_stdin_line().await?;
        if go != format!("go {round}") {
            bail!("expected `go {round}` from the coordinator, got `{go}`");
        }
        let started = Instant::now();
        for _phase in 0..2 {
            let sends = conns.values().map(|c| {
                let c = c.clone();
                let payload = &payload;
                async move {
                    let mut s = c.open_uni().await?;
                    s.write_all(payload).await?;
                    s.finish()?;
                    anyhow::Ok(())
                }
            });
            let send_all = futures::future::try_join_all(sends);
            let recv_all = async {
                for rx in receivers.iter_mut() {
                    let n = rx.recv().await.context("receivers stopped")??;
                    if n != args.chunk {
                        bail!("received {n} bytes, expected {}", args.chunk);
                    }
                }
                anyhow::Ok(())
            };
            tokio::try_join!(send_all, recv_all)?;
        }
        emit(&json!({ "round": round, "s": started.elapsed().as_secs_f64() }));
    }
    // The packet size the connections reached, so a run shows whether path-MTU
    // discovery took `--max-udp-payload` up.
    let path_mtu = conns.values().map(|c| c.stats().path.current_mtu).min();
    emit(&json!({ "done": true, "path_mtu": path_mtu }));
    let _ = read_stdin_line().await;
    ep.close(0u32.into(), b"done");
    Ok(())
}

/// Writes `text` to every child's stdin.
async fn tell_all(children: &mut [tokio::process::Child], text: &str) -> anyhow::Result<()> {
    for c in children {
        c.stdin
            .as_mut()
            .context("child stdin")?
            .write_all(text.as_bytes())
            .await?;
    }
    Ok(())
}

/// Starts N processes, hands them each other's ports, starts each round in
/// all of them at once, and prints one JSON line: per round the fastest
/// process's time (as for `allreduce`), median over the rounds after the
/// first.
pub async fn run(args: QuinnArgs) -> anyhow::Result<()> {
    if args.peers < 2 || args.rounds < 2 {
        bail!("--peers and --rounds must be at least 2");
    }
    let exe = std::env::current_exe()?;
    let chunk = (args.values * 4).div_ceil(args.peers);
    let (tx, mut rx) = mpsc::channel::<(usize, String)>(1024);
    let mut children = Vec::new();
    for i in 0..args.peers {
        let mut child = Command::new(&exe)
            .arg("quinn-node")
            .args(["--index", &i.to_string()])
            .args(["--peers", &args.peers.to_string()])
            .args(["--chunk", &chunk.to_string()])
            .args(["--rounds", &args.rounds.to_string()])
            .args(["--max-udp-payload", &args.max_udp_payload.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a quinn-node process")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send((i, l)).await.is_err() {
                    return;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut ports = vec![None; args.peers];
    let mut times: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let mut done = 0;
    let mut path_mtu: Option<u64> = None;
    while done < args.peers {
        let (i, line) = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(x)) => x,
            Ok(None) => bail!("quinn-node processes ended early (see their errors above)"),
            Err(_) => bail!("quinn pattern timed out after {} s", args.timeout_secs),
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(p) = v.get("port").and_then(|p| p.as_u64()) {
            ports[i] = Some(p);
            if ports.iter().all(Option::is_some) {
                let list: Vec<String> = ports.iter().flatten().map(u64::to_string).collect();
                tell_all(&mut children, &format!("{}\ngo 0\n", list.join(","))).await?;
            }
        } else if let (Some(r), Some(s)) = (v.get("round"), v.get("s")) {
            let (r, s) = (r.as_u64().unwrap_or(0), s.as_f64().unwrap_or(f64::NAN));
            let finished = times.entry(r).or_default();
            finished.push(s);
            // The round's barrier: the next starts when every process is done.
            if finished.len() == args.peers && r + 1 < u64::from(args.rounds) {
                tell_all(&mut children, &format!("go {}\n", r + 1)).await?;
            }
        } else if v.get("done").is_some() {
            done += 1;
            if let Some(m) = v.get("path_mtu").and_then(|m| m.as_u64()) {
                path_mtu = Some(path_mtu.map_or(m, |p| p.min(m)));
            }
        }
    }
    for c in &mut children {
        if let Some(stdin) = c.stdin.as_mut() {
            let _ = stdin.write_all(b"exit\n").await;
        }
    }
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    let per_round: Vec<f64> = times
        .iter()
        .filter(|(r, ts)| **r > 0 && ts.len() == args.peers)
        .map(|(_, ts)| ts.iter().copied().fold(f64::INFINITY, f64::min))
        .collect();
    let s = median(&per_round);
    let sent_per_peer = 2.0 * (args.peers as f64 - 1.0) * chunk as f64;
    emit(&json!({
        "bench": "allreduce",
        // Only our node's packet size is the bound it is held to.
        "impl": if args.max_udp_payload == NODE_LOOPBACK_PAYLOAD {
            "raw-quinn-pattern"
        } else {
            "raw-quinn-pattern-other-packets"
        },
        "max_udp_payload": args.max_udp_payload,
        "path_mtu": path_mtu,
        "peers": args.peers,
        "values": args.values,
        "compression": "f32",
        "rounds_timed": per_round.len(),
        "s_median": s,
        "bound_bytes_per_peer": sent_per_peer,
        "busbw_mb_s": sent_per_peer / s / 1e6,
    }));
    Ok(())
}

#[cfg(all(test, feature = "swarm"))]
mod tests {
    #[test]
    fn the_bound_uses_the_packets_our_node_sends_on_loopback() {
        assert_eq!(
            super::NODE_LOOPBACK_PAYLOAD,
            p2ptrain_node::net::quic::LOOPBACK_PAYLOAD
        );
    }
}
