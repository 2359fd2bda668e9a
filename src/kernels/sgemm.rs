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
    #[cfg(target_arch = "x86_64")]
    if super::dot::has_avx512() {
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
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            ((1u32 << (cols - 16)) - 1) as __mmask16
        } else {
            0
        };
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every transpose combination, accumulate or not, at sizes around the tile's edges,
    /// against f64 sums.
    #[test]
    fn products_match_f64_sums() {
        let vals = crate::kernels::test_values(20000, 11);
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 5),
            (13, 33, 7),
            (11, 31, 64),
            (25, 70, 3),
            (40, 16, 129),
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
                        gemm(m, n, k, &mut c, acc, a, sa, b, sb);
                        for i in 0..m {
                            for j in 0..n {
                                let mut s = if acc { c0[i * n + j] as f64 } else { 0.0 };
                                let mut mag = s.abs();
                                for l in 0..k {
                                    let p = a[i * sa.0 + l * sa.1] as f64
                                        * b[l * sb.0 + j * sb.1] as f64;
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
