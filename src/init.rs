//! Random-weight checkpoints in the official format and key order, initialised as the official
//! trainers (BlinkDL/RWKV-LM) do, so that anyone can benchmark or train realistic shapes
//! without downloading a model.
//!
//! Sources of the formulas: RWKV-v7 `train_temp/src/model.py` (`RWKV_Tmix_x070.__init__`,
//! `RWKV_CMix_x070.__init__`, `RWKV.generate_init_weight`), RWKV-v5 `src/model.py`
//! (`RWKV_Tmix_x052`, `RWKV_Tmix_x060` and their channel mixes) and RWKV-v4neo `src/model.py`
//! (`RWKV_TimeMix.__init__`, `RWKV_ChannelMix.__init__`, `generate_init_weight`).

use crate::checkpoint::{write, Generation, OutTensor};
use crate::error::{Error, Result};
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
    /// Head size (v5.2, v6.0, v7).
    pub head_size: usize,
    /// Random seed.
    pub seed: u64,
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

/// RWKV-LM's LoRA rank rule: `max(32, round(k·√C / 32)·32)` (Python rounds half to even).
fn lora_rank(k: f64, c: usize) -> usize {
    let x = k * (c as f64).sqrt() / 32.0;
    let r = x.round();
    let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && (r as i64) % 2 != 0 {
        r - 1.0
    } else {
        r
    };
    ((r as usize) * 32).max(32)
}

/// A named tensor: name, shape and f32 values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

struct Out(Vec<NamedTensor>);

impl Out {
    fn push(&mut self, name: impl Into<String>, shape: &[usize], data: Vec<f32>) {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        self.0.push((name.into(), shape.to_vec(), data));
    }
    fn ln(&mut self, name: &str, c: usize) {
        self.push(format!("{name}.weight"), &[c], vec![1.0; c]);
        self.push(format!("{name}.bias"), &[c], vec![0.0; c]);
    }
}

impl Out {
    /// The layer norms every block starts with (and `ln0` in block 0); returns the block's
    /// key prefix and RWKV-LM's depth ratios `ratio_0_to_1 = i/(L-1)` and
    /// `ratio_1_to_almost0 = 1 - i/L`.
    fn block_start(&mut self, i: usize, l: usize, c: usize) -> (String, f64, f64) {
        let b = format!("blocks.{i}");
        self.ln(&format!("{b}.ln1"), c);
        self.ln(&format!("{b}.ln2"), c);
        if i == 0 {
            self.ln(&format!("{b}.ln0"), c);
        }
        let r01 = if l > 1 {
            i as f64 / (l - 1) as f64
        } else {
            0.0
        };
        (b, r01, 1.0 - i as f64 / l as f64)
    }
}

/// The number of heads of size `n` in width `c`.
fn heads(c: usize, n: usize) -> Result<usize> {
    if n == 0 || !c.is_multiple_of(n) {
        return Err(Error::bad(format!(
            "--dim {c} is not a multiple of --head-size {n}"
        )));
    }
    Ok(c / n)
}

/// generate_init_weight's rule for a 2-D `.weight`: orthogonal with gain
/// `√(rows/cols)` (when rows > cols) times `scale`, or zeros when `scale` is 0.
fn weight(rows: usize, cols: usize, scale: f32, v4_gain: bool, rng: &mut Rng) -> Vec<f32> {
    if scale == 0.0 {
        return vec![0.0; rows * cols];
    }
    let gain = if v4_gain && rows > cols {
        (rows as f32 / cols as f32).sqrt()
    } else {
        1.0
    };
    orthogonal(rows, cols, gain * scale, rng)
}

fn head(v: usize, c: usize, rng: &mut Rng) -> Vec<f32> {
    let scale = if v > c {
        0.5 * (v as f32 / c as f32).sqrt()
    } else {
        0.5
    };
    orthogonal(v, c, scale, rng)
}

