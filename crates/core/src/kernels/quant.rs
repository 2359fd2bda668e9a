//! Block quantization (int8 and 4-bit, one f32 scale per 32 weights) and the dot products over
//! it. Generation reads every weight once per token, so fewer bytes per weight is directly
//! more tokens per second; the scales cost 4 bytes per 32 weights.

#[cfg(target_arch = "x86_64")]
use crate::cpu::{has_avx2, has_avx512_vnni};
use crate::tensor::quantize::rint;
use crate::tensor::{QBlocks, QBLOCK};

#[inline(always)]
fn dot_q8_body(q: &[u8], d: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for ((qb, &db), xb) in q.chunks_exact(QBLOCK).zip(d).zip(x.chunks_exact(QBLOCK)) {
        let mut p = [0f32; 8];
        for k in 0..4 {
            for l in 0..8 {
                p[l] += (qb[k * 8 + l] as i8) as f32 * xb[k * 8 + l];
            }
        }
        for l in 0..8 {
            acc[l] += db * p[l];
        }
    }
    acc.iter().sum()
}

#[inline(always)]
fn dot_q4_body(q: &[u8], d: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for ((qb, &db), xb) in q
        .chunks_exact(QBLOCK / 2)
        .zip(d)
        .zip(x.chunks_exact(QBLOCK))
    {
        let mut p = [0f32; 8];
        for h in 0..2 {
            for l in 0..8 {
                let byte = qb[h * 8 + l];
                let lo = (byte & 15) as i32 - 8;
                let hi = (byte >> 4) as i32 - 8;
                p[l] += lo as f32 * xb[h * 8 + l] + hi as f32 * xb[16 + h * 8 + l];
            }
        }
        for l in 0..8 {
            acc[l] += db * p[l];
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8_avx2(q: &[u8], d: &[f32], x: &[f32]) -> f32 {
    dot_q8_body(q, d, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q4_avx2(q: &[u8], d: &[f32], x: &[f32]) -> f32 {
    dot_q4_body(q, d, x)
}

/// Dot product of `x` with the quantized row starting at element `start` (block-aligned):
/// int8 when `four_bit` is false.
#[inline]
pub fn dot_q(b: &QBlocks, four_bit: bool, start: usize, x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let n = x.len();
        let (b0, nb) = (start / QBLOCK, n / QBLOCK);
        let d = &b.d[b0..b0 + nb];
        // SAFETY: the CPU supports the enabled features.
        unsafe {
            return if four_bit {
                dot_q4_avx2(&b.q[start / 2..(start + n) / 2], d, x)
            } else {
                dot_q8_avx2(&b.q[start..start + n], d, x)
            };
        }
    }
    dot_q_portable(b, four_bit, start, x)
}

/// The portable twin of [`dot_q`].
pub fn dot_q_portable(b: &QBlocks, four_bit: bool, start: usize, x: &[f32]) -> f32 {
    let n = x.len();
    let (b0, nb) = (start / QBLOCK, n / QBLOCK);
    let d = &b.d[b0..b0 + nb];
    if four_bit {
        dot_q4_body(&b.q[start / 2..(start + n) / 2], d, x)
    } else {
        dot_q8_body(&b.q[start..start + n], d, x)
    }
}

/// Activations quantized per block of 32 to int8 (`x ≈ d · q`), so that a quantized row's dot
/// product runs on integer multiply-adds: four times the work per instruction of the f32 path,
/// which keeps generation at the memory-bandwidth limit instead of the arithmetic one.
#[derive(Debug, Default, Clone)]
pub struct QuantizedX {
    q: Vec<i8>,
    d: Vec<f32>,
    /// The q4 VNNI kernel's copy: each pair of blocks `A, B` reordered as `A[0..16], B[0..16],
    /// A[16..32], B[16..32]`, the order in which a pair's packed nibbles unpack.
    p4: Vec<i8>,
    /// For each group of four values of `p4`, `-8 ×` their sum: q4 nibbles are stored with an
    /// offset of 8, and starting the accumulator here removes it with no extra instruction.
    c4: Vec<i32>,
}

impl QuantizedX {
    /// The quantized values and their per-block scales (for the NEON kernels' tests).
    #[cfg(all(test, target_arch = "aarch64"))]
    pub(crate) fn parts(&self) -> (&[i8], &[f32]) {
        (&self.q, &self.d)
    }

    /// Quantizes `x` (length a multiple of 32), reusing the buffers.
    pub fn set(&mut self, x: &[f32]) {
        self.q.resize(x.len(), 0);
        self.d.resize(x.len() / QBLOCK, 0.0);
        for ((b, q), d) in x
            .chunks_exact(QBLOCK)
            .zip(self.q.chunks_exact_mut(QBLOCK))
            .zip(&mut self.d)
        {
            let (s, inv) = block_scale(b);
            *d = s;
            for (qi, v) in q.iter_mut().zip(b) {
                *qi = rint(v * inv) as i8;
            }
        }
        let pairs = x.len() / (2 * QBLOCK);
        self.p4.resize(pairs * 64, 0);
        self.c4.resize(pairs * 16, 0);
        for ((src, dst), c) in self
            .q
            .chunks_exact(64)
            .zip(self.p4.chunks_exact_mut(64))
            .zip(self.c4.chunks_exact_mut(16))
        {
            dst[..16].copy_from_slice(&src[..16]);
            dst[16..32].copy_from_slice(&src[32..48]);
            dst[32..48].copy_from_slice(&src[16..32]);
            dst[48..].copy_from_slice(&src[48..]);
            for (g, c) in dst.chunks_exact(4).zip(c.iter_mut()) {
                *c = -8 * g.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
    }
}

/// An activation block's int8 scale `max|x| / 127` and its inverse (0 for a zero block).
#[inline(always)]
fn block_scale(b: &[f32]) -> (f32, f32) {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = amax / 127.0;
    (s, if s > 0.0 { 1.0 / s } else { 0.0 })
}

/// `x` as the integer kernels see it: every block of 32 quantized to int8 as
/// [`QuantizedX::set`] does, and scaled back. Float products over these values and dequantized
/// weights give a quantized matrix's results up to rounding, whichever path computes them, so
/// a sequence's tokens do not depend on the batch it runs in.
pub fn round_as_quantized(x: &[f32], out: &mut [f32]) {
    for (b, o) in x.chunks_exact(QBLOCK).zip(out.chunks_exact_mut(QBLOCK)) {
        let (s, inv) = block_scale(b);
        for (oi, v) in o.iter_mut().zip(b) {
            *oi = s * (rint(v * inv) as i8) as f32;
        }
    }
}

#[inline(always)]
fn dot_qq_body(w: &[u8], wd: &[f32], xq: &[i8], xd: &[f32], four_bit: bool) -> f32 {
    let mut acc = 0f32;
    for (blk, (&dw, &dx)) in wd.iter().zip(xd).enumerate() {
        let xb = &xq[blk * QBLOCK..(blk + 1) * QBLOCK];
        let mut s = 0i32;
        if four_bit {
            let wb = &w[blk * 16..(blk + 1) * 16];
            for j in 0..16 {
                s += ((wb[j] & 15) as i32 - 8) * xb[j] as i32
                    + ((wb[j] >> 4) as i32 - 8) * xb[j + 16] as i32;
            }
        } else {
            let wb = &w[blk * QBLOCK..(blk + 1) * QBLOCK];
            for j in 0..QBLOCK {
                s += (wb[j] as i8) as i32 * xb[j] as i32;
            }
        }
        acc += dw * dx * s as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_qq_avx2(w: &[u8], wd: &[f32], xq: &[i8], xd: &[f32], four_bit: bool) -> f32 {
    use std::arch::x86_64::*;
    let nb = wd.len().min(xd.len());
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(15);
    let eight = _mm256_set1_epi8(8);
    let mut acc = _mm256_setzero_ps();
    for blk in 0..nb {
        let wv = if four_bit {
            let b = _mm_loadu_si128(w.as_ptr().add(blk * 16) as *const __m128i);
            let lo = _mm_and_si128(b, low);
            let hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight)
        } else {
            _mm256_loadu_si256(w.as_ptr().add(blk * QBLOCK) as *const __m256i)
        };
        let xv = _mm256_loadu_si256(xq.as_ptr().add(blk * QBLOCK) as *const __m256i);
        // |w| · (x · sign(w)): maddubs needs an unsigned first operand. Neither side is ever
        // -128, so the products fit and the pairwise i16 sums cannot saturate.
        let aw = _mm256_sign_epi8(wv, wv);
        let sx = _mm256_sign_epi8(xv, wv);
        let p16 = _mm256_maddubs_epi16(aw, sx);
        let p32 = _mm256_madd_epi16(p16, ones);
        let scale = _mm256_set1_ps(*wd.get_unchecked(blk) * *xd.get_unchecked(blk));
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p32), acc);
    }
    let lo = _mm256_castps256_ps128(acc);
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_hadd_ps(s, s);
    let s = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(s)
}

/// AVX-512 VNNI: two blocks per 512-bit register and one `vpdpbusd` for their 64 products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
unsafe fn dot_qq_avx512(w: &[u8], wd: &[f32], xq: &[i8], xd: &[f32], four_bit: bool) -> f32 {
    use std::arch::x86_64::*;
    let nb = wd.len().min(xd.len());
    let zero = _mm512_setzero_si512();
    let eight = _mm512_set1_epi8(8);
    let m15 = _mm256_set1_epi8(15);
    // [A_lo, B_lo, A_hi, B_hi] (64-bit lanes 0-1, 2-3, 4-5, 6-7) -> [A_lo, A_hi, B_lo, B_hi]
    let order = _mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0);
    let mut acc = _mm512_setzero_ps();
    let mut blk = 0;
    // Two blocks' products, given their combined scales as a [s0 x8, s1 x8] vector.
    let pair = |blk: usize, scale: __m512, acc: __m512| {
        let wv = if four_bit {
            let b = _mm256_loadu_si256(w.as_ptr().add(blk * 16) as *const __m256i);
            let lo = _mm256_and_si256(b, m15);
            let hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m15);
            let v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            _mm512_sub_epi8(_mm512_permutexvar_epi64(order, v), eight)
        } else {
            _mm512_loadu_si512(w.as_ptr().add(blk * QBLOCK) as *const _)
        };
        let xv = _mm512_loadu_si512(xq.as_ptr().add(blk * QBLOCK) as *const _);
        // |w| · (x · sign(w)), as in the AVX2 kernel; vpdpbusd does not saturate.
        let aw = _mm512_abs_epi8(wv);
        let neg = _mm512_movepi8_mask(wv);
        let sx = _mm512_mask_sub_epi8(xv, neg, zero, xv);
        let p = _mm512_dpbusd_epi32(zero, aw, sx);
        _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p), acc)
    };
    // Sixteen blocks at a time: their scales are multiplied as one vector and spread to each
    // pair of blocks with a permute, instead of scalar loads and broadcasts per block.
    while blk + 16 <= nb {
        let scales = _mm512_mul_ps(
            _mm512_loadu_ps(wd.as_ptr().add(blk)),
            _mm512_loadu_ps(xd.as_ptr().add(blk)),
        );
        for k in 0..8 {
            let lo = 2 * k as i32;
            let idx = _mm512_set_epi32(
                lo + 1,
                lo + 1,
                lo + 1,
                lo + 1,
                lo + 1,
                lo + 1,
                lo + 1,
                lo + 1,
                lo,
                lo,
                lo,
                lo,
                lo,
                lo,
                lo,
                lo,
            );
            acc = pair(blk + 2 * k, _mm512_permutexvar_ps(idx, scales), acc);
        }
        blk += 16;
    }
    while blk + 2 <= nb {
        let sa = *wd.get_unchecked(blk) * *xd.get_unchecked(blk);
        let sb = *wd.get_unchecked(blk + 1) * *xd.get_unchecked(blk + 1);
        let scale = _mm512_insertf32x8(_mm512_set1_ps(sa), _mm256_set1_ps(sb), 1);
        acc = pair(blk, scale, acc);
        blk += 2;
    }
    let mut total = _mm512_reduce_add_ps(acc);
    if blk < nb {
        let (wb, xb) = if four_bit {
            (&w[blk * 16..], &xq[blk * QBLOCK..])
        } else {
            (&w[blk * QBLOCK..], &xq[blk * QBLOCK..])
        };
        total += dot_qq_body(wb, &wd[blk..nb], xb, &xd[blk..nb], four_bit);
    }
    total
}

/// AVX-512 VNNI for q4 rows: a pair of blocks unpacks (shift, insert, mask) straight into the
/// order of the activations' [`QuantizedX::p4`] copy, and `vpdpbusd` multiplies the unsigned
/// nibbles by the signed activations starting from the offset correction [`QuantizedX::c4`],
/// so a pair costs one multiply-add and no sign fix-ups.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
unsafe fn dot_q4_vnni(w: &[u8], wd: &[f32], x: &QuantizedX) -> f32 {
    use std::arch::x86_64::*;
    let nb = wd.len().min(x.d.len());
    let m15 = _mm512_set1_epi8(15);
    let mut acc = _mm512_setzero_ps();
    // Lanes 0-3 and 8-11 hold block A's products, 4-7 and 12-15 block B's.
    let pair = |p: usize, scale: __m512, acc: __m512| {
        let b = _mm256_loadu_si256(w.as_ptr().add(p * 32) as *const __m256i);
        let v = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
        let v = _mm512_and_si512(v, m15);
        let xv = _mm512_loadu_si512(x.p4.as_ptr().add(p * 64) as *const _);
        let c = _mm512_loadu_si512(x.c4.as_ptr().add(p * 16) as *const _);
        let s = _mm512_dpbusd_epi32(c, v, xv);
        _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc)
    };
    let mut blk = 0;
    while blk + 16 <= nb {
        let scales = _mm512_mul_ps(
            _mm512_loadu_ps(wd.as_ptr().add(blk)),
            _mm512_loadu_ps(x.d.as_ptr().add(blk)),
        );
        for k in 0..8 {
            let (a, b) = (2 * k as i32, 2 * k as i32 + 1);
            let idx = _mm512_set_epi32(b, b, b, b, a, a, a, a, b, b, b, b, a, a, a, a);
            acc = pair(blk / 2 + k, _mm512_permutexvar_ps(idx, scales), acc);
        }
        blk += 16;
    }
    while blk + 2 <= nb {
        let sa = *wd.get_unchecked(blk) * *x.d.get_unchecked(blk);
        let sb = *wd.get_unchecked(blk + 1) * *x.d.get_unchecked(blk + 1);
        let scale = _mm512_set_ps(
            sb, sb, sb, sb, sa, sa, sa, sa, sb, sb, sb, sb, sa, sa, sa, sa,
        );
        acc = pair(blk / 2, scale, acc);
        blk += 2;
    }
    let mut total = _mm512_reduce_add_ps(acc);
    if blk < nb {
        total += dot_qq_body(
            &w[blk * 16..],
            &wd[blk..nb],
            &x.q[blk * QBLOCK..],
            &x.d[blk..nb],
            true,
        );
    }
    total
}

