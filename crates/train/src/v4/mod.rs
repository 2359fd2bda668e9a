//! RWKV-4 training without a graph: the forward and backward pass of the paper's architecture
//! over a shard of windows, written out by hand (RWKV-LM `RWKV-v4neo/src/model.py`), with every
//! buffer allocated once and reused from step to step. Per block:
//!
//! - time mixing: `x += (σ(x_r W_r) ⊙ wkv(x_k W_k, x_v W_v)) W_o`, where `x_k`, `x_v`, `x_r`
//!   are the normalised input mixed with the previous token's, `x·μ + x_prev·(1-μ)`, and the
//!   WKV is [`wkv`]'s;
//! - channel mixing: `x += σ(x_r W_r) ⊙ (relu(x_k W_k)² W_v)`.
//!
//! `tests::matches_the_graph` checks the loss and every gradient against the candle graph's.

// Index loops over several parallel per-channel arrays read more clearly than zipped iterators.
#![allow(clippy::needless_range_loop)]

pub mod wkv;

use crate::common::dispatch;
use crate::params::Params;
use crate::pass::ends::{Ends, EndsWork};
use crate::pass::kernels::{
    layer_norm, layer_norm_back, map_sigmoid, relu_sq, relu_sq_back, shift_back, shift_fwd,
    sigmoid_back, two,
};
use crate::pass::products::{Prepared, Products};
use crate::pass::Pass;
use rwkv_core::checkpoint::Generation;
use rwkv_core::error::{Error, Result};

/// Where one block's parameters are in the parameter list.
struct Block {
    ln1: (usize, usize),
    ln2: (usize, usize),
    /// `att.time_mix_k, time_mix_v, time_mix_r`.
    mix: [usize; 3],
    wk: usize,
    wv: usize,
    wr: usize,
    wo: usize,
    decay: usize,
    first: usize,
    /// `ffn.time_mix_k, time_mix_r`.
    fmix: [usize; 2],
    fk: usize,
    fv: usize,
    fr: usize,
}

/// The shapes of an RWKV-4 model and where its parameters are, for the hand-written pass.
pub struct Fused4 {
    c: usize,
    ffn: usize,
    ends: Ends,
    blocks: Vec<Block>,
    prod: Products,
}

