//! Bad flags and bad data end in a one-line error naming the problem and a non-zero exit.

mod common;
use common::run;

fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        lines[0]
    );
}

#[test]
fn unknown_flag() {
    assert_one_line_error(&["node", "--frobnicate"], "--frobnicate");
}

#[test]
fn bad_numbers() {
    assert_one_line_error(
        &["node", "--min-peers", "2", "--wait-peers-secs", "0"],
        "--wait-peers-secs 0",
    );
    assert_one_line_error(&["node", "--batch-size", "0"], "--batch-size");
    assert_one_line_error(&["node", "--lr", "-1"], "learning rate");
    // Negative numbers are values the flag's parser refuses, not unknown flags.
    assert_one_line_error(&["node", "--outer-lr", "-1"], "outer learning rate");
    assert_one_line_error(&["node", "--steps", "-5"], "'-5' for '--steps");
    assert_one_line_error(&["node", "--join-window-secs", "0"], "more than 0");
    assert_one_line_error(&["testnet", "--nodes", "abc"], "--nodes");
    assert_one_line_error(&["node", "--model", "resnet"], "resnet");
    assert_one_line_error(&["node", "--device", "tpu"], "tpu");
}

#[test]
fn busy_listen_port_names_the_reason() {
    // Held for the test: the node's QUIC socket cannot bind it.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let addr = format!("/ip4/127.0.0.1/udp/{port}/quic-v1");
    // libp2p's error printed nothing of its own, so this read "cannot listen on ADDR: ".
    assert_one_line_error(
        &["node", "--no-mdns", "--listen", &addr],
        "in use (os error",
    );
}

#[test]
fn bad_swarm_names() {
    assert_one_line_error(&["node", "--swarm", ""], "empty");
    assert_one_line_error(&["node", "--swarm", "a/b"], "letters, digits");
}

#[test]
fn bad_multiaddrs() {
    assert_one_line_error(
        &["node", "--bootstrap", "not-an-addr"],
        "not a valid multiaddr",
    );
    assert_one_line_error(
        &["node", "--bootstrap", "/ip4/127.0.0.1/udp/4001/quic-v1"],
        "lacks the peer id",
    );
    assert_one_line_error(
        &["node", "--listen", "/ip4/127.0.0.1/tcp/4001"],
        "not a QUIC address",
    );
}

#[test]
fn missing_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    assert_one_line_error(
        &["node", "--data", missing.to_str().unwrap(), "--no-mdns"],
        "nope does not exist",
    );
}

#[test]
fn corrupt_data_file() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        std::fs::write(dir.path().join(name), b"\x00\x00\x08\x03garbage").unwrap();
    }
    assert_one_line_error(
        &[
            "testnet",
            "--nodes",
            "2",
            "--data",
            dir.path().to_str().unwrap(),
        ],
        "train-images-idx3-ubyte",
    );
}

#[test]
fn help_explains_every_flag() {
    for sub in ["node", "testnet"] {
        let out = run(&[sub, "--help"]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in [
            "--model",
            "--data",
            "--batch-size",
            "--lr",
            "--steps",
            "--epochs",
            "--device",
        ] {
            assert!(help.contains(flag), "{sub} --help lacks {flag}");
        }
    }
    let node_help = String::from_utf8_lossy(&run(&["node", "--help"]).stdout).to_string();
    for flag in ["--swarm", "--listen", "--bootstrap", "--no-mdns", "--key"] {
        assert!(node_help.contains(flag), "node --help lacks {flag}");
    }
}

#[test]
fn id_prints_a_stable_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let key = key.to_str().unwrap();
    let first = run(&["id", "--key", key]);
    assert!(first.status.success());
    let id = String::from_utf8_lossy(&first.stdout).trim().to_string();
    assert!(id.starts_with("12D3KooW"), "{id}");
    let again = run(&["id", "--key", key]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), id);
}

/// The binary sets the allocator up to keep large buffers (p2ptrain-heap)
/// before it does anything else, and says so at debug level.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn the_binary_keeps_large_buffers_in_the_heap() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let out = std::process::Command::new(common::binary())
        .args(["--log-format", "json", "id", "--key", key.to_str().unwrap()])
        .env("RUST_LOG", "p2ptrain_node=debug")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("keeps large buffers in the heap"))
        .unwrap_or_else(|| panic!("no heap settings line in:\n{stderr}"));
    assert!(line.contains("Set { mmap_threshold: "), "{line}");
}

