//! The RWKV-4 WKV of the hand-written pass: per channel,
//!
//! `y_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})`
//!
//! with `w = -exp(time_decay)` and `u = time_first`, from a zero state at the start of each
//! window. The same computation and backward pass as the graph's `ops::Wkv4` (the official
//! kernel's, with every exponential kept at or below 1 by a running maximum exponent),
//! restructured for the CPU: a sweep over the tokens with all channels of a token side by side,
//! so every inner loop is a contiguous, vectorisable pass over `C` values.

// Index loops over several parallel per-channel arrays read more clearly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use crate::common::dispatch;
use rwkv_core::kernels::exp;

/// The exponent of the empty state (`e^pp` with `pp` this low is zero in every product).
const EMPTY: f32 = -1e30;

/// The inputs of one layer's WKV over windows of `t` tokens of width `c` (rows `[M, C]`).
pub struct Ins<'a> {
    /// Tokens per window.
    pub t: usize,
    /// Keys `[M, C]`.
    pub k: &'a [f32],
    /// Values `[M, C]`.
    pub v: &'a [f32],
    /// `time_decay [C]` (the decay is `w = -exp(time_decay)`).
    pub decay: &'a [f32],
    /// `time_first [C]` (the current token's bonus `u`).
    pub first: &'a [f32],
}

/// The forward pass: writes `y [M, C]` and, for the backward pass, the state before each
/// token in `state [3, M, C]` (`aa`, `bb`, `pp`: the numerator and denominator sums, scaled
/// by `e^-pp`). `w [C]` is scratch.
pub fn forward(x: &Ins<'_>, y: &mut [f32], state: &mut [f32], w: &mut [f32]) {
    #[inline(always)]
    fn body(x: &Ins<'_>, y: &mut [f32], state: &mut [f32], w: &mut [f32]) {
        let (t, u) = (x.t, x.first);
        let c = u.len();
        let mc = y.len();
        let (sa, rest) = state.split_at_mut(mc);
        let (sb, sp) = rest.split_at_mut(mc);
        for j in 0..c {
            w[j] = -x.decay[j].exp();
        }
        for r in 0..mc / c {
            let o = r * c;
            if r % t == 0 {
                sa[o..o + c].fill(0.0);
                sb[o..o + c].fill(0.0);
                sp[o..o + c].fill(EMPTY);
            }
            let (k, v) = (&x.k[o..o + c], &x.v[o..o + c]);
            let yr = &mut y[o..o + c];
            let (aa, bb, pp) = (&sa[o..o + c], &sb[o..o + c], &sp[o..o + c]);
            for j in 0..c {
                let ww = u[j] + k[j];
                let m = pp[j].max(ww);
                let (e1, e2) = (exp(pp[j] - m), exp(ww - m));
                yr[j] = (e1 * aa[j] + e2 * v[j]) / (e1 * bb[j] + e2);
            }
            if (r + 1) % t == 0 {
                continue;
            }
            // The state before the next token: a' = e^w·a + e^k·v, b' = e^w·b + e^k, both
            // scaled by the larger of the two exponents.
            let (ha, ta) = sa.split_at_mut(o + c);
            let (hb, tb) = sb.split_at_mut(o + c);
            let (hp, tp) = sp.split_at_mut(o + c);
            let (aa, bb, pp) = (&ha[o..], &hb[o..], &hp[o..]);
            let (na, nb, np) = (&mut ta[..c], &mut tb[..c], &mut tp[..c]);
            for j in 0..c {
                let ww = pp[j] + w[j];
                let q = ww.max(k[j]);
                let (e1, e2) = (exp(ww - q), exp(k[j] - q));
                na[j] = e1 * aa[j] + e2 * v[j];
                nb[j] = e1 * bb[j] + e2;
                np[j] = q;
            }
        }
    }
    dispatch!(body(x, y, state, w))
}

/// The gradients of one layer's WKV.
pub struct Grads<'a> {
    /// Set to the keys' gradient `[M, C]`.
    pub dk: &'a mut [f32],
    /// Set to the values' gradient `[M, C]`.
    pub dv: &'a mut [f32],
    /// `time_decay`'s gradient `[C]`, added to.
    pub ddecay: &'a mut [f32],
    /// `time_first`'s gradient `[C]`, added to.
    pub dfirst: &'a mut [f32],
}

