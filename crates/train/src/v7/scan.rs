//! The RWKV-7 WKV scan of the hand-written training pass ([`super`]): the same computation and
//! backward pass as the graph's `ops::Wkv7`, restructured for speed.
//!
//! - The per-token quantities (`kk = normalize(k·k_k)`, `kk·a`, the modified key, the decay)
//!   are computed for every row in one vectorised pass before the scan, and their gradients in
//!   one pass after it, instead of once per head and token inside the scan (and again in the
//!   backward pass).
//! - The scan keeps the forward pass's `sa = S·(-kk)` of every token, so the backward pass
//!   recomputes only the states inside one 16-token chunk from its checkpoint.
//! - With AVX-512 and a head size of 16, 32 or 64, each state row is one to four vector
//!   registers and a token's step over a head is a run of fused multiply-adds. The forward
//!   scan keeps the state transposed, so that it needs no horizontal sum at all; the backward
//!   scan sums the rows of the state gradient sixteen at a time in one batched reduction.

// Index loops over several parallel per-channel arrays read more clearly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use crate::common::{dispatch, WKV_CHUNK};
use crate::pass::kernels::dot;
use rwkv_core::kernels::{exp, sigmoid};
use rwkv_core::model::consts::{NORMALIZE_EPS, V7_DECAY_SCALE as W_SCALE};

/// The per-token quantities of every row `[M, C]`, kept from the forward to the backward pass.
#[derive(Default)]
pub(crate) struct Prep {
    /// `kk = k·k_k / ‖k·k_k‖` per head.
    pub kk: Vec<f32>,
    /// `kk·a`.
    pub b: Vec<f32>,
    /// `k·(1 + (a-1)·k_a)`.
    pub kmod: Vec<f32>,
    /// `sigmoid(w)`.
    pub sig: Vec<f32>,
    /// `exp(-e^-0.5·sigmoid(w))`.
    pub dec: Vec<f32>,
    /// `max(‖k·k_k‖, 1e-12)` per row and head `[M, H]`.
    pub norm: Vec<f32>,
    /// `sa = S_prev·(-kk)` of every token.
    pub sa: Vec<f32>,
    /// States at the start of every chunk of every head.
    pub ck: Vec<f32>,
}

/// Shapes: `b` windows of `t` tokens, `h` heads of size `n`.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub n: usize,
}

impl Grads {
    /// The gradient of the modified key, `[M, C]`: set by the caller (from the output's bonus
    /// term) before [`backward`] adds the scan's part.
    pub(crate) fn dkmod(&mut self, mc: usize) -> &mut [f32] {
        self.dkmod.resize(mc, 0.0);
        &mut self.dkmod
    }
}

impl Shape {
    fn c(&self) -> usize {
        self.h * self.n
    }
    fn nck(&self) -> usize {
        self.t.div_ceil(WKV_CHUNK)
    }
}

#[cfg(test)]
thread_local! {
    /// Set by tests to run the portable scan on a machine with AVX-512.
    pub(crate) static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the vector scan runs for head size `n`.
pub(crate) fn simd(n: usize) -> bool {
    #[cfg(test)]
    if PORTABLE.with(|p| p.get()) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        rwkv_core::cpu::has_avx512() && matches!(n, 16 | 32 | 64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = n;
        false
    }
}

/// The forward scan: from the planes `r, w, k, v, a` of `acts [6, M, C]` and `k_k`, `k_a`,
/// makes `y [M, C]` and fills `p` for [`backward`]. Every window starts from the state `s0`
/// (`[H, N, N]`, `S[value i][key j]` per head, the inference state's layout), or from zero
/// when it is empty.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    d: Shape,
    acts: &[f32],
    k_k: &[f32],
    k_a: &[f32],
    s0: &[f32],
    y: &mut [f32],
    p: &mut Prep,
    scratch: &mut Vec<f32>,
) {
    let (c, n) = (d.c(), d.n);
    let mc = d.b * d.t * c;
    let pl = |i: usize| &acts[i * mc..(i + 1) * mc];
    for v in [
        &mut p.kk,
        &mut p.b,
        &mut p.kmod,
        &mut p.sig,
        &mut p.dec,
        &mut p.sa,
    ] {
        v.resize(mc, 0.0);
    }
    p.norm.resize(d.b * d.t * d.h, 0.0);
    dispatch!(prepare(
        n,
        pl(1),
        pl(2),
        pl(4),
        k_k,
        k_a,
        &mut p.kk,
        &mut p.b,
        &mut p.kmod,
        &mut p.sig,
        &mut p.dec,
        &mut p.norm
    ));
    let nn = n * n;
    p.ck.resize(d.b * d.h * d.nck() * nn, 0.0);
    scratch.resize(nn, 0.0);
    let Prep {
        kk,
        b,
        kmod,
        dec,
        sa,
        ck,
        ..
    } = p;
    let ins = Ins {
        r: pl(0),
        v: pl(3),
        kk,
        b,
        kmod,
        dec,
    };
    for bi in 0..d.b {
        for hi in 0..d.h {
            let o = bi * d.t * c + hi * n;
            let task = bi * d.h + hi;
            let ck = &mut ck[task * d.nck() * nn..(task + 1) * d.nck() * nn];
            let io = Io { t: d.t, c, o, n };
            let init = if s0.is_empty() {
                s0
            } else {
                &s0[hi * nn..(hi + 1) * nn]
            };
            if simd(n) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F was detected; the kernel checks `io` against the slices.
                unsafe {
                    match n {
                        16 => avx512::fwd::<1>(io, &ins, init, sa, y, ck, scratch),
                        32 => avx512::fwd::<2>(io, &ins, init, sa, y, ck, scratch),
                        _ => avx512::fwd::<4>(io, &ins, init, sa, y, ck, scratch),
                    }
                }
                continue;
            }
            dispatch!(fwd_head(io, &ins, init, sa, y, ck, scratch));
        }
    }
}

