//! The tests' check of a hand-written pass against the candle graph (in f64): a model with
//! random weights everywhere (so that no gradient is trivially zero), two windows of 21 tokens
//! (which end inside a WKV chunk), and the loss and every gradient compared.

use super::products::Prepared;
use super::Pass;
use crate::params::Params;
use crate::TrainModel;
use candle_core::DType;
use rwkv_core::init::{init_tensors, InitSpec, Rng};

/// Windows and tokens per window of every case.
const BS: usize = 2;
const T: usize = 21;
/// The L2Wrap factor of every case (small, but enough to show in the head's gradient).
const L2WRAP: f64 = 1e-4;

/// A model, its graph and a batch.
pub struct Case {
    /// The parameters.
    pub params: Params,
    /// The same model as a graph in f64.
    pub graph: TrainModel,
    /// `BS` windows of `T` tokens, and their targets.
    pub toks: Vec<u32>,
    /// The targets.
    pub tgts: Vec<u32>,
}

impl Case {
    /// The model of `spec` with every weight drawn at random (norm weights about 1).
    pub fn new(spec: &InitSpec) -> Case {
        let mut rng = Rng::new(3);
        let mut ts = init_tensors(spec).unwrap();
        for (name, _, data) in ts.iter_mut() {
            let s = if name.contains("ln") && name.ends_with("weight") {
                1.0
            } else {
                0.0
            };
            for x in data.iter_mut() {
                *x = s + (rng.normal() * 0.3) as f32;
            }
        }
        let params = Params::from_tensors(ts.clone()).unwrap();
        let graph = TrainModel::from_tensors(ts, DType::F64).unwrap();
        let v = spec.vocab as u64;
        let toks = (0..BS * T).map(|_| (rng.next_u64() % v) as u32).collect();
        let tgts = (0..BS * T).map(|_| (rng.next_u64() % v) as u32).collect();
        Case {
            params,
            graph,
            toks,
            tgts,
        }
    }

    /// Asserts that `loss` and the gradients `g` of the mean loss are the graph's (the
    /// largest error of each tensor relative to its largest gradient below `tol`); returns
    /// the worst tensor.
    pub fn check(&self, loss: f64, g: &[Vec<f32>], tol: f64) -> (f64, String) {
        let l = self
            .graph
            .loss(&self.toks, &self.tgts, BS, T, L2WRAP)
            .unwrap();
        let want_loss = l.to_scalar::<f64>().unwrap();
        let gs = l.backward().unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "loss {loss} vs {want_loss}"
        );
        let mut worst = (0f64, String::new());
        for ((name, var), got) in self.graph.vars().zip(g) {
            let want: Vec<f64> = match gs.get(var.as_tensor()) {
                Some(t) => t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                None => vec![0.0; got.len()],
            };
            let scale = want.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-8);
            let err = want
                .iter()
                .zip(got)
                .fold(0f64, |a, (w, g)| a.max((w - *g as f64).abs()))
                / scale;
            if err > worst.0 {
                worst = (err, name.to_string());
            }
        }
        assert!(worst.0 < tol, "largest relative gradient error {worst:?}");
        worst
    }
}

/// The pass on the case: the mean loss and the gradients.
pub fn run<P: Pass>(pass: &P, case: &Case) -> (f64, Vec<Vec<f32>>) {
    let mut work = pass.work(BS, T);
    let mut g = pass.products().zero_grads();
    let p: Vec<&[f32]> = case.params.values().iter().map(|v| v.as_slice()).collect();
    let mut pr = Prepared::default();
    pass.products().prepare(&p, &mut pr);
    let scale = 1.0 / (BS * T) as f32;
    let (toks, tgts) = (&case.toks, &case.tgts);
    let l2 = L2WRAP as f32;
    let sum = pass.accumulate(&p, &pr, toks, tgts, scale, l2, &mut work, &mut g);
    (sum.unwrap() / (BS * T) as f64, g)
}