/// Dot product of a quantized row (starting at element `start`) with quantized activations.
#[inline]
pub fn dot_qq(b: &QBlocks, four_bit: bool, start: usize, x: &QuantizedX) -> f32 {
    let n = x.q.len();
    let (b0, nb) = (start / QBLOCK, n / QBLOCK);
    let wd = &b.d[b0..b0 + nb];
    let w = if four_bit {
        &b.q[start / 2..(start + n) / 2]
    } else {
        &b.q[start..start + n]
    };
    #[cfg(target_arch = "x86_64")]
    if has_avx512_vnni() {
        // SAFETY: the CPU supports the enabled features; lengths were checked by slicing, and
        // `p4`/`c4` cover every whole pair of `x`'s blocks.
        return unsafe {
            if four_bit {
                dot_q4_vnni(w, wd, x)
            } else {
                dot_qq_avx512(w, wd, &x.q, &x.d, four_bit)
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { dot_qq_avx2(w, wd, &x.q, &x.d, four_bit) };
    }
    #[cfg(target_arch = "aarch64")]
    if crate::cpu::has_neon() {
        use super::neon;
        // SAFETY: `SDOT` only where the CPU has it; NEON is part of every aarch64 CPU.
        return unsafe {
            if crate::cpu::has_neon_dotprod() {
                neon::dot_qq_sdot(w, wd, &x.q, &x.d, four_bit)
            } else {
                neon::dot_qq_mull(w, wd, &x.q, &x.d, four_bit)
            }
        };
    }
    dot_qq_body(w, wd, &x.q, &x.d, four_bit)
}

/// The portable twin of [`dot_qq`].
pub fn dot_qq_portable(b: &QBlocks, four_bit: bool, start: usize, x: &QuantizedX) -> f32 {
    let n = x.q.len();
    let (b0, nb) = (start / QBLOCK, n / QBLOCK);
    let w = if four_bit {
        &b.q[start / 2..(start + n) / 2]
    } else {
        &b.q[start..start + n]
    };
    dot_qq_body(w, &b.d[b0..b0 + nb], &x.q, &x.d, four_bit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rnd;
    use crate::tensor::quantize::{quantize_q4, quantize_q8};
    use crate::tensor::FloatData;

    #[test]
    fn long_rows_take_every_simd_path() {
        // 25 blocks: a 16-block step, four pairs and a single tail block; 26: five pairs and
        // no tail; 3: a pair and a tail; 48: three 16-block steps.
        for n in [800, 832, 96, 1536] {
            long_row(n);
        }
    }

    fn long_row(n: usize) {
        let w = rnd(3 * n, 21);
        let x = rnd(n, 22);
        let mut qx = QuantizedX::default();
        qx.set(&x);
        for four in [false, true] {
            let qb = if four {
                quantize_q4(&w)
            } else {
                quantize_q8(&w)
            };
            for row in 0..3 {
                let fast = dot_qq(&qb, four, row * n, &qx);
                let port = dot_qq_portable(&qb, four, row * n, &qx);
                assert!(
                    (fast - port).abs() < 1e-4 * (1.0 + port.abs()),
                    "{four} {fast} {port}"
                );
            }
        }
    }

    #[test]
    fn quantization_error_is_bounded_and_dots_match_dequantized() {
        let w = rnd(64 * 96, 1);
        let x = rnd(96, 2);
        for four in [false, true] {
            let qb = if four {
                quantize_q4(&w)
            } else {
                quantize_q8(&w)
            };
            let fd = if four {
                FloatData::Q4(qb.clone())
            } else {
                FloatData::Q8(qb.clone())
            };
            let deq = fd.to_f32();
            // Each weight is within half a step of its block's scale (q4's error-minimising
            // scale may clip the largest weights, by less than one more step).
            let bound = if four { 1.0 } else { 0.5 };
            for (blk, (a, b)) in w.chunks(32).zip(deq.chunks(32)).enumerate() {
                let step = qb.d[blk].abs();
                for (u, v) in a.iter().zip(b) {
                    assert!(
                        (u - v).abs() <= bound * step + 1e-6,
                        "{four} {u} {v} {step}"
                    );
                }
            }
            for row in 0..64 {
                let want: f32 = deq[row * 96..(row + 1) * 96]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| a * b)
                    .sum();
                let fast = dot_q(&qb, four, row * 96, &x);
                let port = dot_q_portable(&qb, four, row * 96, &x);
                assert!((fast - want).abs() < 1e-4, "{fast} {want}");
                assert!((port - want).abs() < 1e-4, "{port} {want}");
            }
            // Integer path: SIMD and portable agree exactly up to float summation order, and
            // the activation quantization costs little.
            let mut qx = QuantizedX::default();
            qx.set(&x);
            for row in 0..64 {
                let want: f32 = deq[row * 96..(row + 1) * 96]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| a * b)
                    .sum();
                let fast = dot_qq(&qb, four, row * 96, &qx);
                let port = dot_qq_portable(&qb, four, row * 96, &qx);
                assert!((fast - port).abs() < 1e-5, "{fast} {port}");
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    let n = 96;
                    let (b0, nb) = (row * 96 / QBLOCK, n / QBLOCK);
                    let wq = if four {
                        &qb.q[row * 48..row * 48 + 48]
                    } else {
                        &qb.q[row * 96..row * 96 + 96]
                    };
                    // SAFETY: AVX2 is present.
                    let a2 = unsafe { dot_qq_avx2(wq, &qb.d[b0..b0 + nb], &qx.q, &qx.d, four) };
                    assert!((a2 - port).abs() < 1e-5, "{a2} {port}");
                }
                assert!(
                    (fast - want).abs() < 0.02 * (1.0 + want.abs()),
                    "{fast} {want}"
                );
            }
        }
    }
}
