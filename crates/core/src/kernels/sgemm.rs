//! Single-threaded f32 matrix products for the small, oddly strided shapes of training
//! (a few hundred rows of width 128–512, LoRA ranks of 32, transposed operands in the
//! backward pass).
//!
//! With AVX-512 the product packs `B` into 32-column panels and `A` into 12-row panels and runs
//! a 12 × 32 register tile (24 accumulators): each step of the inner loop loads two vectors of
//! `B` and broadcasts twelve scalars of `A` into 24 fused multiply-adds, which keeps the FMA
//! unit busy without waiting on loads. The `gemm` crate's AVX2 kernels reach about 55 % of
//! this CPU's peak on these shapes (its packing and edge handling are tuned for larger
//! matrices); without AVX-512 it is still what runs.

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Packing buffers, reused by every call on this thread.
    static PACK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// The bfloat16 products' packing buffers (pairs of bfloat16 in each `u32`).
    static PACK16: std::cell::RefCell<(Vec<u32>, Vec<u32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `c [m, n] (+)= A·B` on the calling thread, where `A[i][l] = a[i·ars + l·acs]`,
/// `B[l][j] = b[l·brs + j·bcs]` and `c` is row-major with `n` columns; with `acc` the product
/// is added to `c`, otherwise it replaces it.
///
/// # Panics
/// If a stride reaches outside `a` or `b`, or `c` holds fewer than `m·n` values.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    a: &[f32],
    (ars, acs): (usize, usize),
    b: &[f32],
    (brs, bcs): (usize, usize),
) {
    if trivial(m, n, k, c, acc, a, (ars, acs), b, (brs, bcs)) {
        return;
    }
    #[cfg(any(test, feature = "test-hooks"))]
    if ROUND_BF16.with(|r| r.get()) {
        // The reference for bfloat16 products: the same sums of the rounded values.
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        ROUND_BF16.with(|r| r.set(false));
        gemm(
            m,
            n,
            k,
            c,
            acc,
            &round(a),
            (ars, acs),
            &round(b),
            (brs, bcs),
        );
        ROUND_BF16.with(|r| r.set(true));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        PACK.with(|p| {
            let (pa, pb) = &mut *p.borrow_mut();
            // SAFETY: AVX-512F was detected at run time; `trivial` bounds every index.
            unsafe { avx512::gemm(m, n, k, c, acc, a, (ars, acs), b, (brs, bcs), pa, pb) }
        });
        return;
    }
    gemm_crate(m, n, k, c, acc, a, (ars, acs), b, (brs, bcs));
}

/// The same product through the `gemm` crate (what runs without AVX-512; public so that
/// `cargo bench --bench train` can compare the two on one machine).
///
/// # Panics
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    a: &[f32],
    (ars, acs): (usize, usize),
    b: &[f32],
    (brs, bcs): (usize, usize),
) {
    if trivial(m, n, k, c, acc, a, (ars, acs), b, (brs, bcs)) {
        return;
    }
    // SAFETY: `trivial` bounds every index the strides reach in `a`, `b` and `c`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            acs as isize,
            ars as isize,
            b.as_ptr(),
            bcs as isize,
            brs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(any(test, feature = "test-hooks"))]
thread_local! {
    /// Tests: [`gemm`] rounds its inputs to bfloat16 first (a reference for [`gemm_bf16`]).
    pub static ROUND_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `c [m, n] (+)= A·B` as [`gemm`], with the values of `A` and `B` rounded to bfloat16 (to
/// nearest, ties to even) and their products summed in f32: mixed-precision training's
/// products, at twice the rate of f32 ones where the CPU multiplies bfloat16 pairs
/// ([`crate::cpu::has_avx512_bf16`]). Elsewhere it is [`gemm`], in f32.
///
/// # Panics
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    a: &[f32],
    (ars, acs): (usize, usize),
    b: &[f32],
    (brs, bcs): (usize, usize),
) {
    if trivial(m, n, k, c, acc, a, (ars, acs), b, (brs, bcs)) {
        return;
    }
    // Gathered loads take 32-bit offsets of up to 15 strides.
    let small = |s: usize| s <= i32::MAX as usize / 16;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512_bf16() && [ars, acs, brs, bcs].into_iter().all(small) {
        PACK16.with(|p| {
            let (pa, pb) = &mut *p.borrow_mut();
            // SAFETY: AVX-512 F/BW and BF16 were detected at run time; `trivial` bounds every
            // index and the strides are small enough for 32-bit gather offsets.
            unsafe { avx512::gemm_bf16(m, n, k, c, acc, a, (ars, acs), b, (brs, bcs), pa, pb) }
        });
        return;
    }
    let _ = small;
    gemm(m, n, k, c, acc, a, (ars, acs), b, (brs, bcs));
}

/// A `B` operand packed once into bfloat16 pairs, for many [`gemm_bf16_packed`] products (a
/// weight multiplied by every micro-batch of a training step).
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<u32>,
}

