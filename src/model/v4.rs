//! RWKV-4, the architecture of the original paper.
//!
//! Time mixing keeps, per channel, a numerically stable running weighted average of past
//! values: numerator `aa`, denominator `bb` and a shared exponent `pp`, with decay
//! `w = -exp(time_decay)` and a bonus `u = time_first` for the current token. Channel mixing is
//! `sigmoid(r) · (relu(k)² W_v)`. See `tests/fixtures/README.md` for the full formulas.

use super::{buf, Io, Loader, Logits, Norm, State};
use crate::checkpoint::ModelInfo;
use crate::error::Result;
use crate::kernels::{matmul, sigmoid, Layout, Matrix};

struct Layer {
    ln1: Norm,
    ln2: Norm,
    /// `-exp(time_decay)`, precomputed at load.
    w: Vec<f32>,
    u: Vec<f32>,
    mix_k: Vec<f32>,
    mix_v: Vec<f32>,
    mix_r: Vec<f32>,
    wk: Matrix,
    wv: Matrix,
    wr: Matrix,
    wo: Matrix,
    ffn_mix_k: Vec<f32>,
    ffn_mix_r: Vec<f32>,
    ffn_key: Matrix,
    ffn_recept: Matrix,
    ffn_value: Matrix,
}

/// An RWKV-4 model.
pub struct V4 {
    pub(crate) info: ModelInfo,
    io: Io,
    layers: Vec<Layer>,
}

impl V4 {
    pub(crate) fn load(ld: &mut Loader, info: ModelInfo) -> Result<V4> {
        let c = info.n_embd;
        let f = info.ffn_dim;
        let io = Io::load(ld, &info)?;
        let mut layers = Vec::with_capacity(info.n_layer);
        for i in 0..info.n_layer {
            let p = format!("blocks.{i}.att.");
            let q = format!("blocks.{i}.ffn.");
            let cv = [1, 1, c];
            let decay = ld.vec(&format!("{p}time_decay"), &[c])?;
            layers.push(Layer {
                ln1: Norm::load(ld, &format!("blocks.{i}.ln1"), c)?,
                ln2: Norm::load(ld, &format!("blocks.{i}.ln2"), c)?,
                w: decay.iter().map(|d| -d.exp()).collect(),
                u: ld.vec(&format!("{p}time_first"), &[c])?,
                mix_k: ld.vec(&format!("{p}time_mix_k"), &cv)?,
                mix_v: ld.vec(&format!("{p}time_mix_v"), &cv)?,
                mix_r: ld.vec(&format!("{p}time_mix_r"), &cv)?,
                wk: ld.matrix(&format!("{p}key.weight"), c, c, Layout::OutIn)?,
                wv: ld.matrix(&format!("{p}value.weight"), c, c, Layout::OutIn)?,
                wr: ld.matrix(&format!("{p}receptance.weight"), c, c, Layout::OutIn)?,
                wo: ld.matrix(&format!("{p}output.weight"), c, c, Layout::OutIn)?,
                ffn_mix_k: ld.vec(&format!("{q}time_mix_k"), &cv)?,
                ffn_mix_r: ld.vec(&format!("{q}time_mix_r"), &cv)?,
                ffn_key: ld.matrix(&format!("{q}key.weight"), c, f, Layout::OutIn)?,
                ffn_recept: ld.matrix(&format!("{q}receptance.weight"), c, c, Layout::OutIn)?,
                ffn_value: ld.matrix(&format!("{q}value.weight"), f, c, Layout::OutIn)?,
            });
        }
        Ok(V4 { info, io, layers })
    }

    pub(crate) fn bytes_per_token(&self) -> usize {
        self.io.bytes_per_token()
            + self
                .layers
                .iter()
                .map(|l| {
                    [
                        &l.wk,
                        &l.wv,
                        &l.wr,
                        &l.wo,
                        &l.ffn_key,
                        &l.ffn_recept,
                        &l.ffn_value,
                    ]
                    .iter()
                    .map(|m| m.bytes())
                    .sum::<usize>()
                })
                .sum::<usize>()
    }