/// The tensors of a freshly initialised model, in the official key order.
pub fn init_tensors(spec: &InitSpec) -> Result<Vec<NamedTensor>> {
    let (l, c, v) = (spec.n_layer, spec.n_embd, spec.vocab);
    if l == 0 || c == 0 || v == 0 {
        return Err(Error::bad("--layers, --dim and --vocab must be at least 1"));
    }
    let mut rng = Rng::new(spec.seed);
    let mut o = Out(Vec::new());
    o.push("emb.weight", &[v, c], uniform(v * c, 1e-4, &mut rng));
    let ddd: Vec<f64> = (0..c).map(|i| i as f64 / c as f64).collect();
    match spec.arch {
        Generation::V7 => {
            let n = spec.head_size;
            let h = heads(c, n)?;
            let f = 4 * c;
            let (dw, da, dv, dg) = (
                lora_rank(2.5, c),
                lora_rank(2.5, c),
                lora_rank(1.7, c),
                lora_rank(5.0, c),
            );
            for i in 0..l {
                let (b, r01, r10) = o.block_start(i, l, c);
                let p = format!("{b}.att");
                let mix = |e: f64| {
                    ddd.iter()
                        .map(|d| (1.0 - d.powf(e)) as f32)
                        .collect::<Vec<_>>()
                };
                for (nm, e) in [
                    ("x_r", 0.2),
                    ("x_w", 0.9),
                    ("x_k", 0.7),
                    ("x_v", 0.7),
                    ("x_a", 0.9),
                    ("x_g", 0.2),
                ] {
                    o.push(format!("{p}.{nm}"), &[1, 1, c], mix(e * r10));
                }
                let linear: Vec<f64> = (0..c)
                    .map(|j| j as f64 / (c - 1).max(1) as f64 - 0.5)
                    .collect();
                let zigzag: Vec<f64> = (0..c)
                    .map(|j| {
                        let z =
                            ((j % n) as f64 - (n - 1) as f64 / 2.0) / ((n - 1).max(1) as f64 / 2.0);
                        z * z.abs()
                    })
                    .collect();
                let www: Vec<f64> = (0..c)
                    .map(|j| {
                        -6.0 + 6.0 * (j as f64 / (c - 1).max(1) as f64).powf(1.0 + r01.powf(0.3))
                    })
                    .collect();
                o.push(format!("{p}.w1"), &[c, dw], vec![0.0; c * dw]);
                o.push(
                    format!("{p}.w2"),
                    &[dw, c],
                    orthogonal(dw, c, 0.1, &mut rng),
                );
                o.push(
                    format!("{p}.w0"),
                    &[1, 1, c],
                    (0..c)
                        .map(|j| (www[j] + 0.5 + zigzag[j] * 2.5) as f32)
                        .collect(),
                );
                o.push(format!("{p}.a1"), &[c, da], vec![0.0; c * da]);
                o.push(
                    format!("{p}.a2"),
                    &[da, c],
                    orthogonal(da, c, 0.1, &mut rng),
                );
                o.push(
                    format!("{p}.a0"),
                    &[1, 1, c],
                    (0..c)
                        .map(|j| (-0.19 + zigzag[j] * 0.3 + linear[j] * 0.4) as f32)
                        .collect(),
                );
                if i > 0 {
                    o.push(format!("{p}.v1"), &[c, dv], vec![0.0; c * dv]);
                    o.push(
                        format!("{p}.v2"),
                        &[dv, c],
                        orthogonal(dv, c, 0.1, &mut rng),
                    );
                    o.push(
                        format!("{p}.v0"),
                        &[1, 1, c],
                        (0..c).map(|j| (0.73 - linear[j] * 0.4) as f32).collect(),
                    );
                }
                o.push(format!("{p}.g1"), &[c, dg], vec![0.0; c * dg]);
                o.push(
                    format!("{p}.g2"),
                    &[dg, c],
                    orthogonal(dg, c, 0.1, &mut rng),
                );
                o.push(
                    format!("{p}.k_k"),
                    &[1, 1, c],
                    (0..c).map(|j| (0.71 - linear[j] * 0.1) as f32).collect(),
                );
                o.push(format!("{p}.k_a"), &[1, 1, c], vec![1.02; c]);
                o.push(format!("{p}.r_k"), &[h, n], vec![-0.04; c]);
                // generate_init_weight: receptance/value orthogonal, key ×0.1, output zero.
                o.push(
                    format!("{p}.receptance.weight"),
                    &[c, c],
                    weight(c, c, 1.0, false, &mut rng),
                );
                o.push(
                    format!("{p}.key.weight"),
                    &[c, c],
                    weight(c, c, 0.1, false, &mut rng),
                );
                o.push(
                    format!("{p}.value.weight"),
                    &[c, c],
                    weight(c, c, 1.0, false, &mut rng),
                );
                o.push(format!("{p}.output.weight"), &[c, c], vec![0.0; c * c]);
                let layer_scale = ((1 + i) as f64 / l as f64).powf(0.7) as f32;
                o.push(format!("{p}.ln_x.weight"), &[c], vec![layer_scale; c]);
                o.push(format!("{p}.ln_x.bias"), &[c], vec![0.0; c]);
                let q = format!("{b}.ffn");
                o.push(
                    format!("{q}.x_k"),
                    &[1, 1, c],
                    ddd.iter()
                        .map(|d| (1.0 - d.powf(r10.powi(4))) as f32)
                        .collect(),
                );
                o.push(
                    format!("{q}.key.weight"),
                    &[f, c],
                    weight(f, c, 1.0, false, &mut rng),
                );
                o.push(format!("{q}.value.weight"), &[c, f], vec![0.0; c * f]);
            }
        }
        Generation::V4 => {
            let f = 4 * c;
            for i in 0..l {
                let (b, r01, r10) = o.block_start(i, l, c);
                let p = format!("{b}.att");
                o.push(
                    format!("{p}.time_decay"),
                    &[c],
                    (0..c)
                        .map(|j| {
                            (-5.0 + 8.0 * (j as f64 / (c - 1).max(1) as f64).powf(0.7 + 1.3 * r01))
                                as f32
                        })
                        .collect(),
                );
                o.push(
                    format!("{p}.time_first"),
                    &[c],
                    (0..c)
                        .map(|j| (0.3f64.ln() + (((j + 1) % 3) as f64 - 1.0) * 0.5) as f32)
                        .collect(),
                );
                let pw = |e: f64, add: f64| {
                    ddd.iter()
                        .map(|d| (d.powf(e) + add) as f32)
                        .collect::<Vec<_>>()
                };
                o.push(format!("{p}.time_mix_k"), &[1, 1, c], pw(r10, 0.0));
                o.push(format!("{p}.time_mix_v"), &[1, 1, c], pw(r10, 0.3 * r01));
                o.push(format!("{p}.time_mix_r"), &[1, 1, c], pw(0.5 * r10, 0.0));
                o.push(
                    format!("{p}.key.weight"),
                    &[c, c],
                    weight(c, c, 0.1, true, &mut rng),
                );
                o.push(
                    format!("{p}.value.weight"),
                    &[c, c],
                    weight(c, c, 1.0, true, &mut rng),
                );
                o.push(
                    format!("{p}.receptance.weight"),
                    &[c, c],
                    weight(c, c, 1.0, true, &mut rng),
                );
                o.push(format!("{p}.output.weight"), &[c, c], vec![0.0; c * c]);
                let q = format!("{b}.ffn");
                o.push(format!("{q}.time_mix_k"), &[1, 1, c], pw(r10, 0.0));
                o.push(format!("{q}.time_mix_r"), &[1, 1, c], pw(r10, 0.0));
                o.push(
                    format!("{q}.key.weight"),
                    &[f, c],
                    weight(f, c, 1.0, true, &mut rng),
                );
                o.push(format!("{q}.receptance.weight"), &[c, c], vec![0.0; c * c]);
                o.push(format!("{q}.value.weight"), &[c, f], vec![0.0; c * f]);
            }
        }
        Generation::V5_2 | Generation::V6_0 => {
            // RWKV-v5/src/model.py: RWKV_Tmix_x052 / RWKV_Tmix_x060 and their channel mixes
            // (ffn size int(3.5·C / 32)·32); generate_init_weight as for v4 (gate ×0.1).
            let v6 = spec.arch == Generation::V6_0;
            let n = spec.head_size;
            let h = heads(c, n)?;
            let f = (c * 7 / 2) / 32 * 32;
            let (dm, dd) = if c == 4096 { (64, 128) } else { (32, 64) };
            for i in 0..l {
                let (b, r01, r10) = o.block_start(i, l, c);
                let p = format!("{b}.att");
                let pw = |e: f64, add: f64| {
                    ddd.iter()
                        .map(|d| (d.powf(e) + add) as f32)
                        .collect::<Vec<_>>()
                };
                let one_minus = |v: Vec<f32>| v.into_iter().map(|x| 1.0 - x).collect::<Vec<_>>();
                let decay: Vec<f32> = (0..c)
                    .map(|j| {
                        (-6.0 + 5.0 * (j as f64 / (c - 1).max(1) as f64).powf(0.7 + 1.3 * r01))
                            as f32
                    })
                    .collect();
                let first: Vec<f32> = (0..c)
                    .map(|j| {
                        let zigzag = (((j + 1) % 3) as f64 - 1.0) * 0.1;
                        (r01 * (1.0 - j as f64 / (c - 1).max(1) as f64) + zigzag) as f32
                    })
                    .collect();
                if v6 {
                    for (nm, e, add) in [
                        ("x", r10, 0.0),
                        ("w", r10, 0.0),
                        ("k", r10, 0.0),
                        ("v", r10, 0.3 * r01),
                        ("r", 0.5 * r10, 0.0),
                        ("g", 0.5 * r10, 0.0),
                    ] {
                        o.push(
                            format!("{p}.time_maa_{nm}"),
                            &[1, 1, c],
                            one_minus(pw(e, add)),
                        );
                    }
                    o.push(
                        format!("{p}.time_maa_w1"),
                        &[c, 5 * dm],
                        uniform(c * 5 * dm, 1e-4, &mut rng),
                    );
                    o.push(
                        format!("{p}.time_maa_w2"),
                        &[5, dm, c],
                        uniform(5 * dm * c, 1e-4, &mut rng),
                    );
                    o.push(format!("{p}.time_decay"), &[1, 1, c], decay);
                    o.push(
                        format!("{p}.time_decay_w1"),
                        &[c, dd],
                        uniform(c * dd, 1e-4, &mut rng),
                    );
                    o.push(
                        format!("{p}.time_decay_w2"),
                        &[dd, c],
                        uniform(dd * c, 1e-4, &mut rng),
                    );
                } else {
                    for (nm, e, add) in [
                        ("k", r10, 0.0),
                        ("v", r10, 0.3 * r01),
                        ("r", 0.5 * r10, 0.0),
                        ("g", 0.5 * r10, 0.0),
                    ] {
                        o.push(format!("{p}.time_mix_{nm}"), &[1, 1, c], pw(e, add));
                    }
                    o.push(format!("{p}.time_decay"), &[h, n], decay);
                }
                o.push(format!("{p}.time_faaaa"), &[h, n], first);
                o.push(
                    format!("{p}.receptance.weight"),
                    &[c, c],
                    weight(c, c, 1.0, true, &mut rng),
                );
                o.push(
                    format!("{p}.key.weight"),
                    &[c, c],
                    weight(c, c, 0.1, true, &mut rng),
                );
                o.push(
                    format!("{p}.value.weight"),
                    &[c, c],
                    weight(c, c, 1.0, true, &mut rng),
                );
                o.push(format!("{p}.output.weight"), &[c, c], vec![0.0; c * c]);
                o.push(
                    format!("{p}.gate.weight"),
                    &[c, c],
                    weight(c, c, 0.1, true, &mut rng),
                );
                o.ln(&format!("{p}.ln_x"), c);
                let q = format!("{b}.ffn");
                if v6 {
                    o.push(
                        format!("{q}.time_maa_k"),
                        &[1, 1, c],
                        one_minus(pw(r10, 0.0)),
                    );
                    o.push(
                        format!("{q}.time_maa_r"),
                        &[1, 1, c],
                        one_minus(pw(r10, 0.0)),
                    );
                } else {
                    o.push(format!("{q}.time_mix_k"), &[1, 1, c], pw(r10, 0.0));
                    o.push(format!("{q}.time_mix_r"), &[1, 1, c], pw(r10, 0.0));
                }
                o.push(
                    format!("{q}.key.weight"),
                    &[f, c],
                    weight(f, c, 1.0, true, &mut rng),
                );
                o.push(format!("{q}.receptance.weight"), &[c, c], vec![0.0; c * c]);
                o.push(format!("{q}.value.weight"), &[c, f], vec![0.0; c * f]);
            }
        }
    }
    o.push("ln_out.weight", &[c], vec![1.0; c]);
    o.push("ln_out.bias", &[c], vec![0.0; c]);
    o.push("head.weight", &[v, c], head(v, c, &mut rng));
    Ok(o.0)
}

/// Creates a model and writes it (`.safetensors` or `.pth`, by extension) in `dtype`.
pub fn write_init(spec: &InitSpec, path: &Path, dtype: DType) -> Result<()> {
    let fmt = write::format_for(path)?;
    let tensors = init_tensors(spec)?;
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
            let mut md = std::collections::BTreeMap::new();
            md.insert("format".to_string(), "pt".to_string());
            crate::checkpoint::write_safetensors(path, &out, &md)
        }
        crate::checkpoint::Format::Pth => write::write_pth(path, &out),
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

    #[test]
    fn lora_ranks_match_the_official_rule() {
        // RWKV-7 0.1B (C=768): w 64, a 64, v 32, g 128.
        assert_eq!(lora_rank(2.5, 768), 64);
        assert_eq!(lora_rank(1.7, 768), 32);
        assert_eq!(lora_rank(5.0, 768), 128);
        assert_eq!(lora_rank(2.5, 128), 32);
    }
}
