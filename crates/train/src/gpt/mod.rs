//! The Transformer baseline's training pass, written out by hand like the RWKV ones: nanoGPT's
//! architecture ([`rwkv_core::schema::gpt`]) over a shard of windows, every buffer allocated
//! once. Per block:
//!
//! - attention: `x += (softmax(q·kᵀ/√N + causal mask)·v) W_projᵀ` per head, where
//!   `[q k v] = ln_1(x) W_attnᵀ`;
//! - MLP: `x += gelu(ln_2(x) W_fcᵀ) W_fc_projᵀ`.
//!
//! The input is `wte[token] + wpe[position in the window]`, the logits `ln_f(x)·wteᵀ` (the
//! head tied to the embedding, so `wte`'s gradient has both parts). The norms have no bias.
//! `tests::matches_the_graph` checks the loss and every gradient against a candle graph of
//! the same model.

// Index loops over several parallel per-channel arrays read more clearly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use crate::common::dispatch;
use crate::params::Params;
use crate::pass::kernels::{add, dot, layer_norm, layer_norm_back};
use crate::pass::products::{Prepared, Products};
use crate::pass::Pass;
use rwkv_core::checkpoint::Generation;
use rwkv_core::error::{Error, Result};
use rwkv_core::kernels::{erf, exp, gelu};
use rwkv_core::schema::gpt::{block, LN_F, WPE, WTE};

/// Where one block's parameters are in the parameter list.
struct Block {
    ln1: usize,
    attn: usize,
    proj: usize,
    ln2: usize,
    fc: usize,
    fc_proj: usize,
}

/// The shapes of a Transformer and where its parameters are, for the hand-written pass.
pub struct FusedGpt {
    c: usize,
    ffn: usize,
    head_size: usize,
    vocab: usize,
    positions: usize,
    wte: usize,
    wpe: usize,
    ln_f: usize,
    blocks: Vec<Block>,
    /// The norms' bias (there is none: zeros).
    zeros: Vec<f32>,
    prod: Products,
}

