//! RWKV-4, the architecture of the original paper.
//!
//! Time mixing keeps, per channel, a numerically stable running weighted average of past
//! values: numerator `aa`, denominator `bb` and a shared exponent `pp`, with decay
//! `w = -exp(time_decay)` and a bonus `u = time_first` for the current token. Channel mixing is
//! `sigmoid(r) · (relu(k)² W_v)`. See `tests/fixtures/README.md` for the full formulas.

use super::common::{GatedFfn, MixKind};
use super::{buf, per_seq, token_shift, Io, Loader, Norm, Scratch, Seq, Slot};
use crate::checkpoint::ModelInfo;
use crate::error::Result;
use crate::kernels::{matmul, sigmoid};
use crate::tensor::Matrix;

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
    ffn: GatedFfn,
}

/// An RWKV-4 model.
pub struct V4 {
    pub(crate) info: ModelInfo,
    pub(crate) io: Io,
    layers: Vec<Layer>,
}

impl V4 {
    pub(crate) fn load(ld: &mut Loader, info: ModelInfo) -> Result<V4> {
        let io = Io::load(ld)?;
        let mut layers = Vec::with_capacity(info.n_layer);
        for i in 0..info.n_layer {
            let p = format!("blocks.{i}.att.");
            let decay = ld.vec(&format!("{p}time_decay"))?;
            layers.push(Layer {
                ln1: Norm::load(ld, &format!("blocks.{i}.ln1"))?,
                ln2: Norm::load(ld, &format!("blocks.{i}.ln2"))?,
                w: decay.iter().map(|d| -d.exp()).collect(),
                u: ld.vec(&format!("{p}time_first"))?,
                mix_k: ld.vec(&format!("{p}time_mix_k"))?,
                mix_v: ld.vec(&format!("{p}time_mix_v"))?,
                mix_r: ld.vec(&format!("{p}time_mix_r"))?,
                wk: ld.matrix(&format!("{p}key.weight"))?,
                wv: ld.matrix(&format!("{p}value.weight"))?,
                wr: ld.matrix(&format!("{p}receptance.weight"))?,
                wo: ld.matrix(&format!("{p}output.weight"))?,
                ffn: GatedFfn::load(ld, i, MixKind::Mix)?,
            });
        }
        Ok(V4 { info, io, layers })
    }

    /// Each layer's constant per-channel decay factor `exp(-exp(time_decay))`.
    pub(crate) fn decay_factors(&self) -> Vec<Vec<f32>> {
        self.layers
            .iter()
            .map(|l| l.w.iter().map(|w| w.exp()).collect())
            .collect()
    }

    pub(crate) fn bytes_per_token(&self) -> usize {
        self.io.bytes_per_token()
            + self
                .layers
                .iter()
                .map(|l| l.wk.bytes() + l.wv.bytes() + l.wr.bytes() + l.wo.bytes() + l.ffn.bytes())
                .sum::<usize>()
    }

    /// Runs the concatenated `tokens` of `seqs` through the model.
    pub(crate) fn run(&self, tokens: &[u32], seqs: &mut [Seq<'_>], sc: &mut Scratch) {
        let t = tokens.len();
        let c = self.info.n_embd;
        let f = self.info.ffn_dim;
        let [bx, bxn, bxk, bxv, bxr, br, bk, bv, bo, bhid, btmp] = sc.bufs::<11>();
        let x = buf(bx, t * c);
        let xn = buf(bxn, t * c);
        let (xk, xv, xr) = (buf(bxk, t * c), buf(bxv, t * c), buf(bxr, t * c));
        let (r, k, v, o) = (
            buf(br, t * c),
            buf(bk, t * c),
            buf(bv, t * c),
            buf(bo, t * c),
        );
        let hid = buf(bhid, t * f);

        self.io.embed(tokens, x, &mut o[..c]);
        for (li, l) in self.layers.iter().enumerate() {
            // ---- time mixing ----
            l.ln1.rows(x, xn);
            token_shift(xn, c, seqs, (li, Slot::AttShift), |row, cur, prev| {
                for j in 0..c {
                    let (xc, p) = (cur[j], prev[j]);
                    xk[row * c + j] = xc * l.mix_k[j] + p * (1.0 - l.mix_k[j]);
                    xv[row * c + j] = xc * l.mix_v[j] + p * (1.0 - l.mix_v[j]);
                    xr[row * c + j] = xc * l.mix_r[j] + p * (1.0 - l.mix_r[j]);
                }
            });
            matmul(&l.wr, xr, t, r);
            matmul(&l.wk, xk, t, k);
            matmul(&l.wv, xv, t, v);
            // The WKV scan: the only part that runs token by token, per sequence (the
            // sequences of a batch in parallel); it turns each row of r into its output.
            per_seq(seqs, c, r, |s, rs| {
                let [aa, bb, pp] = s.state.v4_wkv_mut(li);
                for (ti, rr) in rs.chunks_mut(c).enumerate() {
                    let row = (s.row0 + ti) * c..(s.row0 + ti + 1) * c;
                    let (kr, vr) = (&k[row.clone()], &v[row]);
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
            });
            matmul(&l.wo, r, t, o);
            for i in 0..t * c {
                x[i] += o[i];
            }
            // ---- channel mixing ----
            l.ffn.run(&l.ln2, x, seqs, li, xn, xk, xr, r, o, hid);
        }
        self.io.logits(x, seqs, bxn, btmp);
    }
}