    /// Runs `tokens` through the model from `state`, writing the requested logits to `out`.
    pub(crate) fn chunk(&self, tokens: &[u32], state: &mut State, which: Logits, out: &mut [f32]) {
        let t = tokens.len();
        if t == 0 {
            return;
        }
        let c = self.info.n_embd;
        let f = self.info.ffn_dim;
        let mut sc = std::mem::take(&mut state.scratch);
        if sc.len() < 10 {
            sc.resize_with(10, Vec::new);
        }
        let [x, xn, xk, xv, xr, r, k, v, o, hid] =
            <&mut [Vec<f32>; 10]>::try_from(&mut sc[..10]).expect("10 buffers");
        let x = buf(x, t * c);
        let xn = buf(xn, t * c);
        let (xk, xv, xr) = (buf(xk, t * c), buf(xv, t * c), buf(xr, t * c));
        let (r, k, v, o) = (buf(r, t * c), buf(k, t * c), buf(v, t * c), buf(o, t * c));
        let hid = buf(hid, t * f);

        self.io.embed(tokens, x, &mut o[..c]);
        for (li, l) in self.layers.iter().enumerate() {
            let s = &mut state.tensors[5 * li..5 * li + 5];
            let [att_prev, aa, bb, pp, ffn_prev] = s else {
                unreachable!("v4 state has 5 tensors per layer")
            };
            // ---- time mixing ----
            l.ln1.rows(x, xn);
            for ti in 0..t {
                let cur = &xn[ti * c..(ti + 1) * c];
                let prev: &[f32] = if ti == 0 {
                    att_prev
                } else {
                    &xn[(ti - 1) * c..ti * c]
                };
                for j in 0..c {
                    let (xc, p) = (cur[j], prev[j]);
                    xk[ti * c + j] = xc * l.mix_k[j] + p * (1.0 - l.mix_k[j]);
                    xv[ti * c + j] = xc * l.mix_v[j] + p * (1.0 - l.mix_v[j]);
                    xr[ti * c + j] = xc * l.mix_r[j] + p * (1.0 - l.mix_r[j]);
                }
            }
            att_prev.copy_from_slice(&xn[(t - 1) * c..t * c]);
            matmul(&l.wr, xr, t, r);
            matmul(&l.wk, xk, t, k);
            matmul(&l.wv, xv, t, v);
            // The WKV scan: the only part that runs token by token.
            for ti in 0..t {
                let row = ti * c..(ti + 1) * c;
                let (kr, vr, rr) = (&k[row.clone()], &v[row.clone()], &mut r[row]);
                for j in 0..c {
                    let (kj, vj) = (kr[j], vr[j]);
                    let ww = l.u[j] + kj;
                    let p = pp[j].max(ww);
                    let e1 = (pp[j] - p).exp();
                    let e2 = (ww - p).exp();
                    let wkv = (e1 * aa[j] + e2 * vj) / (e1 * bb[j] + e2);
                    let ww = l.w[j] + pp[j];
                    let p = ww.max(kj);
                    let e1 = (ww - p).exp();
                    let e2 = (kj - p).exp();
                    aa[j] = e1 * aa[j] + e2 * vj;
                    bb[j] = e1 * bb[j] + e2;
                    pp[j] = p;
                    rr[j] = sigmoid(rr[j]) * wkv;
                }
            }
            matmul(&l.wo, r, t, o);
            for i in 0..t * c {
                x[i] += o[i];
            }
            // ---- channel mixing ----
            l.ln2.rows(x, xn);
            for ti in 0..t {
                let cur = &xn[ti * c..(ti + 1) * c];
                let prev: &[f32] = if ti == 0 {
                    ffn_prev
                } else {
                    &xn[(ti - 1) * c..ti * c]
                };
                for j in 0..c {
                    let (xc, p) = (cur[j], prev[j]);
                    xk[ti * c + j] = xc * l.ffn_mix_k[j] + p * (1.0 - l.ffn_mix_k[j]);
                    xr[ti * c + j] = xc * l.ffn_mix_r[j] + p * (1.0 - l.ffn_mix_r[j]);
                }
            }
            ffn_prev.copy_from_slice(&xn[(t - 1) * c..t * c]);
            matmul(&l.ffn_recept, xr, t, r);
            matmul(&l.ffn_key, xk, t, hid);
            hid.iter_mut().for_each(|z| {
                let q = z.max(0.0);
                *z = q * q
            });
            matmul(&l.ffn_value, hid, t, o);
            for i in 0..t * c {
                x[i] += sigmoid(r[i]) * o[i];
            }
        }
        self.io.logits(x, t, which, xn, out);
        state.scratch = sc;
    }
}
