//! The hand-written pass against a candle graph of nanoGPT's model (`model.py`, `bias = False`)
//! written from its primitives in f64: softmax attention with a causal mask, LayerNorm
//! without bias, GELU of the error function, the tied head.

use super::*;
use crate::graph::ops::CrossEntropy;
use crate::pass::products::Prepared;
use candle_core::{DType, Device, Tensor, Var, D};
use rwkv_core::init::{init_tensors, InitSpec, NamedTensor, Rng};
use rwkv_core::model::consts::LN_EPS;
use std::collections::HashMap;

/// The loss of windows `toks` (`bs` of `t`) against `tgts` and every tensor's gradient, by
/// name.
fn graph(
    ts: &[NamedTensor],
    head_size: usize,
    toks: &[u32],
    tgts: &[u32],
    bs: usize,
    t: usize,
) -> (f64, HashMap<String, Vec<f64>>) {
    let dev = Device::Cpu;
    let vars: HashMap<&str, Var> = ts
        .iter()
        .map(|(n, s, d)| {
            let t = Tensor::from_vec(d.clone(), s.as_slice(), &dev)
                .and_then(|t| t.to_dtype(DType::F64))
                .unwrap();
            (n.as_str(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let v = |n: &str| vars[n].as_tensor().clone();
    let c = v(WTE).dim(1).unwrap();
    let h = c / head_size;
    let ln = |x: &Tensor, w: &str| -> Tensor {
        let mu = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mu).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let hat = xc
            .broadcast_div(&(var + LN_EPS).unwrap().sqrt().unwrap())
            .unwrap();
        hat.broadcast_mul(&v(w)).unwrap()
    };
    let lin = |x: &Tensor, w: &str| x.matmul(&v(w).t().unwrap()).unwrap();
    let ids = Tensor::new(toks, &dev).unwrap();
    let pos = v(WPE).narrow(0, 0, t).unwrap();
    let mut x = v(WTE)
        .index_select(&ids, 0)
        .unwrap()
        .reshape((bs, t, c))
        .unwrap()
        .broadcast_add(&pos)
        .unwrap()
        .reshape((bs * t, c))
        .unwrap();
    let mask: Vec<f64> = (0..t * t)
        .map(|k| if k % t > k / t { -1e30 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
    let n_layer = ts
        .iter()
        .filter(|(n, _, _)| n.ends_with("ln_1.weight"))
        .count();
    for i in 0..n_layer {
        let b = block(i);
        let qkv = lin(
            &ln(&x, &format!("{b}ln_1.weight")),
            &format!("{b}attn.c_attn.weight"),
        );
        let part = |k: usize| {
            qkv.narrow(1, k * c, c)
                .unwrap()
                .reshape((bs, t, h, head_size))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, vv) = (part(0), part(1), part(2));
        let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap()
            / (head_size as f64).sqrt())
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
        let mx = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&mx).unwrap().exp().unwrap();
        let a = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let y = a
            .matmul(&vv)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((bs * t, c))
            .unwrap();
        x = (x + lin(&y, &format!("{b}attn.c_proj.weight"))).unwrap();
        let u = lin(
            &ln(&x, &format!("{b}ln_2.weight")),
            &format!("{b}mlp.c_fc.weight"),
        );
        x = (x + lin(&u.gelu_erf().unwrap(), &format!("{b}mlp.c_proj.weight"))).unwrap();
    }
    let logits = lin(&ln(&x, LN_F), WTE);
    let loss = logits
        .apply_op1(CrossEntropy {
            targets: tgts.to_vec(),
            l2wrap: 0.0,
        })
        .unwrap();
    let grads = loss.backward().unwrap();
    let by_name = vars
        .iter()
        .map(|(n, var)| {
            let g = grads.get(var.as_tensor()).unwrap();
            (
                n.to_string(),
                g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            )
        })
        .collect();
    (loss.to_scalar::<f64>().unwrap(), by_name)
}

/// The model of the test, with random weights of norm about 1, and `bs·t` tokens and targets.
fn case(bs: usize, t: usize, head_size: usize) -> (Vec<NamedTensor>, Vec<u32>, Vec<u32>) {
    let spec = InitSpec {
        arch: Generation::Gpt,
        n_layer: 2,
        n_embd: 32,
        vocab: 40,
        head_size,
        positions: 16,
        seed: 7,
    };
    let mut rng = Rng::new(3);
    let mut ts = init_tensors(&spec).unwrap();
    for (name, _, data) in ts.iter_mut() {
        let base = if name.contains("ln") { 1.0 } else { 0.0 };
        data.iter_mut()
            .for_each(|x| *x = base + (rng.normal() * 0.3) as f32);
    }
    let toks: Vec<u32> = (0..bs * t).map(|_| (rng.next_u64() % 40) as u32).collect();
    let tgts: Vec<u32> = (0..bs * t).map(|_| (rng.next_u64() % 40) as u32).collect();
    (ts, toks, tgts)
}

/// The pass's mean loss over the windows and its gradients.
fn pass_loss(
    params: &Params,
    toks: &[u32],
    tgts: &[u32],
    bs: usize,
    t: usize,
) -> (f64, Vec<Vec<f32>>) {
    let pass = FusedGpt::new(params).unwrap();
    let mut work = pass.work(bs, t);
    let mut g = pass.products().zero_grads();
    let p: Vec<&[f32]> = params.values().iter().map(|v| v.as_slice()).collect();
    let mut pr = Prepared::default();
    pass.products().prepare(&p, &mut pr);
    let m = (bs * t) as f32;
    let sum = pass
        .accumulate(&p, &pr, toks, tgts, 1.0 / m, 0.0, &mut work, &mut g)
        .unwrap();
    (sum / m as f64, g)
}

/// The training pass computes the inference engine's loss (the engine is checked against
/// nanoGPT's `model.py` in `tests/gpt.rs`), window by window from a fresh cache.
#[test]
fn matches_the_inference_engine() {
    use rwkv_core::model::{Logits, Model};
    let (bs, t) = (3, 16);
    let (ts, toks, tgts) = case(bs, t, 8);
    let params = Params::from_tensors_with_heads(ts, 8).unwrap();
    let (loss, _) = pass_loss(&params, &toks, &tgts, bs, t);
    let model = Model::from_checkpoint(&params.checkpoint("test").unwrap(), None).unwrap();
    let v = model.vocab_size();
    let mut want = 0.0;
    for w in 0..bs {
        let mut st = model.new_state();
        let lg = model
            .forward(&toks[w * t..(w + 1) * t], &mut st, Logits::All)
            .unwrap();
        for i in 0..t {
            let row = &lg[i * v..(i + 1) * v];
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let s: f64 = row.iter().map(|&z| (z as f64 - mx).exp()).sum();
            want += s.ln() + mx - row[tgts[w * t + i] as usize] as f64;
        }
    }
    want /= (bs * t) as f64;
    assert!(
        (loss - want).abs() < 1e-5 * want,
        "pass {loss} vs engine {want}"
    );
}

/// The hand-written pass gives the graph's loss and every gradient on a 2-block Transformer
/// with random weights (the tied head's two parts of `wte`'s gradient, the positions', the
/// norms'), in windows shorter than its positions.
#[test]
fn matches_the_graph() {
    let (bs, t, head_size) = (2, 13, 8);
    let (ts, toks, tgts) = case(bs, t, head_size);
    let params = Params::from_tensors_with_heads(ts.clone(), head_size).unwrap();
    let (loss, g) = pass_loss(&params, &toks, &tgts, bs, t);
    let (want_loss, want) = graph(&ts, head_size, &toks, &tgts, bs, t);
    assert!(
        (loss - want_loss).abs() < 1e-5 * want_loss,
        "loss {loss} vs {want_loss}"
    );
    let mut worst = (0f64, String::new());
    for (name, got) in params.names().iter().zip(&g) {
        let w = &want[name];
        let scale = w.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-8);
        let err = w
            .iter()
            .zip(got)
            .fold(0f64, |a, (w, g)| a.max((w - *g as f64).abs()))
            / scale;
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!("largest relative gradient error {worst:?}");
    assert!(worst.0 < 1e-4, "largest relative gradient error {worst:?}");
}
