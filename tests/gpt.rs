//! The Transformer baseline against nanoGPT's own `model.py` (`tests/fixtures/gpt/README.md`):
//! logits of a full context in both modes, and greedy generation past the learned positions,
//! where nanoGPT crops its context.

use rwkv::checkpoint::Checkpoint;
use rwkv::model::{Logits, Model};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt")
        .join(name)
}

/// The largest absolute difference.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

const TOL: f32 = 1e-4;

#[test]
fn logits_are_nanogpts_in_both_modes() {
    let model = Model::load(fixture("model.safetensors")).unwrap();
    let want = Checkpoint::open(fixture("expected.safetensors")).unwrap();
    let tokens: Vec<u32> = want
        .i64_vec("tokens")
        .unwrap()
        .iter()
        .map(|&t| t as u32)
        .collect();
    let logits = want.f32_vec("logits").unwrap();
    let mut st = model.new_state();
    let got = model.forward(&tokens, &mut st, Logits::All).unwrap();
    let e = worst(&got, &logits);
    eprintln!("parallel: worst logit error {e:.2e}");
    assert!(e < TOL, "parallel {e}");
    let mut st = model.new_state();
    let v = model.vocab_size();
    for (i, &t) in tokens.iter().enumerate() {
        let row = model.step(t, &mut st).unwrap();
        let e = worst(&row, &logits[i * v..(i + 1) * v]);
        assert!(e < TOL, "token {i}: {e}");
    }
    // The context is full: one more token in a batch is refused, not wrapped around.
    let mut items = [rwkv::model::BatchItem {
        tokens: &[1],
        state: &mut st,
        logits: Logits::Last,
    }];
    let out = model.forward_batch(&mut items, &mut Default::default());
    let err = out[0].as_ref().expect_err("full").to_string();
    assert!(err.contains("context of 16 positions"), "{err}");
}

#[test]
fn generation_crops_the_context_as_nanogpt_does() {
    let model = Model::load(fixture("model.safetensors")).unwrap();
    let want = Checkpoint::open(fixture("expected.safetensors")).unwrap();
    let gen: Vec<u32> = want
        .i64_vec("gen_tokens")
        .unwrap()
        .iter()
        .map(|&t| t as u32)
        .collect();
    let gen_logits = want.f32_vec("gen_logits").unwrap();
    let v = model.vocab_size();
    let mut st = model.new_state();
    let mut row = model.forward(&gen[..5], &mut st, Logits::Last).unwrap();
    for i in 0..20 {
        let e = worst(&row, &gen_logits[i * v..(i + 1) * v]);
        assert!(e < TOL, "generated token {i}: {e}");
        let best = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
        assert_eq!(best, gen[5 + i], "generated token {i}");
        row = model.step(best, &mut st).unwrap();
    }
    assert!(st.cached_tokens() <= 16);
}

#[test]
fn info_names_the_baseline_and_its_context() {
    let ck = Checkpoint::open(fixture("model.safetensors")).unwrap();
    let info = rwkv::checkpoint::detect::detect(&ck).unwrap();
    let text = info.to_string();
    assert!(text.contains("Transformer baseline"), "{text}");
    assert!(text.contains("context     16"), "{text}");
    assert!(text.contains("heads       4 x 8"), "{text}");
}

#[test]
fn a_transformer_without_its_head_size_is_refused_by_name() {
    use rwkv::checkpoint::{write_safetensors, OutTensor};
    let ck = Checkpoint::open(fixture("model.safetensors")).unwrap();
    let tensors: Vec<OutTensor> = ck
        .names()
        .iter()
        .map(|n| {
            let m = ck.get(n).unwrap();
            OutTensor::f32(n.clone(), m.shape.clone(), &ck.f32_vec(n).unwrap())
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("rwkv-gpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("no-heads.safetensors");
    write_safetensors(&p, &tensors, &Default::default()).unwrap();
    let e = Model::load(&p).err().expect("refused").to_string();
    assert!(e.contains("no head_size in the metadata"), "{e}");
    let mut md = std::collections::BTreeMap::new();
    md.insert("head_size".to_string(), "5".to_string());
    write_safetensors(&p, &tensors, &md).unwrap();
    let e = Model::load(&p).err().expect("refused").to_string();
    assert!(
        e.contains("head size 5 does not divide the width 32"),
        "{e}"
    );
    // A Transformer has no state file to save or load.
    let model = Model::load(fixture("model.safetensors")).unwrap();
    let e = model
        .new_state()
        .save(dir.join("s.safetensors"))
        .expect_err("refused");
    assert!(e.to_string().contains("KV cache"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A long context's heads run side by side on the pool: the same numbers as one after the
/// other.
#[test]
fn heads_in_parallel_give_the_same_logits() {
    use rwkv::checkpoint::{Generation, OutTensor};
    use rwkv::init::{init_tensors_with, InitSpec};
    let spec = InitSpec {
        arch: Generation::Gpt,
        n_layer: 1,
        n_embd: 256,
        vocab: 50,
        head_size: 64,
        positions: 1200,
        seed: 3,
    };
    let ts = init_tensors_with(&spec, true).unwrap();
    let out: Vec<OutTensor> = ts
        .iter()
        .map(|(n, s, d)| OutTensor::f32(n.clone(), s.clone(), d))
        .collect();
    let md = rwkv::schema::metadata(&spec.dims().unwrap());
    let bytes = rwkv::checkpoint::safetensors_bytes(&out, &md).unwrap();
    let model = Model::from_checkpoint(&Checkpoint::from_bytes("m", bytes).unwrap(), None).unwrap();
    let tokens: Vec<u32> = (0..1100u32).map(|i| (i * 7 + 3) % 50).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut st = model.new_state();
            let mut last = model.forward(&tokens, &mut st, Logits::Last).unwrap();
            last.extend(model.step(5, &mut st).unwrap());
            last
        })
    };
    assert_eq!(run(1), run(2));
}
