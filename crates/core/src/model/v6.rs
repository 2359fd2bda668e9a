//! RWKV-6.0 "Finch": v5's matrix-valued state with data-dependent token shift and decay.
//!
//! The token-shift mixes and the per-channel decay are no longer constants: small LoRA
//! networks compute them from the current and previous token (`time_maa_w1/w2`,
//! `time_decay_w1/w2`). The `maa` coefficients weigh the *previous* token, the opposite
//! convention to v4/v5's `time_mix`. See `tests/fixtures/README.md`.

use super::common::{wkv5_attend, GatedFfn, MixKind};
use super::{buf, token_shift, Io, Loader, Norm, Scratch, Seq, Slot};
use crate::checkpoint::ModelInfo;
use crate::error::Result;
use crate::kernels::matmul;
use crate::tensor::{Layout, Matrix};

struct Layer {
    ln1: Norm,
    ln2: Norm,
    maa_x: Vec<f32>,
    /// Base mixes in the order of the LoRA blocks: w, k, v, r, g.
    maa: [Vec<f32>; 5],
    maa_w1: Matrix,
    /// `time_maa_w2[n]`, one `[Dm, C]` matrix per mix.
    maa_w2: [Matrix; 5],
    decay: Vec<f32>,
    decay_w1: Matrix,
    decay_w2: Matrix,
    u: Vec<f32>,
    wr: Matrix,
    wk: Matrix,
    wv: Matrix,
    wg: Matrix,
    wo: Matrix,
    ln_x: Norm,
    ffn: GatedFfn,
}

/// An RWKV-6.0 model.
pub struct V6 {
    pub(crate) info: ModelInfo,
    pub(crate) io: Io,
    layers: Vec<Layer>,
}

