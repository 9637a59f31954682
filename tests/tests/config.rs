//! `node --config FILE`: values from the file take effect, flags and
//! P2PTRAIN_* variables override them, `config example` loads as is, and bad
//! files are refused naming the key.

mod common;
use common::{binary, run};
use std::path::Path;
use std::process::{Command, Output};

const BASE: &str = "no-mdns = true\n\
listen = [\"/ip4/127.0.0.1/udp/0/quic-v1\"]\n\
average-every = 10\n\
linger-secs = 0\n\
events = true\n";

fn node(config: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(binary());
    c.arg("node")
        .arg("--config")
        .arg(config)
        .args(extra)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn finished(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished")
        .expect("a finished event")
}

fn has_checkpoint(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.any(|e| e.is_ok()))
}

#[test]
fn the_file_sets_flags_and_flags_and_env_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let from_file = dir.path().join("from-file");
    let from_env = dir.path().join("from-env");
    let cfg = dir.path().join("swarm.toml");
    std::fs::write(
        &cfg,
        format!(
            "{BASE}swarm = \"cfg-{}\"\nsteps = 20\ncheckpoint-dir = {:?}\n",
            std::process::id(),
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();

    let f = finished(&node(&cfg, &[], &[]));
    assert_eq!(f["steps"], 20, "{f}");
    assert_eq!(f["rounds"], 2, "{f}");
    assert!(
        has_checkpoint(&from_file),
        "the file's checkpoint-dir was not used"
    );

    // A flag beats the file; an environment variable beats the file too.
    let f = finished(&node(
        &cfg,
        &["--steps", "10"],
        &[("P2PTRAIN_CHECKPOINT_DIR", &from_env)],
    ));
    assert_eq!(f["steps"], 10, "{f}");
    assert!(
        has_checkpoint(&from_env),
        "P2PTRAIN_CHECKPOINT_DIR was not used"
    );
}

#[test]
fn the_printed_example_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["config", "example"]);
    assert!(out.status.success());
    let example = dir.path().join("example.toml");
    std::fs::write(&example, &out.stdout).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("min-peers = 1"), "{text}");
    let f = finished(&node(
        &example,
        &[
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--steps",
            "5",
            "--events",
            "--linger-secs",
            "0",
        ],
        &[],
    ));
    assert_eq!(f["steps"], 5, "{f}");
}

#[test]
fn bad_config_files_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("stepz = 3\n", "`stepz`"),
        ("min-peers = \"two\"\n", "`min-peers`"),
        ("aggregation = \"median\"\n", "`aggregation`"),
        ("no-mdns = \"yes\"\n", "`no-mdns`"),
        ("steps = \n", "not valid TOML"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let out = node(&cfg, &[], &[]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{text}: {err}");
        assert!(err.contains(&format!("bad-{i}.toml")), "{text}: {err}");
    }
    let missing = dir.path().join("nope.toml");
    let out = node(&missing, &[], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}
