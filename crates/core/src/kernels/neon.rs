//! NEON kernels for aarch64: the float dot products and scaled row additions for f32, bf16 and
//! f16 weights, and the integer dot product of a quantized row with quantized activations,
//! with `SDOT` (the `dotprod` extension, Armv8.2 and later) where the CPU has it.
//!
//! NEON itself is part of every aarch64 CPU, so these run unconditionally there unless
//! `RWKV_NO_SIMD` is set; the portable twins stay the reference the tests hold them to.
//! Four independent accumulators hide the multiply-add latency, as the x86 kernels do.

use crate::tensor::widen::neon::{f16_hi, f16_lo};
use crate::tensor::QBLOCK;
use core::arch::aarch64::*;

/// bf16 is the upper half of an f32: widening by a 16-bit shift is exact.
#[inline(always)]
unsafe fn bf16_lo(h: uint16x8_t) -> float32x4_t {
    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h)))
}

#[inline(always)]
unsafe fn bf16_hi(h: uint16x8_t) -> float32x4_t {
    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h))
}

/// Eight weights starting at `p`, widened to f32 (two vectors).
trait Load {
    type Elem: Copy;
    unsafe fn load8(p: *const Self::Elem) -> (float32x4_t, float32x4_t);
    fn one(v: Self::Elem) -> f32;
}

struct F32;
struct Bf16;
struct F16;

impl Load for F32 {
    type Elem = f32;
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> (float32x4_t, float32x4_t) {
        (vld1q_f32(p), vld1q_f32(p.add(4)))
    }
    fn one(v: f32) -> f32 {
        v
    }
}

impl Load for Bf16 {
    type Elem = u16;
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> (float32x4_t, float32x4_t) {
        let h = vld1q_u16(p);
        (bf16_lo(h), bf16_hi(h))
    }
    fn one(v: u16) -> f32 {
        crate::tensor::bf16_to_f32(v)
    }
}

impl Load for F16 {
    type Elem = u16;
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> (float32x4_t, float32x4_t) {
        let h = vld1q_u16(p);
        (f16_lo(h), f16_hi(h))
    }
    fn one(v: u16) -> f32 {
        half::f16::from_bits(v).to_f32()
    }
}

#[inline(always)]
unsafe fn dot<L: Load>(a: &[L::Elem], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let z = vdupq_n_f32(0.0);
    let (mut s0, mut s1, mut s2, mut s3) = (z, z, z, z);
    let mut i = 0;
    // SAFETY (all loads): `i + 16 <= n` and both slices hold at least `n` elements.
    while i + 16 <= n {
        let (w0, w1) = L::load8(pa.add(i));
        let (w2, w3) = L::load8(pa.add(i + 8));
        s0 = vfmaq_f32(s0, w0, vld1q_f32(pb.add(i)));
        s1 = vfmaq_f32(s1, w1, vld1q_f32(pb.add(i + 4)));
        s2 = vfmaq_f32(s2, w2, vld1q_f32(pb.add(i + 8)));
        s3 = vfmaq_f32(s3, w3, vld1q_f32(pb.add(i + 12)));
        i += 16;
    }
    let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    while i < n {
        s += L::one(a[i]) * b[i];
        i += 1;
    }
    s
}

#[inline(always)]
unsafe fn axpy<L: Load>(a: f32, x: &[L::Elem], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let av = vdupq_n_f32(a);
    let mut i = 0;
    // SAFETY: `i + 8 <= n` and both slices hold at least `n` elements.
    while i + 8 <= n {
        let (w0, w1) = L::load8(px.add(i));
        vst1q_f32(py.add(i), vfmaq_f32(vld1q_f32(py.add(i)), av, w0));
        vst1q_f32(py.add(i + 4), vfmaq_f32(vld1q_f32(py.add(i + 4)), av, w1));
        i += 8;
    }
    while i < n {
        y[i] += a * L::one(x[i]);
        i += 1;
    }
}

/// `Σ a·b` over f32 weights.
///
/// # Safety
/// NEON must be present (every aarch64 CPU).
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot::<F32>(a, b)
}

/// `Σ a·b` over bf16 weights.
///
/// # Safety
/// As [`dot_f32`].
#[target_feature(enable = "neon")]
pub unsafe fn dot_bf16(a: &[u16], b: &[f32]) -> f32 {
    dot::<Bf16>(a, b)
}

