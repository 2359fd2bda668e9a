//! A model's parameters while it trains: f32 values under the official names, in checkpoint
//! order, held as plain vectors that the training passes read and the optimizer updates in
//! place.

use rwkv_core::checkpoint::{Checkpoint, Generation, OutTensor};
use rwkv_core::error::{Error, Result};
use rwkv_core::init::NamedTensor;
use std::collections::HashMap;

/// The shape of a trainable model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims {
    /// Generation (V7 or V4).
    pub arch: Generation,
    /// Blocks.
    pub n_layer: usize,
    /// Width.
    pub n_embd: usize,
    /// Head size (RWKV-7).
    pub head_size: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// The parameters of a model being trained.
pub struct Params {
    /// Shape.
    pub dims: Dims,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    values: Vec<Vec<f32>>,
}

impl Params {
    /// Parameters from named tensors (from `init_tensors` or a checkpoint).
    pub fn from_tensors(tensors: Vec<NamedTensor>) -> Result<Params> {
        let dims = infer_dims(
            &tensors
                .iter()
                .map(|(n, s, _)| (n.as_str(), s.as_slice()))
                .collect(),
        )?;
        let mut p = Params {
            dims,
            names: Vec::new(),
            shapes: Vec::new(),
            values: Vec::new(),
        };
        for (name, shape, data) in tensors {
            if shape.iter().product::<usize>() != data.len() {
                return Err(Error::Internal(format!(
                    "tensor {name} has {} values for shape {shape:?}",
                    data.len()
                )));
            }
            p.names.push(name);
            p.shapes.push(shape);
            p.values.push(data);
        }
        Ok(p)
    }

    /// The tensors of a checkpoint whose names pass `keep`, as f32.
    pub fn from_checkpoint_keys(ck: &Checkpoint, keep: impl Fn(&str) -> bool) -> Result<Params> {
        let mut ts = Vec::new();
        for name in ck.names().iter().filter(|n| keep(n)) {
            let meta = ck.get(name).ok_or_else(|| Error::Internal(name.clone()))?;
            ts.push((name.clone(), meta.shape.clone(), ck.f32_vec(name)?));
        }
        Self::from_tensors(ts)
    }

    /// Names, in checkpoint order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Shapes, in the same order.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Values, in the same order.
    pub fn values(&self) -> &[Vec<f32>] {
        &self.values
    }

    /// Values to update in place.
    pub fn values_mut(&mut self) -> &mut [Vec<f32>] {
        &mut self.values
    }

    /// A copy as named tensors.
    pub fn tensors(&self) -> Vec<NamedTensor> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.values)
            .map(|((n, s), v)| (n.clone(), s.clone(), v.clone()))
            .collect()
    }

    /// The tensors to write (f32, official names and order).
    pub fn out_tensors(&self) -> Vec<OutTensor<'static>> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.values)
            .map(|((n, s), v)| OutTensor::f32(n.clone(), s.clone(), v))
            .collect()
    }
}

/// The shape of a model from its tensors' names and shapes.
pub(crate) fn infer_dims(shapes: &HashMap<&str, &[usize]>) -> Result<Dims> {
    let emb = shapes
        .get("emb.weight")
        .copied()
        .ok_or_else(|| Error::bad("tensor emb.weight is missing"))?;
    let (vocab, c) = match emb {
        [v, c] => (*v, *c),
        s => {
            return Err(Error::bad(format!(
                "emb.weight has shape {s:?}, not [V, C]"
            )))
        }
    };
    let n_layer = (0..)
        .take_while(|i| shapes.contains_key(format!("blocks.{i}.ln1.weight").as_str()))
        .count();
    if n_layer == 0 {
        return Err(Error::bad("the model has no blocks (blocks.0.ln1.weight)"));
    }
    let (arch, head_size) = match shapes.get("blocks.0.att.r_k").copied() {
        Some([h, n]) if h * n == c => (Generation::V7, *n),
        Some(s) => {
            return Err(Error::bad(format!(
                "blocks.0.att.r_k has shape {s:?}, not [H, N] with H·N = {c}"
            )))
        }
        None if shapes.contains_key("blocks.0.att.time_first") => (Generation::V4, 0),
        None => {
            return Err(Error::bad(
                "training supports RWKV-7 (att.r_k) and RWKV-4 (att.time_first) models",
            ))
        }
    };
    Ok(Dims {
        arch,
        n_layer,
        n_embd: c,
        head_size,
        vocab,
    })
}