/// The backward pass from `dy [M, C]`, with the forward pass's `y` and `state`: sets the keys'
/// and values' gradients and adds those of `time_decay` and `time_first`. `scratch [6·C]`.
///
/// Going back through a window, the adjoints of the state's sums `a`, `b` are carried as
/// `α = Â·e^-r` with `r` the smallest exponent of their terms, so every factor that multiplies
/// them (`e^{k_t - r}`, `e^{pp + w - r}`) is at most 1.
pub fn backward(
    x: &Ins<'_>,
    y: &[f32],
    state: &[f32],
    dy: &[f32],
    g: Grads<'_>,
    scratch: &mut [f32],
) {
    #[inline(always)]
    fn body(x: &Ins<'_>, y: &[f32], state: &[f32], dy: &[f32], g: Grads<'_>, scratch: &mut [f32]) {
        let (t, u) = (x.t, x.first);
        let c = u.len();
        let mc = y.len();
        let (sa, rest) = state.split_at(mc);
        let (sb, sp) = rest.split_at(mc);
        let (w, rest) = scratch.split_at_mut(c);
        let (ah, rest) = rest.split_at_mut(c);
        let (bh, rest) = rest.split_at_mut(c);
        let (rr, rest) = rest.split_at_mut(c);
        let (dw, du) = rest.split_at_mut(c);
        let du = &mut du[..c];
        for j in 0..c {
            w[j] = -x.decay[j].exp();
        }
        dw.fill(0.0);
        du.fill(0.0);
        for win in 0..mc / c / t {
            // Past the window's last token: zero adjoints at an exponent no term reaches, so
            // that the last token's update below is their plain start (every product with
            // them is zero).
            ah.fill(0.0);
            bh.fill(0.0);
            rr.fill(-EMPTY);
            for ti in (0..t).rev() {
                let o = (win * t + ti) * c;
                let row = o..o + c;
                let (k, v, gy, yr) = (
                    &x.k[row.clone()],
                    &x.v[row.clone()],
                    &dy[row.clone()],
                    &y[row.clone()],
                );
                let (aa, bb, pp) = (&sa[row.clone()], &sb[row.clone()], &sp[row.clone()]);
                let (dk, dv) = (&mut g.dk[row.clone()], &mut g.dv[row]);
                back_row(u, w, k, v, gy, yr, aa, bb, pp, ah, bh, rr, dw, du, dk, dv);
            }
        }
        // w = -exp(time_decay): dw/d(time_decay) = w.
        for j in 0..c {
            g.ddecay[j] += dw[j] * w[j];
            g.dfirst[j] += du[j];
        }
    }
    dispatch!(body(x, y, state, dy, g, scratch))
}

/// One token's step of [`backward`] over all channels: from the row's `k, v, dy, y` and the
/// state before it `aa, bb, pp`, sets its `dk`, `dv` and moves the carry `α, β, r` one token
/// back, adding to `d(w)`, `d(u)`. Every slice is an argument of its own, so the compiler
/// knows that none overlaps another and vectorises the loop (with the slices in a struct or
/// an array it would need a run-time check per pair, and gives up).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn back_row(
    u: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    gy: &[f32],
    yr: &[f32],
    aa: &[f32],
    bb: &[f32],
    pp: &[f32],
    ah: &mut [f32],
    bh: &mut [f32],
    rr: &mut [f32],
    dw: &mut [f32],
    du: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let c = u.len();
    let (w, k, v, gy, yr) = (&w[..c], &k[..c], &v[..c], &gy[..c], &yr[..c]);
    let (aa, bb, pp) = (&aa[..c], &bb[..c], &pp[..c]);
    let (ah, bh, rr, dw, du) = (
        &mut ah[..c],
        &mut bh[..c],
        &mut rr[..c],
        &mut dw[..c],
        &mut du[..c],
    );
    let (dk, dv) = (&mut dk[..c], &mut dv[..c]);
    for j in 0..c {
        let ww = u[j] + k[j];
        let m = pp[j].max(ww);
        let (e1, e2) = (exp(pp[j] - m), exp(ww - m));
        let dd = e1 * bb[j] + e2;
        // Direct use of k_t, v_t in y_t through e^{u+k_t}.
        let e = e2 / dd;
        let dyk = gy[j] * (v[j] - yr[j]) * e;
        du[j] += dyk;
        // Through a_{t+1} = e^w a_t + e^k v, b_{t+1} = e^w b_t + e^k.
        let ek = exp(k[j] - rr[j]);
        dk[j] = dyk + ek * (v[j] * ah[j] + bh[j]);
        dv[j] = gy[j] * e + ek * ah[j];
        dw[j] += exp(w[j] - rr[j] + pp[j]) * (ah[j] * aa[j] + bh[j] * bb[j]);
        // α_t = g/D_t + e^w α_{t+1} (β likewise), rescaled to r_t = min(m_t, r_{t+1} - w).
        let (ga, gb) = (gy[j] / dd, -gy[j] * yr[j] / dd);
        let rt = m.min(rr[j] - w[j]);
        let (s1, s2) = (exp(rt - m), exp(w[j] - rr[j] + rt));
        ah[j] = ga * s1 + ah[j] * s2;
        bh[j] = gb * s1 + bh[j] * s2;
        rr[j] = rt;
    }
}
