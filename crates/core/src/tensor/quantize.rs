//! Block quantization: int8 and 4-bit values with one f32 scale per [`QBLOCK`] weights, made
//! from f32 (at load with `--quant`, or by `rwkv convert --quant`).

use super::{QBlocks, Shared, QBLOCK};
use rayon::prelude::*;

/// Round to nearest (ties to even) without a libm call: adding 1.5·2^23 pushes the fraction
/// out of an f32's mantissa. Exact for |x| < 2^22, far beyond the ±127 used here.
#[inline(always)]
pub(crate) fn rint(x: f32) -> f32 {
    const M: f32 = 12_582_912.0;
    (x + M) - M
}

/// int8: `d = max|x| / 127`, `q = round(x / d)`.
pub fn quantize_q8(x: &[f32]) -> QBlocks {
    assert!(x.len().is_multiple_of(QBLOCK));
    let mut q = vec![0u8; x.len()];
    let mut d = vec![0f32; x.len() / QBLOCK];
    q.par_chunks_mut(QBLOCK)
        .zip(d.par_iter_mut())
        .zip(x.par_chunks(QBLOCK))
        .for_each(|((qb, db), b)| {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            *db = s;
            for (o, v) in qb.iter_mut().zip(b) {
                *o = (rint(v * inv).clamp(-127.0, 127.0) as i8) as u8;
            }
        });
    QBlocks {
        len: x.len(),
        q: Shared::from_vec(q),
        d: Shared::from_vec(d),
    }
}

/// 4-bit: per block, the scale is chosen among candidates around `max|x| / 8` to minimise
/// the squared error (a cheap search that recovers much of the accuracy a plain absmax
/// scale loses), `q = clamp(round(x / d), -8, 7)`.
pub fn quantize_q4(x: &[f32]) -> QBlocks {
    assert!(x.len().is_multiple_of(QBLOCK));
    let mut q = vec![0u8; x.len() / 2];
    let mut d = vec![0f32; x.len() / QBLOCK];
    q.par_chunks_mut(QBLOCK / 2)
        .zip(d.par_iter_mut())
        .zip(x.par_chunks(QBLOCK))
        .for_each(|((qb, db), b)| {
            // The signed extreme maps to about -8, which uses the full range on that side.
            let (mut amax, mut ext) = (0f32, 0f32);
            for &v in b {
                if v.abs() > amax {
                    amax = v.abs();
                    ext = v;
                }
            }
            let mut best = (f32::INFINITY, 0f32);
            if amax > 0.0 {
                for step in 0..16 {
                    let s = -ext / (8.0 - step as f32 * 0.125);
                    let inv = 1.0 / s;
                    let err: f32 = b
                        .iter()
                        .map(|&v| {
                            let qq = rint(v * inv).clamp(-8.0, 7.0);
                            (v - qq * s) * (v - qq * s)
                        })
                        .sum();
                    if err < best.0 {
                        best = (err, s);
                    }
                }
            }
            let s = best.1;
            let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
            let code = |v: f32| (rint(v * inv).clamp(-8.0, 7.0) as i32 + 8) as u8;
            for j in 0..16 {
                qb[j] = code(b[j]) | (code(b[j + 16]) << 4);
            }
            *db = s;
        });
    QBlocks {
        len: x.len(),
        q: Shared::from_vec(q),
        d: Shared::from_vec(d),
    }
}
