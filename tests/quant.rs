//! Weight formats: every generation runs in f32, f16, bf16, int8 and q4; quantized files written
//! by `rwkv convert --quant` load by memory map and give the same numbers as quantizing at
//! load; the quantized formats stay close to the reference.

mod common;
use common::{fixture, tmpdir, Expected};
use rwkv::checkpoint::write::convert;
use rwkv::checkpoint::Checkpoint;
use rwkv::model::{Logits, Model};
use rwkv::tensor::WeightFormat;

fn logits(m: &Model, toks: &[u32]) -> Vec<f32> {
    let mut s = m.new_state();
    m.forward(toks, &mut s, Logits::All).unwrap()
}

fn top1_agreement(a: &[f32], b: &[f32], v: usize) -> f64 {
    let am = |r: &[f32]| {
        r.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    let rows = a.len() / v;
    let same = (0..rows)
        .filter(|&i| am(&a[i * v..(i + 1) * v]) == am(&b[i * v..(i + 1) * v]))
        .count();
    same as f64 / rows as f64
}

#[test]
fn every_format_runs_every_generation_close_to_the_reference() {
    for gen in ["v4", "v5_2", "v6_0", "v7"] {
        let exp = Expected::open(gen);
        let toks = exp.tokens("seq0");
        let want = exp.f32("seq0.logits_full");
        let path = fixture(&format!("{gen}/model.safetensors"));
        for (fmt, max_rel, min_top1) in [
            ("f32", 1e-4, 1.0),
            ("bf16", 1e-4, 1.0), // the fixture's weights are exactly representable in bf16
            ("f16", 2e-2, 0.9),
            ("int8", 0.1, 0.85),
            ("q4", 1.0, 0.6), // random weights are q4's worst case; quality is measured on a trained model
        ] {
            let m = Model::load_as(&path, Some(fmt.parse::<WeightFormat>().unwrap())).unwrap();
            assert_eq!(m.weight_format(), fmt);
            let got = logits(&m, &toks);
            let v = m.vocab_size();
            // Error relative to the spread of the logits.
            let scale = want.iter().map(|x| x * x).sum::<f32>().sqrt() / (want.len() as f32).sqrt();
            let err = common::max_abs(&got, &want) / scale;
            let top1 = top1_agreement(&got, &want, v);
            println!("{gen} {fmt}: max error {err:.4} of the logit rms, top-1 agreement {top1:.2}");
            assert!(err <= max_rel, "{gen} {fmt}: error {err}");
            assert!(top1 >= min_top1, "{gen} {fmt}: top-1 agreement {top1}");
            // Both modes still agree with each other in every format.
            let mut s = m.new_state();
            let mut last = Vec::new();
            for &t in &toks {
                last = m.step(t, &mut s).unwrap();
            }
            let par_last = &got[(toks.len() - 1) * v..];
            let tol = if fmt == "int8" || fmt == "q4" {
                0.05
            } else {
                1e-3
            };
            assert!(
                common::max_abs(&last, par_last) / scale <= tol,
                "{gen} {fmt}: modes differ"
            );
        }
    }
}

#[test]
fn quantized_files_load_by_map_and_match_load_time_quantization() {
    let dir = tmpdir("quant-files");
    for gen in ["v4", "v7"] {
        let src = fixture(&format!("{gen}/model.pth"));
        for (q, fmt) in [("int8", WeightFormat::Int8), ("q4", WeightFormat::Q4)] {
            let out = dir.join(format!("{gen}-{q}.safetensors"));
            convert(&src, &out, None, Some(fmt), None).unwrap();
            let ck = Checkpoint::open(&out).unwrap();
            assert!(ck.has("head.weight.scales"));
            assert!(ck.get("emb.weight").unwrap().dtype != rwkv::tensor::DType::I8);
            let a = Model::load(&out).unwrap();
            let b = Model::load_as(&src, Some(fmt)).unwrap();
            assert_eq!(a.weight_format(), q);
            let toks = [1u32, 5, 9, 200, 3];
            assert_eq!(logits(&a, &toks), logits(&b, &toks), "{gen} {q}");
            assert!(
                std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&src).unwrap().len()
            );
        }
        // A quantized file cannot go to .pth.
        assert!(convert(
            &src,
            &dir.join("x.pth"),
            None,
            Some(WeightFormat::Int8),
            None
        )
        .is_err());
    }
}

#[test]
fn quantized_file_with_bad_blocks_is_rejected() {
    let dir = tmpdir("quant-bad");
    let q = dir.join("q.safetensors");
    convert(
        &fixture("v7/model.pth"),
        &q,
        None,
        Some(WeightFormat::Int8),
        None,
    )
    .unwrap();
    let bad = dir.join("bad.safetensors");
    common::rewrite(&q, &bad, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blocks.0.att.key.weight.scales")
            .unwrap();
        t.shape = vec![64, 8]; // same bytes, blocks that do not match the matrix
    });
    let e = Model::load(&bad).err().expect("must fail").to_string();
    assert!(e.contains("blocks.0.att.key.weight.scales"), "{e}");
    let bad = dir.join("bad2.safetensors");
    common::rewrite(&q, &bad, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blocks.0.att.key.weight")
            .unwrap();
        t.shape = vec![256, 64];
    });
    let e = Model::load(&bad).err().expect("must fail").to_string();
    assert!(
        e.contains("blocks.0.att.key.weight") && e.contains("blocks of 32"),
        "{e}"
    );
    assert!("q3".parse::<WeightFormat>().is_err());
}
