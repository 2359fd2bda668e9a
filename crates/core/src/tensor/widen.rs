//! Half-precision storage widened to f32: bf16 (the upper half of an f32, so widening is a
//! shift) and IEEE f16 (F16C on x86, `FCVTL` on aarch64). Both conversions are exact, so every
//! path gives the same bits; the vector ones only go faster.

use super::bf16_to_f32;
#[cfg(target_arch = "x86_64")]
use crate::cpu::has_avx2;

#[inline(always)]
fn bf16_widen_body(x: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(x) {
        *o = bf16_to_f32(b);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_widen_avx2(x: &[u16], out: &mut [f32]) {
    bf16_widen_body(x, out)
}

/// Converts bf16 bits to f32, vectorised where AVX2 is available.
pub fn bf16_to_f32_slice(x: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the enabled features.
        return unsafe { bf16_widen_avx2(x, out) };
    }
    bf16_widen_body(x, out)
}

/// Converts f16 bits to f32 with F16C (x86) or NEON (aarch64) where available.
pub fn f16_to_f32(x: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the enabled features (checked above).
        return unsafe { f16_to_f32_avx2(x, out) };
    }
    #[cfg(target_arch = "aarch64")]
    if crate::cpu::has_neon() {
        // SAFETY: NEON is part of every aarch64 CPU.
        return unsafe { neon::f16_to_f32(x, out) };
    }
    f16_to_f32_portable(x, out)
}

/// The portable twin of [`f16_to_f32`].
pub fn f16_to_f32_portable(x: &[u16], out: &mut [f32]) {
    for (o, h) in out.iter_mut().zip(x) {
        *o = half::f16::from_bits(*h).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32_avx2(x: &[u16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    while i < n {
        out[i] = half::f16::from_bits(x[i]).to_f32();
        i += 1;
    }
}

/// The NEON conversions, also used by the NEON dot products of `kernels`.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use core::arch::aarch64::*;

    /// The lower four f16 values of `h` to f32. `FCVTL` is base AdvSIMD, but Rust's `f16`
    /// vector intrinsics are not stable, so it is written out.
    #[inline(always)]
    pub(crate) unsafe fn f16_lo(h: uint16x8_t) -> float32x4_t {
        let r: float32x4_t;
        core::arch::asm!("fcvtl {r:v}.4s, {h:v}.4h", r = lateout(vreg) r, h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags));
        r
    }

    /// The upper four f16 values of `h` to f32.
    #[inline(always)]
    pub(crate) unsafe fn f16_hi(h: uint16x8_t) -> float32x4_t {
        let r: float32x4_t;
        core::arch::asm!("fcvtl2 {r:v}.4s, {h:v}.8h", r = lateout(vreg) r, h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags));
        r
    }

    /// f16 bits to f32, eight at a time.
    ///
    /// # Safety
    /// The CPU must have NEON (every aarch64 CPU does).
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn f16_to_f32(x: &[u16], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let mut i = 0;
        // SAFETY: `i + 8 <= n` and both slices hold at least `n` elements.
        while i + 8 <= n {
            let h = vld1q_u16(x.as_ptr().add(i));
            vst1q_f32(out.as_mut_ptr().add(i), f16_lo(h));
            vst1q_f32(out.as_mut_ptr().add(i + 4), f16_hi(h));
            i += 8;
        }
        while i < n {
            out[i] = half::f16::from_bits(x[i]).to_f32();
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_for_special_values() {
        // Zero, negative zero, the smallest subnormal, the largest finite, infinities, NaN.
        let bits: Vec<u16> = vec![0, 0x8000, 1, 0x03ff, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x3c00];
        // Long enough for the vector loop and its tail.
        let bits: Vec<u16> = bits.iter().cycle().take(27).copied().collect();
        let mut out = vec![0f32; bits.len()];
        f16_to_f32(&bits, &mut out);
        for (b, o) in bits.iter().zip(&out) {
            let want = half::f16::from_bits(*b).to_f32();
            assert!(
                o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()),
                "{b:#06x}: {o} != {want}"
            );
        }
    }

    #[test]
    fn bf16_widening_is_the_upper_half() {
        let bits: Vec<u16> = (0..40u16).map(|i| i.wrapping_mul(2711)).collect();
        let mut out = vec![0f32; bits.len()];
        bf16_to_f32_slice(&bits, &mut out);
        for (b, o) in bits.iter().zip(&out) {
            assert_eq!(o.to_bits(), (*b as u32) << 16);
        }
    }
}
