//! Kernel benchmark: one matrix-vector product (the token step's inner loop), one 8-row
//! product (a decode batch) per weight format, reported as GB/s of weights read, and a
//! 256-row product (a prompt chunk) through both shapes of the channel mix, in GFLOP/s.
//!
//! ```sh
//! cargo bench --bench kernels            # all threads
//! RAYON_NUM_THREADS=1 cargo bench --bench kernels
//! KERNELS_FORMATS=int8,q4 cargo bench --bench kernels
//! ```

use rwkv::init::Rng;
use rwkv::kernels::matmul;
use rwkv::tensor::{FloatData, Layout, Matrix, Shared, WeightFormat};
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
        rwkv::cpu::simd_level()
    );
    println!("format   matvec GB/s   matvec us   8-row us   256-row GFLOP/s (in 768, in 3072)");
    // `KERNELS_FORMATS=int8,q4` limits the run to some formats (e.g. to profile one).
    let only = std::env::var("KERNELS_FORMATS").ok();
    let all = ["f32", "f16", "bf16", "int8", "q4"];
    for fmt in all
        .into_iter()
        .filter(|f| only.as_ref().is_none_or(|o| o.split(',').any(|x| x == *f)))
    {
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
        // A prompt chunk: 256 rows through the key matrix ([3072, 768]) and the value matrix
        // ([768, 3072]), the two shapes whose inputs do and do not fit the L1 cache.
        let chunk = 256;
        let xc = rnd(chunk * n_out, 4);
        let mut yc = vec![0f32; chunk * n_out];
        let value = Matrix {
            n_in: n_out,
            n_out: n_in,
            layout: Layout::OutIn,
            data: mats[0].data.clone(),
        };
        let mut gflops = [0f64; 2];
        for (g, m) in gflops.iter_mut().zip([&mats[0], &value]) {
            let mut ts = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                matmul(m, &xc[..chunk * m.n_in], chunk, &mut yc[..chunk * m.n_out]);
                ts.push(t.elapsed().as_secs_f64());
            }
            *g = 2.0 * (chunk * n_in * n_out) as f64 / median(ts) / 1e9;
        }
        println!(
            "{fmt:<6} {:>10.1} {:>11.1} {:>10.1} {:>10.1} {:>8.1}",
            bytes / m1 / 1e9,
            m1 * 1e6,
            m8 * 1e6,
            gflops[0],
            gflops[1]
        );
        std::hint::black_box(&yc);
        std::hint::black_box((&y1, &y8));
    }
}
