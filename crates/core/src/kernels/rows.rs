//! Products of several input rows (a decode batch, a prompt chunk) with float weights, AVX-512
//! register tiles reading the stored format directly; int8/q4 weights are dequantized a
//! task's rows at a time and go through the same tiles.
//!
//! A tile is 3 weight rows × up to 8 inputs: 24 accumulators, 3 weight vectors and one input
//! vector fill 28 of the 32 vector registers, so every weight loaded (and widened from
//! bf16/f16 in a register, never through a buffer) feeds 8 multiply-adds and every input
//! vector 3. A task owns a run of row blocks and, for each group of 8 inputs, sweeps all of
//! them: the group's inputs stay in L1 and the task's weight rows in L2.

use super::{SendPtr, PAR_MIN_WORK};
use crate::tensor::{FloatData, Layout, Matrix, QBlocks, QBLOCK};
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
    crate::cpu::has_avx512()
}

/// `y[ti] = x[ti] @ W` for `t` input rows (float weights of either layout, int8/q4 weights
/// of the `[out, in]` one), or `false` (nothing written) where the format, layout or CPU is
/// not served here.
pub(crate) fn product(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) -> bool {
    if !available() {
        return false;
    }
    if t == 0 {
        return true;
    }
    let (n_in, n_out) = (w.n_in, w.n_out);
    assert!(w.data.len() >= n_in * n_out && x.len() >= t * n_in && y.len() >= t * n_out);
    let src = match &w.data {
        FloatData::F32(v) => Src::Float(v.as_ptr() as *const u8, F32),
        FloatData::BF16(v) => Src::Float(v.as_ptr() as *const u8, BF16),
        FloatData::F16(v) => Src::Float(v.as_ptr() as *const u8, F16),
        FloatData::Q8(b) if w.layout == Layout::OutIn => Src::Quant(b, false),
        FloatData::Q4(b) if w.layout == Layout::OutIn => Src::Quant(b, true),
        _ => return false,
    };
    if let (Layout::InOut, Src::Float(ptr, fmt)) = (w.layout, src) {
        in_out(ptr, fmt, n_in, n_out, x, t, y);
        return true;
    }
    // Input rows whose length is a multiple of 4 KiB (the 3072-wide inputs of the channel
    // mix's value matrix) all fall in the same L1 cache sets: 8 of them plus the weight rows
    // overflow a set's ways and the input loads miss (f32 weights: 64 → 112 GFLOP/s with a
    // copy). They are copied to rows 64 bytes longer; other widths are used in place, where
    // the copy would only cost. Quantized weights always take a copy: the inputs rounded as
    // the integer path rounds them (see `quant::round_as_quantized`).
    let quant = matches!(src, Src::Quant(..));
    let aliased = n_in.is_multiple_of(1024);
    if !quant && (!aliased || t == 1) {
        rows_out_in(src, n_in, n_out, x, n_in, t, y);
        return true;
    }
    let stride = if aliased { n_in + 16 } else { n_in };
    let mut buf = super::take_local(&XPACK);
    if buf.len() < t * stride {
        buf.resize(t * stride, 0.0);
    }
    for (dst, row) in buf.chunks_mut(stride).zip(x.chunks(n_in)).take(t) {
        if quant {
            super::quant::round_as_quantized(row, &mut dst[..n_in]);
        } else {
            dst[..n_in].copy_from_slice(row);
        }
    }
    rows_out_in(src, n_in, n_out, &buf, stride, t, y);
    XPACK.with(|cell| *cell.borrow_mut() = buf);
    true
}

