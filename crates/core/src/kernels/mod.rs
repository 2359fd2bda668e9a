//! The hot loops: matrix products over every stored weight format, normalisations and
//! activations. Pure functions over slices; the models call them, never the other way round.
//!
//! Each inner loop is written once as portable code and compiled twice: as is, and inside a
//! function with AVX2/FMA/F16C enabled, chosen at run time ([`simd_level`]). The two are the
//! same source, so they compute the same sums up to the order the vector unit adds them.
//! Hand-written kernels sit beside them where the compiler's vectorisation falls short: the
//! AVX-512 tiles (`rows`), the integer dot products (`quant`), and NEON on aarch64 (`neon`);
//! tests hold each to its portable twin.

use crate::tensor::{bf16_to_f32, FloatData, Layout, Matrix};
use rayon::prelude::*;

mod dot;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod quant;
mod rows;
pub mod sgemm;
pub mod wkv;
pub use dot::{axpy_row, dot_f32, dot_row};

/// Sets the number of worker threads of the kernels' pool (once per process, before any work).
pub fn set_threads(n: Option<usize>) -> crate::Result<()> {
    if let Some(n) = n {
        if n == 0 {
            return Err(crate::Error::bad("threads must be at least 1"));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| crate::Error::Internal(e.to_string()))?;
    }
    Ok(())
}

thread_local! {
    /// The calling thread's quantized activations, reused across calls (no allocation once
    /// grown to the model's widest input).
    static QX: std::cell::RefCell<quant::QuantizedX> = Default::default();
    /// The same for the rows of a small batch.
    static QXS: std::cell::RefCell<Vec<quant::QuantizedX>> = Default::default();
}

/// Takes a thread's work buffer out of its cell (leaving an empty one) for the length of a
/// call; the caller puts it back. A thread waiting for its parallel tasks may run another
/// job of the pool that makes the same call: it then finds the cell empty and grows a
/// buffer of its own, where holding the cell's borrow across the wait would panic.
pub(crate) fn take_local<T: Default>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
) -> T {
    key.with(|cell| std::mem::take(&mut *cell.borrow_mut()))
}

/// Work per call below which threads cost more than they save.
pub(crate) const PAR_MIN_WORK: usize = 1 << 18;

/// Runs `a` and `b`, side by side when the caller is a worker of the thread pool (where a
/// `rayon::join` is a queue push that another worker may take), one after the other otherwise:
/// from outside the pool a join would hand both to the pool and wait, which costs more than the
/// small products it is used for (and allocates).
pub(crate) fn join_in_pool(a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
    if rayon::current_thread_index().is_some() {
        rayon::join(a, b);
    } else {
        a();
        b();
    }
}

/// A raw output pointer that parallel tasks may share, each writing only elements no other
/// task writes.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only to write disjoint elements from parallel tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Going through a method makes closures capture the whole (Send) wrapper rather than the
    /// raw pointer field.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[t] = x[t] @ W` for `t` rows: `x` is `[t, n_in]`, `y` is `[t, n_out]` (overwritten).
///
/// With `t == 1` this is the matrix-vector product of the time-sequential mode; with `t > 1`
/// every weight row is read once for all `t` inputs (time-parallel mode).
pub fn matmul(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) {
    debug_assert_eq!(x.len(), t * w.n_in);
    debug_assert_eq!(y.len(), t * w.n_out);
    // Several rows of `[out, in]` float weights: the AVX-512 tile where the CPU has it (for
    // prompt chunks too: it reads bf16/f16 in place and measured faster than widening the
    // matrix for the `gemm` crate's AVX2 kernel).
    if t > 1 && rows::product(w, x, t, y) {
        return;
    }
    if t >= GEMM_MIN_ROWS {
        return matmul_gemm(w, x, t, y);
    }
    match w.layout {
        Layout::OutIn => matmul_out_in(w, x, t, y),
        Layout::InOut => {
            if t * w.n_in * w.n_out >= PAR_MIN_WORK && t > 1 {
                y.par_chunks_mut(w.n_out)
                    .zip(x.par_chunks(w.n_in))
                    .for_each(|(yr, xr)| vec_mat(w, xr, yr));
            } else {
                for (yr, xr) in y.chunks_mut(w.n_out).zip(x.chunks(w.n_in)) {
                    vec_mat(w, xr, yr);
                }
            }
        }
    }
}

/// From this many rows on, products go through a register-blocked GEMM: the weights are
/// reused across rows often enough that arithmetic, not memory, is the limit.
const GEMM_MIN_ROWS: usize = 64;

