//! `p2ptrain export`: a trained checkpoint comes out as safetensors whose
//! tensors, read back and run with plain matrix math in PyTorch's layout,
//! are the node's model.

mod common;
use common::{binary, run};
use p2ptrain_node::checkpoint;
use p2ptrain_node::train::data;
use safetensors::SafeTensors;
use std::process::Command;

fn f32s(view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// torch.nn.Linear: y = x W^T + b, with W stored [out, in].
fn linear(x: &[f32], w: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
    let d_in = x.len();
    b.iter()
        .enumerate()
        .map(|(o, bias)| {
            let row = &w[o * d_in..(o + 1) * d_in];
            let y = bias + row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
            if relu {
                y.max(0.0)
            } else {
                y
            }
        })
        .collect()
}

#[test]
fn an_exported_mlp_is_the_trained_model_in_pytorch_layout() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt_dir = dir.path().join("ckpt");
    let out = Command::new(binary())
        .args(["node", "--swarm", "export-test", "--no-mdns", "--events"])
        .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
        .args([
            "--steps",
            "40",
            "--average-every",
            "10",
            "--linger-secs",
            "0",
        ])
        .arg("--checkpoint-dir")
        .arg(&ckpt_dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let finished: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finished")
        .expect("a finished event");
    let reported = finished["test_accuracy"].as_f64().unwrap();

    let file = dir.path().join("model.safetensors");
    let out = run(&[
        "export",
        ckpt_dir.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["model"], "mlp");
    assert_eq!(meta["round"], "4");

    // Every value is the checkpoint's, with Linear weights transposed.
    let ckpt = checkpoint::load_latest(&ckpt_dir).unwrap();
    assert_eq!(meta["params_digest"], ckpt.meta.params_digest);
    let mut offset = 0;
    let mut layers = Vec::new();
    for (name, d_in, d_out) in [("fc1", 784, 256), ("fc2", 256, 256), ("fc3", 256, 10)] {
        let w = st.tensor(&format!("{name}.weight")).unwrap();
        let b = st.tensor(&format!("{name}.bias")).unwrap();
        assert_eq!(w.shape(), &[d_out, d_in]);
        assert_eq!(b.shape(), &[d_out]);
        let (w, b) = (f32s(&w), f32s(&b));
        let burn_w = &ckpt.params[offset..offset + d_in * d_out];
        for i in 0..d_in {
            for o in 0..d_out {
                assert_eq!(w[o * d_in + i], burn_w[i * d_out + o], "{name}[{o},{i}]");
            }
        }
        offset += d_in * d_out;
        assert_eq!(&b[..], &ckpt.params[offset..offset + d_out]);
        offset += d_out;
        layers.push((w, b));
    }
    assert_eq!(offset, ckpt.params.len());
    assert_eq!(st.len(), 6);

    // Run in PyTorch's convention, the weights classify the held-out images
    // as well as the node said its model does.
    let mnist = data::load_bundled().unwrap();
    let mut correct = 0;
    for (img, label) in mnist.test_images.chunks_exact(784).zip(&mnist.test_labels) {
        let h = linear(img, &layers[0].0, &layers[0].1, true);
        let h = linear(&h, &layers[1].0, &layers[1].1, true);
        let y = linear(&h, &layers[2].0, &layers[2].1, false);
        let guess = (0..10).max_by(|a, b| y[*a].total_cmp(&y[*b])).unwrap();
        correct += usize::from(guess == usize::from(*label));
    }
    let accuracy = correct as f64 / mnist.test_labels.len() as f64;
    assert!(
        (accuracy - reported).abs() < 0.01,
        "exported weights score {accuracy}, the node reported {reported}"
    );
    assert!(accuracy > 0.5, "{accuracy}");

    // The output is not overwritten without --force, and stays intact.
    let again = run(&[
        "export",
        ckpt_dir.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(std::fs::read(&file).unwrap() == bytes, "the output changed");
    let forced = run(&[
        "export",
        ckpt_dir.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
        "--force",
    ]);
    assert!(forced.status.success());
    // --force never writes over a checkpoint: the one exported, named as
    // the output by mistake, stays as it was.
    let newest = std::fs::read_dir(&ckpt_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .max()
        .expect("a checkpoint file");
    let kept = std::fs::read(&newest).unwrap();
    let onto = run(&[
        "export",
        ckpt_dir.to_str().unwrap(),
        "--out",
        newest.to_str().unwrap(),
        "--force",
    ]);
    assert!(!onto.status.success());
    assert!(String::from_utf8_lossy(&onto.stderr).contains("is a checkpoint or a run record"));
    assert!(
        std::fs::read(&newest).unwrap() == kept,
        "the checkpoint changed"
    );
    // The same tensors (the header's metadata order may differ).
    let rewritten = std::fs::read(&file).unwrap();
    let st2 = SafeTensors::deserialize(&rewritten).unwrap();
    for name in st.names() {
        assert!(
            st2.tensor(name).unwrap().data() == st.tensor(name).unwrap().data(),
            "{name}"
        );
    }
}

#[test]
fn export_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let missing = dir.path().join("nope.ckpt");
    let r = run(&[
        "export",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("nope.ckpt"), "{err}");

    // A damaged checkpoint is refused, and no output file appears.
    let bad = dir.path().join("bad.ckpt");
    std::fs::write(&bad, b"P2PCKPT not really a checkpoint").unwrap();
    let r = run(&[
        "export",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(!out.exists());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("bad.ckpt"), "{err}");
}
