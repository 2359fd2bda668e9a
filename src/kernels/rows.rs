//! Products of a few input rows (a decode batch, a prompt chunk) with `[out, in]` float
//! weights, AVX-512 register tiles reading the stored format directly.
//!
//! A tile is 3 weight rows × up to 8 inputs: 24 accumulators, 3 weight vectors and one input
//! vector fill 28 of the 32 vector registers, so every weight loaded (and widened from
//! bf16/f16 in a register, never through a buffer) feeds 8 multiply-adds and every input
//! vector 3. A task owns a run of row blocks and, for each group of 8 inputs, sweeps all of
//! them: the group's inputs stay in L1 and the task's weight rows in L2.

use super::{Matrix, SendPtr, PAR_MIN_WORK};
use crate::checkpoint::FloatData;
use rayon::prelude::*;

/// Weight rows per register tile.
const ROWS: usize = 3;
/// Inputs per register tile.
const COLS: usize = 8;
/// Row blocks per parallel task: 16 × 3 rows of a 768-wide bf16 matrix are 72 KiB (L2).
const BLOCKS_PER_TASK: usize = 16;

/// The stored element formats the tile reads.
const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;

/// Whether the AVX-512 tile can run here (checked once; `RWKV_NO_AVX512` turns it off).
pub fn available() -> bool {
    super::dot::has_avx512()
}

/// `y[ti, o] = x[ti] · W[o]` for an `[out, in]` float matrix and `t` input rows, or `false`
/// (nothing written) where the format or the CPU is not served here.
pub(crate) fn product(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) -> bool {
    if !available() {
        return false;
    }
    let (ptr, fmt) = match &w.data {
        FloatData::F32(v) => (v.as_ptr() as *const u8, F32),
        FloatData::BF16(v) => (v.as_ptr() as *const u8, BF16),
        FloatData::F16(v) => (v.as_ptr() as *const u8, F16),
        _ => return false,
    };
    let (n_in, n_out) = (w.n_in, w.n_out);
    assert!(w.data.len() >= n_in * n_out && x.len() >= t * n_in && y.len() >= t * n_out);
    let wp = SendPtr(ptr as *mut f32);
    let yp = SendPtr(y.as_mut_ptr());
    let xp = SendPtr(x.as_ptr() as *mut f32);
    let blocks = n_out.div_ceil(ROWS);
    let task = |tk: usize| {
        let b0 = tk * BLOCKS_PER_TASK;
        let b1 = (b0 + BLOCKS_PER_TASK).min(blocks);
        let mut t0 = 0;
        while t0 < t {
            // Groups of 8, then 4, 2, 1: each size is its own compiled tile.
            let tt = match t - t0 {
                r if r >= 8 => 8,
                r if r >= 4 => 4,
                r if r >= 2 => 2,
                _ => 1,
            };
            for b in b0..b1 {
                // SAFETY: the block's rows are < n_out (missing rows of the last block
                // repeat its first row and are not written), the inputs t0..t0+tt < t,
                // and the outputs (t0.., rows of this task) are written by this task only.
                unsafe { block(wp, fmt, n_in, n_out, b * ROWS, xp, t0, tt, yp) };
            }
            t0 += tt;
        }
    };
    let tasks = blocks.div_ceil(BLOCKS_PER_TASK);
    if t * n_in * n_out >= PAR_MIN_WORK && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    true
}