impl Fused4 {
    /// The pass for the RWKV-4 model `p`.
    pub fn new(p: &Params) -> Result<Fused4> {
        let d = p.schema();
        if d.generation != Generation::V4 {
            return Err(Error::bad(format!("{:?} is not RWKV-4", d.generation)));
        }
        let blocks = (0..d.n_layer)
            .map(|i| {
                let f = |s: &str| p.find(&format!("blocks.{i}.{s}"));
                let ln = |s: &str| -> Result<(usize, usize)> {
                    Ok((f(&format!("{s}.weight"))?, f(&format!("{s}.bias"))?))
                };
                Ok(Block {
                    ln1: ln("ln1")?,
                    ln2: ln("ln2")?,
                    mix: [
                        f("att.time_mix_k")?,
                        f("att.time_mix_v")?,
                        f("att.time_mix_r")?,
                    ],
                    wk: f("att.key.weight")?,
                    wv: f("att.value.weight")?,
                    wr: f("att.receptance.weight")?,
                    wo: f("att.output.weight")?,
                    decay: f("att.time_decay")?,
                    first: f("att.time_first")?,
                    fmix: [f("ffn.time_mix_k")?, f("ffn.time_mix_r")?],
                    fk: f("ffn.key.weight")?,
                    fv: f("ffn.value.weight")?,
                    fr: f("ffn.receptance.weight")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Fused4 {
            c: d.n_embd,
            ffn: d.ffn_dim,
            ends: Ends::new(p)?,
            blocks,
            prod: Products::new(p)?,
        })
    }
}

/// RWKV-4's token shift `x·μ + x_prev·(1-μ)` is the later generations'
/// `x + (x_prev - x)·μ'` with `μ' = 1 - μ`: the mixes go to the shared shift kernels as their
/// complements (`out`, `K·C`), and the gradient of each `μ` is minus that of its `μ'`.
fn complements(p: &[&[f32]], mixes: &[usize], out: &mut [f32]) {
    let c = out.len() / mixes.len();
    for (o, &i) in out.chunks_exact_mut(c).zip(mixes) {
        o.iter_mut().zip(p[i]).for_each(|(o, &m)| *o = 1.0 - m);
    }
}

/// `g -= d`, for the mixes' gradients (see [`complements`]).
fn sub(g: &mut [f32], d: &[f32]) {
    g.iter_mut().zip(d).for_each(|(g, d)| *g -= *d);
}

/// One block's saved activations.
struct Acts {
    hat1: Vec<f32>,
    rstd1: Vec<f32>,
    xn1: Vec<f32>,
    /// `[3, M, C]`: key, value, receptance (after its sigmoid).
    kvr: Vec<f32>,
    /// The WKV's state before each token `[3, M, C]`, and its output.
    state: Vec<f32>,
    y: Vec<f32>,
    /// `r ⊙ y`, the output projection's input.
    ry: Vec<f32>,
    hat2: Vec<f32>,
    rstd2: Vec<f32>,
    xn2: Vec<f32>,
    /// The channel mix's key before `relu(·)²` `[M, F]`, its value `[M, C]` and receptance
    /// (after its sigmoid).
    hpre: Vec<f32>,
    fkv: Vec<f32>,
    fr: Vec<f32>,
}

/// Every buffer of one shard's forward and backward pass, allocated once.
pub struct Work {
    bs: usize,
    t: usize,
    ends: EndsWork,
    /// The residual stream `[M, C]`.
    x: Vec<f32>,
    layers: Vec<Acts>,
    /// The complements of the block at hand's five mixes (three of time mixing, two of
    /// channel mixing), `[5, C]`.
    cmix: Vec<f32>,
    /// The token-shifted inputs of the block at hand (`[3, M, C]`), and the channel mix's
    /// `relu(·)²`: the backward pass recomputes them rather than keeping them for every block.
    mixed: Vec<f32>,
    hbuf: Vec<f32>,
    dx: Vec<f32>,
    dxn: Vec<f32>,
    dmixed: Vec<f32>,
    /// Gradients of the key, value and receptance `[3, M, C]`.
    dkvr: Vec<f32>,
    dy: Vec<f32>,
    dh: Vec<f32>,
    small: Vec<f32>,
    scratch: Vec<f32>,
}

impl Pass for Fused4 {
    type Work = Work;

    fn products(&self) -> &Products {
        &self.prod
    }

    fn products_mut(&mut self) -> &mut Products {
        &mut self.prod
    }

    fn vocab(&self) -> usize {
        self.ends.vocab
    }

    fn shape(w: &Work) -> (usize, usize) {
        (w.bs, w.t)
    }

    fn logits(w: &mut Work) -> &mut [f32] {
        &mut w.ends.logits
    }

    fn work(&self, bs: usize, t: usize) -> Work {
        let (c, m, f) = (self.c, bs * t, self.ffn);
        let z = |k: usize| vec![0f32; k];
        let layers = self
            .blocks
            .iter()
            .map(|_| Acts {
                hat1: z(m * c),
                rstd1: z(m),
                xn1: z(m * c),
                kvr: z(3 * m * c),
                state: z(3 * m * c),
                y: z(m * c),
                ry: z(m * c),
                hat2: z(m * c),
                rstd2: z(m),
                xn2: z(m * c),
                hpre: z(m * f),
                fkv: z(m * c),
                fr: z(m * c),
            })
            .collect();
        Work {
            bs,
            t,
            ends: self.ends.work(m),
            x: z(m * c),
            layers,
            cmix: z(5 * c),
            mixed: z(3 * m * c),
            hbuf: z(m * f),
            dx: z(m * c),
            dxn: z(m * c),
            dmixed: z(3 * m * c),
            dkvr: z(3 * m * c),
            dy: z(m * c),
            dh: z(m * f),
            small: z(3 * c),
            scratch: z(6 * c),
        }
    }

    fn forward(&self, p: &[&[f32]], pr: &Prepared, tokens: &[u32], w: &mut Work) {
        let (c, t) = (self.c, w.t);
        let m = w.bs * t;
        let mc = m * c;
        let pd = &self.prod;
        self.ends.embed(p, tokens, &mut w.ends, &mut w.x);
        for (bk, a) in self.blocks.iter().zip(w.layers.iter_mut()) {
            // Time mixing.
            let (l1w, l1b) = (p[bk.ln1.0], p[bk.ln1.1]);
            layer_norm(&w.x, l1w, l1b, &mut a.xn1, &mut a.hat1, &mut a.rstd1);
            complements(p, &bk.mix, &mut w.cmix[..3 * c]);
            let cm = [&w.cmix[..c], &w.cmix[c..2 * c], &w.cmix[2 * c..3 * c]];
            shift_fwd(&a.xn1, t, &cm, &mut w.mixed);
            let (k, rest) = a.kvr.split_at_mut(mc);
            let (v, r) = rest.split_at_mut(mc);
            pd.mw(&w.mixed[..mc], pr, bk.wk, m, k, false, None);
            pd.mw(&w.mixed[mc..2 * mc], pr, bk.wv, m, v, false, None);
            pd.mw(
                &w.mixed[2 * mc..],
                pr,
                bk.wr,
                m,
                r,
                false,
                Some(map_sigmoid),
            );
            let ins = wkv::Ins {
                t,
                k,
                v,
                decay: p[bk.decay],
                first: p[bk.first],
            };
            wkv::forward(&ins, &mut a.y, &mut a.state, &mut w.scratch);
            mul(r, &a.y, &mut a.ry);
            pd.mw(&a.ry, pr, bk.wo, m, &mut w.x, true, None);
            // Channel mixing.
            let (l2w, l2b) = (p[bk.ln2.0], p[bk.ln2.1]);
            layer_norm(&w.x, l2w, l2b, &mut a.xn2, &mut a.hat2, &mut a.rstd2);
            complements(p, &bk.fmix, &mut w.cmix[3 * c..]);
            let cm = [&w.cmix[3 * c..4 * c], &w.cmix[4 * c..]];
            shift_fwd(&a.xn2, t, &cm, &mut w.mixed[..2 * mc]);
            pd.mw(&w.mixed[..mc], pr, bk.fk, m, &mut a.hpre, false, None);
            dispatch!(relu_sq(&a.hpre, &mut w.hbuf));
            pd.mw(&w.hbuf, pr, bk.fv, m, &mut a.fkv, false, None);
            let xr = &w.mixed[mc..2 * mc];
            pd.mw(xr, pr, bk.fr, m, &mut a.fr, false, Some(map_sigmoid));
            mul_acc(&a.fr, &a.fkv, &mut w.x);
        }
        self.ends.head(pd, p, pr, &w.x, &mut w.ends);
    }

    fn backward(
        &self,
        p: &[&[f32]],
        pr: &Prepared,
        tokens: &[u32],
        w: &mut Work,
        g: &mut [Vec<f32>],
    ) {
        let (c, t) = (self.c, w.t);
        let m = w.bs * t;
        let mc = m * c;
        let pd = &self.prod;
        self.ends
            .head_back(pd, p, pr, &w.ends, g, &mut w.dxn, &mut w.dx);
        for (bk, a) in self.blocks.iter().zip(&w.layers).rev() {
            // Channel mixing: x += r ⊙ kv, r = σ(x_r W_r), kv = relu(x_k W_k)² W_v.
            complements(p, &bk.fmix, &mut w.cmix[3 * c..]);
            let cm = [&w.cmix[3 * c..4 * c], &w.cmix[4 * c..]];
            shift_fwd(&a.xn2, t, &cm, &mut w.mixed[..2 * mc]);
            dispatch!(relu_sq(&a.hpre, &mut w.hbuf));
            let (dkv, rest) = w.dkvr.split_at_mut(mc);
            let dr = &mut rest[mc..];
            mul(&w.dx, &a.fr, dkv);
            mul(&w.dx, &a.fkv, dr);
            dispatch!(sigmoid_back(&a.fr, dr));
            pd.lin_dw(pr, bk.fv, dkv, &w.hbuf, m, g);
            pd.mw_dx(dkv, pr, p, bk.fv, m, &mut w.dh, false);
            dispatch!(relu_sq_back(&a.hpre, &mut w.dh));
            let (xk, xr) = w.mixed[..2 * mc].split_at(mc);
            pd.lin_dw(pr, bk.fk, &w.dh, xk, m, g);
            pd.mw_dx(&w.dh, pr, p, bk.fk, m, &mut w.dmixed[..mc], false);
            pd.lin_dw(pr, bk.fr, dr, xr, m, g);
            pd.mw_dx(dr, pr, p, bk.fr, m, &mut w.dmixed[mc..2 * mc], false);
            let dm = &w.dmixed[..2 * mc];
            shift_back(&a.xn2, t, &cm, dm, &mut w.dxn, &mut w.small[..2 * c]);
            for (k, &ix) in bk.fmix.iter().enumerate() {
                sub(&mut g[ix], &w.small[k * c..(k + 1) * c]);
            }
            {
                let (gw, gb) = two(g, bk.ln2.0, bk.ln2.1);
                let (hat, rstd, lw) = (&a.hat2, &a.rstd2, p[bk.ln2.0]);
                layer_norm_back(&w.dxn, hat, rstd, lw, &mut w.dx, true, gw, gb);
            }
            // Time mixing: x += (r ⊙ y) W_o, y = wkv(k, v), r = σ(x_r W_r).
            pd.lin_dw(pr, bk.wo, &w.dx, &a.ry, m, g);
            pd.mw_dx(&w.dx, pr, p, bk.wo, m, &mut w.dxn, false);
            let (k, rest) = a.kvr.split_at(mc);
            let (vv, r) = rest.split_at(mc);
            let (dk, rest) = w.dkvr.split_at_mut(mc);
            let (dv, dr) = rest.split_at_mut(mc);
            mul(&w.dxn, r, &mut w.dy);
            mul(&w.dxn, &a.y, dr);
            dispatch!(sigmoid_back(r, dr));
            let ins = wkv::Ins {
                t,
                k,
                v: vv,
                decay: p[bk.decay],
                first: p[bk.first],
            };
            let (gd, gf) = two(g, bk.decay, bk.first);
            let grads = wkv::Grads {
                dk,
                dv,
                ddecay: gd,
                dfirst: gf,
            };
            wkv::backward(&ins, &a.y, &a.state, &w.dy, grads, &mut w.scratch);
            complements(p, &bk.mix, &mut w.cmix[..3 * c]);
            let cm = [&w.cmix[..c], &w.cmix[c..2 * c], &w.cmix[2 * c..3 * c]];
            shift_fwd(&a.xn1, t, &cm, &mut w.mixed);
            for (k, (&wi, d)) in [bk.wk, bk.wv, bk.wr]
                .iter()
                .zip(w.dkvr.chunks_exact(mc))
                .enumerate()
            {
                let x = &w.mixed[k * mc..(k + 1) * mc];
                pd.lin_dw(pr, wi, d, x, m, g);
                pd.mw_dx(d, pr, p, wi, m, &mut w.dmixed[k * mc..(k + 1) * mc], false);
            }
            shift_back(&a.xn1, t, &cm, &w.dmixed, &mut w.dxn, &mut w.small);
            for (k, &ix) in bk.mix.iter().enumerate() {
                sub(&mut g[ix], &w.small[k * c..(k + 1) * c]);
            }
            let (gw, gb) = two(g, bk.ln1.0, bk.ln1.1);
            let (hat, rstd, lw) = (&a.hat1, &a.rstd1, p[bk.ln1.0]);
            layer_norm_back(&w.dxn, hat, rstd, lw, &mut w.dx, true, gw, gb);
        }
        self.ends
            .embed_back(p, tokens, &w.ends, &w.dx, &mut w.dxn, g);
    }
}

/// `out = a ⊙ b`.
fn mul(a: &[f32], b: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn body(a: &[f32], b: &[f32], out: &mut [f32]) {
        for i in 0..out.len() {
            out[i] = a[i] * b[i];
        }
    }
    dispatch!(body(a, b, out))
}

/// `y += a ⊙ b`.
fn mul_acc(a: &[f32], b: &[f32], y: &mut [f32]) {
    #[inline(always)]
    fn body(a: &[f32], b: &[f32], y: &mut [f32]) {
        for i in 0..y.len() {
            y[i] += a[i] * b[i];
        }
    }
    dispatch!(body(a, b, y))
}

#[cfg(all(test, feature = "graph"))]
mod tests {
    use super::*;
    use crate::pass::oracle::{self, Case};
    use rwkv_core::init::InitSpec;

    /// The hand-written pass gives the candle graph's loss and every gradient (the WKV's,
    /// the mixes' and the norms' included) on a 3-block model with random weights, in windows
    /// of 21 tokens.
    #[test]
    fn matches_the_graph() {
        let case = Case::new(&InitSpec {
            arch: Generation::V4,
            n_layer: 3,
            n_embd: 40,
            vocab: 50,
            head_size: 0,
            positions: 0,
            seed: 7,
        });
        let f = Fused4::new(&case.params).unwrap();
        let (loss, g) = oracle::run(&f, &case);
        let worst = case.check(loss, &g, 1e-4);
        eprintln!("largest relative gradient error {worst:?}");
    }
}
