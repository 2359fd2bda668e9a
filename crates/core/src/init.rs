//! Random-weight checkpoints in the official format and key order, initialised as the official
//! trainers (BlinkDL/RWKV-LM) do, so that anyone can benchmark or train realistic shapes
//! without downloading a model. The tensors and their rules are the generation's
//! [`schema`](crate::schema); this module draws the random numbers.

use crate::checkpoint::{write, Generation, OutTensor};
use crate::error::{Error, Result};
use crate::schema::{self, Dims, Init};
use crate::tensor::DType;
use rayon::prelude::*;
use std::path::Path;

/// The shape of a model to create.
#[derive(Debug, Clone)]
pub struct InitSpec {
    /// Generation.
    pub arch: Generation,
    /// Number of blocks.
    pub n_layer: usize,
    /// Width.
    pub n_embd: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Head size (v5.2, v6.0, v7, the Transformer).
    pub head_size: usize,
    /// The Transformer's learned positions (its context); unused by RWKV.
    pub positions: usize,
    /// Random seed.
    pub seed: u64,
}

impl InitSpec {
    /// The dimensions of the model this makes.
    pub fn dims(&self) -> Result<Dims> {
        let d = Dims::new(
            self.arch,
            self.n_layer,
            self.n_embd,
            self.head_size,
            self.vocab,
        )?;
        if self.arch == Generation::Gpt && self.positions == 0 {
            return Err(Error::bad(
                "the Transformer needs at least one position (ctx)",
            ));
        }
        Ok(d.with_positions(if self.arch == Generation::Gpt {
            self.positions
        } else {
            0
        }))
    }
}

/// A small, seedable generator (SplitMix64) with uniform and normal draws.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x853c_49e6_748f_ea9b)
    }
    /// The generator's state (to save and restore it).
    pub fn state(&self) -> u64 {
        self.0
    }
    /// A generator continuing from a saved [`Rng::state`].
    pub fn from_state(state: u64) -> Self {
        Rng(state)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// f64 dot product with independent partial sums, so that it vectorises (a single running
/// sum is a serial dependency chain).
fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `torch.nn.init.orthogonal_` for a `[rows, cols]` matrix: the orthonormal factor of a
/// Gaussian matrix (along the smaller dimension), times `gain`. Columns are orthonormalised by
/// classical Gram-Schmidt applied twice, which is as accurate as Householder QR here and
/// parallel over the projections.
pub fn orthogonal(rows: usize, cols: usize, gain: f32, rng: &mut Rng) -> Vec<f32> {
    let (m, n) = if rows >= cols {
        (rows, cols)
    } else {
        (cols, rows)
    };
    // q[j] is the j-th of n vectors of length m.
    let mut q: Vec<Vec<f64>> = (0..n)
        .map(|_| (0..m).map(|_| rng.normal()).collect())
        .collect();
    for j in 0..n {
        let (done, rest) = q.split_at_mut(j);
        let v = &mut rest[0];
        for _pass in 0..2 {
            let dots: Vec<f64> = done.par_iter().map(|qk| dot64(qk, v)).collect();
            // Subtract the projections, split along the vector so both phases run in parallel.
            const SPAN: usize = 4096;
            v.par_chunks_mut(SPAN).enumerate().for_each(|(ci, vc)| {
                let (off, len) = (ci * SPAN, vc.len());
                for (qk, d) in done.iter().zip(&dots) {
                    for (x, y) in vc.iter_mut().zip(&qk[off..off + len]) {
                        *x -= d * y;
                    }
                }
            });
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
        v.iter_mut().for_each(|x| *x /= norm);
    }
    let mut out = vec![0f32; rows * cols];
    for (j, qj) in q.iter().enumerate() {
        for (i, &x) in qj.iter().enumerate() {
            // q[j][i] is element (i, j) of the tall m×n factor.
            let (r, c) = if rows >= cols { (i, j) } else { (j, i) };
            out[r * cols + c] = (x * gain as f64) as f32;
        }
    }
    out
}

fn uniform(n: usize, lim: f64, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * lim) as f32)
        .collect()
}

/// A named tensor: name, shape and f32 values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