/// What the forward scan reads, `[M, C]` planes.
struct Ins<'a> {
    r: &'a [f32],
    v: &'a [f32],
    kk: &'a [f32],
    b: &'a [f32],
    kmod: &'a [f32],
    dec: &'a [f32],
}

/// One head of one window: its first value is at `o` in `[M, C]` planes, tokens `c` apart.
#[derive(Clone, Copy)]
struct Io {
    t: usize,
    c: usize,
    o: usize,
    n: usize,
}

impl Io {
    /// Offset of token `ti`.
    #[inline(always)]
    fn at(&self, ti: usize) -> usize {
        self.o + ti * self.c
    }
}

/// The per-token quantities of every row (see [`Prep`]), as whole-row sweeps that vectorise.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn prepare(
    n: usize,
    w: &[f32],
    k: &[f32],
    a: &[f32],
    k_k: &[f32],
    k_a: &[f32],
    kk: &mut [f32],
    b: &mut [f32],
    kmod: &mut [f32],
    sig: &mut [f32],
    dec: &mut [f32],
    norm: &mut [f32],
) {
    let c = k_k.len();
    let rows = k.chunks_exact(c).zip(a.chunks_exact(c));
    for ((kr, ar), (kkr, kmr)) in rows.zip(kk.chunks_exact_mut(c).zip(kmod.chunks_exact_mut(c))) {
        for j in 0..c {
            kkr[j] = kr[j] * k_k[j];
            kmr[j] = kr[j] * (1.0 + (ar[j] - 1.0) * k_a[j]);
        }
    }
    // F.normalize: x / max(‖x‖, 1e-12), per head.
    for (seg, nm) in kk.chunks_exact_mut(n).zip(norm.iter_mut()) {
        *nm = dot(seg, seg).sqrt().max(NORMALIZE_EPS as f32);
        let inv = 1.0 / *nm;
        seg.iter_mut().for_each(|x| *x *= inv);
    }
    for ((b, kk), a) in b.iter_mut().zip(kk.iter()).zip(a) {
        *b = kk * a;
    }
    for ((s, d), w) in sig.iter_mut().zip(dec.iter_mut()).zip(w) {
        *s = sigmoid(*w);
        *d = exp(-(W_SCALE as f32) * *s);
    }
}

/// The portable forward scan of one head (any head size), from the state `init` (`[N, N]`;
/// zero when empty).
#[inline(always)]
fn fwd_head(
    io: Io,
    x: &Ins<'_>,
    init: &[f32],
    sa: &mut [f32],
    y: &mut [f32],
    ck: &mut [f32],
    s: &mut [f32],
) {
    let n = io.n;
    let nn = n * n;
    if init.is_empty() {
        s[..nn].iter_mut().for_each(|z| *z = 0.0);
    } else {
        s[..nn].copy_from_slice(init);
    }
    for ti in 0..io.t {
        if ti % WKV_CHUNK == 0 {
            let q = ti / WKV_CHUNK;
            ck[q * nn..(q + 1) * nn].copy_from_slice(&s[..nn]);
        }
        let o = io.at(ti);
        let (kk, b, km, dec, rr) = (
            &x.kk[o..o + n],
            &x.b[o..o + n],
            &x.kmod[o..o + n],
            &x.dec[o..o + n],
            &x.r[o..o + n],
        );
        for i in 0..n {
            let row = &mut s[i * n..(i + 1) * n];
            let mut acc = 0f32;
            for j in 0..n {
                acc -= row[j] * kk[j];
            }
            sa[o + i] = acc;
            let vi = x.v[o + i];
            let mut yy = 0f32;
            for j in 0..n {
                row[j] = row[j] * dec[j] + acc * b[j] + vi * km[j];
                yy += row[j] * rr[j];
            }
            y[o + i] = yy;
        }
    }
}

