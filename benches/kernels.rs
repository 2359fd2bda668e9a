//! Kernel benchmark: one matrix-vector product (the token step's inner loop) and one
//! 8-row product (a decode batch) per weight format, reported as GB/s of weights read.
//!
//! ```sh
//! cargo bench --bench kernels            # all threads
//! RAYON_NUM_THREADS=1 cargo bench --bench kernels
//! ```

use rwkv::checkpoint::{FloatData, Shared, WeightFormat};
use rwkv::init::Rng;
use rwkv::kernels::{matmul, Layout, Matrix};
use std::time::Instant;

/// Uniform values in [-0.5, 0.5).
fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform() as f32 - 0.5).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // The shape of the 0.1B model's channel-mix key matrix, 16 of them so that the weights
    // (up to 150 MB in f32) do not fit in the caches.
    let (n_in, n_out, copies) = (768, 3072, 16);
    // Distinct weights per copy: shared copies would be served from the caches.
    let bases: Vec<FloatData> = (0..copies)
        .map(|i| FloatData::F32(Shared::from_vec(rnd(n_in * n_out, 100 + i as u64))))
        .collect();
    let x1 = rnd(n_in, 2);
    let x8 = rnd(8 * n_in, 3);
    println!(
        "{} x {} matrices x {}, {} threads, simd {}",
        n_out,
        n_in,
        copies,
        rayon::current_num_threads(),
        rwkv::kernels::simd_level()
    );
    println!("format   matvec GB/s   matvec us   8-row us");
    for fmt in ["f32", "f16", "bf16", "int8", "q4"] {
        let f: WeightFormat = fmt.parse().unwrap();
        let mats: Vec<Matrix> = bases
            .iter()
            .map(|b| Matrix {
                n_in,
                n_out,
                layout: Layout::OutIn,
                data: f.convert(b, n_in).unwrap(),
            })
            .collect();
        let mut y1 = vec![0f32; n_out];
        let mut y8 = vec![0f32; 8 * n_out];
        let mut t1 = Vec::new();
        let mut t8 = Vec::new();
        for _ in 0..9 {
            let t = Instant::now();
            for m in &mats {
                matmul(m, &x1, 1, &mut y1);
            }
            t1.push(t.elapsed().as_secs_f64() / copies as f64);
            let t = Instant::now();
            for m in &mats {
                matmul(m, &x8, 8, &mut y8);
            }
            t8.push(t.elapsed().as_secs_f64() / copies as f64);
        }
        let (m1, m8) = (median(t1), median(t8));
        let bytes = mats[0].bytes() as f64;
        println!(
            "{fmt:<6} {:>10.1} {:>11.1} {:>10.1}",
            bytes / m1 / 1e9,
            m1 * 1e6,
            m8 * 1e6
        );
        std::hint::black_box((&y1, &y8));
    }
}