thread_local! {
    /// The calling thread's padded copy of the inputs (kept, so no allocation once grown).
    static XPACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's dequantized weight rows of its current task.
    static DEQ: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where the weights of an `[out, in]` product come from.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// Float rows read in place: base pointer and element format.
    Float(*const u8, u8),
    /// int8 (`false`) or q4 (`true`) blocks, dequantized to f32 a task's rows at a time:
    /// the rows are reused by every input, so widening them once costs little next to the
    /// products (a prompt chunk, a decode batch), and the float tile does the arithmetic.
    Quant(&'a QBlocks, bool),
}

// SAFETY: the pointer of `Float` is a shared read-only view of weights that outlive the call.
unsafe impl Send for Src<'_> {}
unsafe impl Sync for Src<'_> {}

/// The `[out, in]` product with inputs `xs` apart in `x`.
fn rows_out_in(
    src: Src<'_>,
    n_in: usize,
    n_out: usize,
    x: &[f32],
    xs: usize,
    t: usize,
    y: &mut [f32],
) {
    assert!(xs >= n_in && x.len() >= (t - 1) * xs + n_in);
    let yp = SendPtr(y.as_mut_ptr());
    let xp = SendPtr(x.as_ptr() as *mut f32);
    let blocks = n_out.div_ceil(ROWS);
    // Several input groups reuse the task's weight rows: cut the inputs into slices of
    // K_BLOCK so that a group's slice stays in L1 across the task's blocks (partial sums
    // accumulate in y). One group reads every weight once anyway: no slicing.
    let kb = if t > COLS { K_BLOCK } else { n_in };
    // Blocks b0..b1 from weights at `base` (of format `fmt`) whose first row is row `r0`.
    let run = |base: SendPtr, fmt: u8, r0: usize, b0: usize, b1: usize| {
        let mut k0 = 0;
        while k0 < n_in {
            let k = Span {
                start: k0,
                len: kb.min(n_in - k0),
                add: k0 > 0,
            };
            let mut t0 = 0;
            while t0 < t {
                let tt = group(t - t0);
                for b in b0..b1 {
                    // SAFETY: the block's rows are < n_out (missing rows of the last block
                    // repeat its first row and are not written), the inputs t0..t0+tt < t,
                    // the slice inside n_in, and the outputs (t0.., rows of this task) are
                    // written by this task only.
                    unsafe {
                        block(
                            base,
                            fmt,
                            n_in,
                            n_out,
                            (b * ROWS, r0),
                            xp,
                            xs,
                            t0,
                            tt,
                            k,
                            yp,
                        )
                    };
                }
                t0 += tt;
            }
            k0 += kb;
        }
    };
    let task = |tk: usize| {
        let b0 = tk * BLOCKS_PER_TASK;
        let b1 = (b0 + BLOCKS_PER_TASK).min(blocks);
        match src {
            Src::Float(ptr, fmt) => run(SendPtr(ptr as *mut f32), fmt, 0, b0, b1),
            Src::Quant(q, four) => DEQ.with(|cell| {
                let (r0, r1) = (b0 * ROWS, (b1 * ROWS).min(n_out));
                let mut buf = cell.borrow_mut();
                if buf.len() < (r1 - r0) * n_in {
                    buf.resize((r1 - r0) * n_in, 0.0);
                }
                dequant(q, four, r0 * n_in, &mut buf[..(r1 - r0) * n_in]);
                run(SendPtr(buf.as_mut_ptr()), F32, r0, b0, b1)
            }),
        }
    };
    let tasks = blocks.div_ceil(BLOCKS_PER_TASK);
    if t * n_in * n_out >= PAR_MIN_WORK && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Input elements per slice when several input groups share the weights: 8 inputs × 512
/// floats are 16 KiB, half the L1 cache.
const K_BLOCK: usize = 512;

/// A slice of the input dimension; `add`: accumulate into the outputs (not the first slice).
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
    add: bool,
}

/// Inputs per group, largest first: each size is its own compiled tile.
fn group(left: usize) -> usize {
    match left {
        r if r >= 8 => 8,
        r if r >= 4 => 4,
        r if r >= 2 => 2,
        _ => 1,
    }
}

/// The `[in, out]` layout (the small LoRA matrices of v6/v7): a tile is 48 output columns ×
/// up to 8 inputs, each weight row segment loaded once and multiplied by every input's
/// broadcast element. Tasks are (column block, input group) pairs, so a prompt chunk spreads
/// over the threads even where the matrix has one or two column blocks.
fn in_out(w: *const u8, fmt: u8, n_in: usize, n_out: usize, x: &[f32], t: usize, y: &mut [f32]) {
    let wp = SendPtr(w as *mut f32);
    let yp = SendPtr(y.as_mut_ptr());
    let xp = SendPtr(x.as_ptr() as *mut f32);
    let blocks = n_out.div_ceil(COLS_IO);
    let groups = t.div_ceil(COLS);
    let task = |i: usize| {
        let (b, g) = (i % blocks, i / blocks);
        let t0 = g * COLS;
        let mut j0 = t0;
        while j0 < (t0 + COLS).min(t) {
            let tt = group((t0 + COLS).min(t) - j0);
            // In bounds: rows j0 + j < t of x and y.
            let xs = |j: usize| xp.get().wrapping_add((j0 + j) * n_in) as *const f32;
            let ys = |j: usize| yp.get().wrapping_add((j0 + j) * n_out);
            macro_rules! run {
                ($tt:literal) => {{
                    let xs: [*const f32; $tt] = std::array::from_fn(xs);
                    let ys: [*mut f32; $tt] = std::array::from_fn(ys);
                    let o0 = b * COLS_IO;
                    let wq = wp.get() as *const u8;
                    // SAFETY: rows j0.. < t of x and y, columns o0.. masked to n_out; this
                    // task alone writes its (input group, column block) of y.
                    unsafe {
                        match fmt {
                            F32 => tile_io::<F32, $tt>(wq, n_in, n_out, o0, xs, ys),
                            BF16 => tile_io::<BF16, $tt>(wq, n_in, n_out, o0, xs, ys),
                            _ => tile_io::<F16, $tt>(wq, n_in, n_out, o0, xs, ys),
                        }
                    }
                }};
            }
            match tt {
                8 => run!(8),
                4 => run!(4),
                2 => run!(2),
                _ => run!(1),
            }
            j0 += tt;
        }
    };
    let tasks = blocks * groups;
    if t * n_in * n_out >= PAR_MIN_WORK && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Output columns per `[in, out]` tile (three vectors of 16).
const COLS_IO: usize = 48;

/// One row block (first row `o0`) × one input group: picks the compiled tile and stores its
/// results.
///
/// # Safety
/// `w` holds rows `r0..` (up to the block's last) of `n_in` elements of format `fmt`, `x`
/// `t0 + tt` rows `xs` apart, `y` `(t0 + tt) × n_out` floats; AVX-512 is available.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    w: SendPtr,
    fmt: u8,
    n_in: usize,
    n_out: usize,
    (o0, r0): (usize, usize),
    x: SendPtr,
    xs: usize,
    t0: usize,
    tt: usize,
    k: Span,
    y: SendPtr,
) {
    let rows = (n_out - o0).min(ROWS);
    let esize = if fmt == F32 { 4 } else { 2 };
    let base = w.get() as *const u8;
    let wr: [*const u8; ROWS] = std::array::from_fn(|r| {
        base.add(((o0 - r0 + if r < rows { r } else { 0 }) * n_in + k.start) * esize)
    });
    let xr = |j: usize| x.get().add((t0 + j) * xs + k.start) as *const f32;
    let mut out = [[0f32; ROWS]; COLS];
    macro_rules! run {
        ($tt:literal) => {{
            let xs: [*const f32; $tt] = std::array::from_fn(xr);
            let o: &mut [[f32; ROWS]; $tt] = (&mut out[..$tt]).try_into().expect("tile size");
            match fmt {
                F32 => tile::<F32, $tt>(wr, k.len, n_in, xs, o),
                BF16 => tile::<BF16, $tt>(wr, k.len, n_in, xs, o),
                _ => tile::<F16, $tt>(wr, k.len, n_in, xs, o),
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
            let yo = y.get().add((t0 + j) * n_out + o0 + r);
            *yo = if k.add { *yo + *v } else { *v };
        }
    }
}

/// Widens quantized weights from element `start` (a block boundary) into `out`.
fn dequant(q: &QBlocks, four: bool, start: usize, out: &mut [f32]) {
    let (b0, nb) = (start / QBLOCK, out.len() / QBLOCK);
    assert!(start.is_multiple_of(QBLOCK) && out.len().is_multiple_of(QBLOCK));
    assert!(q.d.len() >= b0 + nb);
    let bytes = if four { QBLOCK / 2 } else { QBLOCK };
    assert!(q.q.len() >= (b0 + nb) * bytes);
    // SAFETY: AVX-512 is available (the caller is the tile's path); bounds asserted above.
    unsafe { dequant_avx512(q.q.as_ptr().add(b0 * bytes), &q.d[b0..b0 + nb], four, out) }
}

/// 32 weights per block: int8 values (or 4-bit ones, low nibbles first, offset by 8) times the
/// block's scale.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn dequant_avx512(q: *const u8, d: &[f32], four: bool, out: &mut [f32]) {
    let o = out.as_mut_ptr();
    let eight = _mm512_set1_epi32(8);
    let m15 = _mm_set1_epi8(15);
    for (b, &db) in d.iter().enumerate() {
        let dv = _mm512_set1_ps(db);
        let (lo, hi) = if four {
            let v = _mm_loadu_si128(q.add(b * 16) as *const __m128i);
            let lo = _mm512_cvtepu8_epi32(_mm_and_si128(v, m15));
            let hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m15));
            (_mm512_sub_epi32(lo, eight), _mm512_sub_epi32(hi, eight))
        } else {
            let v = _mm256_loadu_si256(q.add(b * 32) as *const __m256i);
            (
                _mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)),
                _mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)),
            )
        };
        _mm512_storeu_ps(o.add(b * 32), _mm512_mul_ps(_mm512_cvtepi32_ps(lo), dv));
        _mm512_storeu_ps(
            o.add(b * 32 + 16),
            _mm512_mul_ps(_mm512_cvtepi32_ps(hi), dv),
        );
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn dequant_avx512(_: *const u8, _: &[f32], _: bool, _: &mut [f32]) {
    unreachable!("AVX-512 dequantization off x86-64")
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

/// `out[j][r] = w[r] · x[j]` for 3 weight rows of format `F` and `TT` inputs of `n` floats;
/// the rows are `stride` elements apart in the matrix.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn tile<const F: u8, const TT: usize>(
    w: [*const u8; ROWS],
    n: usize,
    stride: usize,
    x: [*const f32; TT],
    out: &mut [[f32; ROWS]; TT],
) {
    let mut acc = [[_mm512_setzero_ps(); ROWS]; TT];
    // The next block's rows follow these three in memory: fetching them while this block
    // computes keeps the weight stream from DRAM going (a decode batch reads each weight once).
    let esize = if F == F32 { 4 } else { 2 };
    let ahead = ROWS * stride * esize;
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

/// `y[j][o0..o0 + 48] = x[j] @ W[:, o0..o0 + 48]` for an `[in, out]` matrix of format `F`
/// and `TT` inputs; columns at or past `n_out` are neither read nor written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn tile_io<const F: u8, const TT: usize>(
    w: *const u8,
    n_in: usize,
    n_out: usize,
    o0: usize,
    x: [*const f32; TT],
    y: [*mut f32; TT],
) {
    let esize = if F == F32 { 4 } else { 2 };
    let mut masks = [0u16; 3];
    for (v, m) in masks.iter_mut().enumerate() {
        let lo = o0 + 16 * v;
        *m = if lo >= n_out {
            0
        } else if lo + 16 <= n_out {
            0xffff
        } else {
            ((1u32 << (n_out - lo)) - 1) as u16
        };
    }
    let mut acc = [[_mm512_setzero_ps(); 3]; TT];
    for i in 0..n_in {
        let row = w.add((i * n_out + o0) * esize);
        let wv = [
            load::<F>(row, 0, Some(masks[0])),
            load::<F>(row, 16, Some(masks[1])),
            load::<F>(row, 32, Some(masks[2])),
        ];
        for j in 0..TT {
            let xb = _mm512_set1_ps(*x[j].add(i));
            for v in 0..3 {
                acc[j][v] = _mm512_fmadd_ps(wv[v], xb, acc[j][v]);
            }
        }
    }
    for j in 0..TT {
        for v in 0..3 {
            _mm512_mask_storeu_ps(y[j].add(o0 + 16 * v), masks[v], acc[j][v]);
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_io<const F: u8, const TT: usize>(
    _: *const u8,
    _: usize,
    _: usize,
    _: usize,
    _: [*const f32; TT],
    _: [*mut f32; TT],
) {
    unreachable!("AVX-512 tile off x86-64")
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const F: u8, const TT: usize>(
    _: [*const u8; ROWS],
    _: usize,
    _: usize,
    _: [*const f32; TT],
    _: &mut [[f32; ROWS]; TT],
) {
    unreachable!("AVX-512 tile off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as rnd;
    use crate::tensor::Layout;
    use crate::tensor::Shared;

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
    fn quantized_weights_are_taken_where_available() {
        let m = Matrix {
            n_in: 32,
            n_out: 2,
            layout: Layout::OutIn,
            data: crate::tensor::WeightFormat::Int8
                .convert(&FloatData::F32(Shared::from_vec(rnd(64, 1))), 32)
                .unwrap(),
        };
        let mut y = vec![0.0; 4];
        assert_eq!(product(&m, &rnd(64, 2), 2, &mut y), available());
    }
}