impl FusedGpt {
    /// The pass for the Transformer `p`.
    pub fn new(p: &Params) -> Result<FusedGpt> {
        let d = p.schema();
        if d.generation != Generation::Gpt {
            return Err(Error::bad(format!(
                "{:?} is not the Transformer",
                d.generation
            )));
        }
        let blocks = (0..d.n_layer)
            .map(|i| {
                let f = |s: &str| p.find(&format!("{}{s}", block(i)));
                Ok(Block {
                    ln1: f("ln_1.weight")?,
                    attn: f("attn.c_attn.weight")?,
                    proj: f("attn.c_proj.weight")?,
                    ln2: f("ln_2.weight")?,
                    fc: f("mlp.c_fc.weight")?,
                    fc_proj: f("mlp.c_proj.weight")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FusedGpt {
            c: d.n_embd,
            ffn: d.ffn_dim,
            head_size: d.head_size,
            vocab: d.vocab,
            positions: d.positions,
            wte: p.find(WTE)?,
            wpe: p.find(WPE)?,
            ln_f: p.find(LN_F)?,
            blocks,
            zeros: vec![0.0; d.n_embd],
            prod: Products::new(p)?,
        })
    }
}

/// One block's saved activations.
struct Acts {
    hat1: Vec<f32>,
    rstd1: Vec<f32>,
    xn1: Vec<f32>,
    /// `[M, 3C]`: queries, keys, values.
    qkv: Vec<f32>,
    /// The attention weights `[windows, heads, T, T]` (zero above the diagonal).
    att: Vec<f32>,
    /// The heads' outputs `[M, C]`, the projection's input.
    y: Vec<f32>,
    hat2: Vec<f32>,
    rstd2: Vec<f32>,
    xn2: Vec<f32>,
    /// The MLP's hidden layer before the GELU `[M, F]`.
    u: Vec<f32>,
}

/// Every buffer of one shard's forward and backward pass, allocated once.
pub struct Work {
    bs: usize,
    t: usize,
    /// The residual stream `[M, C]`.
    x: Vec<f32>,
    layers: Vec<Acts>,
    hat_f: Vec<f32>,
    rstd_f: Vec<f32>,
    xf: Vec<f32>,
    /// `[M, V]`: the logits, then their gradient.
    logits: Vec<f32>,
    /// The GELU's output (recomputed in the backward pass), then its gradient `[M, F]`.
    hbuf: Vec<f32>,
    dx: Vec<f32>,
    dxn: Vec<f32>,
    dy: Vec<f32>,
    dqkv: Vec<f32>,
    /// One row of the attention weights' gradient.
    drow: Vec<f32>,
    /// The gradient of the norms' (absent) bias, discarded.
    dbias: Vec<f32>,
}

impl Pass for FusedGpt {
    type Work = Work;

    fn products(&self) -> &Products {
        &self.prod
    }

    fn products_mut(&mut self) -> &mut Products {
        &mut self.prod
    }

    fn vocab(&self) -> usize {
        self.vocab
    }

    fn shape(w: &Work) -> (usize, usize) {
        (w.bs, w.t)
    }

    fn logits(w: &mut Work) -> &mut [f32] {
        &mut w.logits
    }

    fn work(&self, bs: usize, t: usize) -> Work {
        assert!(t <= self.positions, "windows longer than the positions");
        let (c, m, f) = (self.c, bs * t, self.ffn);
        let h = c / self.head_size;
        let z = |k: usize| vec![0f32; k];
        let layers = self
            .blocks
            .iter()
            .map(|_| Acts {
                hat1: z(m * c),
                rstd1: z(m),
                xn1: z(m * c),
                qkv: z(3 * m * c),
                att: z(bs * h * t * t),
                y: z(m * c),
                hat2: z(m * c),
                rstd2: z(m),
                xn2: z(m * c),
                u: z(m * f),
            })
            .collect();
        Work {
            bs,
            t,
            x: z(m * c),
            layers,
            hat_f: z(m * c),
            rstd_f: z(m),
            xf: z(m * c),
            logits: z(m * self.vocab),
            hbuf: z(m * f),
            dx: z(m * c),
            dxn: z(m * c),
            dy: z(m * c),
            dqkv: z(3 * m * c),
            drow: z(t),
            dbias: z(c),
        }
    }

    fn forward(&self, p: &[&[f32]], pr: &Prepared, tokens: &[u32], w: &mut Work) {
        let (c, t) = (self.c, w.t);
        let m = w.bs * t;
        let pd = &self.prod;
        for (r, &tok) in tokens.iter().enumerate() {
            let (tok, pos) = (tok as usize, r % t);
            let xr = &mut w.x[r * c..(r + 1) * c];
            xr.copy_from_slice(&p[self.wte][tok * c..(tok + 1) * c]);
            add(xr, &p[self.wpe][pos * c..(pos + 1) * c]);
        }
        for (bk, a) in self.blocks.iter().zip(w.layers.iter_mut()) {
            layer_norm(
                &w.x,
                p[bk.ln1],
                &self.zeros,
                &mut a.xn1,
                &mut a.hat1,
                &mut a.rstd1,
            );
            pd.mw(&a.xn1, pr, bk.attn, m, &mut a.qkv, false, None);
            dispatch!(attention(
                &a.qkv,
                c,
                self.head_size,
                t,
                &mut a.att,
                &mut a.y
            ));
            pd.mw(&a.y, pr, bk.proj, m, &mut w.x, true, None);
            layer_norm(
                &w.x,
                p[bk.ln2],
                &self.zeros,
                &mut a.xn2,
                &mut a.hat2,
                &mut a.rstd2,
            );
            pd.mw(&a.xn2, pr, bk.fc, m, &mut a.u, false, None);
            dispatch!(map_gelu(&a.u, &mut w.hbuf));
            pd.mw(&w.hbuf, pr, bk.fc_proj, m, &mut w.x, true, None);
        }
        layer_norm(
            &w.x,
            p[self.ln_f],
            &self.zeros,
            &mut w.xf,
            &mut w.hat_f,
            &mut w.rstd_f,
        );
        pd.mw(&w.xf, pr, self.wte, m, &mut w.logits, false, None);
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
        let pd = &self.prod;
        // The head (the embedding, read as a matrix) and ln_f.
        pd.lin_dw(pr, self.wte, &w.logits, &w.xf, m, g);
        pd.mw_dx(&w.logits, pr, p, self.wte, m, &mut w.dxn, false);
        let (hat, rstd) = (&w.hat_f, &w.rstd_f);
        layer_norm_back(
            &w.dxn,
            hat,
            rstd,
            p[self.ln_f],
            &mut w.dx,
            false,
            &mut g[self.ln_f],
            &mut w.dbias,
        );
        for (bk, a) in self.blocks.iter().zip(&w.layers).rev() {
            // MLP: x += gelu(u) W_fc_projᵀ, u = ln_2(x) W_fcᵀ.
            dispatch!(map_gelu(&a.u, &mut w.hbuf));
            pd.lin_dw(pr, bk.fc_proj, &w.dx, &w.hbuf, m, g);
            pd.mw_dx(&w.dx, pr, p, bk.fc_proj, m, &mut w.hbuf, false);
            dispatch!(gelu_back(&a.u, &mut w.hbuf));
            pd.lin_dw(pr, bk.fc, &w.hbuf, &a.xn2, m, g);
            pd.mw_dx(&w.hbuf, pr, p, bk.fc, m, &mut w.dxn, false);
            let (hat, rstd) = (&a.hat2, &a.rstd2);
            layer_norm_back(
                &w.dxn,
                hat,
                rstd,
                p[bk.ln2],
                &mut w.dx,
                true,
                &mut g[bk.ln2],
                &mut w.dbias,
            );
            // Attention: x += y W_projᵀ, y = attention(ln_1(x) W_attnᵀ).
            pd.lin_dw(pr, bk.proj, &w.dx, &a.y, m, g);
            pd.mw_dx(&w.dx, pr, p, bk.proj, m, &mut w.dy, false);
            let n = self.head_size;
            dispatch!(attention_back(
                &a.qkv,
                c,
                n,
                t,
                &a.att,
                &w.dy,
                &mut w.dqkv,
                &mut w.drow
            ));
            pd.lin_dw(pr, bk.attn, &w.dqkv, &a.xn1, m, g);
            pd.mw_dx(&w.dqkv, pr, p, bk.attn, m, &mut w.dxn, false);
            let (hat, rstd) = (&a.hat1, &a.rstd1);
            layer_norm_back(
                &w.dxn,
                hat,
                rstd,
                p[bk.ln1],
                &mut w.dx,
                true,
                &mut g[bk.ln1],
                &mut w.dbias,
            );
        }
        for (r, &tok) in tokens.iter().enumerate() {
            let (tok, pos) = (tok as usize, r % t);
            let d = &w.dx[r * c..(r + 1) * c];
            // A frozen embedding has no gradient buffer.
            if !g[self.wte].is_empty() {
                add(&mut g[self.wte][tok * c..(tok + 1) * c], d);
            }
            add(&mut g[self.wpe][pos * c..(pos + 1) * c], d);
        }
    }
}

/// `y = gelu(u)`.
#[inline(always)]
fn map_gelu(u: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(u).for_each(|(y, &u)| *y = gelu(u));
}

/// `d ← d · gelu'(u)`, where `gelu'(u) = Φ(u) + u·φ(u)`.
#[inline(always)]
fn gelu_back(u: &[f32], d: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    d.iter_mut().zip(u).for_each(|(d, &u)| {
        let cdf = 0.5 * (1.0 + erf(u * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * exp(-0.5 * u * u);
        *d *= cdf + u * pdf;
    });
}

/// Causal softmax attention of every window of `t` rows and every head of size `n`: from the
/// queries, keys and values side by side in `qkv [M, 3C]`, the weights into `att` and the
/// heads' outputs into `y [M, C]`.
#[inline(always)]
fn attention(qkv: &[f32], c: usize, n: usize, t: usize, att: &mut [f32], y: &mut [f32]) {
    let (rows, h) = (qkv.len() / (3 * c), c / n);
    let scale = 1.0 / (n as f32).sqrt();
    y.fill(0.0);
    for b in 0..rows / t {
        for hh in 0..h {
            let a = &mut att[(b * h + hh) * t * t..][..t * t];
            for i in 0..t {
                let ri = b * t + i;
                let q = &qkv[ri * 3 * c + hh * n..][..n];
                let row = &mut a[i * t..(i + 1) * t];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..=i {
                    let k = &qkv[(b * t + j) * 3 * c + c + hh * n..][..n];
                    row[j] = dot(q, k) * scale;
                    mx = mx.max(row[j]);
                }
                let mut s = 0.0;
                for j in 0..=i {
                    row[j] = exp(row[j] - mx);
                    s += row[j];
                }
                let inv = 1.0 / s;
                row[..=i].iter_mut().for_each(|z| *z *= inv);
                row[i + 1..].fill(0.0);
                let yi = &mut y[ri * c + hh * n..][..n];
                for j in 0..=i {
                    let v = &qkv[(b * t + j) * 3 * c + 2 * c + hh * n..][..n];
                    let wj = row[j];
                    yi.iter_mut().zip(v).for_each(|(y, &v)| *y += wj * v);
                }
            }
        }
    }
}

/// The backward pass of [`attention`] from the heads' output gradient `dy [M, C]`: sets
/// `dqkv [M, 3C]` (`drow` holds one row of the weights' gradient).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attention_back(
    qkv: &[f32],
    c: usize,
    n: usize,
    t: usize,
    att: &[f32],
    dy: &[f32],
    dqkv: &mut [f32],
    drow: &mut [f32],
) {
    let (rows, h) = (qkv.len() / (3 * c), c / n);
    let scale = 1.0 / (n as f32).sqrt();
    dqkv.fill(0.0);
    for b in 0..rows / t {
        for hh in 0..h {
            let a = &att[(b * h + hh) * t * t..][..t * t];
            for i in 0..t {
                let ri = b * t + i;
                let row = &a[i * t..(i + 1) * t];
                let dyi = &dy[ri * c + hh * n..][..n];
                // dV_j += a_ij·dy_i; da_ij = dy_i·v_j.
                let mut sum = 0.0;
                for j in 0..=i {
                    let vo = (b * t + j) * 3 * c + 2 * c + hh * n;
                    drow[j] = dot(dyi, &qkv[vo..vo + n]);
                    sum += drow[j] * row[j];
                    let wj = row[j];
                    let dv = &mut dqkv[vo..vo + n];
                    dv.iter_mut().zip(dyi).for_each(|(d, &g)| *d += wj * g);
                }
                // dS_ij = a_ij·(da_ij − Σ_k a_ik·da_ik); dq_i += s·dS_ij·k_j, dk_j += s·dS_ij·q_i.
                let qo = ri * 3 * c + hh * n;
                for j in 0..=i {
                    let ds = row[j] * (drow[j] - sum) * scale;
                    let ko = (b * t + j) * 3 * c + c + hh * n;
                    for l in 0..n {
                        dqkv[qo + l] += ds * qkv[ko + l];
                        dqkv[ko + l] += ds * qkv[qo + l];
                    }
                }
            }
        }
    }
}

#[cfg(all(test, feature = "graph"))]
mod tests;