/// The gradients the scan produces per token, `[M, C]` each, before the pass through the
/// per-token quantities.
#[derive(Default)]
pub(crate) struct Grads {
    dkk: Vec<f32>,
    db: Vec<f32>,
    dkmod: Vec<f32>,
    ddec: Vec<f32>,
    /// Chunk states and the state gradient.
    states: Vec<f32>,
}

/// The backward pass of [`forward`]: adds the gradients of `r` and `v` into planes 0 and 3 of
/// `dacts [6, M, C]`, sets those of `w, k, a` (planes 1, 2, 4) including what reaches the
/// modified key through [`Grads::dkmod`], adds those of `k_k`, `k_a` into `dk_k`, `dk_a`, and,
/// when `ds0` is not empty, that of the initial state (`[H, N, N]`, summed over the windows)
/// into `ds0`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    d: Shape,
    acts: &[f32],
    k_k: &[f32],
    k_a: &[f32],
    p: &Prep,
    gy: &[f32],
    dacts: &mut [f32],
    dk_k: &mut [f32],
    dk_a: &mut [f32],
    ds0: &mut [f32],
    gr: &mut Grads,
) {
    let (c, n) = (d.c(), d.n);
    let mc = d.b * d.t * c;
    let nn = n * n;
    for v in [&mut gr.dkk, &mut gr.db, &mut gr.ddec] {
        v.resize(mc, 0.0);
    }
    assert_eq!(gr.dkmod.len(), mc, "Grads::dkmod was not set");
    gr.states.resize((WKV_CHUNK + 2) * nn, 0.0);
    let pl = |i: usize| &acts[i * mc..(i + 1) * mc];
    let (dr, rest) = dacts.split_at_mut(mc);
    let (dw, rest) = rest.split_at_mut(mc);
    let (dk, rest) = rest.split_at_mut(mc);
    let (dv, rest) = rest.split_at_mut(mc);
    let da = &mut rest[..mc];
    for bi in 0..d.b {
        for hi in 0..d.h {
            let o = bi * d.t * c + hi * n;
            let task = bi * d.h + hi;
            let ck = &p.ck[task * d.nck() * nn..(task + 1) * d.nck() * nn];
            let io = Io { t: d.t, c, o, n };
            let outs = Outs {
                dr: &mut *dr,
                dv: &mut *dv,
                dkk: &mut gr.dkk,
                db: &mut gr.db,
                dkmod: &mut gr.dkmod,
                ddec: &mut gr.ddec,
            };
            if simd(n) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F was detected; `Io` stays inside the planes.
                unsafe {
                    match n {
                        16 => avx512::bwd::<1>(io, pl(0), pl(3), p, gy, ck, outs, &mut gr.states),
                        32 => avx512::bwd::<2>(io, pl(0), pl(3), p, gy, ck, outs, &mut gr.states),
                        _ => avx512::bwd::<4>(io, pl(0), pl(3), p, gy, ck, outs, &mut gr.states),
                    }
                }
            } else {
                dispatch!(bwd_head(io, pl(0), pl(3), p, gy, ck, outs, &mut gr.states));
            }
            // Both scans leave the gradient of the state before the window's first token in
            // the scratch's last `N × N` values.
            if !ds0.is_empty() {
                let ds = &gr.states[(WKV_CHUNK + 1) * nn..(WKV_CHUNK + 2) * nn];
                add_into(&mut ds0[hi * nn..(hi + 1) * nn], ds);
            }
        }
    }
    dispatch!(through_prep(
        n,
        pl(2),
        pl(4),
        k_k,
        k_a,
        p,
        gr,
        dw,
        dk,
        da,
        dk_k,
        dk_a
    ));
}

/// `acc += x`.
fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// Where the backward scan writes: `dr`, `dv` are added to; the others are set.
struct Outs<'a> {
    dr: &'a mut [f32],
    dv: &'a mut [f32],
    dkk: &'a mut [f32],
    db: &'a mut [f32],
    dkmod: &'a mut [f32],
    ddec: &'a mut [f32],
}

