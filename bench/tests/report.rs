//! `bench/py/report.py` judges the harness's targets from runs taken in turns:
//! the 60%-of-raw-quinn verdict is the median of each pair's fraction, not
//! the fraction of the medians, which runs minutes apart on a shared machine
//! can push either way.

use std::path::Path;
use std::process::Command;

fn allreduce(impl_: &str, s: f64) -> String {
    format!(
        r#"{{"bench":"allreduce","impl":"{impl_}","peers":2,"values":1000000,"compression":"f32","s_median":{s}}}"#
    )
}

fn pair(p: &str) -> String {
    format!(r#"{{"bench":"allreduce_pair","pair":{p}}}"#)
}

/// A name for `text`'s file, distinct per input.
fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The target lines `report.py` prints for `results`, or `None` where
/// Python 3 is missing.
fn targets(results: &str) -> Option<Vec<serde_json::Value>> {
    let lines = report(results)?;
    Some(
        lines
            .into_iter()
            .filter(|v| v["bench"] == "target")
            .collect(),
    )
}

/// Every line `report.py` prints for `results`, or `None` where Python 3 is
/// missing.
fn report(results: &str) -> Option<Vec<serde_json::Value>> {
    // Cargo's scratch directory for integration tests; one file per input.
    let name = format!("report-{}.jsonl", text_hash(results));
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&file, results).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/report.py");
    let out = match Command::new("python3").arg(script).arg(&file).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: python3 cannot run here ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "report.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect(),
    )
}

#[test]
fn the_raw_quinn_verdict_is_the_median_of_the_pairs() {
    // Pair fractions 0.5, 0.75, 0.667: median 0.667, met. The medians'
    // fraction would be 0.020 / 0.040 = 0.5, not met.
    let mut lines = Vec::new();
    for (p, quinn, ours) in [
        ("1", 0.020, 0.040),
        ("2", 0.030, 0.040),
        ("3", 0.020, 0.030),
    ] {
        lines.push(pair(p));
        lines.push(allreduce("raw-quinn-pattern", quinn));
        lines.push(allreduce("p2ptrain", ours));
    }
    lines.push(pair("null"));
    let Some(found) = targets(&lines.join("\n")) else {
        return;
    };
    let t = found
        .iter()
        .find(|t| t["name"] == "allreduce_f32_at_least_60pct_of_raw_quinn")
        .expect("a raw-quinn verdict");
    let frac = t["fraction_of_bound"].as_f64().unwrap();
    assert!((frac - 0.02 / 0.03).abs() < 1e-9, "{t}");
    assert_eq!(t["met"], true, "{t}");
    assert_eq!(t["pair_fractions"].as_array().unwrap().len(), 3, "{t}");

    // A file without pair markers (older runs): the medians' fraction.
    let unpaired = [
        allreduce("raw-quinn-pattern", 0.020),
        allreduce("p2ptrain", 0.040),
    ]
    .join("\n");
    let found = targets(&unpaired).unwrap();
    let t = &found[0];
    assert_eq!(t["fraction_of_bound"].as_f64().unwrap(), 0.5, "{t}");
    assert_eq!(t["met"], false, "{t}");
}

#[test]
fn other_packet_sizes_are_context_and_not_the_bound() {
    let results = [
        allreduce("raw-quinn-pattern", 0.020),
        allreduce("p2ptrain", 0.030),
        allreduce("raw-quinn-pattern-other-packets", 0.040),
    ]
    .join("\n");
    let Some(lines) = report(&results) else {
        return;
    };
    let verdict = lines
        .iter()
        .find(|t| t["name"] == "allreduce_f32_at_least_60pct_of_raw_quinn")
        .expect("a raw-quinn verdict");
    // 0.020 / 0.030, not 0.040 / 0.030.
    let frac = verdict["fraction_of_bound"].as_f64().unwrap();
    assert!((frac - 2.0 / 3.0).abs() < 1e-9, "{verdict}");
    assert_eq!(verdict["met"], true, "{verdict}");
    let gain = lines
        .iter()
        .find(|l| l["what"] == "raw_quinn_s_with_other_packets")
        .expect("an other-packets ratio");
    assert_eq!(gain["ratio"].as_f64().unwrap(), 2.0, "{gain}");
}

#[test]
fn no_verdict_rests_on_an_incomplete_run_or_a_quick_one() {
    let verdict = |results: &str| {
        let found = targets(results)?;
        found
            .into_iter()
            .find(|t| t["name"] == "allreduce_f32_at_least_60pct_of_raw_quinn")
    };
    let quinn = allreduce("raw-quinn-pattern", 0.020);
    // A round that left a peer out: its time is no all-reduce's.
    let incomplete = allreduce("p2ptrain", 0.030)
        .replace(r#""s_median""#, r#""all_rounds_complete":false,"s_median""#);
    let Some(t) = verdict(&[quinn.clone(), incomplete].join("\n")) else {
        return; // no Python 3
    };
    assert_eq!(t["met"], serde_json::Value::Null, "{t}");
    assert!(t["reason"].as_str().unwrap().contains("every round"), "{t}");
    // A mean that came out wrong.
    let wrong = allreduce("p2ptrain", 0.030).replace(
        r#""s_median""#,
        r#""all_rounds_complete":true,"max_abs_err":0.5,"s_median""#,
    );
    let t = verdict(&[quinn.clone(), wrong].join("\n")).unwrap();
    assert_eq!(t["met"], serde_json::Value::Null, "{t}");
    // The same figures from a --quick run: not judged either.
    let machine = r#"{"bench":"machine","cores":2,"quick":1}"#;
    let fine = allreduce("p2ptrain", 0.030);
    let t = verdict(&[machine, &quinn, &fine].join("\n")).unwrap();
    assert_eq!(t["met"], serde_json::Value::Null, "{t}");
    assert!(t["reason"].as_str().unwrap().contains("--quick"), "{t}");
    // And from a full run: judged.
    let t = verdict(&[quinn, fine].join("\n")).unwrap();
    assert_eq!(t["met"], true, "{t}");
}
