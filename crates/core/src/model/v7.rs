//! RWKV-7 "Goose" (x070).
//!
//! Time mixing (per head, state `S[value i, key j]`):
//! `S = S·diag(w) + (S·(-kk)) (kk·a)ᵀ + v kᵀ`, `y = S r`, then GroupNorm, the `r·k·r_k`
//! bonus, the gate `g` and the output projection. Channel mixing is `relu(k W_k)² W_v` without
//! a receptance gate. See `tests/fixtures/README.md` for the full formulas.
//!
//! RWKV-7a adds DeepEmbed to the channel mixing: a per-token `R×R` matrix
//! `E = s_emb[token] + reshape(LN0(emb[token]) s_emb_xᵀ)` turns the mix input into a
//! gate on the hidden layer, `k ← k · ((xn s1) E s2 + s0)` (`xn` = LN2 output, before the
//! token shift), as the official package computes it with `RWKV_DE_VERSION=1`.

use super::consts::{GN_EPS, NORMALIZE_EPS, V7_DECAY_SCALE_OFFICIAL};
use super::{buf, per_seq, token_shift, Io, Loader, Norm, Scratch, Seq, Slot};
use crate::checkpoint::ModelInfo;
use crate::error::Result;
use crate::kernels::{self, matmul, sigmoid, SendPtr};
use crate::schema::v7::BLOCK0_UNUSED;
use crate::tensor::{FloatData, Matrix};
use rayon::prelude::*;

struct Lora {
    down: Matrix,
    up: Matrix,
}

impl Lora {
    fn load(ld: &mut Loader, p: &str, n: &str) -> Result<Lora> {
        Ok(Lora {
            down: ld.matrix(&format!("{p}{n}1"))?,
            up: ld.matrix(&format!("{p}{n}2"))?,
        })
    }
    fn rank(&self) -> usize {
        self.down.n_out
    }
    fn bytes(&self) -> usize {
        self.down.bytes() + self.up.bytes()
    }
}

/// RWKV-7a's DeepEmbed tensors of one channel mix (see the module's docs).
struct DeepEmbed {
    /// `[V, R²]`, one row per token, as stored.
    table: FloatData,
    /// `[R², C]`: the embedded input's part of each token's matrix.
    from_input: Matrix,
    /// `[C, R]`.
    s1: Matrix,
    /// `[R, F]`.
    s2: Matrix,
    /// `[F]`.
    s0: Vec<f32>,
}

impl DeepEmbed {
    fn load(ld: &mut Loader, q: &str) -> Result<DeepEmbed> {
        Ok(DeepEmbed {
            table: ld.stored(&format!("{q}s_emb.weight"))?,
            from_input: ld.matrix(&format!("{q}s_emb_x.weight"))?,
            s1: ld.matrix(&format!("{q}s1"))?,
            s2: ld.matrix(&format!("{q}s2"))?,
            s0: ld.vec(&format!("{q}s0"))?,
        })
    }

    fn rank(&self) -> usize {
        self.s1.n_out
    }

    /// Bytes read per token: the products and one table row.
    fn bytes(&self) -> usize {
        let r = self.rank();
        self.from_input.bytes()
            + self.s1.bytes()
            + self.s2.bytes()
            + r * r * self.table.dtype().size()
    }