/// `Σ a·b` over f16 weights.
///
/// # Safety
/// As [`dot_f32`].
#[target_feature(enable = "neon")]
pub unsafe fn dot_f16(a: &[u16], b: &[f32]) -> f32 {
    dot::<F16>(a, b)
}

/// `y += a·x` over f32 weights.
///
/// # Safety
/// As [`dot_f32`].
#[target_feature(enable = "neon")]
pub unsafe fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    axpy::<F32>(a, x, y)
}

/// `y += a·x` over bf16 weights.
///
/// # Safety
/// As [`dot_f32`].
#[target_feature(enable = "neon")]
pub unsafe fn axpy_bf16(a: f32, x: &[u16], y: &mut [f32]) {
    axpy::<Bf16>(a, x, y)
}

/// `y += a·x` over f16 weights.
///
/// # Safety
/// As [`dot_f32`].
#[target_feature(enable = "neon")]
pub unsafe fn axpy_f16(a: f32, x: &[u16], y: &mut [f32]) {
    axpy::<F16>(a, x, y)
}

/// A block's 32 weights as two vectors of signed bytes (elements 0-15, 16-31): int8 as
/// stored, q4 unpacked from the low (0-15) and high (16-31) nibbles and offset by 8.
#[inline(always)]
unsafe fn block_weights(w: *const u8, blk: usize, four_bit: bool) -> (int8x16_t, int8x16_t) {
    if four_bit {
        let b = vld1q_u8(w.add(blk * 16));
        let eight = vdupq_n_s8(8);
        let lo = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15)));
        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(b));
        (vsubq_s8(lo, eight), vsubq_s8(hi, eight))
    } else {
        let p = w.add(blk * QBLOCK) as *const i8;
        (vld1q_s8(p), vld1q_s8(p.add(16)))
    }
}

/// One block's 32 integer products, summed to four lanes without `SDOT`: widening multiplies
/// to i16 (|w·x| ≤ 127², and two of them still fit) and pairwise widening adds to i32.
#[inline(always)]
unsafe fn block_sum_mull(w: (int8x16_t, int8x16_t), x: (int8x16_t, int8x16_t)) -> int32x4_t {
    let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(w.0), vget_low_s8(x.0)), w.0, x.0);
    let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(w.1), vget_low_s8(x.1)), w.1, x.1);
    vpadalq_s16(vpaddlq_s16(p0), p1)
}

#[inline(always)]
unsafe fn dot_qq_with<const SDOT: bool>(
    w: &[u8],
    wd: &[f32],
    xq: &[i8],
    xd: &[f32],
    four_bit: bool,
) -> f32 {
    let nb = wd.len().min(xd.len());
    let bytes = if four_bit { QBLOCK / 2 } else { QBLOCK };
    assert!(w.len() >= nb * bytes && xq.len() >= nb * QBLOCK);
    let (pw, px) = (w.as_ptr(), xq.as_ptr());
    let z = vdupq_n_f32(0.0);
    let mut acc = [z, z];
    for blk in 0..nb {
        // SAFETY: both slices hold `nb` whole blocks (asserted above).
        let wv = block_weights(pw, blk, four_bit);
        let xv = (
            vld1q_s8(px.add(blk * QBLOCK)),
            vld1q_s8(px.add(blk * QBLOCK + 16)),
        );
        let s = if SDOT {
            sdot(sdot(vdupq_n_s32(0), wv.0, xv.0), wv.1, xv.1)
        } else {
            block_sum_mull(wv, xv)
        };
        let scale = *wd.get_unchecked(blk) * *xd.get_unchecked(blk);
        // Two accumulators alternate so that consecutive blocks do not wait on each other.
        let a = &mut acc[blk & 1];
        *a = vfmaq_n_f32(*a, vcvtq_f32_s32(s), scale);
    }
    vaddvq_f32(vaddq_f32(acc[0], acc[1]))
}

/// `SDOT`: each i32 lane gains the sum of four byte products.
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut r = acc;
    core::arch::asm!("sdot {r:v}.4s, {a:v}.16b, {b:v}.16b", r = inout(vreg) r, a = in(vreg) a,
        b = in(vreg) b, options(pure, nomem, nostack, preserves_flags));
    r
}

