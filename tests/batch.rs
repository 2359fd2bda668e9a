//! Batched inference: one call advances many sequences (a ragged batch) and gives exactly what
//! separate calls give, for every generation.

mod common;
use common::fixture;
use rwkv::model::{BatchItem, Logits, Model, Scratch};

#[test]
fn ragged_batch_equals_separate_runs_for_every_generation() {
    for gen in ["v4", "v5_2", "v6_0", "v7"] {
        let model = Model::load(fixture(&format!("{gen}/model.safetensors"))).unwrap();
        // Different histories, so every sequence starts from its own state.
        let histories: [&[u32]; 5] = [&[], &[5, 6, 7], &[100], &[1, 2, 3, 4, 5, 6, 7, 8], &[9]];
        let new: [Vec<u32>; 5] = [
            (0..40).map(|i| (i * 7 % 300) as u32).collect(), // a prompt
            vec![42],                                        // generating
            vec![299, 0],
            vec![],                                            // nothing this round
            (0..300).map(|i| (i * 13 % 300) as u32).collect(), // longer than a chunk share
        ];
        let modes = [
            Logits::All,
            Logits::Last,
            Logits::All,
            Logits::Last,
            Logits::Last,
        ];
        let mut states: Vec<_> = histories
            .iter()
            .map(|h| {
                let mut s = model.new_state();
                model.forward(h, &mut s, Logits::None).unwrap();
                s
            })
            .collect();
        let mut expect_states = states.clone();
        let expect: Vec<Vec<f32>> = (0..5)
            .map(|i| {
                model
                    .forward(&new[i], &mut expect_states[i], modes[i])
                    .unwrap()
            })
            .collect();
        let mut items: Vec<BatchItem> = states
            .iter_mut()
            .enumerate()
            .map(|(i, s)| BatchItem {
                tokens: &new[i],
                state: s,
                logits: modes[i],
            })
            .collect();
        let mut scratch = Scratch::default();
        let got = model.forward_batch(&mut items, &mut scratch);
        // A batch orders some sums differently from one sequence alone (several-row kernels
        // against the matrix-vector one), so the two agree to rounding, far inside the
        // fixtures' tolerance: 2 % of it (the portable kernels come closest, about 1 %).
        for i in 0..5 {
            let g = got[i].as_ref().unwrap();
            assert_eq!(g.len(), expect[i].len(), "{gen} item {i}");
            let r = common::tol_ratio(g, &expect[i]);
            assert!(
                r <= 0.02,
                "{gen} item {i}: logits differ ({r} of tolerance)"
            );
            for j in 0..states[i].len() {
                let r = common::tol_ratio(states[i].tensor(j), expect_states[i].tensor(j));
                assert!(r <= 0.02, "{gen} item {i} state {j}: {r}");
            }
        }
    }
}

#[test]
fn a_bad_sequence_fails_alone() {
    let model = Model::load(fixture("v7/model.pth")).unwrap();
    let v4 = Model::load(fixture("v4/model.pth")).unwrap();
    let mut good = model.new_state();
    let mut bad_tok = model.new_state();
    let mut foreign = v4.new_state();
    let mut reference = model.new_state();
    let want = model
        .forward(&[1, 2, 3], &mut reference, Logits::Last)
        .unwrap();
    let mut items = vec![
        BatchItem {
            tokens: &[1, 2, 3],
            state: &mut good,
            logits: Logits::Last,
        },
        BatchItem {
            tokens: &[1, 300],
            state: &mut bad_tok,
            logits: Logits::Last,
        },
        BatchItem {
            tokens: &[1],
            state: &mut foreign,
            logits: Logits::Last,
        },
    ];
    let out = model.forward_batch(&mut items, &mut Scratch::default());
    assert!(common::tol_ratio(out[0].as_ref().unwrap(), &want) <= 0.01);
    assert!(out[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("token id 300"));
    assert!(out[2].as_ref().unwrap_err().to_string().contains("v4"));
    // The failed sequences' states are untouched.
    assert!(bad_tok.tensor(0).iter().all(|&x| x == 0.0));
}

#[test]
fn state_fork_save_and_load_round_trip() {
    let dir = common::tmpdir("state-rt");
    for gen in ["v4", "v5_2", "v6_0", "v7"] {
        let model = Model::load(fixture(&format!("{gen}/model.pth"))).unwrap();
        let mut s = model.new_state();
        model
            .forward(&[3, 1, 4, 1, 5], &mut s, Logits::None)
            .unwrap();
        let mut fork = s.clone();
        let p = dir.join(format!("{gen}.safetensors"));
        s.save(&p).unwrap();
        let mut loaded = rwkv::model::State::load(&p, model.info()).unwrap();
        let a = model.step(9, &mut fork).unwrap();
        let b = model.step(9, &mut loaded).unwrap();
        let c = model.step(9, &mut s).unwrap();
        assert_eq!(a, b, "{gen}: loaded state differs");
        assert_eq!(a, c, "{gen}: fork differs");
        assert_eq!(
            s.bytes(),
            model.new_state().bytes(),
            "state size is constant"
        );
    }
}