    /// Multiplies the hidden rows `hid` (`[T, F]`) by each token's DeepEmbed gate, from the
    /// LN2 rows `xn` and the embedded inputs `x0` (`[T, C]`). `m` (`[T, R²]`), `p`
    /// (`[2TR + R²]`) and `gate` (`[T, F]`) are work buffers.
    #[allow(clippy::too_many_arguments)]
    fn gate(
        &self,
        tokens: &[u32],
        xn: &[f32],
        x0: &[f32],
        hid: &mut [f32],
        m: &mut [f32],
        p: &mut [f32],
        gate: &mut [f32],
    ) {
        let t = tokens.len();
        let r = self.rank();
        let rr = r * r;
        matmul(&self.from_input, x0, t, m);
        let (pin, rest) = p.split_at_mut(t * r);
        let (pout, row) = rest.split_at_mut(t * r);
        matmul(&self.s1, xn, t, pin);
        for (ti, &tok) in tokens.iter().enumerate() {
            let mr = &mut m[ti * rr..(ti + 1) * rr];
            kernels::embedding_row(&self.table, tok as usize, &mut row[..rr]);
            for (a, b) in mr.iter_mut().zip(row.iter()) {
                *a += b;
            }
            // (xn s1) · E: a row vector times the token's R×R matrix.
            let pi = &pin[ti * r..(ti + 1) * r];
            let po = &mut pout[ti * r..(ti + 1) * r];
            po.fill(0.0);
            for (i, &pv) in pi.iter().enumerate() {
                for (o, e) in po.iter_mut().zip(&mr[i * r..(i + 1) * r]) {
                    *o += pv * e;
                }
            }
        }
        matmul(&self.s2, pout, t, gate);
        for (hr, gr) in hid
            .chunks_mut(self.s0.len())
            .zip(gate.chunks(self.s0.len()))
        {
            for ((h, g), s0) in hr.iter_mut().zip(gr).zip(&self.s0) {
                *h *= g + s0;
            }
        }
    }
}

struct Layer {
    ln1: Norm,
    ln2: Norm,
    x_r: Vec<f32>,
    x_w: Vec<f32>,
    x_k: Vec<f32>,
    x_v: Vec<f32>,
    x_a: Vec<f32>,
    x_g: Vec<f32>,
    w0: Vec<f32>,
    a0: Vec<f32>,
    w: Lora,
    a: Lora,
    g: Lora,
    /// Value residual mixing; absent in layer 0, which defines `v_first`.
    v: Option<(Vec<f32>, Lora)>,
    k_k: Vec<f32>,
    k_a: Vec<f32>,
    r_k: Vec<f32>,
    wr: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ln_x: Norm,
    ffn_x_k: Vec<f32>,
    ffn_key: Matrix,
    ffn_value: Matrix,
    /// RWKV-7a's DeepEmbed gate on the channel mix.
    deep: Option<DeepEmbed>,
}

/// An RWKV-7 model.
pub struct V7 {
    pub(crate) info: ModelInfo,
    pub(crate) io: Io,
    layers: Vec<Layer>,
}