/// The portable backward scan of one head (any head size).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_head(
    io: Io,
    r: &[f32],
    v: &[f32],
    p: &Prep,
    gy: &[f32],
    ck: &[f32],
    out: Outs<'_>,
    scr: &mut [f32],
) {
    let n = io.n;
    let nn = n * n;
    let (states, ds) = scr.split_at_mut((WKV_CHUNK + 1) * nn);
    let ds = &mut ds[..nn];
    ds.iter_mut().for_each(|z| *z = 0.0);
    for q in (0..io.t.div_ceil(WKV_CHUNK)).rev() {
        let (t0, t1) = (q * WKV_CHUNK, ((q + 1) * WKV_CHUNK).min(io.t));
        states[..nn].copy_from_slice(&ck[q * nn..(q + 1) * nn]);
        for ti in t0..t1 {
            let li = ti - t0;
            let o = io.at(ti);
            let (prev, next) = states.split_at_mut((li + 1) * nn);
            let prev = &prev[li * nn..];
            for i in 0..n {
                let (sai, vi) = (p.sa[o + i], v[o + i]);
                for j in 0..n {
                    next[i * n + j] =
                        prev[i * n + j] * p.dec[o + j] + sai * p.b[o + j] + vi * p.kmod[o + j];
                }
            }
        }
        for ti in (t0..t1).rev() {
            let li = ti - t0;
            let o = io.at(ti);
            let sprev = &states[li * nn..(li + 1) * nn];
            let scur = &states[(li + 1) * nn..(li + 2) * nn];
            for j in 0..n {
                out.dkk[o + j] = 0.0;
                out.db[o + j] = 0.0;
                out.ddec[o + j] = 0.0;
            }
            for i in 0..n {
                let (dyi, vi, sai) = (gy[o + i], v[o + i], p.sa[o + i]);
                let row = &mut ds[i * n..(i + 1) * n];
                let (mut dvi, mut dsai) = (0f32, 0f32);
                for j in 0..n {
                    let dd = row[j] + dyi * r[o + j];
                    out.dr[o + j] += scur[i * n + j] * dyi;
                    out.ddec[o + j] += dd * sprev[i * n + j];
                    out.db[o + j] += dd * sai;
                    out.dkmod[o + j] += dd * vi;
                    dvi += dd * p.kmod[o + j];
                    dsai += dd * p.b[o + j];
                    row[j] = dd;
                }
                out.dv[o + i] += dvi;
                for j in 0..n {
                    out.dkk[o + j] -= dsai * sprev[i * n + j];
                    row[j] = row[j] * p.dec[o + j] - dsai * p.kk[o + j];
                }
            }
        }
    }
}

