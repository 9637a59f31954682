//! `--metrics ADDR`: real node processes serve Prometheus text, JSON and a
//! status page that headless Chromium renders with live charts.

mod common;
use common::{bootstrap_address, next_event, one_swarm, spawn_node, Nodes};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// `n` distinct ports free right now on loopback (the OS picks them; all
/// are held until all are picked, so no two are the same).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A running 3-node swarm whose node i serves metrics on `ports[i]`.
struct Swarm {
    _nodes: Nodes,
    rx: Receiver<(usize, Value)>,
    ports: Vec<u16>,
    peer_ids: Vec<String>,
    deadline: Instant,
}

fn start_swarm(name: &str, steps: &str) -> Swarm {
    let swarm = format!("{name}-{}", std::process::id());
    let ports = free_ports(3);
    let (tx, rx) = mpsc::channel();
    let deadline = Instant::now() + Duration::from_secs(240);
    let spawn = |i: usize, boot: Option<&str>| {
        let metrics = format!("127.0.0.1:{}", ports[i]);
        let mut args = vec!["--swarm", &swarm, "--min-peers", "3", "--steps", steps];
        args.extend(["--average-every", "5", "--linger-secs", "1"]);
        args.extend(["--metrics", &metrics]);
        if let Some(b) = boot {
            args.extend(["--bootstrap", b]);
        }
        spawn_node(i, &args, tx.clone())
    };
    let mut nodes = Nodes(vec![spawn(0, None)]);
    let boot = bootstrap_address(&rx, deadline);
    nodes.0.push(spawn(1, Some(&boot)));
    nodes.0.push(spawn(2, Some(&boot)));
    let mut peer_ids = vec![String::new(); 3];
    peer_ids[0] = boot.rsplit('/').next().unwrap().to_string();
    while peer_ids.iter().any(String::is_empty) {
        let (i, v) = next_event(&rx, deadline);
        if v["event"] == "listening" {
            peer_ids[i] = v["peer_id"].as_str().unwrap().to_string();
        }
    }
    Swarm {
        _nodes: nodes,
        rx,
        ports,
        peer_ids,
        deadline,
    }
}

impl Swarm {
    /// Waits until node 0 reports round `round` or later.
    fn wait_round(&self, round: u64) -> u64 {
        loop {
            let (i, v) = next_event(&self.rx, self.deadline);
            if i == 0 && v["event"] == "round" && v["round"].as_u64().unwrap() >= round {
                return v["round"].as_u64().unwrap();
            }
            assert_ne!(v["event"], "finished", "the run ended before round {round}");
        }
    }
}

/// GET `path` from 127.0.0.1:`port`; returns (status line, body).
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics port answers");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Parses Prometheus text format strictly enough to catch breakage: every
/// sample's family is declared with a known TYPE first, names are valid,
/// values are numbers. Returns sample name (labels dropped) -> value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, what) = (parts.next().unwrap(), parts.next().unwrap(), parts.next());
            assert!(valid_name(name), "bad name in {line:?}");
            match kind {
                "HELP" => assert!(what.is_some_and(|h| !h.is_empty()), "{line:?}"),
                "TYPE" => {
                    let t = what.unwrap();
                    assert!(
                        ["counter", "gauge", "summary", "histogram", "untyped"].contains(&t),
                        "{line:?}"
                    );
                    types.insert(name.to_string(), t.to_string());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let name = series.split('{').next().unwrap();
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line:?}"
            );
        }
        assert!(valid_name(name), "bad name in {line:?}");
        let family = ["_sum", "_count", "_bucket"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no TYPE line");
        let v: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.insert(name.to_string(), v);
    }
    samples
}