impl V7 {
    pub(crate) fn load(ld: &mut Loader, info: ModelInfo) -> Result<V7> {
        let io = Io::load(ld)?;
        let mut layers = Vec::with_capacity(info.n_layer);
        for i in 0..info.n_layer {
            let p = format!("blocks.{i}.att.");
            let q = format!("blocks.{i}.ffn.");
            let v = if i == 0 {
                // Some exporters write the unused layer-0 value-residual tensors; they take no
                // part in the math.
                for k in BLOCK0_UNUSED {
                    ld.ignore(&format!("{p}{k}"));
                }
                None
            } else {
                Some((ld.vec(&format!("{p}v0"))?, Lora::load(ld, &p, "v")?))
            };
            layers.push(Layer {
                ln1: Norm::load(ld, &format!("blocks.{i}.ln1"))?,
                ln2: Norm::load(ld, &format!("blocks.{i}.ln2"))?,
                x_r: ld.vec(&format!("{p}x_r"))?,
                x_w: ld.vec(&format!("{p}x_w"))?,
                x_k: ld.vec(&format!("{p}x_k"))?,
                x_v: ld.vec(&format!("{p}x_v"))?,
                x_a: ld.vec(&format!("{p}x_a"))?,
                x_g: ld.vec(&format!("{p}x_g"))?,
                w0: ld.vec(&format!("{p}w0"))?,
                a0: ld.vec(&format!("{p}a0"))?,
                w: Lora::load(ld, &p, "w")?,
                a: Lora::load(ld, &p, "a")?,
                g: Lora::load(ld, &p, "g")?,
                v,
                k_k: ld.vec(&format!("{p}k_k"))?,
                k_a: ld.vec(&format!("{p}k_a"))?,
                r_k: ld.vec(&format!("{p}r_k"))?,
                wr: ld.matrix(&format!("{p}receptance.weight"))?,
                wk: ld.matrix(&format!("{p}key.weight"))?,
                wv: ld.matrix(&format!("{p}value.weight"))?,
                wo: ld.matrix(&format!("{p}output.weight"))?,
                ln_x: Norm::load(ld, &format!("{p}ln_x"))?,
                ffn_x_k: ld.vec(&format!("{q}x_k"))?,
                ffn_key: ld.matrix(&format!("{q}key.weight"))?,
                ffn_value: ld.matrix(&format!("{q}value.weight"))?,
                deep: if info.deep_embed > 0 {
                    Some(DeepEmbed::load(ld, &q)?)
                } else {
                    None
                },
            });
        }
        Ok(V7 { info, io, layers })
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
                        + l.wo.bytes()
                        + l.w.bytes()
                        + l.a.bytes()
                        + l.g.bytes()
                        + l.v.as_ref().map_or(0, |(_, lo)| lo.bytes())
                        + l.ffn_key.bytes()
                        + l.ffn_value.bytes()
                        + l.deep.as_ref().map_or(0, DeepEmbed::bytes)
                })
                .sum::<usize>()
    }

    /// Runs the concatenated `tokens` of `seqs` through the model.
    pub(crate) fn run(&self, tokens: &[u32], seqs: &mut [Seq<'_>], sc: &mut Scratch) {
        let t = tokens.len();
        let c = self.info.n_embd;
        let (nh, n) = (self.info.n_head, self.info.head_size);
        let f = self.info.ffn_dim;
        let dmax = self
            .layers
            .iter()
            .flat_map(|l| {
                [
                    l.w.rank(),
                    l.a.rank(),
                    l.g.rank(),
                    l.v.as_ref().map_or(0, |v| v.1.rank()),
                ]
            })
            .max()
            .unwrap_or(0);
        let mut decays = sc.decays.take();
        let [x, bxn, xr, xw, xk, xv, xa, xg, r, k, v, w, a, g, kk, y, lo, vf, hid, btmp, x0, dm, dp, dg] =
            sc.bufs::<24>();
        let x = buf(x, t * c);
        let xn = buf(bxn, t * c);
        let (xr, xw, xk, xv) = (
            buf(xr, t * c),
            buf(xw, t * c),
            buf(xk, t * c),
            buf(xv, t * c),
        );
        let (xa, xg) = (buf(xa, t * c), buf(xg, t * c));
        let (r, k, v, w) = (buf(r, t * c), buf(k, t * c), buf(v, t * c), buf(w, t * c));
        let (a, g, kk, y) = (buf(a, t * c), buf(g, t * c), buf(kk, t * c), buf(y, t * c));
        let lo = buf(lo, 2 * t * dmax.max(1));
        let vf = buf(vf, t * c);
        let hid = buf(hid, t * f.max(c));

        self.io.embed(tokens, x, &mut y[..c]);
        // DeepEmbed reads every layer's embedded input.
        let de_rank = self.info.deep_embed;
        let x0 = buf(x0, if de_rank > 0 { t * c } else { 0 });
        x0.copy_from_slice(&x[..x0.len()]);
        let dm = buf(dm, t * de_rank * de_rank);
        let dp = buf(dp, 2 * t * de_rank + de_rank * de_rank);
        let dg = buf(dg, if de_rank > 0 { t * f } else { 0 });
        for (li, l) in self.layers.iter().enumerate() {
            // ---- time mixing ----
            l.ln1.rows(x, xn);
            token_shift(xn, c, seqs, (li, Slot::AttShift), |row, cur, prev| {
                for j in 0..c {
                    let (xc, d) = (cur[j], prev[j] - cur[j]);
                    let o = row * c + j;
                    xr[o] = xc + d * l.x_r[j];
                    xw[o] = xc + d * l.x_w[j];
                    xk[o] = xc + d * l.x_k[j];
                    xv[o] = xc + d * l.x_v[j];
                    xa[o] = xc + d * l.x_a[j];
                    xg[o] = xc + d * l.x_g[j];
                }
            });
            matmul(&l.wr, xr, t, r);
            matmul(&l.wk, xk, t, k);
            matmul(&l.wv, xv, t, v);
            // The four LoRAs are small `[in, out]` products that, for one token, would each
            // run on one thread while the others wait: the decay and in-context-rate pair and
            // the gate and value-residual pair run side by side instead (ranks 64 + 64 against
            // 128 + 32 in the 0.1B shape).
            let (lo1, lo2) = lo.split_at_mut(t * dmax.max(1));
            kernels::join_in_pool(
                || {
                    // Decay: w = exp(-e^-0.5 · sigmoid(w0 + tanh(xw W1) W2)).
                    let dw = l.w.rank();
                    matmul(&l.w.down, xw, t, &mut lo1[..t * dw]);
                    lo1[..t * dw].iter_mut().for_each(|z| *z = z.tanh());
                    matmul(&l.w.up, &lo1[..t * dw], t, w);
                    for wr in w.chunks_mut(c) {
                        for (z, w0) in wr.iter_mut().zip(&l.w0) {
                            *z = kernels::exp(-(V7_DECAY_SCALE_OFFICIAL as f32) * sigmoid(w0 + *z));
                        }
                    }
                    // In-context learning rate a = sigmoid(a0 + xa A1 A2).
                    let da = l.a.rank();
                    matmul(&l.a.down, xa, t, &mut lo1[..t * da]);
                    matmul(&l.a.up, &lo1[..t * da], t, a);
                    for ar in a.chunks_mut(c) {
                        for (z, a0) in ar.iter_mut().zip(&l.a0) {
                            *z = sigmoid(a0 + *z);
                        }
                    }
                },
                || {
                    // Gate g = sigmoid(xg G1) G2.
                    let dg = l.g.rank();
                    matmul(&l.g.down, xg, t, &mut lo2[..t * dg]);
                    lo2[..t * dg].iter_mut().for_each(|z| *z = sigmoid(*z));
                    matmul(&l.g.up, &lo2[..t * dg], t, g);
                    // The value residual's LoRA (layers after the first), into `xr`.
                    if let Some((_, lora)) = &l.v {
                        let dv = lora.rank();
                        matmul(&lora.down, xv, t, &mut lo2[..t * dv]);
                        matmul(&lora.up, &lo2[..t * dv], t, xr);
                    }
                },
            );
            if let Some(d) = decays.as_mut() {
                d[li].extend_from_slice(w);
            }
            // kk = normalize(k * k_k) per head, from the unmodified k; then k = k(1 + (a-1)k_a).
            for (ti, (kr, kkr)) in k.chunks_mut(c).zip(kk.chunks_mut(c)).enumerate() {
                for j in 0..c {
                    kkr[j] = kr[j] * l.k_k[j];
                }
                for hh in kkr.chunks_mut(n) {
                    let norm = hh
                        .iter()
                        .map(|z| z * z)
                        .sum::<f32>()
                        .sqrt()
                        .max(NORMALIZE_EPS as f32);
                    hh.iter_mut().for_each(|z| *z /= norm);
                }
                let ar = &a[ti * c..(ti + 1) * c];
                for j in 0..c {
                    kr[j] *= 1.0 + (ar[j] - 1.0) * l.k_a[j];
                }
            }
            // Value residual: layer 0 defines v_first, later layers mix towards it.
            match &l.v {
                None => vf.copy_from_slice(v),
                Some((v0, _)) => {
                    let rows = v.chunks_mut(c).zip(vf.chunks(c)).zip(xr.chunks(c));
                    for ((vr, fr), mr) in rows {
                        for j in 0..c {
                            vr[j] += (fr[j] - vr[j]) * sigmoid(v0[j] + mr[j]);
                        }
                    }
                }
            }
            per_seq(seqs, c, y, |s, ys| {
                let rows = s.row0 * c..(s.row0 + s.n) * c;
                let kv = s.state.get_mut(li, Slot::AttKv);
                let ins = [
                    &r[rows.clone()],
                    &w[rows.clone()],
                    &k[rows.clone()],
                    &v[rows.clone()],
                ];
                wkv7(kv, ins, &kk[rows.clone()], &a[rows], ys, nh, n);
            });
            for ti in 0..t {
                let yr = &mut y[ti * c..(ti + 1) * c];
                kernels::group_norm(yr, nh, &l.ln_x.w, &l.ln_x.b, GN_EPS as f32);
                for hh in 0..nh {
                    let s = hh * n;
                    let o = ti * c + s;
                    let mut bonus = 0.0;
                    for j in 0..n {
                        bonus += r[o + j] * k[o + j] * l.r_k[s + j];
                    }
                    for j in 0..n {
                        yr[s + j] += bonus * v[o + j];
                    }
                }
                for j in 0..c {
                    yr[j] *= g[ti * c + j];
                }
            }
            matmul(&l.wo, y, t, xr);
            for i in 0..t * c {
                x[i] += xr[i];
            }
            // ---- channel mixing ----
            l.ln2.rows(x, xn);
            token_shift(xn, c, seqs, (li, Slot::FfnShift), |row, cur, prev| {
                for j in 0..c {
                    xk[row * c + j] = cur[j] + (prev[j] - cur[j]) * l.ffn_x_k[j];
                }
            });
            let hid = &mut hid[..t * f];
            matmul(&l.ffn_key, xk, t, hid);
            hid.iter_mut().for_each(|z| {
                let q = z.max(0.0);
                *z = q * q
            });
            if let Some(de) = &l.deep {
                de.gate(tokens, xn, x0, hid, dm, dp, dg);
            }
            matmul(&l.ffn_value, hid, t, xr);
            for i in 0..t * c {
                x[i] += xr[i];
            }
        }
        self.io.logits(x, seqs, bxn, btmp);
        sc.decays = decays;
    }
}

