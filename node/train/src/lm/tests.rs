use super::*;
use crate::backend::CpuBackend;

fn small() -> CharLmConfig {
    CharLmConfig {
        context: 32,
        width: 32,
        blocks: 2,
        heads: 2,
        ff: 64,
        micro_batch: 4,
        micro_batches: 2,
        lr: 3e-3,
        seed: 7,
        eval_windows: 80,
    }
}

fn text() -> Arc<TextData> {
    Arc::new(text::load_bundled().unwrap())
}

fn stage(config: &CharLmConfig, index: usize, count: usize) -> CharLmStage<CpuBackend> {
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    CharLmStage::new(config, StageSpec { index, count }, text(), &device).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn two_stage_gradients_equal_the_unsplit_model() {
    let config = small();
    let mut whole = stage(&config, 0, 1);
    let mut first = stage(&config, 0, 2);
    let mut last = stage(&config, 1, 2);
    // Stages start from slices of the whole model's weights.
    let params = whole.params();
    assert_eq!(first.num_params() + last.num_params(), params.len());
    assert_eq!(first.params(), params[..first.num_params()]);
    assert_eq!(last.params(), params[first.num_params()..]);

    let batch: Vec<Vec<u32>> = (0..2).map(|_| whole.next_train_tokens().unwrap()).collect();
    let (mut whole_loss, mut split_loss) = (0.0, 0.0);
    for (id, tokens) in batch.iter().enumerate() {
        let id = id as u64;
        let Forward::Loss { loss, .. } = whole.forward(id, tokens, None, true).unwrap() else {
            panic!("the whole model ends in a loss");
        };
        whole_loss += loss;
        let Forward::Activations(acts) = first.forward(id, tokens, None, true).unwrap() else {
            panic!("the first of two stages sends activations");
        };
        assert_eq!(acts.len(), first.activation_len(4));
        let Forward::Loss {
            loss, grad_input, ..
        } = last.forward(id, tokens, Some(&acts), true).unwrap()
        else {
            panic!("the last stage computes the loss");
        };
        split_loss += loss;
        assert_eq!(grad_input.len(), acts.len());
        assert_eq!(first.backward(id, &grad_input).unwrap(), None);
    }
    assert!(
        (whole_loss - split_loss).abs() <= 1e-5,
        "{whole_loss} vs {split_loss}"
    );
    let whole_grads = whole.take_gradients().unwrap();
    let mut split_grads = first.take_gradients().unwrap();
    split_grads.extend(last.take_gradients().unwrap());
    let diff = max_abs_diff(&whole_grads, &split_grads);
    assert!(diff <= 1e-5, "max abs gradient difference {diff}");
    // Not vacuous: the gradients are far from zero.
    let norm: f32 = whole_grads.iter().map(|g| g * g).sum::<f32>().sqrt();
    assert!(norm > 1e-2, "gradient norm {norm}");
}

#[test]
fn a_middle_stage_passes_gradients_through() {
    let config = small();
    let mut whole = stage(&config, 0, 1);
    let mut stages: Vec<_> = (0..3).map(|i| stage(&config, i, 3)).collect();
    let params = whole.params();
    let mut offset = 0;
    for s in &mut stages {
        let n = s.num_params();
        s.set_params(&params[offset..offset + n]).unwrap();
        offset += n;
    }
    let tokens = whole.next_train_tokens().unwrap();
    whole.forward(1, &tokens, None, true).unwrap();
    let Forward::Activations(a0) = stages[0].forward(1, &tokens, None, true).unwrap() else {
        panic!()
    };
    let Forward::Activations(a1) = stages[1].forward(1, &tokens, Some(&a0), true).unwrap() else {
        panic!()
    };
    let Forward::Loss { grad_input, .. } = stages[2].forward(1, &tokens, Some(&a1), true).unwrap()
    else {
        panic!()
    };
    let g1 = stages[1]
        .backward(1, &grad_input)
        .unwrap()
        .expect("a middle stage has an input");
    assert_eq!(stages[0].backward(1, &g1).unwrap(), None);
    let mut split = Vec::new();
    for s in &mut stages {
        split.extend(s.take_gradients().unwrap());
    }
    let diff = max_abs_diff(&whole.take_gradients().unwrap(), &split);
    assert!(diff <= 1e-5, "max abs gradient difference {diff}");
}

#[test]
fn bad_inputs_are_refused_and_forget_drops_state() {
    let config = small();
    let mut last = stage(&config, 1, 2);
    let mut first = stage(&config, 0, 2);
    let tokens = first.next_train_tokens().unwrap();
    // Wrong sizes, bytes outside the vocabulary, NaN, unknown ids.
    assert!(matches!(
        last.forward(1, &tokens[1..], Some(&[0.0]), true),
        Err(TaskError::BadInput(_))
    ));
    // More windows than this node's micro-batches hold (a peer could make
    // one message take gigabytes of activations and graph).
    let mut many = tokens.clone();
    many.extend_from_slice(&tokens[..config.context + 1]);
    let acts = vec![0.5; last.activation_len(config.micro_batch + 1)];
    match last.forward(1, &many, Some(&acts), true) {
        Err(TaskError::BadInput(why)) => assert!(why.contains("--micro-batches"), "{why}"),
        other => panic!("{other:?}"),
    }
    let mut wide = tokens.clone();
    wide[0] = 300;
    assert!(matches!(
        first.forward(1, &wide, None, true),
        Err(TaskError::BadInput(_))
    ));
    let mut acts = vec![0.5; last.activation_len(4)];
    assert!(matches!(
        last.forward(1, &tokens, Some(&acts[1..]), true),
        Err(TaskError::BadInput(_))
    ));
    acts[3] = f32::NAN;
    assert!(matches!(
        last.forward(1, &tokens, Some(&acts), true),
        Err(TaskError::NonFinite { index: 3 })
    ));
    assert!(matches!(
        first.backward(9, &[0.0]),
        Err(TaskError::BadInput(_))
    ));
    // Parameters of the wrong length or non-finite.
    let n = first.num_params();
    assert!(matches!(
        first.set_params(&vec![0.0; n + 1]),
        Err(TaskError::ParamLength { .. })
    ));
    let mut p = first.params();
    p[0] = f32::INFINITY;
    assert!(matches!(
        first.set_params(&p),
        Err(TaskError::NonFinite { index: 0 })
    ));
    // A forgotten micro-batch can no longer be back-propagated.
    first.forward(5, &tokens, None, true).unwrap();
    first.forget(5);
    assert!(first
        .backward(5, &vec![0.0; first.activation_len(4)])
        .is_err());
    assert_eq!(first.apply_step().unwrap(), 0);
}

#[test]
fn a_stage_holds_a_graph_per_micro_batch_until_its_backward() {
    let config = small();
    let mut first = stage(&config, 0, 2);
    let mut last = stage(&config, 1, 2);
    let tokens = first.next_train_tokens().unwrap();
    let mut acts = Vec::new();
    for id in [1, 2] {
        let Forward::Activations(a) = first.forward(id, &tokens, None, true).unwrap() else {
            panic!("the first of two stages sends activations");
        };
        acts = a;
    }
    assert_eq!(first.graphs_held(), 2);
    // Evaluation keeps nothing for a backward pass.
    first.forward(3, &tokens, None, false).unwrap();
    assert_eq!(first.graphs_held(), 2);
    // The last stage back-propagates at once and keeps nothing either.
    let Forward::Loss { grad_input, .. } = last.forward(1, &tokens, Some(&acts), true).unwrap()
    else {
        panic!("the last stage ends in a loss");
    };
    assert_eq!(last.graphs_held(), 0);
    first.backward(1, &grad_input).unwrap();
    assert_eq!(first.graphs_held(), 1);
    first.forget(2);
    assert_eq!(first.graphs_held(), 0);
}

/// A micro-batch whose gradient comes back after the stage stepped, or took
/// an averaged model, still counts towards the next step (a replicated
/// middle stage steps while other replicas' micro-batches are in flight).
#[test]
fn a_gradient_that_returns_after_a_step_or_new_parameters_still_counts() {
    let config = small();
    for replace in [false, true] {
        let mut first = stage(&config, 0, 2);
        let mut last = stage(&config, 1, 2);
        let tokens = first.next_train_tokens().unwrap();
        let mut grads = Vec::new();
        for id in [1, 2] {
            let Forward::Activations(acts) = first.forward(id, &tokens, None, true).unwrap() else {
                panic!("the first of two stages sends activations");
            };
            let Forward::Loss { grad_input, .. } =
                last.forward(id, &tokens, Some(&acts), true).unwrap()
            else {
                panic!("the last stage ends in a loss");
            };
            grads.push(grad_input);
        }
        first.backward(1, &grads[0]).unwrap();
        if replace {
            let params = first.params();
            first.set_params(&params).unwrap();
        } else {
            assert_eq!(first.apply_step().unwrap(), 1);
        }
        first.backward(2, &grads[1]).unwrap();
        let g = first.take_gradients().unwrap();
        let norm: f32 = g.iter().map(|v| v * v).sum();
        assert!(
            norm > 0.0,
            "the late gradient was lost (replace: {replace})"
        );
    }
}

#[test]
fn training_the_whole_model_lowers_held_out_loss() {
    let config = CharLmConfig {
        micro_batches: 1,
        ..small()
    };
    let mut whole = stage(&config, 0, 1);
    let eval = |m: &mut CharLmStage<CpuBackend>| {
        let batches = m.eval_tokens();
        let mut total = 0.0;
        for (i, t) in batches.iter().take(20).enumerate() {
            let Forward::Loss { loss, .. } = m.forward(i as u64, t, None, false).unwrap() else {
                panic!()
            };
            total += loss;
        }
        total / 20.0
    };
    let before = eval(&mut whole);
    for step in 0..150u64 {
        let tokens = whole.next_train_tokens().unwrap();
        whole.forward(step, &tokens, None, true).unwrap();
        assert_eq!(whole.apply_step().unwrap(), 1);
    }
    let after = eval(&mut whole);
    // ln 256 = 5.5 nats at random; English text is far more predictable.
    assert!(before > 5.0, "initial loss {before}");
    assert!(
        after < before - 2.0,
        "loss fell only from {before} to {after}"
    );
    let text = sample(&config, &whole.params(), "It is a truth", 40, 0.8, 1).unwrap();
    assert!(
        text.starts_with("It is a truth") && text.len() >= 40,
        "{text}"
    );
}

#[test]
fn a_stage_given_its_optimizer_state_steps_as_if_never_stopped() {
    let config = CharLmConfig {
        micro_batches: 1,
        ..small()
    };
    let mut running = stage(&config, 0, 1);
    assert!(running.optim_state().is_none(), "no moments before a step");
    let step = |m: &mut CharLmStage<CpuBackend>, id: u64, tokens: &[u32]| {
        m.forward(id, tokens, None, true).unwrap();
        assert_eq!(m.apply_step().unwrap(), 1);
    };
    for id in 0..3 {
        let tokens = running.next_train_tokens().unwrap();
        step(&mut running, id, &tokens);
    }
    let state = running.optim_state().expect("moments after three steps");
    let mut resumed = stage(&config, 0, 1);
    resumed.set_params(&running.params()).unwrap();
    resumed.set_optim_state(&state).unwrap();
    // Parameters alone: Adam starts over, and its first step differs.
    let mut fresh_moments = stage(&config, 0, 1);
    fresh_moments.set_params(&running.params()).unwrap();
    let tokens = running.next_train_tokens().unwrap();
    for (m, id) in [
        (&mut running, 3),
        (&mut resumed, 0),
        (&mut fresh_moments, 0),
    ] {
        step(m, id, &tokens);
    }
    let resumed_gap = max_abs_diff(&running.params(), &resumed.params());
    let fresh_gap = max_abs_diff(&running.params(), &fresh_moments.params());
    assert!(resumed_gap < 1e-6, "resumed stage drifted by {resumed_gap}");
    assert!(fresh_gap > 1e-4, "fresh moments differ by only {fresh_gap}");
    // A state of another stage's length is refused, not applied.
    let other = stage(&config, 0, 2);
    let mut wrong = state.clone();
    wrong.moment_1.truncate(other.num_params());
    wrong.moment_2.truncate(other.num_params());
    assert!(resumed.set_optim_state(&wrong).is_err());
    assert_eq!(
        resumed.optim_state().map(|s| s.time),
        Some(state.time + 1),
        "a refused state wiped the moments"
    );
}

#[test]
fn a_first_stage_that_skips_micro_batches_draws_what_comes_after_them() {
    let config = small();
    let shard = || crate::task::Shard {
        indices: (10..16).collect(),
        seed: 3,
        peers: 2,
    };
    let mut running = stage(&config, 0, 2);
    let mut resumed = stage(&config, 0, 2);
    running.set_shard(shard());
    resumed.set_shard(shard());
    // Five micro-batches of four windows: three passes over six windows and a bit.
    for _ in 0..5 {
        running.next_train_tokens().unwrap();
    }
    assert_eq!(resumed.skip_micro_batches(5), 5);
    for _ in 0..3 {
        assert_eq!(
            resumed.next_train_tokens().unwrap(),
            running.next_train_tokens().unwrap()
        );
    }
    let mut fresh = stage(&config, 0, 2);
    fresh.set_shard(shard());
    assert_ne!(
        fresh.next_train_tokens().unwrap(),
        resumed.next_train_tokens().unwrap(),
        "the order did not move on"
    );
}