#[test]
fn prometheus_text_and_json_describe_the_live_swarm() {
    let _one = one_swarm();
    let swarm = start_swarm("metrics", "300");
    swarm.wait_round(4);
    for (i, port) in swarm.ports.iter().enumerate() {
        let (status, body) = get(*port, "/metrics");
        assert!(status.contains("200"), "{status}");
        let m = parse_prometheus(&body);
        let rounds = m["p2ptrain_rounds_total"];
        assert!(rounds >= 2.0, "node {i}: rounds {rounds}");
        let loss = m["p2ptrain_loss"];
        assert!(
            loss.is_finite() && loss > 0.0 && loss < 5.0,
            "node {i}: loss {loss}"
        );
        assert_eq!(m["p2ptrain_peers"], 3.0, "node {i}");
        // 5 steps of 64 samples a round (an epoch's last batch may be short).
        assert!(
            m["p2ptrain_samples_total"] >= rounds * 5.0 * 32.0,
            "node {i}"
        );
        assert!(m["p2ptrain_samples_per_second"] > 0.0);
        assert!(m["p2ptrain_bytes_sent_total"] > 1e5, "node {i}");
        assert!(m["p2ptrain_bytes_received_total"] > 1e5, "node {i}");
        assert!(m["p2ptrain_round_duration_seconds_count"] >= 1.0);
        assert!(m["p2ptrain_round_duration_seconds_sum"] > 0.0);
        assert_eq!(m["p2ptrain_dropped_members_total"], 0.0);
        assert!(body.contains(&format!("peer_id=\"{}\"", swarm.peer_ids[i])));

        let (status, json) = get(*port, "/status.json");
        assert!(status.contains("200"), "{status}");
        let s: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(s["peer_id"], swarm.peer_ids[i].as_str());
        let table = s["peer_table"].as_array().unwrap();
        assert_eq!(table.len(), 3, "{s}");
        assert_eq!(table[0]["self"], true);
        let mut shards = 0;
        for (j, id) in swarm.peer_ids.iter().enumerate() {
            let row = table
                .iter()
                .find(|r| r["peer_id"] == id.as_str())
                .unwrap_or_else(|| panic!("node {i}'s table lacks node {j}: {s}"));
            shards += row["shard"].as_u64().expect("a shard size");
            if j != i {
                assert_eq!(row["kind"], "direct", "{row}");
                assert!(row["address"].as_str().unwrap().contains("/quic-v1"));
            }
        }
        // The bundled MNIST subset's 10,000 training images, split three ways.
        assert_eq!(shards, 10_000, "{s}");
        assert!(!s["history"].as_array().unwrap().is_empty());
    }
    let (status, _) = get(swarm.ports[0], "/nope");
    assert!(status.contains("404"), "{status}");
}

/// Debian's Chromium, if installed.
fn chromium() -> Option<String> {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(String::from)
}

/// Loads `url` in headless Chromium, lets the page run `budget_ms` of
/// virtual time (its timers and fetches), and returns the resulting DOM.
fn dump_dom(chromium: &str, url: &str, budget_ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(["--dump-dom", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium starts");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// The value of `attr="N"` on the element whose id is `id`.
fn attr_of(dom: &str, id: &str, attr: &str) -> u64 {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let tag_start = dom[..at].rfind('<').unwrap();
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>').unwrap()];
    let key = format!("{attr}=\"");
    let from = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} on #{id}"))
        + key.len();
    tag[from..from + tag[from..].find('"').unwrap()]
        .parse()
        .unwrap()
}

#[test]
fn status_page_shows_peers_and_a_chart_that_updates() {
    let Some(chromium) = chromium() else {
        eprintln!(
            "SKIPPED status page test: chromium is not installed (apt-get install -y chromium)"
        );
        return;
    };
    let _one = one_swarm();
    let swarm = start_swarm("status-page", "600");
    let first = swarm.wait_round(3);
    let url = format!("http://127.0.0.1:{}/", swarm.ports[0]);
    let dom = dump_dom(&chromium, &url, 3000);
    // The page polled /status.json more than once in its 3 s of virtual time.
    assert!(attr_of(&dom, "loss-chart", "data-points") >= 2, "{dom}");
    let polls = dom
        .split("data-polls=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("the body counts its polls");
    assert!(polls >= 2, "only {polls} poll(s)");
    let before = attr_of(&dom, "loss-chart", "data-points");
    let rate_before = attr_of(&dom, "rate-chart", "data-points");
    assert_eq!(dom.matches("<tr class=\"peer\"").count(), 2, "{dom}");
    assert_eq!(dom.matches("<tr class=\"self\"").count(), 1);
    for id in &swarm.peer_ids {
        assert!(
            dom.contains(id.as_str()),
            "peer {id} missing from the table"
        );
    }
    assert!(dom.contains(">direct<"), "no address kind shown");
    // Axes are open lines: a filled axis path once hid the charts behind a black triangle.
    assert!(dom.contains("class=\"axis\" fill=\"none\""), "{dom}");
    swarm.wait_round(first + 3);
    let later = dump_dom(&chromium, &url, 1500);
    let after = attr_of(&later, "loss-chart", "data-points");
    assert!(
        after > before,
        "the loss chart did not grow: {before} -> {after} points"
    );
    assert!(attr_of(&later, "rate-chart", "data-points") > rate_before);
}

#[test]
fn a_taken_metrics_port_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::run(&["node", "--no-mdns", "--metrics", &addr, "--steps", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot serve metrics on {addr}")),
        "{err}"
    );
    let out = common::run(&["node", "--metrics", "localhost"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an IP address and port"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The testnet checks its whole port range before starting any node.
    let out = common::run(&["testnet", "--nodes", "3", "--metrics", "127.0.0.1:65534"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node 2 would need port 65536"), "{err}");
}
