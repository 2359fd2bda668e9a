//! The element-wise kernels both hand-written passes use: layer norm, token shift, the
//! activations, cross-entropy and the small reductions, each with its backward pass. They are
//! plain loops over slices left to the compiler's vectoriser and called through
//! [`dispatch!`](crate::common::dispatch) where they are hot (AVX2 and FMA where present).

// Index loops over several parallel per-channel arrays read more clearly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use crate::common::dispatch;
use rwkv_core::kernels::{exp, sigmoid};

const LN_EPS: f32 = rwkv_core::model::consts::LN_EPS as f32;

/// Two distinct gradient buffers at once.
pub(crate) fn two(g: &mut [Vec<f32>], i: usize, j: usize) -> (&mut [f32], &mut [f32]) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = g.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = g.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

/// `tanh` from one exponential (2 ulp in `exp`; absolute error about 1e-7 near zero).
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.clamp(-15.0, 15.0));
    (e - 1.0) / (e + 1.0)
}

/// `x ← tanh(x)`.
pub(crate) fn map_tanh(x: &mut [f32]) {
    #[inline(always)]
    fn body(x: &mut [f32]) {
        x.iter_mut().for_each(|z| *z = tanh(*z));
    }
    dispatch!(body(x))
}

/// `x ← sigmoid(x)`.
pub(crate) fn map_sigmoid(x: &mut [f32]) {
    #[inline(always)]
    fn body(x: &mut [f32]) {
        x.iter_mut().for_each(|z| *z = sigmoid(*z));
    }
    dispatch!(body(x))
}

/// Every row of `y` set to `b`.
pub(crate) fn bias_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.copy_from_slice(b);
    }
}

/// `y += x`.
pub(crate) fn add(y: &mut [f32], x: &[f32]) {
    #[inline(always)]
    fn body(y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(a, b)| *a += *b);
    }
    dispatch!(body(y, x))
}

/// `s += Σ rows of x`.
pub(crate) fn col_sums(x: &[f32], s: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], s: &mut [f32]) {
        let c = s.len();
        for row in x.chunks_exact(c) {
            s.iter_mut().zip(row).for_each(|(a, b)| *a += *b);
        }
    }
    dispatch!(body(x, s))
}

#[inline(always)]
pub(crate) fn relu_sq(x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| {
        let r = x.max(0.0);
        *y = r * r
    });
}

#[inline(always)]
pub(crate) fn relu_sq_back(x: &[f32], d: &mut [f32]) {
    d.iter_mut()
        .zip(x)
        .for_each(|(d, &x)| *d *= 2.0 * x.max(0.0));
}

/// `d ← d · (1 - y²)` for `y = tanh(x)`.
#[inline(always)]
pub(crate) fn tanh_back(y: &[f32], d: &mut [f32]) {
    d.iter_mut().zip(y).for_each(|(d, &y)| *d *= 1.0 - y * y);
}

/// `d ← d · y(1 - y)` for `y = sigmoid(x)`.
#[inline(always)]
pub(crate) fn sigmoid_back(y: &[f32], d: &mut [f32]) {
    d.iter_mut().zip(y).for_each(|(d, &y)| *d *= y * (1.0 - y));
}

/// Layer norm of every row: `out = x̂·w + b`, keeping `x̂` and `1/σ` for the backward pass.
pub(crate) fn layer_norm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    out: &mut [f32],
    hat: &mut [f32],
    rstd: &mut [f32],
) {
    #[inline(always)]
    fn body(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], hat: &mut [f32], rstd: &mut [f32]) {
        let c = w.len();
        let inv = 1.0 / c as f32;
        for (r, ((xr, or), hr)) in x
            .chunks_exact(c)
            .zip(out.chunks_exact_mut(c))
            .zip(hat.chunks_exact_mut(c))
            .enumerate()
        {
            let mu = sum(xr) * inv;
            let var = sq_dev(xr, mu) * inv;
            let rs = 1.0 / (var + LN_EPS).sqrt();
            rstd[r] = rs;
            for j in 0..c {
                let h = (xr[j] - mu) * rs;
                hr[j] = h;
                or[j] = h * w[j] + b[j];
            }
        }
    }
    dispatch!(body(x, w, b, out, hat, rstd))
}

/// The backward pass of [`layer_norm`]: `dx (+)= ∂/∂x`, `dw += Σ dout·x̂`, `db += Σ dout`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_back(
    dout: &[f32],
    hat: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: &mut [f32],
    acc: bool,
    dw: &mut [f32],
    db: &mut [f32],
) {
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn body(
        dout: &[f32],
        hat: &[f32],
        rstd: &[f32],
        w: &[f32],
        dx: &mut [f32],
        acc: bool,
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let c = w.len();
        let inv = 1.0 / c as f32;
        for (r, ((gr, hr), dr)) in dout
            .chunks_exact(c)
            .zip(hat.chunks_exact(c))
            .zip(dx.chunks_exact_mut(c))
            .enumerate()
        {
            // Sixteen partial sums each (one running sum does not vectorise).
            let (s1, s2) = (dot(gr, w), dot3(gr, w, hr));
            for j in 0..c {
                dw[j] += gr[j] * hr[j];
                db[j] += gr[j];
            }
            let (m1, m2, rs) = (s1 * inv, s2 * inv, rstd[r]);
            for j in 0..c {
                let d = (gr[j] * w[j] - m1 - hr[j] * m2) * rs;
                dr[j] = if acc { dr[j] + d } else { d };
            }
        }
    }
    dispatch!(body(dout, hat, rstd, w, dx, acc, dw, db))
}