/// Under `--log-format json` the error a command fails with is one more JSON
/// line, so a script reading the log stream does not meet plain text; with
/// text logs it stays `error: ...`.
#[test]
fn a_failed_command_reports_its_error_in_the_log_format() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-checkpoints");
    let out_file = dir.path().join("model.safetensors");
    let export = |format: &str| {
        run(&[
            "--log-format",
            format,
            "export",
            missing.to_str().unwrap(),
            "--out",
            out_file.to_str().unwrap(),
        ])
    };
    let json = export("json");
    assert!(!json.status.success());
    let stderr = String::from_utf8_lossy(&json.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let line: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: not JSON: {stderr}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    let message = line["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no-such-checkpoints"), "{line}");
    let text = export("text");
    let stderr = String::from_utf8_lossy(&text.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("no-such-checkpoints"),
        "{stderr}"
    );
}

#[test]
fn bad_pipeline_settings() {
    assert_one_line_error(&["node", "--stages", "2"], "--model char-lm");
    assert_one_line_error(
        &["testnet", "--model", "char-lm", "--stages", "7"],
        "--stages 7",
    );
    assert_one_line_error(
        &[
            "testnet", "--nodes", "2", "--model", "char-lm", "--stages", "3",
        ],
        "every stage needs",
    );
    assert_one_line_error(
        &[
            "testnet",
            "--model",
            "char-lm",
            "--batch-size",
            "2",
            "--micro-batches",
            "4",
        ],
        "--micro-batches",
    );
    assert_one_line_error(
        &[
            "node",
            "--model",
            "char-lm",
            "--batch-size",
            "10",
            "--micro-batches",
            "4",
        ],
        "not a multiple of --micro-batches 4",
    );
    // Micro-batches whose activations no message between stages can carry
    // (they used to be dropped, then blamed on the network minutes later).
    assert_one_line_error(
        &["node", "--model", "char-lm", "--batch-size", "16384"],
        "raise --micro-batches or lower --batch-size",
    );
    // Settings the chosen model would ignore.
    assert_one_line_error(
        &["node", "--model", "char-lm", "--eval-every", "5"],
        "--eval-every works in data-parallel",
    );
    assert_one_line_error(&["node", "--micro-batches", "8"], "--micro-batches applies");
    assert_one_line_error(
        &["testnet", "--model", "cnn", "--stage-timeout-secs", "5"],
        "--stage-timeout-secs applies",
    );
    assert_one_line_error(
        &["node", "--checkpoint-every", "3"],
        "--checkpoint-every 3 needs --checkpoint-dir",
    );
    // A refused combination leaves no new key file behind.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("new.key");
    assert_one_line_error(
        &[
            "node",
            "--key",
            key.to_str().unwrap(),
            "--micro-batches",
            "8",
        ],
        "--micro-batches applies",
    );
    assert!(!key.exists());
    assert_one_line_error(&["node", "--max-in-flight", "2"], "--model char-lm");
    assert_one_line_error(
        &["node", "--model", "char-lm", "--max-in-flight", "2"],
        "--stages 2 or more",
    );
    assert_one_line_error(
        &["testnet", "--model", "char-lm", "--max-in-flight", "0"],
        "--max-in-flight",
    );
    let dir = tempfile::tempdir().unwrap();
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    assert_one_line_error(
        &[
            "testnet",
            "--model",
            "char-lm",
            "--data",
            latin1.to_str().unwrap(),
        ],
        "UTF-8",
    );
    assert_one_line_error(
        &["sample", "--from", dir.path().to_str().unwrap()],
        "no char-lm stage checkpoint",
    );
    assert_one_line_error(
        &["sample", "--from", "/nonexistent/dir"],
        "/nonexistent/dir",
    );
}

