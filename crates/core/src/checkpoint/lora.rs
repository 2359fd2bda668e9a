//! LoRA files of fine-tuning tools, folded into a checkpoint's weights.
//!
//! RWKV-PEFT saves a LoRA as a flat dict of `P.lora_A` `[r, in]` and `P.lora_B` `[out, r]` for
//! each adapted `P.weight` `[out, in]`, plus the other parameters it trained (LayerNorms,
//! `emb`, `head`, … under their own names), and no scale: its merge script
//! (`merge/merge_lora.py`) takes `alpha` from the command line and computes
//! `W += B·A·alpha/r` (with `r` from `lora_B`'s shape), replacing every other tensor the file
//! holds. That is what [`merge_lora`] does.

use super::gguf::GgmlType;
use super::{Checkpoint, TensorMeta};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// RWKV-PEFT merge script's default `alpha` (its `merge.py --lora_alpha`).
pub const DEFAULT_ALPHA: f32 = 16.0;

/// A `FILE[:ALPHA]` argument: the LoRA file and its alpha ([`DEFAULT_ALPHA`] when omitted).
pub fn parse_spec(spec: &str) -> Result<(std::path::PathBuf, f32)> {
    if let Some((file, a)) = spec.rsplit_once(':') {
        if let Ok(alpha) = a.parse::<f32>() {
            if !alpha.is_finite() {
                return Err(Error::bad(format!("--lora {spec}: alpha must be finite")));
            }
            return Ok((file.into(), alpha));
        }
    }
    Ok((spec.into(), DEFAULT_ALPHA))
}

/// Folds the LoRA file `lora` into `ck` with scale `alpha / r`: each adapted weight becomes
/// `W + B·A·alpha/r`, computed in f32 and kept as f32 (`narrow`: `false`) or rounded to the
/// weight's stored dtype (`true`, what the merge script writes); every other tensor of the
/// file replaces the checkpoint's of the same name and shape. Returns how many weights were
/// adapted. A tensor of the file the model does not have, or of another shape, is an error.
pub fn merge_lora(
    ck: &mut Checkpoint,
    lora: &Checkpoint,
    alpha: f32,
    narrow: bool,
) -> Result<usize> {
    let lw = lora.path().display().to_string();
    let mut adapted = 0;
    for name in lora.names() {
        let m = lora.meta(name)?;
        if let Some(prefix) = name.strip_suffix(".lora_B") {
            if !lora.has(&format!("{prefix}.lora_A")) {
                return Err(Error::bad(format!("{lw}: {name} has no {prefix}.lora_A")));
            }
            continue;
        }
        let Some(prefix) = name.strip_suffix(".lora_A") else {
            // A trained parameter of its own: it replaces the model's.
            let base = ck.get(name).ok_or_else(|| {
                Error::bad(format!(
                    "{lw}: tensor {name} is not in the model {}",
                    ck.path().display()
                ))
            })?;
            let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
            if squeeze(&base.shape) != squeeze(&m.shape) {
                return Err(Error::bad(format!(
                    "{lw}: tensor {name} has shape {:?}, the model's {:?}",
                    m.shape, base.shape
                )));
            }
            let shape = base.shape.clone();
            let v = lora.f32_vec(name)?;
            put(ck, name, shape, &v, narrow.then_some(m.dtype));
            continue;
        };
        let target = format!("{prefix}.weight");
        let bname = format!("{prefix}.lora_B");
        let base = ck.get(&target).cloned().ok_or_else(|| {
            Error::bad(format!(
                "{lw}: {name} adapts {target}, which the model does not have"
            ))
        })?;
        let b = lora
            .meta(&bname)
            .map_err(|_| Error::bad(format!("{lw}: {name} has no {bname}")))?;
        // A quantized matrix (int8, q4: two values per byte) is merged into its dequantized
        // values, and stays f32.
        let (out, inp) = match (&base.shape[..], base.dtype) {
            (&[o, i], DType::F32 | DType::F16 | DType::BF16 | DType::I8) => (o, i),
            (&[o, i], DType::U8) => (o, 2 * i),
            _ => {
                return Err(Error::bad(format!(
                    "{lw}: {target} is {} {:?}; a LoRA merges into a float or quantized matrix",
                    base.dtype, base.shape
                )))
            }
        };
        let r = m.shape.first().copied().unwrap_or(0);
        if m.shape != [r, inp] || b.shape != [out, r] || r == 0 {
            return Err(Error::bad(format!(
                "{lw}: {name} {:?} and {bname} {:?} do not adapt {target} {:?} (expected [r, {inp}] and [{out}, r])",
                m.shape, b.shape, base.shape
            )));
        }
        let (a, bv) = (lora.f32_vec(name)?, lora.f32_vec(&bname)?);
        let mut w = match ck.quantized_matrix(&target, out, inp)? {
            Some(q) => {
                let scales = format!("{target}.scales");
                ck.tensors.remove(&scales);
                ck.order.retain(|n| *n != scales);
                q.to_f32()
            }
            None => ck.f32_vec(&target)?,
        };
        let scale = alpha / r as f32;
        for o in 0..out {
            let row = &mut w[o * inp..(o + 1) * inp];
            for k in 0..r {
                let s = bv[o * r + k] * scale;
                for (x, &av) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                    *x += s * av;
                }
            }
        }
        put(
            ck,
            &target,
            vec![out, inp],
            &w,
            narrow.then_some(base.dtype),
        );
        adapted += 1;
    }
    Ok(adapted)
}

/// Replaces tensor `name` of `ck` by `v` in `dtype` (f32 when `None` or not a 16-bit float).
fn put(ck: &mut Checkpoint, name: &str, shape: Vec<usize>, v: &[f32], dtype: Option<DType>) {
    let (dtype, ty) = match dtype {
        Some(DType::BF16) => (DType::BF16, GgmlType::BF16),
        Some(DType::F16) => (DType::F16, GgmlType::F16),
        _ => (DType::F32, GgmlType::F32),
    };
    let bytes = super::gguf::quantize(ty, v);
    let nbytes = bytes.len();
    let buf = ck.keep(bytes);
    let meta = TensorMeta {
        dtype,
        shape,
        offset: 0,
        nbytes,
        converted: Some(buf),
    };
    ck.tensors.insert(name.to_string(), meta);
}