/// `Σ x` with sixteen partial sums (one running sum is a serial chain that does not vectorise).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let tail: f32 = ch.remainder().iter().sum();
    for c in ch {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ (x - mu)²` with sixteen partial sums.
#[inline(always)]
pub(crate) fn sq_dev(x: &[f32], mu: f32) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let tail: f32 = ch.remainder().iter().map(|&v| (v - mu) * (v - mu)).sum();
    for c in ch {
        for l in 0..16 {
            acc[l] += (c[l] - mu) * (c[l] - mu);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a·b·c` with sixteen partial sums.
#[inline(always)]
pub(crate) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; 16];
    let mut tail = 0f32;
    let full = n / 16 * 16;
    for i in full..n {
        tail += a[i] * b[i] * c[i];
    }
    for ((x, y), z) in a
        .chunks_exact(16)
        .zip(b.chunks_exact(16))
        .zip(c.chunks_exact(16))
    {
        for l in 0..16 {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Token shift and mix (RWKV-5 to 7): `out_k[r] = x[r] + (x[r-1] - x[r])·mix_k`, with a zero
/// row before the first token of each window of `t` rows.
pub(crate) fn shift_fwd(x: &[f32], t: usize, mixes: &[&[f32]], out: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], t: usize, mixes: &[&[f32]], out: &mut [f32]) {
        let c = mixes[0].len();
        let n = x.len();
        for (k, mix) in mixes.iter().enumerate() {
            let o = &mut out[k * n..(k + 1) * n];
            for r in 0..n / c {
                let cur = &x[r * c..(r + 1) * c];
                let or = &mut o[r * c..(r + 1) * c];
                if r % t == 0 {
                    for j in 0..c {
                        or[j] = cur[j] - cur[j] * mix[j];
                    }
                } else {
                    let prev = &x[(r - 1) * c..r * c];
                    for j in 0..c {
                        or[j] = cur[j] + (prev[j] - cur[j]) * mix[j];
                    }
                }
            }
        }
    }
    dispatch!(body(x, t, mixes, out))
}

/// The backward pass of [`shift_fwd`]: sets `dx`, writes `Σ_r dout_k·(x[r-1] - x[r])` into
/// `dmix [K, C]`. Row by row, so that each row of `dx` is written once from all `K` mixes.
pub(crate) fn shift_back(
    x: &[f32],
    t: usize,
    mixes: &[&[f32]],
    dout: &[f32],
    dx: &mut [f32],
    dmix: &mut [f32],
) {
    #[inline(always)]
    fn body(x: &[f32], t: usize, mixes: &[&[f32]], dout: &[f32], dx: &mut [f32], dmix: &mut [f32]) {
        let c = mixes[0].len();
        let n = x.len();
        let rows = n / c;
        let zero = [0f32; 4096];
        dmix.iter_mut().for_each(|z| *z = 0.0);
        for r in 0..rows {
            let cur = &x[r * c..(r + 1) * c];
            let prev = if r % t == 0 {
                &zero[..c]
            } else {
                &x[(r - 1) * c..r * c]
            };
            let has_next = r + 1 < rows && (r + 1) % t != 0;
            let dr = &mut dx[r * c..(r + 1) * c];
            dr.iter_mut().for_each(|z| *z = 0.0);
            for (k, mix) in mixes.iter().enumerate() {
                let mix = &mix[..c];
                let g = &dout[k * n + r * c..k * n + (r + 1) * c];
                let dm = &mut dmix[k * c..(k + 1) * c];
                for j in 0..c {
                    dr[j] += g[j] * (1.0 - mix[j]);
                    dm[j] += g[j] * (prev[j] - cur[j]);
                }
                if has_next {
                    let gn = &dout[k * n + (r + 1) * c..k * n + (r + 2) * c];
                    for j in 0..c {
                        dr[j] += gn[j] * mix[j];
                    }
                }
            }
        }
    }
    dispatch!(body(x, t, mixes, dout, dx, dmix))
}

/// Cross-entropy of every row of `logits [M, V]` against `targets` (rows whose target is
/// [`super::IGNORE`] get a zero gradient and add nothing); returns the sum over rows
/// (in f64) and overwrites the logits with `scale ×` the gradient, plus RWKV-LM's L2Wrap term
/// `l2 · max` on each row's largest logit.
#[inline(always)]
pub(crate) fn cross_entropy(
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    scale: f32,
    l2: f32,
) -> f64 {
    let mut total = 0f64;
    for (row, &tg) in logits.chunks_exact_mut(v).zip(targets) {
        if tg == super::IGNORE {
            row.fill(0.0);
            continue;
        }
        // The largest logit with sixteen running maxima (vectorised), then its first place.
        let mut m16 = [f32::NEG_INFINITY; 16];
        let ch = row.chunks_exact(16);
        let mut mx = ch
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for c in ch {
            for l in 0..16 {
                m16[l] = m16[l].max(c[l]);
            }
        }
        mx = m16.iter().fold(mx, |a, &b| a.max(b));
        let arg = row.iter().position(|&z| z == mx).unwrap_or(0);
        let target = row[tg as usize];
        for z in row.iter_mut() {
            *z = exp(*z - mx);
        }
        let s = sum(row);
        total += (s.ln() + mx - target) as f64;
        let k = scale / s;
        row.iter_mut().for_each(|z| *z *= k);
        row[tg as usize] -= scale;
        row[arg] += l2 * mx;
    }
    total
}

/// `Σ a·b` with sixteen partial sums (one running sum is a serial chain that does not
/// vectorise).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut tail = 0f32;
    for i in n / 16 * 16..n {
        tail += a[i] * b[i];
    }
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