impl PackedB {
    /// Packs `B [k, n]`, `B[l][j] = b[l·brs + j·bcs]`; `None` where the CPU has no bfloat16
    /// products ([`crate::cpu::has_avx512_bf16`]).
    ///
    /// # Panics
    /// If a stride reaches outside `b`.
    pub fn new(k: usize, n: usize, b: &[f32], (brs, bcs): (usize, usize)) -> Option<PackedB> {
        let mut data = Vec::new();
        PackedB::fill(k, n, b, (brs, bcs), &mut data)?;
        Some(PackedB { k, n, data })
    }

    /// Packs into `data` (reusing its memory); `None` without bfloat16 products.
    fn fill(
        k: usize,
        n: usize,
        b: &[f32],
        (brs, bcs): (usize, usize),
        data: &mut Vec<u32>,
    ) -> Option<()> {
        if k > 0 && n > 0 {
            assert!(
                (k - 1) * brs + (n - 1) * bcs < b.len(),
                "gemm: B out of bounds"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512_bf16()
            && [brs, bcs].into_iter().all(|s| s <= i32::MAX as usize / 16)
        {
            // SAFETY: AVX-512 F/BW and BF16 were detected at run time; B's bounds are checked.
            unsafe { avx512::pack_b16(n, k, b, (brs, bcs), data) };
            return Some(());
        }
        let _ = data;
        None
    }

    /// Repacks a `B` of the same shape in place (a weight after an optimizer step).
    ///
    /// # Panics
    /// As [`PackedB::new`].
    pub fn repack(&mut self, b: &[f32], strides: (usize, usize)) {
        PackedB::fill(self.k, self.n, b, strides, &mut self.data)
            .expect("a PackedB exists only where bfloat16 products do");
    }

    /// `(k, n)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// `c [m, n] (+)= A·B` as [`gemm_bf16`], with `B` packed beforehand; then, with `then`, applies
/// it to every few finished rows of `c` while they are in the L1 cache (an activation).
///
/// # Panics
/// If `A` reaches outside `a` or `c` holds fewer than `m·n` values.
pub fn gemm_bf16_packed(
    m: usize,
    c: &mut [f32],
    acc: bool,
    a: &[f32],
    (ars, acs): (usize, usize),
    b: &PackedB,
    then: Option<fn(&mut [f32])>,
) {
    let (k, n) = (b.k, b.n);
    // `trivial` checks A and C (B was checked when packed: a one-value stand-in passes).
    if trivial(m, n, k, c, acc, a, (ars, acs), &[0.0], (0, 0)) {
        if let Some(f) = then {
            f(&mut c[..m * n]);
        }
        return;
    }
    assert!(
        ars.max(acs) <= i32::MAX as usize / 16,
        "gemm: A's strides are too large"
    );
    #[cfg(target_arch = "x86_64")]
    PACK16.with(|p| {
        let (pa, _) = &mut *p.borrow_mut();
        // SAFETY: a PackedB exists only where AVX-512 F/BW and BF16 were detected; `trivial`
        // bounds A and C, and `b.data` holds every panel of a `[k, n]` B.
        unsafe { avx512::run16(m, n, k, c, acc, a, (ars, acs), &b.data, pa, then) }
    });
}

/// Checks the bounds; handles (and returns true for) products with nothing to multiply.
#[allow(clippy::too_many_arguments)]
fn trivial(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    acc: bool,
    a: &[f32],
    (ars, acs): (usize, usize),
    b: &[f32],
    (brs, bcs): (usize, usize),
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    assert!(c.len() >= m * n, "gemm: output of {} < {m}×{n}", c.len());
    if k == 0 {
        if !acc {
            c[..m * n].iter_mut().for_each(|z| *z = 0.0);
        }
        return true;
    }
    assert!(
        (m - 1) * ars + (k - 1) * acs < a.len(),
        "gemm: A out of bounds"
    );
    assert!(
        (k - 1) * brs + (n - 1) * bcs < b.len(),
        "gemm: B out of bounds"
    );
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows of `A` per register tile.
    const MR: usize = 12;
    /// Columns of `B` per register tile.
    const NR: usize = 32;

    /// Packs `B` into panels of `NR` columns (`[panel][l][NR]`, zero beyond column `n`), then
    /// runs the tile over every panel of `MR` rows of `A` and every panel of `B`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        c: &mut [f32],
        acc: bool,
        a: &[f32],
        (ars, acs): (usize, usize),
        b: &[f32],
        (brs, bcs): (usize, usize),
        pa: &mut Vec<f32>,
        pb: &mut Vec<f32>,
    ) {
        let (np, mp) = (n.div_ceil(NR), m.div_ceil(MR));
        // B is read in place where its rows are contiguous (a gradient or an activation, a
        // LoRA matrix, a weight in the backward pass) except for a last, partial panel;
        // otherwise (a transposed weight) it is copied into panels with zeros beyond `n`.
        let direct_b = |jp: usize| bcs == 1 && (jp + 1) * NR <= n;
        // Only a partial panel needs zeros (beyond column `n`); whole panels are overwritten.
        if pb.len() < np * k * NR {
            pb.resize(np * k * NR, 0.0);
        }
        for jp in (0..np).filter(|&jp| !direct_b(jp)) {
            let (j0, j1) = (jp * NR, ((jp + 1) * NR).min(n));
            let panel = &mut pb[jp * k * NR..(jp + 1) * k * NR];
            if j1 - j0 < NR {
                panel.fill(0.0);
            }
            if bcs == 1 {
                for l in 0..k {
                    panel[l * NR..l * NR + (j1 - j0)]
                        .copy_from_slice(&b[l * brs + j0..l * brs + j1]);
                }
            } else {
                for j in j0..j1 {
                    for l in 0..k {
                        panel[l * NR + j - j0] = b[l * brs + j * bcs];
                    }
                }
            }
        }
        // A is read in place where one of its strides is 1 (x, or a transposed gradient);
        // only a last, partial panel of rows (and A of other strides) is copied, into the
        // transposed form with zeros beyond row `m`.
        let cp = c.as_mut_ptr();
        for ip in 0..mp {
            let (i0, rows) = (ip * MR, (m - ip * MR).min(MR));
            let direct = rows == MR && (acs == 1 || ars == 1);
            if !direct {
                if pa.len() < k * MR {
                    pa.resize(k * MR, 0.0);
                }
                if rows < MR {
                    pa[..k * MR].fill(0.0);
                }
                for i in 0..rows {
                    for l in 0..k {
                        pa[l * MR + i] = a[(i0 + i) * ars + l * acs];
                    }
                }
            }
            for jp in 0..np {
                let cols = (n - jp * NR).min(NR);
                let bp = if direct_b(jp) {
                    (b.as_ptr().add(jp * NR), brs)
                } else {
                    (pb.as_ptr().add(jp * k * NR), NR)
                };
                let cc = cp.add(i0 * n + jp * NR);
                if !direct {
                    tile::<true>(k, (pa.as_ptr(), MR), bp, cc, n, rows, cols, acc);
                } else if ars == 1 {
                    tile::<true>(k, (a.as_ptr().add(i0), acs), bp, cc, n, rows, cols, acc);
                } else {
                    tile::<false>(
                        k,
                        (a.as_ptr().add(i0 * ars), ars),
                        bp,
                        cc,
                        n,
                        rows,
                        cols,
                        acc,
                    );
                }
            }
        }
    }

    /// One `MR × NR` tile of `C` from `NR` columns of `B` (row `l` at `b + l·sb`) and `MR` rows
    /// of `A`, element `(i, l)` at `a[l·sa + i]` (`TA`, A transposed or packed) or
    /// `a[i·sa + l]`; `rows`, `cols` of the tile are stored.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const TA: bool>(
        k: usize,
        (a, sa): (*const f32, usize),
        (b, sb): (*const f32, usize),
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        acc: bool,
    ) {
        let mut s0 = [_mm512_setzero_ps(); MR];
        let mut s1 = [_mm512_setzero_ps(); MR];
        if TA {
            for l in 0..k {
                let b0 = _mm512_loadu_ps(b.add(l * sb));
                let b1 = _mm512_loadu_ps(b.add(l * sb + 16));
                let al = a.add(l * sa);
                for i in 0..MR {
                    let x = _mm512_set1_ps(*al.add(i));
                    s0[i] = _mm512_fmadd_ps(x, b0, s0[i]);
                    s1[i] = _mm512_fmadd_ps(x, b1, s1[i]);
                }
            }
        } else {
            // Rows of A `sa` apart: four base pointers (rows 0, 3, 6, 9) that advance together,
            // each row then one register offset away (`sa`, `2·sa`), so that every broadcast
            // is a single addressing mode rather than a chain of pointer additions.
            let mut p = [a, a.add(3 * sa), a.add(6 * sa), a.add(9 * sa)];
            let (o1, o2) = (sa, 2 * sa);
            for l in 0..k {
                let b0 = _mm512_loadu_ps(b.add(l * sb));
                let b1 = _mm512_loadu_ps(b.add(l * sb + 16));
                for (g, base) in p.iter().enumerate() {
                    for (r, off) in [0, o1, o2].into_iter().enumerate() {
                        let i = 3 * g + r;
                        let x = _mm512_set1_ps(*base.add(off));
                        s0[i] = _mm512_fmadd_ps(x, b0, s0[i]);
                        s1[i] = _mm512_fmadd_ps(x, b1, s1[i]);
                    }
                }
                for q in p.iter_mut() {
                    *q = q.add(1);
                }
            }
        }
        store(&s0, &s1, c, ldc, rows, cols, acc);
    }

    /// Stores (`acc`: adds) `rows × cols` of a register tile into `C`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(
        s0: &[__m512; MR],
        s1: &[__m512; MR],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        acc: bool,
    ) {
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        for i in 0..rows {
            let p = c.add(i * ldc);
            let (mut v0, mut v1) = (s0[i], s1[i]);
            if acc {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
            }
            _mm512_mask_storeu_ps(p, m0, v0);
            _mm512_mask_storeu_ps(p.add(16), m1, v1);
        }
    }