/// From the gradients of `kk, kk·a, kmod, decay` to those of `w, k, a` (set) and of `k_k`,
/// `k_a` (added), through the normalisation and the decay activation.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn through_prep(
    n: usize,
    k: &[f32],
    a: &[f32],
    k_k: &[f32],
    k_a: &[f32],
    p: &Prep,
    gr: &mut Grads,
    dw: &mut [f32],
    dk: &mut [f32],
    da: &mut [f32],
    dk_k: &mut [f32],
    dk_a: &mut [f32],
) {
    let c = k_k.len();
    let ws = -(W_SCALE as f32);
    let rows = k.chunks_exact(c).zip(a.chunks_exact(c));
    let keep =
        p.kk.chunks_exact(c)
            .zip(p.sig.chunks_exact(c).zip(p.dec.chunks_exact(c)));
    let gin = gr
        .db
        .chunks_exact(c)
        .zip(gr.dkmod.chunks_exact(c).zip(gr.ddec.chunks_exact(c)));
    let outs = dw
        .chunks_exact_mut(c)
        .zip(dk.chunks_exact_mut(c).zip(da.chunks_exact_mut(c)));
    for ((((kr, ar), (kkr, (sg, de))), (dbr, (dkm, dde))), ((dwr, (dkr, dar)), dkk)) in rows
        .zip(keep)
        .zip(gin)
        .zip(outs.zip(gr.dkk.chunks_exact_mut(c)))
    {
        for j in 0..c {
            dkk[j] += dbr[j] * ar[j];
            dar[j] = dbr[j] * kkr[j] + dkm[j] * kr[j] * k_a[j];
            dk_a[j] += dkm[j] * kr[j] * (ar[j] - 1.0);
            dkr[j] = dkm[j] * (1.0 + (ar[j] - 1.0) * k_a[j]);
            dwr[j] = dde[j] * de[j] * ws * sg[j] * (1.0 - sg[j]);
        }
    }
    // Through kk = x / max(‖x‖, 1e-12), x = k·k_k, per head.
    for (g, base) in (0..k.len()).step_by(n).enumerate() {
        let s = base..base + n;
        let ch = base % c..base % c + n;
        let (dkk, kk) = (&gr.dkk[s.clone()], &p.kk[s.clone()]);
        let nm = p.norm[g];
        let inv = 1.0 / nm;
        let proj = if nm > NORMALIZE_EPS as f32 {
            dot(dkk, kk)
        } else {
            0.0
        };
        let (kr, dkr) = (&k[s.clone()], &mut dk[s]);
        let (kkp, dkkp) = (&k_k[ch.clone()], &mut dk_k[ch]);
        for j in 0..n {
            let draw = (dkk[j] - kk[j] * proj) * inv;
            dkr[j] += draw * kkp[j];
            dkkp[j] += draw * kr[j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Ins, Io, Outs, Prep, WKV_CHUNK};
    use std::arch::x86_64::*;

    /// How many tokens ahead the scans prefetch their planes' rows (1, 3 and 6 measured the
    /// same on the recipe's shapes).
    const PF: usize = 1;

    /// Asks for the `16·Z` values of `x` from `o` on to be brought into the L1 cache: the scan
    /// walks the rows of a dozen `[M, C]` planes one token at a time, a pattern the hardware
    /// prefetchers do not follow (backwards, and through the L3 cache: a piece's planes do
    /// not fit the L2), and the loop over a head's state rows leaves the next token's loads no
    /// room to start early.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fetch<const Z: usize>(x: &[f32], o: usize) {
        for z in 0..Z {
            _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().wrapping_add(o + 16 * z).cast());
        }
    }

    /// Sixteen horizontal sums at once: lane `k` of the result is the sum of the lanes of
    /// `v[k]`. Four rounds of shuffles and adds (45 instructions) instead of sixteen separate
    /// reductions (about 130, each a serial chain).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn hsum16(v: &[__m512; 16]) -> __m512 {
        // Pairs within 128-bit lanes: [a0+a2, b0+b2, a1+a3, b1+b3].
        let u: [__m512; 8] = std::array::from_fn(|k| {
            let (a, b) = (v[2 * k], v[2 * k + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Quads: [sum a, sum b, sum c, sum d] in every 128-bit lane.
        let w: [__m512; 4] = std::array::from_fn(|m| {
            let (a, b) = (_mm512_castps_pd(u[2 * m]), _mm512_castps_pd(u[2 * m + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        });
        // Across 128-bit lanes: two rounds of pairing lanes (0,1) and (2,3).
        let x: [__m512; 2] = std::array::from_fn(|m| {
            let (a, b) = (w[2 * m], w[2 * m + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x[0], x[1]),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x[0], x[1]),
        )
    }

    /// The forward scan of one head of size `16·Z`.
    ///
    /// The state is kept transposed (`s[j·n + i] = S[i][j]`, a row per key channel), so that
    /// both `sa = S·(-kk)` and `y = S·r` are sums of rows scaled by broadcast values, with no
    /// horizontal sums at all; the checkpoints are written in `S`'s own layout for
    /// [`bwd`] and the portable scan.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fwd<const Z: usize>(
        io: Io,
        x: &Ins<'_>,
        init: &[f32],
        sa: &mut [f32],
        y: &mut [f32],
        ck: &mut [f32],
        s: &mut [f32],
    ) {
        let n = 16 * Z;
        let nn = n * n;
        let last = io.at(io.t - 1) + n;
        for q in [x.r, x.v, x.kk, x.b, x.kmod, x.dec, &*sa, &*y] {
            assert!(last <= q.len());
        }
        assert!(s.len() >= nn && ck.len() >= io.t.div_ceil(WKV_CHUNK) * nn);
        assert!(init.is_empty() || init.len() == nn);
        if init.is_empty() {
            s[..nn].fill(0.0);
        } else {
            for i in 0..n {
                for j in 0..n {
                    s[j * n + i] = init[i * n + j];
                }
            }
        }
        let s = s.as_mut_ptr();
        let ld = |x: &[f32], o: usize| -> [__m512; Z] {
            std::array::from_fn(|z| _mm512_loadu_ps(x.as_ptr().add(o + 16 * z)))
        };
        let zero = [_mm512_setzero_ps(); Z];
        for ti in 0..io.t {
            if ti % WKV_CHUNK == 0 {
                let c = ck.as_mut_ptr().add(ti / WKV_CHUNK * nn);
                for j in 0..n {
                    for i in 0..n {
                        *c.add(i * n + j) = *s.add(j * n + i);
                    }
                }
            }
            let o = io.at(ti);
            if ti + PF < io.t {
                let o1 = io.at(ti + PF);
                for q in [x.r, x.v, x.kk, x.b, x.kmod, x.dec, &*sa, &*y] {
                    fetch::<Z>(q, o1);
                }
            }
            let (kk, b, km) = (
                x.kk.as_ptr().add(o),
                x.b.as_ptr().add(o),
                x.kmod.as_ptr().add(o),
            );
            let (dec, rr) = (x.dec.as_ptr().add(o), x.r.as_ptr().add(o));
            // sa = -Σ_j kk_j·S[:, j], in two interleaved sums (shorter dependency chains).
            let (mut p0, mut p1) = (zero, zero);
            for j in (0..n).step_by(2) {
                let (k0, k1) = (_mm512_set1_ps(*kk.add(j)), _mm512_set1_ps(*kk.add(j + 1)));
                for z in 0..Z {
                    p0[z] = _mm512_fmadd_ps(_mm512_loadu_ps(s.add(j * n + 16 * z)), k0, p0[z]);
                    p1[z] = _mm512_fmadd_ps(_mm512_loadu_ps(s.add(j * n + n + 16 * z)), k1, p1[z]);
                }
            }
            let sav: [__m512; Z] = std::array::from_fn(|z| {
                _mm512_sub_ps(_mm512_setzero_ps(), _mm512_add_ps(p0[z], p1[z]))
            });
            let vv = ld(x.v, o);
            // Row j of the new state: S[:, j]·dec_j + sa·b_j + v·kmod_j, and y += r_j·that.
            let step = |j: usize, y: &mut [__m512; Z]| {
                let (dj, bj) = (_mm512_set1_ps(*dec.add(j)), _mm512_set1_ps(*b.add(j)));
                let (kj, rj) = (_mm512_set1_ps(*km.add(j)), _mm512_set1_ps(*rr.add(j)));
                for z in 0..Z {
                    let row = s.add(j * n + 16 * z);
                    let st = _mm512_fmadd_ps(
                        _mm512_loadu_ps(row),
                        dj,
                        _mm512_fmadd_ps(sav[z], bj, _mm512_mul_ps(vv[z], kj)),
                    );
                    _mm512_storeu_ps(row, st);
                    y[z] = _mm512_fmadd_ps(st, rj, y[z]);
                }
            };
            let (mut y0, mut y1) = (zero, zero);
            for j in (0..n).step_by(2) {
                step(j, &mut y0);
                step(j + 1, &mut y1);
            }
            for z in 0..Z {
                _mm512_storeu_ps(sa.as_mut_ptr().add(o + 16 * z), sav[z]);
                _mm512_storeu_ps(y.as_mut_ptr().add(o + 16 * z), _mm512_add_ps(y0[z], y1[z]));
            }
        }
    }

    /// The backward scan of one head of size `16·Z` (see `bwd_head`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn bwd<const Z: usize>(
        io: Io,
        r: &[f32],
        v: &[f32],
        p: &Prep,
        gy: &[f32],
        ck: &[f32],
        out: Outs<'_>,
        scr: &mut [f32],
    ) {
        let n = 16 * Z;
        let nn = n * n;
        let last = io.at(io.t - 1) + n;
        for x in [r, v, gy, &p.sa, &p.kk, &p.b, &p.kmod, &p.dec] {
            assert!(last <= x.len());
        }
        for x in [
            &*out.dr,
            &*out.dv,
            &*out.dkk,
            &*out.db,
            &*out.dkmod,
            &*out.ddec,
        ] {
            assert!(last <= x.len());
        }
        assert!(scr.len() >= (WKV_CHUNK + 2) * nn && ck.len() >= io.t.div_ceil(WKV_CHUNK) * nn);
        let states = scr.as_mut_ptr();
        let ds = states.add((WKV_CHUNK + 1) * nn);
        std::ptr::write_bytes(ds, 0, nn);
        let ld_ptr = |x: *const f32, o: usize| -> [__m512; Z] {
            std::array::from_fn(|z| _mm512_loadu_ps(x.add(o + 16 * z)))
        };
        let ld = |x: &[f32], o: usize| ld_ptr(x.as_ptr(), o);
        let st = |x: *mut f32, o: usize, val: [__m512; Z]| {
            for z in 0..Z {
                _mm512_storeu_ps(x.add(o + 16 * z), val[z]);
            }
        };
        for q in (0..io.t.div_ceil(WKV_CHUNK)).rev() {
            let (t0, t1) = (q * WKV_CHUNK, ((q + 1) * WKV_CHUNK).min(io.t));
            std::ptr::copy_nonoverlapping(ck.as_ptr().add(q * nn), states, nn);
            for ti in t0..t1 {
                let li = ti - t0;
                let o = io.at(ti);
                if ti + PF < t1 {
                    for x in [v, &p.sa, &p.b, &p.kmod, &p.dec] {
                        fetch::<Z>(x, io.at(ti + PF));
                    }
                }
                let (prev, next) = (states.add(li * nn), states.add((li + 1) * nn));
                let (b, km, dec) = (ld(&p.b, o), ld(&p.kmod, o), ld(&p.dec, o));
                for i in 0..n {
                    let sa = _mm512_set1_ps(*p.sa.get_unchecked(o + i));
                    let vi = _mm512_set1_ps(*v.get_unchecked(o + i));
                    for z in 0..Z {
                        let x = _mm512_loadu_ps(prev.add(i * n + 16 * z));
                        let x = _mm512_fmadd_ps(
                            x,
                            dec[z],
                            _mm512_fmadd_ps(sa, b[z], _mm512_mul_ps(vi, km[z])),
                        );
                        _mm512_storeu_ps(next.add(i * n + 16 * z), x);
                    }
                }
            }
            for ti in (t0..t1).rev() {
                let li = ti - t0;
                let o = io.at(ti);
                // The previous token's rows (the next chunk's last, at a chunk's start).
                if ti >= PF {
                    let o1 = io.at(ti - PF);
                    for x in [r, v, gy, &p.sa, &p.kk, &p.b, &p.kmod, &p.dec] {
                        fetch::<Z>(x, o1);
                    }
                    for x in [&*out.dr, &*out.dkmod, &*out.ddec, &*out.db, &*out.dkk] {
                        fetch::<Z>(x, o1);
                    }
                }
                let (sprev, scur) = (states.add(li * nn), states.add((li + 1) * nn));
                let (rr, kk, b, km, dec) = (
                    ld(r, o),
                    ld(&p.kk, o),
                    ld(&p.b, o),
                    ld(&p.kmod, o),
                    ld(&p.dec, o),
                );
                // With D = dS + dy⊗r the state gradient after this token's output, the rows'
                // sums dsa_i = Σ_j D[i][j]·b_j and dv_i = Σ_j D[i][j]·kmod_j are
                // dS·b + dy·(r·b) and dS·kmod + dy·(r·kmod): computed first, sixteen rows
                // at a time through one batched horizontal sum, so that the loop below has no
                // horizontal sum waiting in the middle of each row.
                let dotv = |a: &[__m512; Z], c: &[__m512; Z]| {
                    let mut acc = _mm512_mul_ps(a[0], c[0]);
                    for z in 1..Z {
                        acc = _mm512_fmadd_ps(a[z], c[z], acc);
                    }
                    acc
                };
                let (rb, rk) = (
                    _mm512_set1_ps(_mm512_reduce_add_ps(dotv(&rr, &b))),
                    _mm512_set1_ps(_mm512_reduce_add_ps(dotv(&rr, &km))),
                );
                let mut dsa = [0f32; 64];
                for g in 0..Z {
                    let rows = |x: &[__m512; Z]| -> __m512 {
                        let part: [__m512; 16] =
                            std::array::from_fn(|l| dotv(&ld_ptr(ds, (16 * g + l) * n), x));
                        hsum16(&part)
                    };
                    let dy = _mm512_loadu_ps(gy.as_ptr().add(o + 16 * g));
                    _mm512_storeu_ps(
                        dsa.as_mut_ptr().add(16 * g),
                        _mm512_fmadd_ps(dy, rb, rows(&b)),
                    );
                    let dvp = out.dv.as_mut_ptr().add(o + 16 * g);
                    let dvs = _mm512_fmadd_ps(dy, rk, rows(&km));
                    _mm512_storeu_ps(dvp, _mm512_add_ps(_mm512_loadu_ps(dvp), dvs));
                }
                let zero = [_mm512_setzero_ps(); Z];
                let (mut dr, mut ddec, mut db, mut dkm, mut dkk) = (zero, zero, zero, zero, zero);
                for i in 0..n {
                    let dyi = _mm512_set1_ps(*gy.get_unchecked(o + i));
                    let vi = _mm512_set1_ps(*v.get_unchecked(o + i));
                    let sai = _mm512_set1_ps(*p.sa.get_unchecked(o + i));
                    let dsa = _mm512_set1_ps(dsa[i]);
                    let row = ds.add(i * n);
                    for z in 0..Z {
                        let d = _mm512_fmadd_ps(dyi, rr[z], _mm512_loadu_ps(row.add(16 * z)));
                        let sc = _mm512_loadu_ps(scur.add(i * n + 16 * z));
                        let sp = _mm512_loadu_ps(sprev.add(i * n + 16 * z));
                        dr[z] = _mm512_fmadd_ps(sc, dyi, dr[z]);
                        ddec[z] = _mm512_fmadd_ps(d, sp, ddec[z]);
                        db[z] = _mm512_fmadd_ps(d, sai, db[z]);
                        dkm[z] = _mm512_fmadd_ps(d, vi, dkm[z]);
                        dkk[z] = _mm512_fnmadd_ps(dsa, sp, dkk[z]);
                        let nd = _mm512_fnmadd_ps(dsa, kk[z], _mm512_mul_ps(d, dec[z]));
                        _mm512_storeu_ps(row.add(16 * z), nd);
                    }
                }
                let old = ld(out.dr, o);
                let dr: [__m512; Z] = std::array::from_fn(|z| _mm512_add_ps(old[z], dr[z]));
                st(out.dr.as_mut_ptr(), o, dr);
                st(out.ddec.as_mut_ptr(), o, ddec);
                st(out.db.as_mut_ptr(), o, db);
                let old = ld(out.dkmod, o);
                let dkm: [__m512; Z] = std::array::from_fn(|z| _mm512_add_ps(old[z], dkm[z]));
                st(out.dkmod.as_mut_ptr(), o, dkm);
                st(out.dkk.as_mut_ptr(), o, dkk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the scan forward and backward on random planes: the outputs and every gradient.
    fn run(d: Shape, portable: bool) -> Vec<Vec<f32>> {
        PORTABLE.with(|p| p.set(portable));
        let c = d.h * d.n;
        let mc = d.b * d.t * c;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |lo: f32, hi: f32| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            lo + (hi - lo) * ((seed >> 40) as f32 / (1u64 << 24) as f32)
        };
        let mut acts = vec![0f32; 6 * mc];
        for (i, x) in acts.iter_mut().enumerate() {
            // Plane 4 (a) lies in (0, 1) as after its sigmoid; the others in (-1, 1).
            *x = if i / mc == 4 {
                rnd(0.0, 1.0)
            } else {
                rnd(-1.0, 1.0)
            };
        }
        let k_k: Vec<f32> = (0..c).map(|_| rnd(0.5, 1.5)).collect();
        let k_a: Vec<f32> = (0..c).map(|_| rnd(0.0, 1.0)).collect();
        let gy: Vec<f32> = (0..mc).map(|_| rnd(-1.0, 1.0)).collect();
        let dkm0: Vec<f32> = (0..mc).map(|_| rnd(-1.0, 1.0)).collect();
        let s0: Vec<f32> = (0..d.h * d.n * d.n).map(|_| rnd(-0.5, 0.5)).collect();
        let (mut y, mut p, mut scratch) = (vec![0f32; mc], Prep::default(), Vec::new());
        forward(d, &acts, &k_k, &k_a, &s0, &mut y, &mut p, &mut scratch);
        let mut dacts = vec![0.5f32; 6 * mc];
        let (mut dk_k, mut dk_a) = (vec![0f32; c], vec![0f32; c]);
        let mut ds0 = vec![0f32; s0.len()];
        let mut gr = Grads::default();
        gr.dkmod(mc).copy_from_slice(&dkm0);
        backward(
            d, &acts, &k_k, &k_a, &p, &gy, &mut dacts, &mut dk_k, &mut dk_a, &mut ds0, &mut gr,
        );
        PORTABLE.with(|p| p.set(false));
        vec![y, p.sa, p.ck, dacts, dk_k, dk_a, ds0]
    }

    /// The vector scan (AVX-512, head sizes 16, 32, 64) gives the portable scan's outputs,
    /// checkpoints and gradients (the initial state's too), over windows that start from a
    /// state and end inside a chunk.
    #[test]
    fn vector_scan_matches_portable() {
        for n in [16, 32, 64] {
            if !simd(n) {
                eprintln!("no vector scan here for head size {n}");
                continue;
            }
            let d = Shape {
                b: 2,
                t: 37,
                h: 2,
                n,
            };
            let (want, got) = (run(d, true), run(d, false));
            for (k, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(w.len(), g.len());
                let scale = w.iter().fold(0f32, |a, b| a.max(b.abs())).max(1e-6);
                let err = w.iter().zip(g).fold(0f32, |a, (w, g)| a.max((w - g).abs())) / scale;
                eprintln!("head size {n}, output {k}: largest relative difference {err:e}");
                assert!(err < 1e-5, "head size {n}, output {k}: {err:e}");
            }
        }
    }
}
