//! RWKV-PEFT state-tuning files (`blocks.N.att.time_state`) as initial states: the official
//! package's logits from the same file, loaded as ChatRWKV and RWKV-PEFT's demos load it
//! (`tests/fixtures/peft/README.md`).

mod common;

use common::{fixture, tol_ratio, Expected};
use rwkv::checkpoint::Checkpoint;
use rwkv::model::{Logits, Model, Slot, State};

fn logits_from(model: &Model, state: &mut State, tokens: &[u32]) -> Vec<f32> {
    model.forward(tokens, state, Logits::All).unwrap()
}

#[test]
fn a_tuned_time_state_gives_the_official_logits() {
    let model = Model::load(fixture("v7/model.safetensors")).unwrap();
    let tokens = Expected::open("v7").tokens("seq1");
    let path = fixture("peft/v7-time_state.pth");
    let mut state = State::load(&path, model.info()).unwrap();
    let want = Checkpoint::open(fixture("peft/v7-expected.pth"))
        .unwrap()
        .f32_vec("logits")
        .unwrap();
    let r = tol_ratio(&logits_from(&model, &mut state, &tokens), &want);
    println!("v7: {r:.4} of the tolerance");
    assert!(r <= 1.0, "{r} times the tolerance");
    // The test can fail: the state untransposed, or no state, is far off.
    let mut raw = model.new_state();
    let ck = Checkpoint::open(&path).unwrap();
    for layer in 0..model.info().n_layer {
        let t = ck
            .f32_vec(&format!("blocks.{layer}.att.time_state"))
            .unwrap();
        raw.get_mut(layer, Slot::AttKv).copy_from_slice(&t);
    }
    assert!(tol_ratio(&logits_from(&model, &mut raw, &tokens), &want) > 10.0);
    let mut zero = model.new_state();
    assert!(tol_ratio(&logits_from(&model, &mut zero, &tokens), &want) > 10.0);
}

/// RWKV-6 the same way: each head's matrix transposed into `att_kv`, the shifts zero.
#[test]
fn a_tuned_rwkv6_time_state_is_transposed_into_att_kv() {
    let model = Model::load(fixture("v6_0/model.safetensors")).unwrap();
    let path = fixture("peft/v6_0-time_state.pth");
    let state = State::load(&path, model.info()).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let (h, n) = (model.info().n_head, model.info().head_size);
    for layer in 0..model.info().n_layer {
        let t = ck
            .f32_vec(&format!("blocks.{layer}.att.time_state"))
            .unwrap();
        let kv = state.get(layer, Slot::AttKv);
        for (head, i, j) in
            (0..h).flat_map(|a| (0..n).flat_map(move |b| (0..n).map(move |c| (a, b, c))))
        {
            assert_eq!(kv[(head * n + i) * n + j], t[(head * n + j) * n + i]);
        }
        assert!(state.get(layer, Slot::AttShift).iter().all(|&x| x == 0.0));
        assert!(state.get(layer, Slot::FfnShift).iter().all(|&x| x == 0.0));
    }
}

#[test]
fn time_state_files_that_do_not_fit_are_refused() {
    let path = fixture("peft/v7-time_state.pth");
    let v4 = Model::load(fixture("v4/model.safetensors")).unwrap();
    let err = State::load(&path, v4.info()).unwrap_err().to_string();
    assert!(err.contains("RWKV-4"), "{err}");
    // A file with one layer missing (the fixtures have two): a model deeper than the file.
    let dir = common::tmpdir("peft");
    let ck = Checkpoint::open(&path).unwrap();
    let t = ck.f32_vec("blocks.0.att.time_state").unwrap();
    let shallow = dir.join("shallow.safetensors");
    rwkv::checkpoint::write_safetensors(
        &shallow,
        &[rwkv::checkpoint::OutTensor::f32(
            "blocks.0.att.time_state",
            vec![2, 64, 64],
            &t,
        )],
        &Default::default(),
    )
    .unwrap();
    let v7 = Model::load(fixture("v7/model.safetensors")).unwrap();
    let err = State::load(&shallow, v7.info()).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor blocks.1.att.time_state"),
        "{err}"
    );
}

/// `rwkv eval --state`: the loss is scored from the tuned state, window by window as in one
/// pass (every window from the state).
#[test]
fn eval_scores_from_a_tuned_state() {
    let model = Model::load(fixture("v7/model.safetensors")).unwrap();
    let state = State::load(fixture("peft/v7-time_state.pth"), model.info()).unwrap();
    let tokens = Expected::open("v7").tokens("seq0");
    let quiet = &mut |_: usize, _: usize| {};
    let zero = rwkv::eval::score(&model, &tokens, 1, None, None, quiet).unwrap();
    let tuned = rwkv::eval::score(&model, &tokens, 1, None, Some(&state), quiet).unwrap();
    let windows = rwkv::eval::score(&model, &tokens, 1, Some(4096), Some(&state), quiet).unwrap();
    // The loss by hand from the state's logits.
    let mut st = state.clone();
    let logits = model.forward(&tokens, &mut st, Logits::All).unwrap();
    let v = model.vocab_size();
    let mut total = 0f64;
    for i in 0..tokens.len() - 1 {
        let row = &logits[i * v..(i + 1) * v];
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let s: f64 = row.iter().map(|&z| (z as f64 - mx).exp()).sum();
        total += s.ln() + mx - row[tokens[i + 1] as usize] as f64;
    }
    let want = total / (tokens.len() - 1) as f64;
    assert!((tuned.loss - want).abs() < 1e-4, "{} {want}", tuned.loss);
    assert!(
        (windows.loss - want).abs() < 1e-4,
        "{} {want}",
        windows.loss
    );
    assert!((zero.loss - want).abs() > 1e-2, "the state changes nothing");
}
