//! The per-head WKV state updates of v5/v6 and v7, for one token. Each is written once as
//! portable code whose loops LLVM vectorises (independent accumulators for the reductions) and
//! compiled twice, as is and with AVX2/FMA enabled, like the matrix kernels.

use super::dot::{dot_f32_body as dot, has_avx2, has_avx512};

/// One RWKV-7 token for one head. `s` is `[N value i, N key j]`; `b[j] = kk[j]·a[j]`:
/// `S[i,:] = S[i,:]·w + (S[i,:]·(-kk))·b + v[i]·k`, then `y[i] = S[i,:]·r`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn wkv7_body(
    s: &mut [f32],
    r: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    kk: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    let n = r.len();
    for i in 0..n {
        let row = &mut s[i * n..(i + 1) * n];
        let sa = -dot(row, kk);
        let vi = v[i];
        for j in 0..n {
            row[j] = row[j] * w[j] + sa * b[j] + vi * k[j];
        }
        y[i] = dot(row, r);
    }
}

/// One RWKV-5/6 token for one head. `s` is `[N key i, N value j]`:
/// `y[j] = Σ_i r[i]·(u[i]·k[i]·v[j] + S[i,j])`, then `S[i,j] = k[i]·v[j] + w[i]·S[i,j]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn wkv5_body(s: &mut [f32], r: &[f32], k: &[f32], v: &[f32], w: &[f32], u: &[f32], y: &mut [f32]) {
    let n = r.len();
    y[..n].fill(0.0);
    for i in 0..n {
        let row = &mut s[i * n..(i + 1) * n];
        let (ri, ki, wi, ui) = (r[i], k[i], w[i], u[i]);
        for j in 0..n {
            let a = ki * v[j];
            y[j] += ri * (ui * a + row[j]);
            row[j] = a + wi * row[j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn wkv7_avx2(
    s: &mut [f32],
    r: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    kk: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    wkv7_body(s, r, w, k, v, kk, b, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wkv5_avx2(
    s: &mut [f32],
    r: &[f32],
    k: &[f32],
    v: &[f32],
    w: &[f32],
    u: &[f32],
    y: &mut [f32],
) {
    wkv5_body(s, r, k, v, w, u, y)
}

/// The AVX-512 build of [`wkv7_body`] for head sizes of 16, 32, 64 or 128: a state row
/// stays in registers from its first use to its store, and the two row reductions use the
/// vector unit's tree sum rather than the portable body's serial one (whose latency, twice per
/// row, dominated the scan).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn wkv7_avx512(
    s: &mut [f32],
    r: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    kk: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    match r.len() / 16 {
        1 => wkv7_avx512_m::<1>(s, r, w, k, v, kk, b, y),
        2 => wkv7_avx512_m::<2>(s, r, w, k, v, kk, b, y),
        4 => wkv7_avx512_m::<4>(s, r, w, k, v, kk, b, y),
        _ => wkv7_avx512_m::<8>(s, r, w, k, v, kk, b, y),
    }
}

/// [`wkv7_avx512`] for a head of `16 * M` values: the per-head vectors are arrays of `M`
/// registers (a run-time length would put them on the stack).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn wkv7_avx512_m<const M: usize>(
    s: &mut [f32],
    r: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    kk: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = 16 * M;
    assert!(r.len() == n && s.len() >= n * n);
    assert!([w, k, kk, b].iter().all(|z| z.len() >= n) && v.len() >= n && y.len() >= n);
    let ld = |z: &[f32], c: usize| _mm512_loadu_ps(z.as_ptr().add(16 * c));
    let zero = _mm512_setzero_ps();
    let (mut vr, mut vw, mut vk, mut vkk, mut vb) =
        ([zero; M], [zero; M], [zero; M], [zero; M], [zero; M]);
    for c in 0..M {
        vr[c] = ld(r, c);
        vw[c] = ld(w, c);
        vk[c] = ld(k, c);
        vkk[c] = ld(kk, c);
        vb[c] = ld(b, c);
    }
    let sp = s.as_mut_ptr();
    for i in 0..n {
        let row = sp.add(i * n);
        let mut acc = _mm512_setzero_ps();
        let mut x = [zero; M];
        for c in 0..M {
            x[c] = _mm512_loadu_ps(row.add(16 * c));
            acc = _mm512_fmadd_ps(x[c], vkk[c], acc);
        }
        let sa = _mm512_set1_ps(-_mm512_reduce_add_ps(acc));
        let vi = _mm512_set1_ps(v[i]);
        let mut yacc = _mm512_setzero_ps();
        for c in 0..M {
            let z = _mm512_fmadd_ps(
                x[c],
                vw[c],
                _mm512_fmadd_ps(sa, vb[c], _mm512_mul_ps(vi, vk[c])),
            );
            _mm512_storeu_ps(row.add(16 * c), z);
            yacc = _mm512_fmadd_ps(z, vr[c], yacc);
        }
        y[i] = _mm512_reduce_add_ps(yacc);
    }
}

/// See [`wkv7_body`]; dispatches to the AVX-512 or AVX2 build where available.
#[allow(clippy::too_many_arguments)]
pub fn wkv7_head(
    s: &mut [f32],
    r: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    kk: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() && matches!(r.len(), 16 | 32 | 64 | 128) {
            // SAFETY: the CPU supports the enabled features; bounds are asserted inside.
            return unsafe { wkv7_avx512(s, r, w, k, v, kk, b, y) };
        }
        if has_avx2() {
            // SAFETY: the CPU supports the enabled features.
            return unsafe { wkv7_avx2(s, r, w, k, v, kk, b, y) };
        }
    }
    wkv7_body(s, r, w, k, v, kk, b, y)
}

/// The portable twin of [`wkv7_head`].
#[allow(clippy::too_many_arguments)]
pub fn wkv7_head_portable(
    s: &mut [f32],
    r: &[f32],
    w: &[f32],
    k: &[f32],
    v: &[f32],
    kk: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    wkv7_body(s, r, w, k, v, kk, b, y)
}

/// One RWKV-5/6 token for one head; dispatches to the AVX2 build where available.
pub fn wkv5_head(
    s: &mut [f32],
    r: &[f32],
    k: &[f32],
    v: &[f32],
    w: &[f32],
    u: &[f32],
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the enabled features.
        return unsafe { wkv5_avx2(s, r, k, v, w, u, y) };
    }
    wkv5_body(s, r, k, v, w, u, y)
}

/// The portable twin of [`wkv5_head`].
pub fn wkv5_head_portable(
    s: &mut [f32],
    r: &[f32],
    k: &[f32],
    v: &[f32],
    w: &[f32],
    u: &[f32],
    y: &mut [f32],
) {
    wkv5_body(s, r, k, v, w, u, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rnd;

    #[test]
    fn simd_and_portable_wkv_agree() {
        let n = 64;
        let (r, w, k, v, kk, b) = (
            rnd(n, 1),
            rnd(n, 2),
            rnd(n, 3),
            rnd(n, 4),
            rnd(n, 5),
            rnd(n, 6),
        );
        let s0 = rnd(n * n, 7);
        let (mut s1, mut s2) = (s0.clone(), s0.clone());
        let (mut y1, mut y2) = (vec![0.0; n], vec![0.0; n]);
        wkv7_head(&mut s1, &r, &w, &k, &v, &kk, &b, &mut y1);
        wkv7_head_portable(&mut s2, &r, &w, &k, &v, &kk, &b, &mut y2);
        for (a, c) in s1.iter().zip(&s2).chain(y1.iter().zip(&y2)) {
            assert!((a - c).abs() < 1e-5);
        }
        // Each SIMD build on its own where the CPU has it (the dispatcher takes only one).
        #[cfg(target_arch = "x86_64")]
        {
            type Build =
                unsafe fn(&mut [f32], &[f32], &[f32], &[f32], &[f32], &[f32], &[f32], &mut [f32]);
            let builds: [(bool, Build); 2] = [(has_avx2(), wkv7_avx2), (has_avx512(), wkv7_avx512)];
            for (_, f) in builds.into_iter().filter(|b| b.0) {
                let mut s3 = s0.clone();
                let mut y3 = vec![0.0; n];
                // SAFETY: the CPU has the build's features; n is 64.
                unsafe { f(&mut s3, &r, &w, &k, &v, &kk, &b, &mut y3) };
                for (a, c) in s3.iter().zip(&s2).chain(y3.iter().zip(&y2)) {
                    assert!((a - c).abs() < 1e-5);
                }
            }
        }
        let (mut s1, mut s2) = (s0.clone(), s0);
        wkv5_head(&mut s1, &r, &k, &v, &w, &kk, &mut y1);
        wkv5_head_portable(&mut s2, &r, &k, &v, &w, &kk, &mut y2);
        for (a, c) in s1.iter().zip(&s2).chain(y1.iter().zip(&y2)) {
            assert!((a - c).abs() < 1e-5);
        }
    }
}