/// `y = x @ W` through the `gemm` crate. Half-precision weights are widened to f32 first:
/// one pass over the matrix per chunk of tokens, small next to the chunk's arithmetic.
fn matmul_gemm(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) {
    let (k, n) = (w.n_in, w.n_out);
    let widened;
    let wf: &[f32] = match &w.data {
        FloatData::F32(v) => v,
        other => {
            let mut buf = vec![0f32; k * n];
            other.read_into(0, &mut buf);
            widened = buf;
            &widened
        }
    };
    // rhs is W^T ([k, n]) for [out, in] storage, W itself for [in, out] storage.
    // Quantized weights see their inputs rounded as the integer one-row path rounds them, so
    // a row's result does not depend on how many rows share the call.
    let rounded;
    let x = match &w.data {
        FloatData::Q8(_) | FloatData::Q4(_) => {
            // Rows of a quantized matrix are whole blocks, so the rows round as one run.
            let mut r = vec![0f32; t * k];
            quant::round_as_quantized(&x[..t * k], &mut r);
            rounded = r;
            &rounded[..]
        }
        _ => x,
    };
    let (rhs_rs, rhs_cs) = match w.layout {
        Layout::OutIn => (1isize, k as isize),
        Layout::InOut => (n as isize, 1isize),
    };
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && t * k * n >= PAR_MIN_WORK {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers and strides describe the slices' bounds exactly:
    // dst [t, n] row-major, lhs [t, k] row-major, rhs as above.
    unsafe {
        gemm::gemm(
            t,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            wf.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y = x @ M` for an `[in, out]` matrix: a sum of scaled rows.
fn vec_mat(w: &Matrix, x: &[f32], y: &mut [f32]) {
    y.fill(0.0);
    for (i, &xi) in x.iter().enumerate() {
        if xi != 0.0 {
            axpy_row(&w.data, i * w.n_out, xi, y);
        }
    }
}

fn matmul_out_in(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) {
    let (n_in, n_out) = (w.n_in, w.n_out);
    let work = t * n_in * n_out;
    if t == 1 {
        if let FloatData::Q8(b) | FloatData::Q4(b) = &w.data {
            let four = matches!(w.data, FloatData::Q4(_));
            let mut qx = take_local(&QX);
            qx.set(x);
            let q = &qx;
            let row = |(o, yo): (usize, &mut f32)| *yo = quant::dot_qq(b, four, o * n_in, q);
            if work >= PAR_MIN_WORK {
                y.par_iter_mut().enumerate().with_min_len(16).for_each(row);
            } else {
                y.iter_mut().enumerate().for_each(row);
            }
            QX.with(|cell| *cell.borrow_mut() = qx);
            return;
        }
        let row = |(o, yo): (usize, &mut f32)| *yo = dot_row(&w.data, o * n_in, x);
        if work >= PAR_MIN_WORK {
            y.par_iter_mut().enumerate().with_min_len(16).for_each(row);
        } else {
            y.iter_mut().enumerate().for_each(row);
        }
        return;
    }
    // Several inputs with quantized weights: every input is quantized once, then each weight
    // row (a few hundred bytes, still in L1) is dotted with all of them on the integer path.
    if let FloatData::Q8(b) | FloatData::Q4(b) = &w.data {
        let four = matches!(w.data, FloatData::Q4(_));
        let mut all = take_local(&QXS);
        if all.len() < t {
            all.resize_with(t, Default::default);
        }
        for (q, xr) in all.iter_mut().zip(x.chunks(n_in)) {
            q.set(xr);
        }
        let qxs = &all[..t];
        let yp = SendPtr(y.as_mut_ptr());
        let row = |o: usize| {
            for (ti, q) in qxs.iter().enumerate() {
                let v = quant::dot_qq(b, four, o * n_in, q);
                // SAFETY: element (ti, o) is written only by the task owning row o.
                unsafe { *yp.get().add(ti * n_out + o) = v };
            }
        };
        if work >= PAR_MIN_WORK {
            (0..n_out).into_par_iter().with_min_len(16).for_each(row);
        } else {
            (0..n_out).for_each(row);
        }
        QXS.with(|cell| *cell.borrow_mut() = all);
        return;
    }
    // Several inputs (a decode batch): blocks of 4 weight rows are widened to f32 once into a
    // per-thread buffer, then a register tile of 4 rows x up to 3 inputs runs over them, so
    // each loaded weight feeds several multiply-adds.
    let yp = SendPtr(y.as_mut_ptr());
    let block = |b: usize| {
        let o0 = b * TILE_ROWS;
        let rows = (n_out - o0).min(TILE_ROWS);
        ROWS.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < TILE_ROWS * n_in {
                buf.resize(TILE_ROWS * n_in, 0.0);
            }
            let wb = &mut buf[..TILE_ROWS * n_in];
            w.data.read_into(o0 * n_in, &mut wb[..rows * n_in]);
            wb[rows * n_in..].fill(0.0);
            let mut t0 = 0;
            while t0 < t {
                let tt = (t - t0).min(2);
                let mut out = [[0f32; TILE_ROWS]; 2];
                let xr = |j: usize| &x[(t0 + j) * n_in..(t0 + j + 1) * n_in];
                if tt == 2 {
                    tile::tile(wb, n_in, [xr(0), xr(1)], &mut out);
                } else {
                    let (o, _) = out.split_at_mut(1);
                    tile::tile(wb, n_in, [xr(0)], o.try_into().expect("1 row"));
                }
                for (j, oj) in out.iter().enumerate().take(tt) {
                    for (r, v) in oj.iter().enumerate().take(rows) {
                        // SAFETY: element (t0 + j, o0 + r) belongs to this task's rows only.
                        unsafe { *yp.get().add((t0 + j) * n_out + o0 + r) = *v };
                    }
                }
                t0 += tt;
            }
        });
    };
    let nblocks = n_out.div_ceil(TILE_ROWS);
    if work >= PAR_MIN_WORK {
        (0..nblocks).into_par_iter().with_min_len(8).for_each(block);
    } else {
        (0..nblocks).for_each(block);
    }
}

/// Weight rows per register tile of the small-batch product.
const TILE_ROWS: usize = 4;

thread_local! {
    /// Each thread's widened weight rows for the small-batch product.
    static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

mod tile {
    use super::TILE_ROWS;
    #[cfg(target_arch = "x86_64")]
    use crate::cpu::has_avx2;

    /// `out[j][r] = w[r] · x[j]` for 4 rows of `w` (`[4, n]`) and `TT` inputs.
    fn body<const TT: usize>(
        w: &[f32],
        n: usize,
        x: [&[f32]; TT],
        out: &mut [[f32; TILE_ROWS]; TT],
    ) {
        for j in 0..TT {
            for r in 0..TILE_ROWS {
                out[j][r] = super::dot::dot_f32_body(&w[r * n..(r + 1) * n], x[j]);
            }
        }
    }

    /// The register tile: `4 * TT` accumulators (TT ≤ 2) plus the 4 weight vectors fit the 16
    /// AVX2 registers, so each weight load feeds TT fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const TT: usize>(
        w: &[f32],
        n: usize,
        x: [&[f32]; TT],
        out: &mut [[f32; TILE_ROWS]; TT],
    ) {
        use std::arch::x86_64::*;
        assert!(w.len() >= TILE_ROWS * n && x.iter().all(|xj| xj.len() >= n));
        let mut acc = [[_mm256_setzero_ps(); TILE_ROWS]; TT];
        let p = w.as_ptr();
        let mut c = 0;
        while c + 8 <= n {
            let w0 = _mm256_loadu_ps(p.add(c));
            let w1 = _mm256_loadu_ps(p.add(n + c));
            let w2 = _mm256_loadu_ps(p.add(2 * n + c));
            let w3 = _mm256_loadu_ps(p.add(3 * n + c));
            for j in 0..TT {
                let xv = _mm256_loadu_ps(x[j].as_ptr().add(c));
                acc[j][0] = _mm256_fmadd_ps(w0, xv, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(w1, xv, acc[j][1]);
                acc[j][2] = _mm256_fmadd_ps(w2, xv, acc[j][2]);
                acc[j][3] = _mm256_fmadd_ps(w3, xv, acc[j][3]);
            }
            c += 8;
        }
        for j in 0..TT {
            for r in 0..TILE_ROWS {
                let v = acc[j][r];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_hadd_ps(s, s);
                let s = _mm_hadd_ps(s, s);
                let mut sum = _mm_cvtss_f32(s);
                for k in c..n {
                    sum += w[r * n + k] * x[j][k];
                }
                out[j][r] = sum;
            }
        }
    }

    /// The tile product, AVX2 where available.
    pub fn tile<const TT: usize>(
        w: &[f32],
        n: usize,
        x: [&[f32]; TT],
        out: &mut [[f32; TILE_ROWS]; TT],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports the enabled features; bounds are asserted inside.
            return unsafe { avx2(w, n, x, out) };
        }
        body(w, n, x, out)
    }

    /// The portable twin of [`tile`].
    #[cfg(test)]
    pub fn tile_portable<const TT: usize>(
        w: &[f32],
        n: usize,
        x: [&[f32]; TT],
        out: &mut [[f32; TILE_ROWS]; TT],
    ) {
        body(w, n, x, out)
    }
}

/// LayerNorm of `x` into `out` with weight `w`, bias `b` and epsilon `eps` (biased variance,
/// as `torch.nn.functional.layer_norm`).
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for i in 0..x.len() {
        out[i] = (x[i] - mean) * inv * w[i] + b[i];
    }
}

/// GroupNorm over `groups` equal groups of `x`, in place, with per-channel weight and bias.
pub fn group_norm(x: &mut [f32], groups: usize, w: &[f32], b: &[f32], eps: f32) {
    let g = x.len() / groups;
    for (h, xs) in x.chunks_mut(g).enumerate() {
        let n = g as f32;
        let mean = xs.iter().sum::<f32>() / n;
        let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, v) in xs.iter_mut().enumerate() {
            let c = h * g + i;
            *v = (*v - mean) * inv * w[c] + b[c];
        }
    }
}

/// Logistic sigmoid.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `e^x` within 2 ulp of the exact value for results in the normal range (below it, a value
/// under 1.3e-38 instead of a subnormal), NaN for NaN. Branch-free and call-free, so the
/// element-wise loops over it vectorise; the C library's `expf` is a call per element.
/// Cephes' `expf`: `x = n ln 2 + r` with `|r| ≤ ln 2 / 2` (ln 2 in two parts, so `r` is
/// exact), a degree-7 polynomial for `e^r`, and `2^n` built in the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 × 2^23: adding and subtracting it rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // `t` is a whole number near 1.5 × 2^23, where one unit is one step of the mantissa, so
    // its bits minus those of ROUND are `n` as an integer. (`n as i32` would saturate and map
    // NaN to 0, which compiles to a scalar compare-and-move per element and stops the loops
    // over this function from vectorising; for NaN the garbage exponent below is harmless, as
    // `er` is NaN.)
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((ni + 127) as u32) << 23)
}

/// The error function, within 1.5e-7 of the exact value (Abramowitz and Stegun 7.1.26), in
/// f32 with the branch-free [`exp`], so that the loops over it vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// GELU of the error function, `x·Φ(x)` (PyTorch's `nn.GELU()`, which nanoGPT uses).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Copies a row of an embedding table (any float format) into `out` as f32.
pub fn embedding_row(table: &FloatData, row: usize, out: &mut [f32]) {
    table.read_into(row * out.len(), out);
}

/// bf16 bits to f32, re-exported for the models' small conversions.
#[inline(always)]
pub fn bf16(b: u16) -> f32 {
    bf16_to_f32(b)
}

/// Deterministic pseudo-random values in [-0.5, 0.5) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// `values` in f32, bf16 and f16 (truncated and rounded as the checkpoints store them), for
/// the kernels' tests.
#[cfg(test)]
pub(crate) fn test_formats(values: &[f32]) -> [FloatData; 3] {
    use crate::tensor::Shared;
    let bf: Vec<u16> = values.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    let hf: Vec<u16> = values
        .iter()
        .map(|v| half::f16::from_f32(*v).to_bits())
        .collect();
    [
        FloatData::F32(Shared::from_vec(values.to_vec())),
        FloatData::BF16(Shared::from_vec(bf)),
        FloatData::F16(Shared::from_vec(hf)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rnd;

    fn naive(
        w: &[f32],
        n_in: usize,
        n_out: usize,
        layout: Layout,
        x: &[f32],
        t: usize,
    ) -> Vec<f32> {
        let mut y = vec![0.0; t * n_out];
        for ti in 0..t {
            for o in 0..n_out {
                let mut s = 0.0f64;
                for i in 0..n_in {
                    let wv = match layout {
                        Layout::OutIn => w[o * n_in + i],
                        Layout::InOut => w[i * n_out + o],
                    };
                    s += wv as f64 * x[ti * n_in + i] as f64;
                }
                y[ti * n_out + o] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matmul_matches_naive_for_every_format_layout_and_size() {
        for &(n_in, n_out, t) in &[
            (7, 5, 1),
            (33, 17, 3),
            (1030, 40, 2),
            (512, 600, 1),
            (600, 512, 5),
            // Every tile size of the small-batch kernels, tails in both dimensions, and a
            // prompt-sized chunk.
            (37, 10, 15),
            (768, 50, 8),
            (100, 7, 70),
            // Input slices (with a tail slice), and the padded copy of 4 KiB-long rows.
            (1100, 9, 12),
            (2048, 5, 10),
        ] {
            let wf = rnd(n_in * n_out, 1);
            let x = rnd(n_in * t, 2);
            for layout in [Layout::OutIn, Layout::InOut] {
                for data in test_formats(&wf) {
                    let exact = data.to_f32();
                    let want = naive(&exact, n_in, n_out, layout, &x, t);
                    let m = Matrix {
                        n_in,
                        n_out,
                        layout,
                        data,
                    };
                    let mut y = vec![f32::NAN; t * n_out];
                    matmul(&m, &x, t, &mut y);
                    for (a, b) in y.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
            }
        }
    }

    /// Several rows with int8/q4 weights: each row as the one-row (integer) path computes it,
    /// up to rounding, whichever path runs (the AVX-512 tile over dequantized weights and
    /// rounded inputs, or the integer kernels), and within the inputs' int8 rounding of the
    /// exact product.
    #[test]
    fn quantized_products_of_several_rows() {
        use crate::tensor::WeightFormat;
        for &(n_in, n_out, t) in &[(64, 5, 2), (96, 7, 9), (2048, 4, 3), (128, 10, 70)] {
            let wf = rnd(n_in * n_out, 31);
            let x = rnd(n_in * t, 32);
            let base = FloatData::F32(crate::tensor::Shared::from_vec(wf));
            for f in [WeightFormat::Int8, WeightFormat::Q4] {
                let data = f.convert(&base, n_in).expect("quantizes");
                let want = naive(&data.to_f32(), n_in, n_out, Layout::OutIn, &x, t);
                let m = Matrix {
                    n_in,
                    n_out,
                    layout: Layout::OutIn,
                    data,
                };
                let mut y = vec![f32::NAN; t * n_out];
                matmul(&m, &x, t, &mut y);
                let mut one = vec![f32::NAN; n_out];
                for ti in 0..t {
                    matmul(&m, &x[ti * n_in..(ti + 1) * n_in], 1, &mut one);
                    for o in 0..n_out {
                        let (a, b) = (y[ti * n_out + o], one[o]);
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{f:?}: {a} vs {b}");
                    }
                }
                let scale = 1.0 + (n_in as f32).sqrt() * 0.1;
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 2e-2 * scale, "{f:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn simd_and_portable_dots_agree() {
        let a = rnd(1000, 3);
        let b = rnd(1000, 4);
        let s1 = dot::dot_f32_portable(&a, &b);
        let s2 = dot::dot_f32(&a, &b);
        assert!((s1 - s2).abs() < 1e-4);
        let [_, bf, hf] = test_formats(&a);
        for d in [bf, hf] {
            let p = dot::dot_row_portable(&d, 0, &b);
            let f = dot_row(&d, 0, &b);
            assert!((p - f).abs() < 1e-4, "{p} vs {f}");
            let mut y1 = b.clone();
            let mut y2 = b.clone();
            dot::axpy_row_portable(&d, 0, 0.5, &mut y1);
            axpy_row(&d, 0, 0.5, &mut y2);
            for (u, v) in y1.iter().zip(&y2) {
                assert!((u - v).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn tile_simd_and_portable_agree() {
        let n = 100;
        let w = rnd(4 * n, 8);
        let x = rnd(2 * n, 9);
        let xs = [&x[..n], &x[n..2 * n]];
        let (mut a, mut b) = ([[0f32; 4]; 2], [[0f32; 4]; 2]);
        tile::tile(&w, n, xs, &mut a);
        tile::tile_portable(&w, n, xs, &mut b);
        for j in 0..2 {
            for r in 0..4 {
                let want: f32 = (0..n).map(|k| w[r * n + k] * xs[j][k]).sum();
                assert!((a[j][r] - b[j][r]).abs() < 1e-4 && (a[j][r] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "max relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1.3e-38 && exp(-200.0) >= 0.0);
        assert!(exp(100.0).is_infinite() || exp(100.0) > 1e38);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7 && sigmoid(-100.0) < 1e-30);
    }

    #[test]
    fn layer_norm_normalises() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut y = [0.0; 4];
        layer_norm(&x, &[1.0; 4], &[0.0; 4], 1e-5, &mut y);
        let mean: f32 = y.iter().sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6);
        assert!((y[3] - 1.3416).abs() < 1e-3);
    }
}