impl V6 {
    pub(crate) fn load(ld: &mut Loader, info: ModelInfo) -> Result<V6> {
        let c = info.n_embd;
        let dm = info.lora.get("maa").copied().unwrap_or(0);
        let io = Io::load(ld)?;
        let mut layers = Vec::with_capacity(info.n_layer);
        for i in 0..info.n_layer {
            let p = format!("blocks.{i}.att.");
            let w2 = ld.stored(&format!("{p}time_maa_w2"))?;
            let block = |b: usize| Matrix {
                n_in: dm,
                n_out: c,
                layout: Layout::InOut,
                data: w2.slice(b * dm * c, dm * c),
            };
            layers.push(Layer {
                ln1: Norm::load(ld, &format!("blocks.{i}.ln1"))?,
                ln2: Norm::load(ld, &format!("blocks.{i}.ln2"))?,
                maa_x: ld.vec(&format!("{p}time_maa_x"))?,
                maa: [
                    ld.vec(&format!("{p}time_maa_w"))?,
                    ld.vec(&format!("{p}time_maa_k"))?,
                    ld.vec(&format!("{p}time_maa_v"))?,
                    ld.vec(&format!("{p}time_maa_r"))?,
                    ld.vec(&format!("{p}time_maa_g"))?,
                ],
                maa_w1: ld.matrix(&format!("{p}time_maa_w1"))?,
                maa_w2: [block(0), block(1), block(2), block(3), block(4)],
                decay: ld.vec(&format!("{p}time_decay"))?,
                decay_w1: ld.matrix(&format!("{p}time_decay_w1"))?,
                decay_w2: ld.matrix(&format!("{p}time_decay_w2"))?,
                u: ld.vec(&format!("{p}time_faaaa"))?,
                wr: ld.matrix(&format!("{p}receptance.weight"))?,
                wk: ld.matrix(&format!("{p}key.weight"))?,
                wv: ld.matrix(&format!("{p}value.weight"))?,
                wg: ld.matrix(&format!("{p}gate.weight"))?,
                wo: ld.matrix(&format!("{p}output.weight"))?,
                ln_x: Norm::load(ld, &format!("{p}ln_x"))?,
                ffn: GatedFfn::load(ld, i, MixKind::Maa)?,
            });
        }
        Ok(V6 { info, io, layers })
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
                        + l.maa_w1.bytes()
                        + 5 * l.maa_w2[0].bytes()
                        + l.decay_w1.bytes()
                        + l.decay_w2.bytes()
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
        let dm = self.layers.first().map_or(0, |l| l.maa_w2[0].n_in);
        let dd = self.layers.first().map_or(0, |l| l.decay_w1.n_out);
        let mut decays = sc.decays.take();
        let [bx, bxn, bd, bxxx, bxw, bxk, bxv, bxr, bxg, br, bk, bv, bg, bw, by, bo, blo, blo2, bhid, btmp] =
            sc.bufs::<20>();
        let x = buf(bx, t * c);
        let xn = buf(bxn, t * c);
        let (d, xxx) = (buf(bd, t * c), buf(bxxx, t * c));
        let (xw, xk, xv) = (buf(bxw, t * c), buf(bxk, t * c), buf(bxv, t * c));
        let (xr, xg) = (buf(bxr, t * c), buf(bxg, t * c));
        let (r, k, v, g) = (
            buf(br, t * c),
            buf(bk, t * c),
            buf(bv, t * c),
            buf(bg, t * c),
        );
        let (w, y, o) = (buf(bw, t * c), buf(by, t * c), buf(bo, t * c));
        let lo = buf(blo, t * (5 * dm).max(dd).max(1));
        let lo2 = buf(blo2, t * dm.max(1));
        let hid = buf(bhid, t * f);

        self.io.embed(tokens, x, &mut o[..c]);
        for (li, l) in self.layers.iter().enumerate() {
            // ---- time mixing: data-dependent token shift ----
            l.ln1.rows(x, xn);
            token_shift(xn, c, seqs, (li, Slot::AttShift), |row, cur, prev| {
                for j in 0..c {
                    let i = row * c + j;
                    d[i] = prev[j] - cur[j];
                    xxx[i] = cur[j] + d[i] * l.maa_x[j];
                }
            });
            let lo5 = &mut lo[..t * 5 * dm];
            matmul(&l.maa_w1, xxx, t, lo5);
            lo5.iter_mut().for_each(|z| *z = z.tanh());
            let outs: [&mut [f32]; 5] = [&mut *xw, &mut *xk, &mut *xv, &mut *xr, &mut *xg];
            for (b, dst) in outs.into_iter().enumerate() {
                for ti in 0..t {
                    lo2[ti * dm..(ti + 1) * dm]
                        .copy_from_slice(&lo5[ti * 5 * dm + b * dm..ti * 5 * dm + (b + 1) * dm]);
                }
                matmul(&l.maa_w2[b], &lo2[..t * dm], t, dst);
                for i in 0..t * c {
                    let j = i % c;
                    dst[i] = xn[i] + d[i] * (l.maa[b][j] + dst[i]);
                }
            }
            // Data-dependent decay: w = exp(-exp(time_decay + tanh(xw D1) D2)).
            let lod = &mut lo[..t * dd];
            matmul(&l.decay_w1, xw, t, lod);
            lod.iter_mut().for_each(|z| *z = z.tanh());
            matmul(&l.decay_w2, lod, t, w);
            for (i, z) in w.iter_mut().enumerate() {
                *z = (-(l.decay[i % c] + *z).exp()).exp();
            }
            if let Some(d) = decays.as_mut() {
                d[li].extend_from_slice(w);
            }
            matmul(&l.wr, xr, t, r);
            matmul(&l.wk, xk, t, k);
            matmul(&l.wv, xv, t, v);
            matmul(&l.wg, xg, t, g);
            let ins = [&*r, &*k, &*v, &*w];
            wkv5_attend(seqs, li, ins, &l.u, g, &l.ln_x, &l.wo, x, y, o, nh, n);
            // ---- channel mixing ----
            l.ffn.run(&l.ln2, x, seqs, li, xn, xk, xr, r, o, hid);
        }
        self.io.logits(x, seqs, bxn, btmp);
        sc.decays = decays;
    }
}