/// One row block × one input group: picks the compiled tile and stores its results.
///
/// # Safety
/// `w` holds `n_out × n_in` elements of format `fmt`, `x` `(t0 + tt) × n_in` floats, `y`
/// `(t0 + tt) × n_out` floats; AVX-512 is available.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    w: SendPtr,
    fmt: u8,
    n_in: usize,
    n_out: usize,
    o0: usize,
    x: SendPtr,
    t0: usize,
    tt: usize,
    y: SendPtr,
) {
    let rows = (n_out - o0).min(ROWS);
    let esize = if fmt == F32 { 4 } else { 2 };
    let base = w.get() as *const u8;
    let wr: [*const u8; ROWS] =
        std::array::from_fn(|r| base.add((o0 + if r < rows { r } else { 0 }) * n_in * esize));
    let xr = |j: usize| x.get().add((t0 + j) * n_in) as *const f32;
    let mut out = [[0f32; ROWS]; COLS];
    macro_rules! run {
        ($tt:literal) => {{
            let xs: [*const f32; $tt] = std::array::from_fn(xr);
            let o: &mut [[f32; ROWS]; $tt] = (&mut out[..$tt]).try_into().expect("tile size");
            match fmt {
                F32 => tile::<F32, $tt>(wr, n_in, xs, o),
                BF16 => tile::<BF16, $tt>(wr, n_in, xs, o),
                _ => tile::<F16, $tt>(wr, n_in, xs, o),
            }
        }};
    }
    match tt {
        8 => run!(8),
        4 => run!(4),
        2 => run!(2),
        _ => run!(1),
    }
    for (j, oj) in out.iter().enumerate().take(tt) {
        for (r, v) in oj.iter().enumerate().take(rows) {
            *y.get().add((t0 + j) * n_out + o0 + r) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// 16 weights at `p` (element index `i`) as f32; `mask` selects a tail's elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
#[inline]
unsafe fn load<const F: u8>(p: *const u8, i: usize, mask: Option<__mmask16>) -> __m512 {
    match F {
        F32 => {
            let q = (p as *const f32).add(i);
            match mask {
                None => _mm512_loadu_ps(q),
                Some(m) => _mm512_maskz_loadu_ps(m, q),
            }
        }
        _ => {
            let q = (p as *const u16).add(i) as *const __m256i;
            let h = match mask {
                None => _mm256_loadu_si256(q),
                Some(m) => _mm256_maskz_loadu_epi16(m, q as *const i16),
            };
            if F == BF16 {
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            } else {
                _mm512_cvtph_ps(h)
            }
        }
    }
}

/// `out[j][r] = w[r] · x[j]` for 3 weight rows of format `F` and `TT` inputs of `n` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn tile<const F: u8, const TT: usize>(
    w: [*const u8; ROWS],
    n: usize,
    x: [*const f32; TT],
    out: &mut [[f32; ROWS]; TT],
) {
    let mut acc = [[_mm512_setzero_ps(); ROWS]; TT];
    // The next block's rows follow these three in memory: fetching them while this block
    // computes keeps the weight stream from DRAM going (a decode batch reads each weight once).
    let esize = if F == F32 { 4 } else { 2 };
    let ahead = ROWS * n * esize;
    let mut c = 0;
    while c + 16 <= n {
        for &wr in &w {
            _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(ahead + c * esize) as *const i8);
        }
        let wv = [
            load::<F>(w[0], c, None),
            load::<F>(w[1], c, None),
            load::<F>(w[2], c, None),
        ];
        for j in 0..TT {
            let xv = _mm512_loadu_ps(x[j].add(c));
            for r in 0..ROWS {
                acc[j][r] = _mm512_fmadd_ps(wv[r], xv, acc[j][r]);
            }
        }
        c += 16;
    }
    if c < n {
        let m: __mmask16 = ((1u32 << (n - c)) - 1) as u16;
        let wv = [
            load::<F>(w[0], c, Some(m)),
            load::<F>(w[1], c, Some(m)),
            load::<F>(w[2], c, Some(m)),
        ];
        for j in 0..TT {
            let xv = _mm512_maskz_loadu_ps(m, x[j].add(c));
            for r in 0..ROWS {
                acc[j][r] = _mm512_fmadd_ps(wv[r], xv, acc[j][r]);
            }
        }
    }
    for j in 0..TT {
        for r in 0..ROWS {
            out[j][r] = _mm512_reduce_add_ps(acc[j][r]);
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const F: u8, const TT: usize>(
    _: [*const u8; ROWS],
    _: usize,
    _: [*const f32; TT],
    _: &mut [[f32; ROWS]; TT],
) {
    unreachable!("AVX-512 tile off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Shared;
    use crate::kernels::{test_values as rnd, Layout};

    /// (The results are checked against f64 sums by the kernels' `matmul` test, which goes
    /// through here on a CPU with AVX-512.)
    #[test]
    fn float_weights_are_taken_where_available() {
        for data in crate::kernels::test_formats(&rnd(64, 1)) {
            let m = Matrix {
                n_in: 32,
                n_out: 2,
                layout: Layout::OutIn,
                data,
            };
            let mut y = vec![0.0; 4];
            assert_eq!(product(&m, &rnd(64, 2), 2, &mut y), available());
        }
    }

    #[test]
    fn quantized_weights_are_not_taken() {
        let m = Matrix {
            n_in: 32,
            n_out: 2,
            layout: Layout::OutIn,
            data: crate::checkpoint::WeightFormat::Int8
                .convert(&FloatData::F32(Shared::from_vec(rnd(64, 1))), 32)
                .unwrap(),
        };
        let mut y = vec![0.0; 4];
        assert!(!product(&m, &rnd(64, 2), 2, &mut y));
    }
}
