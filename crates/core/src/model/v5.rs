//! RWKV-5.2 "Eagle": multi-headed matrix-valued state.
//!
//! Per head, the state `S[key i, value j]` decays by a learned per-channel `w` each token;
//! the output reads `S` (plus a bonus `u` for the current token) with the receptance, then
//! GroupNorm and a SiLU gate. Channel mixing is v4's. See `tests/fixtures/README.md`.

use super::common::{wkv5_attend, GatedFfn, MixKind};
use super::{buf, token_shift, Io, Loader, Norm, Scratch, Seq, Slot};
use crate::checkpoint::ModelInfo;
use crate::error::Result;
use crate::kernels::matmul;
use crate::tensor::Matrix;

struct Layer {
    ln1: Norm,
    ln2: Norm,
    mix_k: Vec<f32>,
    mix_v: Vec<f32>,
    mix_r: Vec<f32>,
    mix_g: Vec<f32>,
    /// `exp(-exp(time_decay))`, precomputed at load.
    w: Vec<f32>,
    u: Vec<f32>,
    wr: Matrix,
    wk: Matrix,
    wv: Matrix,
    wg: Matrix,
    wo: Matrix,
    ln_x: Norm,
    ffn: GatedFfn,
}

/// An RWKV-5.2 model.
pub struct V5 {
    pub(crate) info: ModelInfo,
    pub(crate) io: Io,
    layers: Vec<Layer>,
}

impl V5 {
    pub(crate) fn load(ld: &mut Loader, info: ModelInfo) -> Result<V5> {
        let io = Io::load(ld)?;
        let mut layers = Vec::with_capacity(info.n_layer);
        for i in 0..info.n_layer {
            let p = format!("blocks.{i}.att.");
            let decay = ld.vec(&format!("{p}time_decay"))?;
            layers.push(Layer {
                ln1: Norm::load(ld, &format!("blocks.{i}.ln1"))?,
                ln2: Norm::load(ld, &format!("blocks.{i}.ln2"))?,
                mix_k: ld.vec(&format!("{p}time_mix_k"))?,
                mix_v: ld.vec(&format!("{p}time_mix_v"))?,
                mix_r: ld.vec(&format!("{p}time_mix_r"))?,
                mix_g: ld.vec(&format!("{p}time_mix_g"))?,
                w: decay.iter().map(|d| (-d.exp()).exp()).collect(),
                u: ld.vec(&format!("{p}time_faaaa"))?,
                wr: ld.matrix(&format!("{p}receptance.weight"))?,
                wk: ld.matrix(&format!("{p}key.weight"))?,
                wv: ld.matrix(&format!("{p}value.weight"))?,
                wg: ld.matrix(&format!("{p}gate.weight"))?,
                wo: ld.matrix(&format!("{p}output.weight"))?,
                ln_x: Norm::load(ld, &format!("{p}ln_x"))?,
                ffn: GatedFfn::load(ld, i, MixKind::Mix)?,
            });
        }
        Ok(V5 { info, io, layers })
    }

    /// Each layer's constant per-channel decay factor `exp(-exp(time_decay))`.
    pub(crate) fn decay_factors(&self) -> Vec<Vec<f32>> {
        self.layers.iter().map(|l| l.w.clone()).collect()
    }

    pub(crate) fn bytes_per_token(&self) -> usize {
        self.io.bytes_per_token()
            + self
                .layers
                .iter()
                .map(|l| {
                    l.wr.bytes()
                        + l.wk.bytes()
                        + l.wv.bytes()
                        + l.wg.bytes()
                        + l.wo.bytes()
                        + l.ffn.bytes()
                })
                .sum::<usize>()
    }

    /// Runs the concatenated `tokens` of `seqs` through the model.
    pub(crate) fn run(&self, tokens: &[u32], seqs: &mut [Seq<'_>], sc: &mut Scratch) {
        let t = tokens.len();
        let c = self.info.n_embd;
        let (nh, n) = (self.info.n_head, self.info.head_size);
        let f = self.info.ffn_dim;
        let [bx, bxn, bxk, bxv, bxr, bxg, br, bk, bv, bg, by, bo, bhid, btmp] = sc.bufs::<14>();
        let x = buf(bx, t * c);
        let xn = buf(bxn, t * c);
        let (xk, xv, xr, xg) = (
            buf(bxk, t * c),
            buf(bxv, t * c),
            buf(bxr, t * c),
            buf(bxg, t * c),
        );
        let (r, k, v, g) = (
            buf(br, t * c),
            buf(bk, t * c),
            buf(bv, t * c),
            buf(bg, t * c),
        );
        let (y, o) = (buf(by, t * c), buf(bo, t * c));
        let hid = buf(bhid, t * f);

        self.io.embed(tokens, x, &mut o[..c]);
        for (li, l) in self.layers.iter().enumerate() {
            // ---- time mixing ----
            l.ln1.rows(x, xn);
            token_shift(xn, c, seqs, (li, Slot::AttShift), |row, cur, prev| {
                for j in 0..c {
                    let (xc, p) = (cur[j], prev[j]);
                    let i = row * c + j;
                    xk[i] = MixKind::Mix.apply(xc, p, l.mix_k[j]);
                    xv[i] = MixKind::Mix.apply(xc, p, l.mix_v[j]);
                    xr[i] = MixKind::Mix.apply(xc, p, l.mix_r[j]);
                    xg[i] = MixKind::Mix.apply(xc, p, l.mix_g[j]);
                }
            });
            matmul(&l.wr, xr, t, r);
            matmul(&l.wk, xk, t, k);
            matmul(&l.wv, xv, t, v);
            matmul(&l.wg, xg, t, g);
            let ins = [&*r, &*k, &*v, &l.w[..]];
            wkv5_attend(seqs, li, ins, &l.u, g, &l.ln_x, &l.wo, x, y, o, nh, n);
            // ---- channel mixing ----
            l.ffn.run(&l.ln2, x, seqs, li, xn, xk, xr, r, o, hid);
        }
        self.io.logits(x, seqs, bxn, btmp);
    }
}