/// A text too short for one window is refused before the node joins a
/// swarm (it used to listen, take a stage, and fail there).
#[test]
fn char_lm_text_too_short_is_refused_before_the_node_starts() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.txt");
    std::fs::write(&tiny, "too short").unwrap();
    let args = [
        "node",
        "--model",
        "char-lm",
        "--data",
        tiny.to_str().unwrap(),
        "--no-mdns",
        "--swarm",
        "too-short-text-test",
    ];
    assert_one_line_error(&args, "tiny.txt has 9 bytes");
    // A testnet says so once, not once per node.
    assert_one_line_error(
        &[
            "testnet",
            "--model",
            "char-lm",
            "--data",
            tiny.to_str().unwrap(),
        ],
        "tiny.txt has 9 bytes",
    );
    let out = run(&args);
    assert!(
        out.stdout.is_empty(),
        "the node started: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A pipeline cannot start with fewer peers than stages: the node waits for
/// them as for --min-peers, and says so when they do not come.
#[test]
fn a_pipeline_node_waits_for_a_peer_per_stage() {
    assert_one_line_error(
        &[
            "node",
            "--model",
            "char-lm",
            "--stages",
            "2",
            "--wait-peers-secs",
            "1",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--swarm",
            "pipeline-wait-test",
        ],
        "only 1 of the 2 peers needed",
    );
}

/// A listen address naming another peer is refused; one naming this node
/// (its --key) is fine.
#[test]
fn a_listen_address_naming_another_peer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let other = dir.path().join("other.key");
    let id_of = |key: &std::path::Path| {
        let out = run(&["id", "--key", key.to_str().unwrap()]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (mine, theirs) = (id_of(&key), id_of(&other));
    let listen = |id: &str| {
        run(&[
            "node",
            "--key",
            key.to_str().unwrap(),
            "--listen",
            &format!("/ip4/127.0.0.1/udp/0/quic-v1/p2p/{id}"),
            "--no-mdns",
            "--wait-peers-secs",
            "1",
            "--min-peers",
            "2",
            "--swarm",
            "listen-peer-id-test",
        ])
    };
    let refused = listen(&theirs);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains(&format!("names peer {theirs}")),
        "{stderr}"
    );
    // Its own id gets past listening, to the peer wait that follows.
    let own = listen(&mine);
    let stderr = String::from_utf8_lossy(&own.stderr);
    assert!(stderr.contains("only 1 of the 2 peers"), "{stderr}");
}

/// Stage checkpoints of different runs do not make one model: `sample`
/// used to put them together and print garbage.
#[test]
fn sample_refuses_stages_of_different_swarms() {
    use p2ptrain_node::checkpoint::{params_digest, save, CheckpointMeta};
    let dir = tempfile::tempdir().unwrap();
    for (stage, swarm) in [(0, "run-a"), (1, "run-b")] {
        let params = vec![0.5f32; 8];
        let meta = CheckpointMeta {
            swarm: swarm.into(),
            model: p2ptrain_node::driver::stage_model_name(stage, 2),
            round: 3,
            step: 15,
            samples: 100,
            params_digest: params_digest(&params),
            average_every: None,
        };
        save(&dir.path().join(format!("node-{stage}")), &meta, &params).unwrap();
    }
    // The run written last is the one sampled, and it lacks stage 0.
    assert_one_line_error(
        &["sample", "--from", dir.path().to_str().unwrap()],
        "no checkpoint of stage 0 of 2 of swarm `run-b`",
    );
}

/// A fresh run pointed at an earlier run's checkpoints used to train, fail
/// every checkpoint as behind them, then replace the one of the round it
/// ended on: now it is refused before it starts, and the files stay.
#[test]
fn a_fresh_run_does_not_write_over_an_earlier_runs_checkpoints() {
    use p2ptrain_node::checkpoint::{params_digest, save, CheckpointMeta};
    let dir = tempfile::tempdir().unwrap();
    let params = vec![0.25f32; 8];
    let meta = CheckpointMeta {
        swarm: "earlier".into(),
        model: "mlp".into(),
        round: 47,
        step: 470,
        samples: 60_000,
        params_digest: params_digest(&params),
        average_every: Some(10),
    };
    let path = save(dir.path(), &meta, &params).unwrap();
    let d = dir.path().to_str().unwrap();
    for flags in [
        &["--checkpoint-dir", d][..],
        &["--checkpoint-dir", d, "--model", "cnn"],
        &["--checkpoint-dir", d, "--model", "char-lm"],
    ] {
        let mut args = vec!["node", "--no-mdns", "--swarm", "earlier"];
        args.extend_from_slice(flags);
        assert_one_line_error(&args, "already holds checkpoints of swarm `earlier`");
    }
    assert!(path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn bad_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.secret");
    std::fs::write(&short, b"abc").unwrap();
    assert_one_line_error(
        &["node", "--secret-file", short.to_str().unwrap()],
        "at least 16",
    );
    assert_one_line_error(
        &["node", "--secret-file", "/nonexistent/swarm.secret"],
        "/nonexistent/swarm.secret",
    );
    // The OS's reason is printed once, not again as the error's cause.
    let out = run(&["node", "--secret-file", "/nonexistent/swarm.secret"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
}

#[test]
fn unusable_checkpoint_directory_fails_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ckpt");
    std::fs::write(&file, b"not a directory").unwrap();
    // Refused at start: it used to train until the first checkpoint was due.
    assert_one_line_error(
        &[
            "node",
            "--no-mdns",
            "--checkpoint-dir",
            file.to_str().unwrap(),
        ],
        "is a file, not a checkpoint directory",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
    // --resume given a file (export takes one; resume takes the directory).
    assert_one_line_error(
        &["node", "--no-mdns", "--resume", file.to_str().unwrap()],
        "is a file, not a checkpoint directory",
    );
}

#[test]
fn bad_aggregation_rules() {
    assert_one_line_error(&["node", "--aggregation", "median"], "median");
    assert_one_line_error(&["node", "--aggregation", "trimmed-mean:0.7"], "below 0.5");
    assert_one_line_error(
        &["node", "--aggregation", "centered-clip:x"],
        "not a number",
    );
    assert_one_line_error(&["node", "--misbehave", "evil"], "misbehaviour");
    assert_one_line_error(&["testnet", "--hostile", "1"], "--misbehave");
}

#[test]
fn bad_compression_settings() {
    assert_one_line_error(&["node", "--compression", "zstd"], "unknown codec");
    assert_one_line_error(&["node", "--compression", "int8:0"], "block");
    assert_one_line_error(&["node", "--compression", "topk"], "share of entries");
    assert_one_line_error(&["node", "--compression", "topk:2"], "(0, 1]");
    // Top-k drops entries: only DiLoCo's error feedback sends them later.
    assert_one_line_error(&["node", "--compression", "topk:0.01"], "--outer-lr");
    assert_one_line_error(
        &["testnet", "--compression", "topk:0.01", "--sync-every", "5"],
        "--outer-lr",
    );
}

#[test]
fn durations_beyond_any_real_wait_are_refused() {
    // Added to the clock, these overflowed it: a panic, or a node that never exits.
    let max = u64::MAX.to_string();
    assert_one_line_error(&["node", "--wait-peers-secs", &max], "--wait-peers-secs");
    assert_one_line_error(&["node", "--linger-secs", &max], "--linger-secs");
    assert_one_line_error(&["node", "--linger-secs", "86401"], "--linger-secs");
    assert_one_line_error(&["testnet", "--timeout-secs", &max], "--timeout-secs");
    assert_one_line_error(&["testnet", "--timeout-secs", "0"], "--timeout-secs");
}

#[test]
fn missing_arguments_and_typos_are_named() {
    // The names follow clap's first line; only the first line was printed.
    assert_one_line_error(&["id"], "--key");
    assert_one_line_error(&["node", "--min-peer", "3"], "--min-peers");
    // No subcommand: the help, as a failure.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Usage"),
        "{out:?}"
    );
    let out = run(&["config"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[cfg(unix)]
#[test]
fn endless_key_secret_and_config_files_are_refused() {
    // Read whole, /dev/zero filled memory before anything looked at it.
    assert_one_line_error(
        &["id", "--key", "/dev/zero"],
        "a device, not a p2ptrain key",
    );
    assert_one_line_error(&["node", "--config", "/dev/zero"], "a device, not a config");
    assert_one_line_error(
        &["node", "--no-mdns", "--secret-file", "/dev/zero"],
        "a device, not a swarm secret",
    );
    // A named pipe blocked the node forever on opening it.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("node.toml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        assert_one_line_error(
            &["node", "--config", fifo.to_str().unwrap()],
            "a named pipe, not a config file",
        );
    }
    // A file too large is refused by its size.
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    assert_one_line_error(&["node", "--config", big.to_str().unwrap()], "larger than");
}

#[test]
fn a_run_dir_holding_an_earlier_runs_records_is_refused_without_resume() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("metrics.jsonl");
    let earlier = "{\"kind\":\"round\",\"round\":1,\"loss\":2.0}\n";
    std::fs::write(&records, earlier).unwrap();
    let d = dir.path().to_str().unwrap();
    // A fresh node would append a second run to them (and the plot mix the
    // two): refused before it joins a swarm, the records left as they were.
    assert_one_line_error(&["node", "--run-dir", d], "earlier run's records");
    assert_eq!(std::fs::read_to_string(&records).unwrap(), earlier);
    // A file where the directory should be is named as such.
    let r = records.to_str().unwrap();
    assert_one_line_error(&["node", "--run-dir", r], "is a file");
}

#[test]
fn an_empty_environment_variable_is_named_not_its_flag() {
    for var in ["P2PTRAIN_CONFIG", "P2PTRAIN_DATA"] {
        let out = std::process::Command::new(common::binary())
            .args(["node", "--no-mdns"])
            .env(var, "")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{var} is set but empty")),
            "{var}: {stderr}"
        );
    }
}
