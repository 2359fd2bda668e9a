//! The training model: every fused op's hand-written backward against central finite
//! differences in f64, and the training forward pass against the official package's logits.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, tol_ratio, Expected};
use rwkv::checkpoint::Checkpoint;
use rwkv::init::Rng;
use rwkv::train::graph::ops::{Act, CrossEntropy, Heads, Norm, ShiftMix, Wkv4, Wkv7, Wkv7Out};
use rwkv::train::TrainModel;

fn randn(n: usize, scale: f64, rng: &mut Rng) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

/// Checks the gradient of `Σ f(inputs) · R` (R fixed random weights) with respect to every
/// input at `samples` random positions against central differences; returns the largest
/// relative error.
fn grad_check(
    name: &str,
    inputs: &[(Vec<f64>, Vec<usize>)],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    samples: usize,
) -> f64 {
    let dev = Device::Cpu;
    let mut rng = Rng::new(99);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(d, s)| {
            Var::from_tensor(&Tensor::from_vec(d.clone(), s.as_slice(), &dev).unwrap()).unwrap()
        })
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let rw = Tensor::from_vec(randn(out.elem_count(), 1.0, &mut rng), out.shape(), &dev).unwrap();
    let loss = (out * &rw).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let eval = |data: &[Vec<f64>]| -> f64 {
        let ts: Vec<Tensor> = data
            .iter()
            .zip(inputs)
            .map(|(d, (_, s))| Tensor::from_vec(d.clone(), s.as_slice(), &dev).unwrap())
            .collect();
        (f(&ts) * &rw)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut worst = 0f64;
    for (ii, (data, _)) in inputs.iter().enumerate() {
        let g = grads
            .get(vars[ii].as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for input {ii}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for _ in 0..samples {
            let at = (rng.next_u64() as usize) % data.len();
            let h = 1e-5 * data[at].abs().max(1.0);
            let mut cur: Vec<Vec<f64>> = inputs.iter().map(|(d, _)| d.clone()).collect();
            cur[ii][at] = data[at] + h;
            let up = eval(&cur);
            cur[ii][at] = data[at] - h;
            let down = eval(&cur);
            let fd = (up - down) / (2.0 * h);
            let rel = (fd - g[at]).abs() / fd.abs().max(g[at].abs()).max(1e-3);
            assert!(
                rel <= 1e-6,
                "{name}: input {ii}[{at}]: analytic {} vs finite difference {fd} (relative error {rel:.2e})",
                g[at]
            );
            worst = worst.max(rel);
        }
    }
    println!("{name}: max relative error {worst:.2e}");
    worst
}

#[test]
fn shift_mix_gradients() {
    let mut rng = Rng::new(1);
    let (b, t, c) = (2, 5, 8);
    for v4 in [false, true] {
        grad_check(
            if v4 { "shift-mix (v4)" } else { "shift-mix" },
            &[
                (randn(b * t * c, 1.0, &mut rng), vec![b, t, c]),
                (randn(3 * c, 0.5, &mut rng), vec![3, c]),
            ],
            &|x| x[0].apply_op2(&x[1], ShiftMix { t, c, v4 }).unwrap(),
            40,
        );
    }
}

#[test]
fn norm_gradients() {
    let mut rng = Rng::new(2);
    let (m, c) = (7, 12);
    for groups in [1, 3] {
        grad_check(
            "norm",
            &[
                (randn(m * c, 1.0, &mut rng), vec![m, c]),
                (randn(c, 1.0, &mut rng), vec![c]),
                (randn(c, 1.0, &mut rng), vec![c]),
            ],
            &|x| {
                x[0].apply_op3(
                    &x[1],
                    &x[2],
                    Norm {
                        c,
                        groups,
                        eps: 1e-5,
                    },
                )
                .unwrap()
            },
            40,
        );
    }
}

#[test]
fn activation_and_loss_gradients() {
    let mut rng = Rng::new(3);
    for act in [Act::Sigmoid, Act::ReluSq] {
        grad_check(
            &format!("{act:?}"),
            &[(randn(50, 1.0, &mut rng), vec![5, 10])],
            &|x| x[0].apply_op1(act).unwrap(),
            30,
        );
    }
    let targets = vec![3, 0, 9, 4, 4];
    grad_check(
        "cross-entropy",
        &[(randn(50, 2.0, &mut rng), vec![5, 10])],
        &|x| {
            x[0].apply_op1(CrossEntropy {
                targets: targets.clone(),
                l2wrap: 0.0,
            })
            .unwrap()
            .reshape(1)
            .unwrap()
        },
        30,
    );
}

#[test]
fn wkv7_gradients() {
    let mut rng = Rng::new(4);
    // T = 37 spans three checkpoints of 16 and a partial chunk.
    let d = Heads {
        b: 2,
        t: 37,
        h: 2,
        n: 4,
    };
    let (c, pl) = (d.h * d.n, d.b * d.t * d.h * d.n);
    let mut acts = randn(6 * pl, 0.5, &mut rng);
    // a is a sigmoid output in the model: keep it in (0, 1).
    for z in &mut acts[4 * pl..5 * pl] {
        *z = 1.0 / (1.0 + (-*z).exp());
    }
    let mut params = randn(5 * c, 0.5, &mut rng);
    for z in &mut params[3 * c..4 * c] {
        *z += 1.0;
    }
    let inputs = [(acts, vec![6, d.b, d.t, c]), (params, vec![5, c])];
    let worst = grad_check(
        "wkv7",
        &inputs,
        &|x| x[0].apply_op2(&x[1], Wkv7::new(d)).unwrap(),
        200,
    );
    assert!(worst <= 1e-6);
    grad_check(
        "wkv7 + out",
        &inputs,
        &|x| {
            let y = x[0].apply_op2(&x[1], Wkv7::new(d)).unwrap();
            y.apply_op3(&x[0], &x[1], Wkv7Out { d, eps: 64e-5 })
                .unwrap()
        },
        200,
    );
}

#[test]
fn wkv4_gradients() {
    let mut rng = Rng::new(5);
    let (b, t, c) = (2, 23, 5);
    let mut kv = randn(2 * b * t * c, 1.0, &mut rng);
    // Large keys exercise the running-maximum scaling.
    for z in kv.iter_mut().take(b * t * c).step_by(7) {
        *z *= 20.0;
    }
    grad_check(
        "wkv4",
        &[
            (kv, vec![2, b, t, c]),
            (randn(2 * c, 1.0, &mut rng), vec![2, c]),
        ],
        &|x| x[0].apply_op2(&x[1], Wkv4 { b, t, c }).unwrap(),
        200,
    );
}

/// The training forward pass on the fixture weights reproduces the official logits.
fn fixture_logits(dir: &str) {
    let exp = Expected::open(dir);
    let ck = Checkpoint::open(fixture(&format!("{dir}/model.safetensors"))).unwrap();
    let m = TrainModel::from_checkpoint(&ck, DType::F32).unwrap();
    for seq in ["seq0", "seq1"] {
        let tokens = exp.tokens(seq);
        let got = m.logits_vec(&tokens).unwrap();
        let want = exp.f32(&format!("{seq}.logits_full"));
        let r = tol_ratio(&got, &want);
        println!(
            "{dir} {seq}: {} tokens, error {r:.3}x the tolerance",
            tokens.len()
        );
        assert!(r <= 1.0, "{dir} {seq}: error is {r:.3}x the tolerance");
    }
}

#[test]
fn v7_training_forward_matches_fixture() {
    fixture_logits("v7");
}

#[test]
fn v4_training_forward_matches_fixture() {
    fixture_logits("v4");
}