/// The RWKV-7 WKV scan over one sequence's rows for every head, updating `state` (`[H, N, N]`,
/// value index major) and writing `y`. Heads are independent, so long chunks run them in
/// parallel.
fn wkv7(
    state: &mut [f32],
    [r, w, k, v]: [&[f32]; 4],
    kk: &[f32],
    a: &[f32],
    y: &mut [f32],
    nh: usize,
    n: usize,
) {
    let c = nh * n;
    let t = r.len() / c;
    assert!(n <= 256, "head size {n} above 256 is not supported");
    let yp = SendPtr(y.as_mut_ptr());
    let head = |(h, s): (usize, &mut [f32])| {
        let mut b = [0f32; 256];
        for ti in 0..t {
            let o = ti * c + h * n;
            let seg = o..o + n;
            for j in 0..n {
                b[j] = kk[o + j] * a[o + j];
            }
            // SAFETY: head h of token ti owns y[o..o+n]; no other task touches it.
            let yh = unsafe { std::slice::from_raw_parts_mut(yp.get().add(o), n) };
            let x = kernels::wkv::Wkv7In {
                r: &r[seg.clone()],
                w: &w[seg.clone()],
                k: &k[seg.clone()],
                v: &v[seg.clone()],
                kk: &kk[seg],
                b: &b[..n],
            };
            kernels::wkv::wkv7_head(s, &x, yh);
        }
    };
    if t > 1 && nh > 1 {
        state.par_chunks_mut(n * n).enumerate().for_each(head);
    } else {
        state.chunks_mut(n * n).enumerate().for_each(head);
    }
}