impl Init {
    /// The values of a tensor of `shape` under this rule, drawing from `rng` where it is
    /// random (so that the tensors, made in schema order, draw as the official trainer does).
    pub fn values(&self, shape: &[usize], rng: &mut Rng) -> Vec<f32> {
        let n = shape.iter().product();
        match self {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::Const(x) => vec![*x; n],
            Init::Values(v) => {
                debug_assert_eq!(v.len(), n);
                v.clone()
            }
            Init::Uniform(lim) => uniform(n, *lim, rng),
            Init::Orthogonal(gain) => {
                let (rows, cols) = match shape {
                    [r, c] => (*r, *c),
                    _ => (n, 1),
                };
                orthogonal(rows, cols, *gain, rng)
            }
            Init::Normal(std) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
        }
    }
}

/// The tensors of a freshly initialised model, in the official key order.
pub fn init_tensors(spec: &InitSpec) -> Result<Vec<NamedTensor>> {
    init_tensors_with(spec, false)
}

/// [`init_tensors`], or with `fast` every orthogonal matrix replaced by Gaussian values of
/// the same scale (`gain / √max(rows, cols)`, an orthogonal matrix's typical entry): seconds
/// instead of the hour Gram-Schmidt takes for a 1.5B model, for benchmark shapes whose
/// speed, not training, is measured.
pub fn init_tensors_with(spec: &InitSpec, fast: bool) -> Result<Vec<NamedTensor>> {
    let dims = spec.dims()?;
    let mut rng = Rng::new(spec.seed);
    Ok(schema::params(&dims)
        .into_iter()
        .map(|p| {
            let v = match (&p.init, &p.shape[..], fast) {
                (Init::Orthogonal(gain), [r, c], true) => {
                    let sd = *gain as f64 / (*r.max(c) as f64).sqrt();
                    (0..r * c).map(|_| (rng.normal() * sd) as f32).collect()
                }
                _ => p.init.values(&p.shape, &mut rng),
            };
            (p.name, p.shape, v)
        })
        .collect())
}

/// Creates a model and writes it (`.safetensors` or `.pth`, by extension) in `dtype`.
pub fn write_init(spec: &InitSpec, path: &Path, dtype: DType) -> Result<()> {
    write_init_with(spec, path, dtype, false)
}

/// [`write_init`], with `fast` as [`init_tensors_with`]'s.
pub fn write_init_with(spec: &InitSpec, path: &Path, dtype: DType, fast: bool) -> Result<()> {
    let fmt = write::format_for(path)?;
    let tensors = init_tensors_with(spec, fast)?;
    let out: Vec<OutTensor> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let mut t = OutTensor::f32(name.clone(), shape.clone(), data);
            if dtype != DType::F32 {
                let bytes: Vec<u8> = data
                    .iter()
                    .flat_map(|&x| match dtype {
                        DType::F16 => half::f16::from_f32(x).to_bits().to_le_bytes(),
                        _ => half::bf16::from_f32(x).to_bits().to_le_bytes(),
                    })
                    .collect();
                t.dtype = if dtype == DType::F16 {
                    DType::F16
                } else {
                    DType::BF16
                };
                t.data = bytes.into();
            }
            t
        })
        .collect();
    match fmt {
        crate::checkpoint::Format::Safetensors => {
            let md = schema::metadata(&spec.dims()?);
            crate::checkpoint::write_safetensors(path, &out, &md)
        }
        crate::checkpoint::Format::Pth if spec.arch == Generation::Gpt => Err(Error::bad(format!(
            "{}: the Transformer is written as .safetensors (its head size is kept in the metadata)",
            path.display()
        ))),
        crate::checkpoint::Format::Pth => write::write_pth(path, &out),
        crate::checkpoint::Format::Gguf => Err(Error::bad(format!(
            "{}: rwkv init writes .safetensors or .pth; make a GGUF of it with rwkv convert",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_is_orthonormal_in_both_orientations() {
        let mut rng = Rng::new(1);
        for (r, c) in [(20, 7), (7, 20), (16, 16)] {
            let w = orthogonal(r, c, 1.0, &mut rng);
            let k = r.min(c);
            // The smaller dimension's vectors are orthonormal.
            for a in 0..k {
                for b in 0..k {
                    let dot: f32 = if r >= c {
                        (0..r).map(|i| w[i * c + a] * w[i * c + b]).sum()
                    } else {
                        (0..c).map(|j| w[a * c + j] * w[b * c + j]).sum()
                    };
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-5, "{r}x{c} ({a},{b}) {dot}");
                }
            }
        }
    }
}
