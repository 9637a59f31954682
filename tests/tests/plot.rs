//! `p2ptrain plot RUN_DIR` and the testnet's `loss.png`: real PNGs, decoded.

mod common;
use p2ptrain_node::plot::{AVERAGE_COLOR, NODE_COLORS, PANEL_HEIGHT, WIDTH};
use std::path::Path;

/// Decodes an RGB PNG into (width, height, pixels).
fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).expect("the PNG exists"));
    let mut reader = png::Decoder::new(file).read_info().expect("a valid PNG");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).expect("one frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn pixels_of(rgb: &[u8], color: [u8; 3]) -> usize {
    rgb.chunks(3).filter(|p| *p == color).count()
}

/// A node's record file: `rounds` rounds of falling loss, then an evaluation.
fn write_node(dir: &Path, offset: f64, accuracy: f64, rounds: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for r in 1..=rounds {
        let loss = 2.0 / r as f64 + offset;
        text += &format!(
            "{{\"kind\":\"round\",\"round\":{r},\"step\":{},\"loss\":{loss},\"samples\":{},\"time_s\":{r}.5}}\n",
            r * 10,
            r * 640
        );
    }
    text += &format!(
        "{{\"kind\":\"eval\",\"round\":{rounds},\"step\":{},\"loss\":0.3,\"accuracy\":{accuracy},\"time_s\":99.0}}\n",
        rounds * 10
    );
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn plot_draws_each_node_and_the_average() {
    let run = tempfile::tempdir().unwrap();
    write_node(&run.path().join("node-0"), 0.0, 0.91, 30);
    write_node(&run.path().join("node-1"), 0.5, 0.85, 30);
    write_node(&run.path().join("node-2"), 1.5, 0.80, 25);
    let out = run.path().join("curves.png");
    let res = common::run(&[
        "plot",
        run.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{res:?}");
    let (w, h, rgb) = decode(&out);
    // Loss panel and accuracy panel.
    assert_eq!((w, h), (WIDTH, 2 * PANEL_HEIGHT));
    for (i, color) in NODE_COLORS[..3].iter().enumerate() {
        // Curves, not only the legend's 11x11 square.
        let n = pixels_of(&rgb, *color);
        assert!(n > 300, "node {i}'s colour has {n} pixels");
    }
    assert!(pixels_of(&rgb, AVERAGE_COLOR) > 1000, "no average curve");
    assert_eq!(pixels_of(&rgb, NODE_COLORS[3]), 0, "a fourth node appeared");

    // Without --out the PNG goes into the run directory.
    let res = common::run(&["plot", run.path().to_str().unwrap()]);
    assert!(res.status.success(), "{res:?}");
    assert_eq!(decode(&run.path().join("loss.png")).0, WIDTH);
}

#[test]
fn a_malformed_record_names_file_and_line() {
    let run = tempfile::tempdir().unwrap();
    write_node(&run.path().join("node-0"), 0.0, 0.9, 3);
    let bad = run.path().join("node-1");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("metrics.jsonl"),
        "{\"kind\":\"round\",\"round\":1,\"step\":10,\"loss\":1.0,\"samples\":64,\"time_s\":1.0}\n{\"kind\":\"round\",\"round\":\"two\"}\n",
    )
    .unwrap();
    let res = common::run(&["plot", run.path().to_str().unwrap()]);
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    let want = format!("{}:2:", bad.join("metrics.jsonl").display());
    assert!(err.contains(&want), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!run.path().join("loss.png").exists());

    let empty = tempfile::tempdir().unwrap();
    let res = common::run(&["plot", empty.path().to_str().unwrap()]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("no metrics.jsonl"));
}

#[test]
fn testnet_writes_run_records_and_loss_png() {
    let run = tempfile::tempdir().unwrap();
    let res = common::run(&[
        "testnet",
        "--nodes",
        "2",
        "--steps",
        "30",
        "--average-every",
        "5",
        "--eval-every",
        "2",
        "--timeout-secs",
        "240",
        "--run-dir",
        run.path().to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{res:?}");
    for node in ["node-0", "node-1"] {
        let records = std::fs::read_to_string(run.path().join(node).join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = records
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let rounds = lines.iter().filter(|v| v["kind"] == "round").count();
        assert_eq!(rounds, 6, "{records}");
        let eval = lines.last().unwrap();
        assert_eq!(eval["kind"], "eval");
        assert!(eval["accuracy"].as_f64().unwrap() > 0.1, "{eval}");
        // --eval-every 2: after rounds 2 and 4, then the final evaluation.
        let evals: Vec<u64> = lines
            .iter()
            .filter(|v| v["kind"] == "eval" && v["accuracy"].as_f64().is_some())
            .map(|v| v["round"].as_u64().unwrap())
            .collect();
        assert_eq!(evals, vec![2, 4, 6], "{records}");
    }
    let (w, h, rgb) = decode(&run.path().join("loss.png"));
    assert_eq!((w, h), (WIDTH, 2 * PANEL_HEIGHT));
    assert!(pixels_of(&rgb, AVERAGE_COLOR) > 500);
    assert!(pixels_of(&rgb, NODE_COLORS[1]) > 50);
    // A second testnet into the same directory would append to these
    // records and plot both runs as one: refused before any node starts.
    let again = common::run(&[
        "testnet",
        "--nodes",
        "2",
        "--steps",
        "30",
        "--run-dir",
        run.path().to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("earlier run's records"), "{stderr}");
    let records = std::fs::read_to_string(run.path().join("node-0/metrics.jsonl")).unwrap();
    let rounds = records
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"] == "round")
        .count();
    assert_eq!(rounds, 6, "{records}");
}

#[test]
fn eval_every_is_refused_for_a_pipeline() {
    let res = common::run(&[
        "node",
        "--model",
        "char-lm",
        "--stages",
        "2",
        "--eval-every",
        "1",
    ]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("--eval-every"), "{err}");
}

#[test]
fn plot_replaces_an_earlier_plot_but_no_other_file() {
    let run = tempfile::tempdir().unwrap();
    write_node(&run.path().join("node-0"), 0.0, 0.91, 10);
    let dir = run.path().to_str().unwrap();
    let plot = |out: &Path, force: bool| {
        let mut args = vec!["plot", dir, "--out", out.to_str().unwrap()];
        if force {
            args.push("--force");
        }
        common::run(&args)
    };
    // A plot drawn before is simply redrawn.
    let png = run.path().join("curves.png");
    assert!(plot(&png, false).status.success());
    assert!(plot(&png, false).status.success());
    assert_eq!(decode(&png).0, WIDTH);
    // The run's own records, named by mistake, are kept.
    let records = run.path().join("node-0/metrics.jsonl");
    let before = std::fs::read(&records).unwrap();
    // Even with --force: they are what plots are drawn from.
    for force in [false, true] {
        let res = plot(&records, force);
        assert!(!res.status.success());
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains("is a run record or a checkpoint"), "{err}");
        assert_eq!(std::fs::read(&records).unwrap(), before);
    }
    // So is a checkpoint (by its header), --force or not.
    let ckpt = run.path().join("ckpt-r00000001-x.bin");
    std::fs::write(&ckpt, b"P2PTCKPT and the rest").unwrap();
    let res = plot(&ckpt, true);
    assert!(!res.status.success());
    assert_eq!(std::fs::read(&ckpt).unwrap(), b"P2PTCKPT and the rest");
    // So is a picture of the user's: a PNG, but not one of our plots.
    let photo = run.path().join("photo.png");
    let theirs = {
        let mut bytes = Vec::new();
        let mut enc = png::Encoder::new(&mut bytes, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[1, 2, 3]).unwrap();
        w.finish().unwrap();
        bytes
    };
    std::fs::write(&photo, &theirs).unwrap();
    assert!(!plot(&photo, false).status.success());
    assert_eq!(std::fs::read(&photo).unwrap(), theirs);
    // A named pipe there is refused at once, not opened (which would block).
    let fifo = run.path().join("pipe.png");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        assert!(!plot(&fifo, false).status.success());
    }
    // No temporary file is left beside the outputs.
    let names: Vec<String> = std::fs::read_dir(run.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    // --force replaces it.
    let notes = run.path().join("notes.txt");
    std::fs::write(&notes, "mine").unwrap();
    assert!(plot(&notes, true).status.success());
    assert_eq!(decode(&notes).0, WIDTH);
}