/// Integer dot product of a quantized row with quantized activations (int8 weights unless
/// `four_bit`), with `SDOT`.
///
/// # Safety
/// The CPU must have `dotprod` ([`crate::cpu::has_neon_dotprod`]).
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_qq_sdot(w: &[u8], wd: &[f32], xq: &[i8], xd: &[f32], four_bit: bool) -> f32 {
    dot_qq_with::<true>(w, wd, xq, xd, four_bit)
}

/// [`dot_qq_sdot`] for CPUs without `dotprod`.
///
/// # Safety
/// As [`dot_f32`].
#[target_feature(enable = "neon")]
pub unsafe fn dot_qq_mull(w: &[u8], wd: &[f32], xq: &[i8], xd: &[f32], four_bit: bool) -> f32 {
    dot_qq_with::<false>(w, wd, xq, xd, four_bit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rnd;
    use crate::tensor::quantize::{quantize_q4, quantize_q8};

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn float_kernels_equal_scalar_sums_at_every_length() {
        for n in (0..40).chain([1003]) {
            let w = rnd(n, 1);
            let x = rnd(n, 2);
            let bf: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let hf: Vec<u16> = w
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let want = |f: &dyn Fn(usize) -> f32| -> f32 { (0..n).map(|i| f(i) * x[i]).sum() };
            // SAFETY: NEON is part of every aarch64 CPU.
            unsafe {
                assert!(close(dot_f32(&w, &x), want(&|i| w[i]), 1e-5), "f32 {n}");
                let b = want(&|i| half::bf16::from_bits(bf[i]).to_f32());
                assert!(close(dot_bf16(&bf, &x), b, 1e-5), "bf16 {n}");
                let h = want(&|i| half::f16::from_bits(hf[i]).to_f32());
                assert!(close(dot_f16(&hf, &x), h, 1e-5), "f16 {n}");
                let mut y = x.clone();
                axpy_f16(0.5, &hf, &mut y);
                for i in 0..n {
                    let e = x[i] + 0.5 * half::f16::from_bits(hf[i]).to_f32();
                    assert!(close(y[i], e, 1e-6), "axpy f16 {n} {i}");
                }
                let mut y = x.clone();
                axpy_bf16(0.5, &bf, &mut y);
                axpy_f32(-0.5, &w, &mut y);
                for i in 0..n {
                    let e = x[i] + 0.5 * (half::bf16::from_bits(bf[i]).to_f32() - w[i]);
                    assert!(close(y[i], e, 1e-6), "axpy bf16/f32 {n} {i}");
                }
            }
        }
    }

    #[test]
    fn integer_kernels_equal_exact_sums() {
        for nb in [1, 2, 3, 24, 97] {
            let n = nb * QBLOCK;
            let w = rnd(n, 3);
            let x = rnd(n, 4);
            let mut qx = crate::kernels::quant::QuantizedX::default();
            qx.set(&x);
            let (xq, xd) = qx.parts();
            for four in [false, true] {
                let qb = if four {
                    quantize_q4(&w)
                } else {
                    quantize_q8(&w)
                };
                // The exact integer sum per block, scaled.
                let mut want = 0f64;
                for blk in 0..nb {
                    let mut s = 0i64;
                    for j in 0..QBLOCK {
                        let wq = if four {
                            let byte = qb.q[blk * 16 + j % 16];
                            let nib = if j < 16 { byte & 15 } else { byte >> 4 };
                            nib as i64 - 8
                        } else {
                            qb.q[blk * QBLOCK + j] as i8 as i64
                        };
                        s += wq * xq[blk * QBLOCK + j] as i64;
                    }
                    want += (qb.d[blk] * xd[blk]) as f64 * s as f64;
                }
                let want = want as f32;
                // SAFETY: NEON is part of every aarch64 CPU; SDOT only where detected.
                let mull = unsafe { dot_qq_mull(&qb.q, &qb.d, xq, xd, four) };
                assert!(
                    close(mull, want, 1e-5),
                    "mull {four} {nb}: {mull} vs {want}"
                );
                if crate::cpu::has_neon_dotprod() {
                    let sd = unsafe { dot_qq_sdot(&qb.q, &qb.d, xq, xd, four) };
                    assert!(close(sd, want, 1e-5), "sdot {four} {nb}: {sd} vs {want}");
                }
            }
        }
    }
}
