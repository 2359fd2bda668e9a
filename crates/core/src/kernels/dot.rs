//! Dot products and scaled row additions over each weight format, portable and AVX2 (the NEON
//! twins are in `neon.rs`).
//!
//! The portable bodies are written so that LLVM vectorises them (independent accumulators,
//! fixed-width chunks); the AVX2 twins are the same bodies compiled with the wider instruction
//! set enabled, plus F16C for half-precision conversion.

#[cfg(target_arch = "x86_64")]
use crate::cpu::has_avx2;
use crate::tensor::{bf16_to_f32, FloatData};

const L: usize = 16;

#[inline(always)]
pub(crate) fn dot_f32_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..L {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

#[inline(always)]
fn dot_bf16_body(a: &[u16], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..L {
            acc[k] += bf16_to_f32(x[k]) * y[k];
        }
    }
    let mut s = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += bf16_to_f32(*x) * y;
    }
    acc.iter().sum::<f32>() + s
}

#[inline(always)]
fn dot_f16_scalar(a: &[u16], b: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let ca = a.chunks_exact(4);
    let cb = b.chunks_exact(4);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += half::f16::from_bits(x[k]).to_f32() * y[k];
        }
    }
    let mut s = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += half::f16::from_bits(*x).to_f32() * y;
    }
    acc.iter().sum::<f32>() + s
}

#[inline(always)]
fn axpy_f32_body(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[inline(always)]
fn axpy_bf16_body(a: f32, x: &[u16], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * bf16_to_f32(*xi);
    }
}

#[inline(always)]
fn axpy_f16_scalar(a: f32, x: &[u16], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * half::f16::from_bits(*xi).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        super::dot_f32_body(a, b)
    }
    /// Explicit widening (zero-extend to 32 bits, shift into the high half): LLVM does not
    /// vectorise the portable body's conversion well.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_bf16(a: &[u16], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let widen = |p: *const u16| {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            ))
        };
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm256_fmadd_ps(widen(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(widen(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
            acc2 = _mm256_fmadd_ps(widen(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), acc2);
            acc3 = _mm256_fmadd_ps(widen(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), acc3);
            i += 32;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(widen(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc0, acc1),
            _mm256_add_ps(acc2, acc3),
        ));
        while i < n {
            s += crate::tensor::bf16_to_f32(a[i]) * b[i];
            i += 1;
        }
        s
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
        super::axpy_f32_body(a, x, y)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_bf16(a: f32, x: &[u16], y: &mut [f32]) {
        super::axpy_bf16_body(a, x, y)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_hadd_ps(s, s);
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(s)
    }

    /// Half precision needs explicit F16C conversions: LLVM does not vectorise `half`'s.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[u16], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let h0 = _mm_loadu_si128(a.as_ptr().add(i) as *const __m128i);
            let h1 = _mm_loadu_si128(a.as_ptr().add(i + 8) as *const __m128i);
            acc0 = _mm256_fmadd_ps(
                _mm256_cvtph_ps(h0),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_cvtph_ps(h1),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += half::f16::from_bits(a[i]).to_f32() * b[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(a: f32, x: &[u16], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i);
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                yp,
                _mm256_fmadd_ps(av, _mm256_cvtph_ps(h), _mm256_loadu_ps(yp)),
            );
            i += 8;
        }
        while i < n {
            y[i] += a * half::f16::from_bits(x[i]).to_f32();
            i += 1;
        }
    }
}

/// f32 dot product, fastest available code path.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the enabled features (checked above).
        return unsafe { avx2::dot_f32(a, b) };
    }
    #[cfg(target_arch = "aarch64")]
    if crate::cpu::has_neon() {
        // SAFETY: NEON is part of every aarch64 CPU.
        return unsafe { super::neon::dot_f32(a, b) };
    }
    dot_f32_body(a, b)
}

/// The portable twin of [`dot_f32`].
#[cfg(test)]
pub fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_body(a, b)
}

/// Dot product of `x` with the `x.len()` weights starting at element `start` of `w`.
#[inline]
pub fn dot_row(w: &FloatData, start: usize, x: &[f32]) -> f32 {
    let n = x.len();
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the enabled features (checked above).
        unsafe {
            return match w {
                FloatData::F32(v) => avx2::dot_f32(&v[start..start + n], x),
                FloatData::BF16(v) => avx2::dot_bf16(&v[start..start + n], x),
                FloatData::F16(v) => avx2::dot_f16(&v[start..start + n], x),
                FloatData::Q8(b) => super::quant::dot_q(b, false, start, x),
                FloatData::Q4(b) => super::quant::dot_q(b, true, start, x),
            };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if crate::cpu::has_neon() {
        // SAFETY: NEON is part of every aarch64 CPU.
        unsafe {
            match w {
                FloatData::F32(v) => return super::neon::dot_f32(&v[start..start + n], x),
                FloatData::BF16(v) => return super::neon::dot_bf16(&v[start..start + n], x),
                FloatData::F16(v) => return super::neon::dot_f16(&v[start..start + n], x),
                _ => {}
            }
        }
    }
    dot_row_portable(w, start, x)
}

/// The portable twin of [`dot_row`].
pub fn dot_row_portable(w: &FloatData, start: usize, x: &[f32]) -> f32 {
    let n = x.len();
    match w {
        FloatData::F32(v) => dot_f32_body(&v[start..start + n], x),
        FloatData::BF16(v) => dot_bf16_body(&v[start..start + n], x),
        FloatData::F16(v) => dot_f16_scalar(&v[start..start + n], x),
        FloatData::Q8(b) => super::quant::dot_q_portable(b, false, start, x),
        FloatData::Q4(b) => super::quant::dot_q_portable(b, true, start, x),
    }
}

/// `y += a * w[start .. start + y.len()]`.
#[inline]
pub fn axpy_row(w: &FloatData, start: usize, a: f32, y: &mut [f32]) {
    let n = y.len();
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the enabled features (checked above).
        unsafe {
            return match w {
                FloatData::F32(v) => avx2::axpy_f32(a, &v[start..start + n], y),
                FloatData::BF16(v) => avx2::axpy_bf16(a, &v[start..start + n], y),
                FloatData::F16(v) => avx2::axpy_f16(a, &v[start..start + n], y),
                _ => axpy_row_portable(w, start, a, y),
            };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if crate::cpu::has_neon() {
        // SAFETY: NEON is part of every aarch64 CPU.
        unsafe {
            match w {
                FloatData::F32(v) => return super::neon::axpy_f32(a, &v[start..start + n], y),
                FloatData::BF16(v) => return super::neon::axpy_bf16(a, &v[start..start + n], y),
                FloatData::F16(v) => return super::neon::axpy_f16(a, &v[start..start + n], y),
                _ => {}
            }
        }
    }
    axpy_row_portable(w, start, a, y)
}

/// The portable twin of [`axpy_row`].
pub fn axpy_row_portable(w: &FloatData, start: usize, a: f32, y: &mut [f32]) {
    let n = y.len();
    match w {
        FloatData::F32(v) => axpy_f32_body(a, &v[start..start + n], y),
        FloatData::BF16(v) => axpy_bf16_body(a, &v[start..start + n], y),
        FloatData::F16(v) => axpy_f16_scalar(a, &v[start..start + n], y),
        // Quantized matrices are only ever [out, in]; this generic path keeps the function
        // total.
        _ => {
            for (i, yi) in y.iter_mut().enumerate() {
                *yi += a * w.get(start + i);
            }
        }
    }
}
