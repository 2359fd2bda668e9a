//! Pieces shared by several generations: the receptance-gated channel mixing of v4/v5/v6 and
//! the v5/v6 WKV scan.

use super::consts::GN_EPS;
use super::{per_seq, token_shift, Loader, Norm, Seq, Slot};
use crate::error::Result;
use crate::kernels::{self, matmul, sigmoid, SendPtr};
use crate::tensor::Matrix;
use rayon::prelude::*;

/// How a token-shift mix coefficient is applied.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MixKind {
    /// v4/v5 `time_mix`: `x·m + prev·(1 - m)`.
    Mix,
    /// v6 `time_maa`: `x + (prev - x)·m`.
    Maa,
}

impl MixKind {
    #[inline(always)]
    pub fn apply(self, cur: f32, prev: f32, m: f32) -> f32 {
        match self {
            MixKind::Mix => cur * m + prev * (1.0 - m),
            MixKind::Maa => cur + (prev - cur) * m,
        }
    }
}

/// Channel mixing of v4, v5 and v6: `sigmoid(r W_r) · (relu(k W_k)² W_v)`.
pub(crate) struct GatedFfn {
    kind: MixKind,
    mix_k: Vec<f32>,
    mix_r: Vec<f32>,
    key: Matrix,
    recept: Matrix,
    value: Matrix,
}

impl GatedFfn {
    pub fn load(ld: &mut Loader, i: usize, kind: MixKind) -> Result<Self> {
        let q = format!("blocks.{i}.ffn.");
        let (mk, mr) = match kind {
            MixKind::Mix => ("time_mix_k", "time_mix_r"),
            MixKind::Maa => ("time_maa_k", "time_maa_r"),
        };
        Ok(GatedFfn {
            kind,
            mix_k: ld.vec(&format!("{q}{mk}"))?,
            mix_r: ld.vec(&format!("{q}{mr}"))?,
            key: ld.matrix(&format!("{q}key.weight"))?,
            recept: ld.matrix(&format!("{q}receptance.weight"))?,
            value: ld.matrix(&format!("{q}value.weight"))?,
        })
    }

    pub fn bytes(&self) -> usize {
        self.key.bytes() + self.recept.bytes() + self.value.bytes()
    }

    /// `x += ffn(LN(x; ln2))` over all rows of block `layer`.
    /// `xn`, `xk`, `xr`, `r`, `o` are `[T, C]` work buffers and `hid` is `[T, F]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        ln2: &Norm,
        x: &mut [f32],
        seqs: &mut [Seq<'_>],
        layer: usize,
        xn: &mut [f32],
        xk: &mut [f32],
        xr: &mut [f32],
        r: &mut [f32],
        o: &mut [f32],
        hid: &mut [f32],
    ) {
        let c = self.mix_k.len();
        let t = x.len() / c;
        ln2.rows(x, xn);
        let kind = self.kind;
        token_shift(xn, c, seqs, (layer, Slot::FfnShift), |row, cur, prev| {
            for j in 0..c {
                xk[row * c + j] = kind.apply(cur[j], prev[j], self.mix_k[j]);
                xr[row * c + j] = kind.apply(cur[j], prev[j], self.mix_r[j]);
            }
        });
        matmul(&self.recept, xr, t, r);
        matmul(&self.key, xk, t, hid);
        hid.iter_mut().for_each(|z| {
            let q = z.max(0.0);
            *z = q * q
        });
        matmul(&self.value, hid, t, o);
        for i in 0..t * c {
            x[i] += sigmoid(r[i]) * o[i];
        }
    }
}

/// The rest of v5/v6 time mixing once r, k, v, the decay w (one row per token for v6, one
/// row for all tokens for v5) and the gate pre-activation g exist: the WKV scan of every
/// sequence from block `layer`'s WKV state, GroupNorm, the SiLU gate, the output projection and
/// the residual `x += …`. `y` and `o` are `[T, C]` work buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn wkv5_attend(
    seqs: &mut [Seq<'_>],
    layer: usize,
    [r, k, v, w]: [&[f32]; 4],
    u: &[f32],
    g: &[f32],
    ln_x: &Norm,
    wo: &Matrix,
    x: &mut [f32],
    y: &mut [f32],
    o: &mut [f32],
    nh: usize,
    n: usize,
) {
    let c = nh * n;
    let t = x.len() / c;
    let per_token = w.len() != c;
    per_seq(seqs, c, y, |s, ys| {
        let rows = s.row0 * c..(s.row0 + s.n) * c;
        let ws = if per_token { &w[rows.clone()] } else { w };
        let kv = s.state.get_mut(layer, Slot::AttKv);
        wkv5(
            kv,
            &r[rows.clone()],
            &k[rows.clone()],
            &v[rows],
            ws,
            u,
            ys,
            nh,
            n,
        );
    });
    for (yr, gr) in y.chunks_mut(c).zip(g.chunks(c)) {
        kernels::group_norm(yr, nh, &ln_x.w, &ln_x.b, GN_EPS as f32);
        for j in 0..c {
            yr[j] *= gr[j] * sigmoid(gr[j]);
        }
    }
    matmul(wo, y, t, o);
    for i in 0..t * c {
        x[i] += o[i];
    }
}

/// The v5/v6 WKV scan over one sequence's rows, per head, with the state `S[h, key i, value j]`:
/// `y[j] = Σ_i r[i]·(u[i]·k[i]·v[j] + S[i,j])`, then `S[i,j] = k[i]·v[j] + w[i]·S[i,j]`.
/// `w` holds one row of decays per token (v6) or a single row for all tokens (v5).
#[allow(clippy::too_many_arguments)]
fn wkv5(
    kv: &mut [f32],
    r: &[f32],
    k: &[f32],
    v: &[f32],
    w: &[f32],
    u: &[f32],
    y: &mut [f32],
    nh: usize,
    n: usize,
) {
    let c = nh * n;
    let t = r.len() / c;
    let w_at = |ti: usize| if w.len() == c { 0 } else { ti * c };
    let yp = SendPtr(y.as_mut_ptr());
    let head = |(h, s): (usize, &mut [f32])| {
        for ti in 0..t {
            let o = ti * c + h * n;
            let wo = w_at(ti) + h * n;
            // SAFETY: head h of token ti owns y[o..o+n]; no other task touches it.
            let yh = unsafe { std::slice::from_raw_parts_mut(yp.get().add(o), n) };
            let x = kernels::wkv::Wkv5In {
                r: &r[o..o + n],
                k: &k[o..o + n],
                v: &v[o..o + n],
                w: &w[wo..wo + n],
                u: &u[h * n..(h + 1) * n],
            };
            kernels::wkv::wkv5_head(s, &x, yh);
        }
    };
    if t > 1 && nh > 1 {
        kv.par_chunks_mut(n * n).enumerate().for_each(head);
    } else {
        kv.chunks_mut(n * n).enumerate().for_each(head);
    }
}
