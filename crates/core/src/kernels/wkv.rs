//! The per-head WKV state updates of v5/v6 and v7, for one token. Each is written once as
//! portable code whose loops LLVM vectorises (independent accumulators for the reductions) and
//! compiled twice, as is and with AVX2/FMA enabled, like the matrix kernels; RWKV-7 also has
//! an AVX-512 build of its own.

use super::dot::dot_f32_body as dot;
#[cfg(target_arch = "x86_64")]
use crate::cpu::{has_avx2, has_avx512};

/// One token's inputs to an RWKV-7 head (each slice one head's `N` values): receptance,
/// decay, key, value, the normalised key `kk`, and `b[j] = kk[j]·a[j]`.
#[derive(Clone, Copy)]
pub struct Wkv7In<'a> {
    /// Receptance.
    pub r: &'a [f32],
    /// Decay, in (0, 1).
    pub w: &'a [f32],
    /// Key (already scaled by the in-context learning rate).
    pub k: &'a [f32],
    /// Value.
    pub v: &'a [f32],
    /// Normalised key.
    pub kk: &'a [f32],
    /// `kk · a`.
    pub b: &'a [f32],
}

/// One token's inputs to an RWKV-5/6 head: receptance, key, value, decay and bonus.
#[derive(Clone, Copy)]
pub struct Wkv5In<'a> {
    /// Receptance.
    pub r: &'a [f32],
    /// Key.
    pub k: &'a [f32],
    /// Value.
    pub v: &'a [f32],
    /// Decay, in (0, 1).
    pub w: &'a [f32],
    /// Bonus of the current token (`time_faaaa`).
    pub u: &'a [f32],
}

/// One RWKV-7 token for one head. `s` is `[N value i, N key j]`:
/// `S[i,:] = S[i,:]·w + (S[i,:]·(-kk))·b + v[i]·k`, then `y[i] = S[i,:]·r`.
#[inline(always)]
fn wkv7_body(s: &mut [f32], x: &Wkv7In<'_>, y: &mut [f32]) {
    let Wkv7In { r, w, k, v, kk, b } = *x;
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
fn wkv5_body(s: &mut [f32], x: &Wkv5In<'_>, y: &mut [f32]) {
    let Wkv5In { r, k, v, w, u } = *x;
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
unsafe fn wkv7_avx2(s: &mut [f32], x: &Wkv7In<'_>, y: &mut [f32]) {
    wkv7_body(s, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wkv5_avx2(s: &mut [f32], x: &Wkv5In<'_>, y: &mut [f32]) {
    wkv5_body(s, x, y)
}

/// The AVX-512 build of [`wkv7_body`] for head sizes of 16, 32, 64 or 128: a state row
/// stays in registers from its first use to its store, and the two row reductions use the
/// vector unit's tree sum rather than the portable body's serial one (whose latency, twice per
/// row, dominated the scan).
#[cfg(target_arch = "x86_64")]
unsafe fn wkv7_avx512(s: &mut [f32], x: &Wkv7In<'_>, y: &mut [f32]) {
    match x.r.len() / 16 {
        1 => wkv7_avx512_m::<1>(s, x, y),
        2 => wkv7_avx512_m::<2>(s, x, y),
        4 => wkv7_avx512_m::<4>(s, x, y),
        _ => wkv7_avx512_m::<8>(s, x, y),
    }
}

/// [`wkv7_avx512`] for a head of `16 * M` values: the per-head vectors are arrays of `M`
/// registers (a run-time length would put them on the stack).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn wkv7_avx512_m<const M: usize>(s: &mut [f32], x: &Wkv7In<'_>, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = 16 * M;
    let Wkv7In { r, w, k, v, kk, b } = *x;
    assert!(r.len() == n && s.len() >= n * n && y.len() >= n);
    assert!([w, k, v, kk, b].iter().all(|z| z.len() >= n));
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
        let mut xs = [zero; M];
        for c in 0..M {
            xs[c] = _mm512_loadu_ps(row.add(16 * c));
            acc = _mm512_fmadd_ps(xs[c], vkk[c], acc);
        }
        let sa = _mm512_set1_ps(-_mm512_reduce_add_ps(acc));
        let vi = _mm512_set1_ps(v[i]);
        let mut yacc = _mm512_setzero_ps();
        for c in 0..M {
            let z = _mm512_fmadd_ps(
                xs[c],
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
pub fn wkv7_head(s: &mut [f32], x: &Wkv7In<'_>, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() && matches!(x.r.len(), 16 | 32 | 64 | 128) {
            // SAFETY: the CPU supports the enabled features; bounds are asserted inside.
            return unsafe { wkv7_avx512(s, x, y) };
        }
        if has_avx2() {
            // SAFETY: the CPU supports the enabled features.
            return unsafe { wkv7_avx2(s, x, y) };
        }
    }
    wkv7_body(s, x, y)
}

/// The portable twin of [`wkv7_head`].
pub fn wkv7_head_portable(s: &mut [f32], x: &Wkv7In<'_>, y: &mut [f32]) {
    wkv7_body(s, x, y)
}

/// One RWKV-5/6 token for one head; dispatches to the AVX2 build where available.
pub fn wkv5_head(s: &mut [f32], x: &Wkv5In<'_>, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the enabled features.
        return unsafe { wkv5_avx2(s, x, y) };
    }
    wkv5_body(s, x, y)
}

/// The portable twin of [`wkv5_head`].
pub fn wkv5_head_portable(s: &mut [f32], x: &Wkv5In<'_>, y: &mut [f32]) {
    wkv5_body(s, x, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rnd;

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn simd_and_portable_wkv_agree() {
        let n = 64;
        let v: Vec<Vec<f32>> = (1..=6).map(|seed| rnd(n, seed)).collect();
        let x7 = Wkv7In {
            r: &v[0],
            w: &v[1],
            k: &v[2],
            v: &v[3],
            kk: &v[4],
            b: &v[5],
        };
        let s0 = rnd(n * n, 7);
        let (mut s1, mut s2) = (s0.clone(), s0.clone());
        let (mut y1, mut y2) = (vec![0.0; n], vec![0.0; n]);
        wkv7_head(&mut s1, &x7, &mut y1);
        wkv7_head_portable(&mut s2, &x7, &mut y2);
        close(&s1, &s2);
        close(&y1, &y2);
        // Each SIMD build on its own where the CPU has it (the dispatcher takes only one).
        #[cfg(target_arch = "x86_64")]
        {
            type Build = unsafe fn(&mut [f32], &Wkv7In<'_>, &mut [f32]);
            let builds: [(bool, Build); 2] = [(has_avx2(), wkv7_avx2), (has_avx512(), wkv7_avx512)];
            for (_, f) in builds.into_iter().filter(|b| b.0) {
                let mut s3 = s0.clone();
                let mut y3 = vec![0.0; n];
                // SAFETY: the CPU has the build's features; n is 64.
                unsafe { f(&mut s3, &x7, &mut y3) };
                close(&s3, &s2);
                close(&y3, &y2);
            }
        }
        let x5 = Wkv5In {
            r: &v[0],
            k: &v[2],
            v: &v[3],
            w: &v[1],
            u: &v[4],
        };
        let (mut s1, mut s2) = (s0.clone(), s0);
        wkv5_head(&mut s1, &x5, &mut y1);
        wkv5_head_portable(&mut s2, &x5, &mut y2);
        close(&s1, &s2);
        close(&y1, &y2);
    }
}