    /// The first `min(n, 16)` lanes.
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Sixteen values `s` apart from `p` (`n` of them; zeros in the other lanes).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32, s: usize, n: usize) -> __m512 {
        let k = mask(n);
        if s == 1 {
            _mm512_maskz_loadu_ps(k, p)
        } else {
            let s = s as i32;
            let ix = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(s),
            );
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), k, ix, p)
        }
    }

    /// Sixteen pairs `(lo[q], hi[q])` rounded to bfloat16, `lo` in the low half of each lane:
    /// the operand layout of `vdpbf16ps`, which multiplies lane by lane and adds both halves.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn zip(lo: __m512, hi: __m512) -> __m512i {
        // `cvtne2ps` puts `lo` in bfloat16 lanes 0–15 and `hi` in 16–31; the permutation
        // interleaves them.
        const IX: [u16; 32] = [
            0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27,
            12, 28, 13, 29, 14, 30, 15, 31,
        ];
        let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_permutexvar_epi16(_mm512_loadu_si512(IX.as_ptr().cast()), bf)
    }

    /// `pb` ← `B` in panels of `NR` columns, `[panel][pair][NR]`: rows `2p` and `2p + 1` of
    /// the panel zipped into bfloat16 pairs (zeros beyond row `k` and column `n`).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_b16(
        n: usize,
        k: usize,
        b: &[f32],
        (brs, bcs): (usize, usize),
        pb: &mut Vec<u32>,
    ) {
        let (np, kp) = (n.div_ceil(NR), k.div_ceil(2));
        if pb.len() < np * kp * NR {
            pb.resize(np * kp * NR, 0);
        }
        let (bp, out) = (b.as_ptr(), pb.as_mut_ptr());
        // A pair of rows at a time, along the rows (each panel's rows are written in order).
        for p in 0..kp {
            for j0 in (0..np * NR).step_by(16) {
                let cnt = n.saturating_sub(j0).min(16);
                let dst = out.add(((j0 / NR) * kp + p) * NR + j0 % NR);
                if cnt == 0 {
                    _mm512_storeu_si512(dst.cast(), _mm512_setzero_si512());
                    continue;
                }
                let lo = load16(bp.add(2 * p * brs + j0 * bcs), bcs, cnt);
                let hi = if 2 * p + 1 < k {
                    load16(bp.add((2 * p + 1) * brs + j0 * bcs), bcs, cnt)
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_storeu_si512(dst.cast(), zip(lo, hi));
            }
        }
    }

    /// `pa` ← `A` as bfloat16 pairs along `k`: with `acs == 1` row by row (`[row][pair]`, a
    /// plain conversion), otherwise column pair by column pair (`[pair][row]`, `rows` wide).
    /// Returns whether the layout is `[pair][row]`. Rows from `m` to `rows` are left as they
    /// are (their products are never stored).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_a16(
        m: usize,
        k: usize,
        rows: usize,
        a: &[f32],
        (ars, acs): (usize, usize),
        pa: &mut Vec<u32>,
    ) -> bool {
        let kp = k.div_ceil(2);
        if pa.len() < rows * kp {
            pa.resize(rows * kp, 0);
        }
        let (ap, out) = (a.as_ptr(), pa.as_mut_ptr());
        if acs == 1 {
            for i in 0..m {
                let row = ap.add(i * ars);
                for l0 in (0..k).step_by(32) {
                    let lo = load16(row.add(l0), 1, k - l0);
                    let hi = if l0 + 16 < k {
                        load16(row.add(l0 + 16), 1, k - l0 - 16)
                    } else {
                        _mm512_setzero_ps()
                    };
                    // Consecutive values are already consecutive pairs.
                    let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    let keep = mask((k - l0).div_ceil(2));
                    _mm512_mask_storeu_epi32(out.add(i * kp + l0 / 2).cast(), keep, bf);
                }
            }
            return false;
        }
        for p in 0..kp {
            for i0 in (0..m).step_by(16) {
                let cnt = (m - i0).min(16);
                let lo = load16(ap.add(2 * p * acs + i0 * ars), ars, cnt);
                let hi = if 2 * p + 1 < k {
                    load16(ap.add((2 * p + 1) * acs + i0 * ars), ars, cnt)
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_mask_storeu_epi32(out.add(p * rows + i0).cast(), mask(cnt), zip(lo, hi));
            }
        }
        true
    }

    /// [`super::gemm_bf16`] with AVX512-BF16: packs both operands into bfloat16 pairs, then
    /// runs a 12 × 32 tile of `vdpbf16ps` (two products and a sum per lane).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn gemm_bf16(
        m: usize,
        n: usize,
        k: usize,
        c: &mut [f32],
        acc: bool,
        a: &[f32],
        sa: (usize, usize),
        b: &[f32],
        sb: (usize, usize),
        pa: &mut Vec<u32>,
        pb: &mut Vec<u32>,
    ) {
        pack_b16(n, k, b, sb, pb);
        run16(m, n, k, c, acc, a, sa, pb, pa, None);
    }

    /// The products of [`gemm_bf16`] once `B` is packed (`pb`, by [`pack_b16`]).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn run16(
        m: usize,
        n: usize,
        k: usize,
        c: &mut [f32],
        acc: bool,
        a: &[f32],
        sa: (usize, usize),
        pb: &[u32],
        pa: &mut Vec<u32>,
        then: Option<fn(&mut [f32])>,
    ) {
        let (np, mp, kp) = (n.div_ceil(NR), m.div_ceil(MR), k.div_ceil(2));
        let rows = mp * MR;
        assert!(pb.len() >= np * kp * NR);
        let by_pair = pack_a16(m, k, rows, a, sa, pa);
        let cp = c.as_mut_ptr();
        for ip in 0..mp {
            let (i0, r) = (ip * MR, (m - ip * MR).min(MR));
            for jp in 0..np {
                let cols = (n - jp * NR).min(NR);
                let bp = pb.as_ptr().add(jp * kp * NR);
                let cc = cp.add(i0 * n + jp * NR);
                if by_pair {
                    tile16::<true>(kp, (pa.as_ptr().add(i0), rows), bp, cc, n, r, cols, acc);
                } else {
                    tile16::<false>(kp, (pa.as_ptr().add(i0 * kp), kp), bp, cc, n, r, cols, acc);
                }
            }
            // The panel's rows are done and still in the L1 cache.
            if let Some(f) = then {
                f(&mut c[i0 * n..(i0 + r) * n]);
            }
        }
    }

    /// One `MR × NR` tile of `C` from bfloat16 pairs: `B`'s panel `[pair][NR]` at `b`, `A`'s
    /// pair `(i, p)` at `a[p·sa + i]` (`TA`) or `a[i·sa + p]`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile16<const TA: bool>(
        kp: usize,
        (a, sa): (*const u32, usize),
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        acc: bool,
    ) {
        let mut s0 = [_mm512_setzero_ps(); MR];
        let mut s1 = [_mm512_setzero_ps(); MR];
        let dp = |s: __m512, x: __m512i, y: __m512i| -> __m512 {
            _mm512_dpbf16_ps(
                s,
                std::mem::transmute::<__m512i, __m512bh>(x),
                std::mem::transmute::<__m512i, __m512bh>(y),
            )
        };
        if TA {
            for p in 0..kp {
                let b0 = _mm512_loadu_si512(b.add(p * NR).cast());
                let b1 = _mm512_loadu_si512(b.add(p * NR + 16).cast());
                let al = a.add(p * sa);
                for i in 0..MR {
                    let x = _mm512_set1_epi32(*al.add(i) as i32);
                    s0[i] = dp(s0[i], x, b0);
                    s1[i] = dp(s1[i], x, b1);
                }
            }
        } else {
            // As in `tile`: four base pointers, each row one register offset away.
            let mut q = [a, a.add(3 * sa), a.add(6 * sa), a.add(9 * sa)];
            let (o1, o2) = (sa, 2 * sa);
            for p in 0..kp {
                let b0 = _mm512_loadu_si512(b.add(p * NR).cast());
                let b1 = _mm512_loadu_si512(b.add(p * NR + 16).cast());
                for (g, base) in q.iter().enumerate() {
                    for (r, off) in [0, o1, o2].into_iter().enumerate() {
                        let i = 3 * g + r;
                        let x = _mm512_set1_epi32(*base.add(off) as i32);
                        s0[i] = dp(s0[i], x, b0);
                        s1[i] = dp(s1[i], x, b1);
                    }
                }
                for v in q.iter_mut() {
                    *v = v.add(1);
                }
            }
        }
        store(&s0, &s1, c, ldc, rows, cols, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every transpose combination, accumulate or not, at sizes around the tile's edges,
    /// against f64 sums.
    #[test]
    fn products_match_f64_sums() {
        check(false);
    }

    /// The bfloat16 product (and with `B` packed beforehand) against f64 sums of the inputs
    /// rounded to bfloat16 (to nearest even, as `half` rounds): every packing layout, odd `k`
    /// (a half-filled last pair), sizes around the tile's edges. Unrounded inputs would be
    /// off by about 1e-3: the check can tell.
    #[test]
    fn bf16_products_match_rounded_sums() {
        if !crate::cpu::has_avx512_bf16() {
            eprintln!("no AVX512-BF16 here: gemm_bf16 is gemm (tested above)");
            return;
        }
        check(true);
    }

    fn check(bf16: bool) {
        let round = |x: f32| {
            if bf16 {
                half::bf16::from_f32(x).to_f32() as f64
            } else {
                x as f64
            }
        };
        let vals = crate::kernels::test_values(20000, 11);
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 5),
            (13, 33, 7),
            (11, 31, 64),
            (25, 70, 3),
            (40, 16, 129),
            (30, 17, 34),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    for acc in [false, true] {
                        let a = &vals[..m * k];
                        let b = &vals[8000..8000 + k * n];
                        let sa = if ta { (1, m) } else { (k, 1) };
                        let sb = if tb { (1, k) } else { (n, 1) };
                        let mut c: Vec<f32> = vals[16000..16000 + m * n].to_vec();
                        let c0 = c.clone();
                        if bf16 {
                            gemm_bf16(m, n, k, &mut c, acc, a, sa, b, sb);
                            let mut c2 = c0.clone();
                            let pb = PackedB::new(k, n, b, sb).unwrap();
                            gemm_bf16_packed(m, &mut c2, acc, a, sa, &pb, None);
                            assert_eq!(c, c2, "{m}×{n}×{k} ta={ta} tb={tb} acc={acc}: packed");
                            // A function of the finished rows reaches every value once.
                            let mut c3 = c0.clone();
                            let neg: fn(&mut [f32]) = |x| x.iter_mut().for_each(|v| *v = -*v);
                            gemm_bf16_packed(m, &mut c3, acc, a, sa, &pb, Some(neg));
                            assert!(c3.iter().zip(&c).all(|(x, y)| *x == -*y), "then");
                        } else {
                            gemm(m, n, k, &mut c, acc, a, sa, b, sb);
                        }
                        for i in 0..m {
                            for j in 0..n {
                                let mut s = if acc { c0[i * n + j] as f64 } else { 0.0 };
                                let mut mag = s.abs();
                                for l in 0..k {
                                    let p = round(a[i * sa.0 + l * sa.1])
                                        * round(b[l * sb.0 + j * sb.1]);
                                    s += p;
                                    mag += p.abs();
                                }
                                let got = c[i * n + j] as f64;
                                assert!(
                                    (got - s).abs() <= 1e-6 * mag + 1e-30,
                                    "{m}×{n}×{k} ta={ta} tb={tb} acc={acc} [{i},{j}]: {got} vs {s}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
