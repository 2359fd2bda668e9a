//! A model's parameters while it trains: f32 values under the official names, in checkpoint
//! order, held as plain vectors that the training passes read and the optimizer updates in
//! place.

use rwkv_core::checkpoint::{Checkpoint, Generation, OutTensor};
use rwkv_core::error::{Error, Result};
use rwkv_core::init::NamedTensor;
use rwkv_core::schema;
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
    /// Head size (RWKV-7, the Transformer).
    pub head_size: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The Transformer's learned positions (0 for RWKV).
    pub positions: usize,
}

/// The parameters of a model being trained.
pub struct Params {
    /// Shape.
    pub dims: Dims,
    /// The schema's dimensions (the channel-mix size and LoRA ranks too), checked against
    /// every tensor.
    schema: schema::Dims,
    index: HashMap<String, usize>,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    values: Vec<Vec<f32>>,
}

impl Params {
    /// Parameters from named tensors (from `init_tensors` or a checkpoint).
    pub fn from_tensors(tensors: Vec<NamedTensor>) -> Result<Params> {
        Self::build(tensors, &|_| false, None)
    }

    /// [`Params::from_tensors`] for the Transformer, whose head size its tensors do not say.
    pub fn from_tensors_with_heads(tensors: Vec<NamedTensor>, head_size: usize) -> Result<Params> {
        Self::build(tensors, &|_| false, Some(head_size))
    }

    /// The Transformer's head size from a checkpoint's metadata (`None` for RWKV files).
    fn heads_of(ck: &Checkpoint) -> Result<Option<usize>> {
        match ck.metadata().get(schema::gpt::HEAD_SIZE_KEY) {
            None => Ok(None),
            Some(h) => h.parse().map(Some).map_err(|_| {
                Error::bad(format!(
                    "{}: metadata {} is not a number",
                    ck.path().display(),
                    schema::gpt::HEAD_SIZE_KEY
                ))
            }),
        }
    }

    /// The tensors of a checkpoint as f32, except those `later` names, which are listed with
    /// their shapes but no values (frozen weights whose product forms are made from the
    /// checkpoint: [`crate::pass::products::Products::prepare_stored`]).
    ///
    /// A quantized checkpoint's matrices (`rwkv convert --quant`, GGUF Q8_0/Q4_0) are listed with
    /// their unpacked shapes (their `.scales` tensors with them); a quantized embedding is
    /// dequantized.
    pub fn from_checkpoint_deferred(
        ck: &Checkpoint,
        later: impl Fn(&str) -> bool,
    ) -> Result<Params> {
        use rwkv_core::tensor::DType;
        let mut ts = Vec::new();
        for name in ck.names() {
            if name.ends_with(".scales") {
                continue;
            }
            let meta = ck.get(name).ok_or_else(|| Error::Internal(name.clone()))?;
            let mut shape = meta.shape.clone();
            if meta.dtype == DType::U8 && shape.len() == 2 {
                shape[1] *= 2;
            }
            let values = if later(name) {
                Vec::new()
            } else if let [rows, cols] = shape[..] {
                match ck.quantized_matrix(name, rows, cols)? {
                    Some(q) => q.to_f32(),
                    None => ck.f32_vec(name)?,
                }
            } else {
                ck.f32_vec(name)?
            };
            ts.push((name.clone(), shape, values));
        }
        Self::build(ts, &later, Self::heads_of(ck)?)
    }

    fn build(
        tensors: Vec<NamedTensor>,
        later: &dyn Fn(&str) -> bool,
        heads: Option<usize>,
    ) -> Result<Params> {
        let shapes: HashMap<&str, &[usize]> = tensors
            .iter()
            .map(|(n, s, _)| (n.as_str(), s.as_slice()))
            .collect();
        let dims = infer_dims(&shapes, heads)?;
        // Every tensor as the generation's schema has it: no more, no fewer, no other shape.
        let listed = tensors.iter().map(|(n, s, _)| (n.as_str(), s.as_slice()));
        let schema = schema_dims(&dims, &shapes);
        schema::check(&schema, listed)?;
        let mut p = Params {
            dims,
            schema,
            index: HashMap::new(),
            names: Vec::new(),
            shapes: Vec::new(),
            values: Vec::new(),
        };
        for (name, shape, data) in tensors {
            let deferred = data.is_empty() && later(&name);
            if shape.iter().product::<usize>() != data.len() && !deferred {
                return Err(Error::Internal(format!(
                    "tensor {name} has {} values for shape {shape:?}",
                    data.len()
                )));
            }
            p.index.insert(name.clone(), p.names.len());
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
        Self::build(ts, &|_| false, Self::heads_of(ck)?)
    }

    /// The schema's dimensions of the model.
    pub fn schema(&self) -> &schema::Dims {
        &self.schema
    }

    /// The metadata its safetensors files carry (the Transformer's head size).
    pub fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        schema::metadata(&self.schema)
    }

    /// The model as a checkpoint in memory, for the inference engine.
    pub fn checkpoint(&self, what: &str) -> Result<Checkpoint> {
        let bytes =
            rwkv_core::checkpoint::safetensors_bytes(&self.out_tensors(), &self.metadata())?;
        Checkpoint::from_bytes(what, bytes)
    }

    /// The place of tensor `name` in the order of [`Params::names`].
    pub fn find(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| Error::bad(format!("tensor {name} is missing")))
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

/// The schema's dimensions of a model of shape `d`, with its channel-mix size and LoRA ranks
/// read from `shapes` (0 where a tensor is missing, which the schema check then names).
fn schema_dims(d: &Dims, shapes: &HashMap<&str, &[usize]>) -> schema::Dims {
    let col = |name: &str, i: usize| {
        shapes
            .get(name)
            .and_then(|s| s.get(i).copied())
            .unwrap_or(0)
    };
    if d.arch == Generation::Gpt {
        let gpt = schema::gpt::block(0);
        return schema::Dims {
            generation: d.arch,
            n_layer: d.n_layer,
            n_embd: d.n_embd,
            head_size: d.head_size,
            ffn_dim: col(&format!("{gpt}mlp.c_fc.weight"), 0),
            vocab: d.vocab,
            lora: Vec::new(),
            deep_embed: 0,
            positions: d.positions,
        };
    }
    let lora = match d.arch {
        Generation::V7 => vec![
            ("w", col("blocks.0.att.w1", 1)),
            ("a", col("blocks.0.att.a1", 1)),
            ("v", col("blocks.1.att.v1", 1)),
            ("g", col("blocks.0.att.g1", 1)),
        ],
        _ => Vec::new(),
    };
    schema::Dims {
        generation: d.arch,
        n_layer: d.n_layer,
        n_embd: d.n_embd,
        head_size: d.head_size,
        ffn_dim: col("blocks.0.ffn.key.weight", 0),
        vocab: d.vocab,
        lora,
        // The trainer's passes have no DeepEmbed: its tensors are reported as unknown.
        deep_embed: 0,
        positions: 0,
    }
}

/// The shape of a model from its tensors' names and shapes (and, for the Transformer, the
/// head size `heads`, which they do not say).
pub(crate) fn infer_dims(shapes: &HashMap<&str, &[usize]>, heads: Option<usize>) -> Result<Dims> {
    use schema::gpt;
    if let Some(wte) = shapes.get(gpt::WTE) {
        let two = |name: &str| match shapes.get(name) {
            Some([a, b]) => Ok((*a, *b)),
            Some(s) => Err(Error::bad(format!(
                "{name} has shape {s:?}, not two dimensions"
            ))),
            None => Err(Error::bad(format!("tensor {name} is missing"))),
        };
        let (vocab, c) = match wte {
            [v, c] => (*v, *c),
            s => {
                return Err(Error::bad(format!(
                    "{} has shape {s:?}, not [V, C]",
                    gpt::WTE
                )))
            }
        };
        let (positions, _) = two(gpt::WPE)?;
        let n_layer = (0..)
            .take_while(|&i| shapes.contains_key(format!("{}ln_1.weight", gpt::block(i)).as_str()))
            .count();
        let head_size = heads.ok_or_else(|| {
            Error::bad("the Transformer's head size is not given (its tensors do not say it)")
        })?;
        if n_layer == 0 || head_size == 0 || !c.is_multiple_of(head_size) {
            return Err(Error::bad(format!(
                "a Transformer of {n_layer} layers of width {c} with heads of {head_size}: not a model"
            )));
        }
        return Ok(Dims {
            arch: Generation::Gpt,
            n_layer,
            n_embd: c,
            head_size,
            vocab,
            positions,
        });
    }
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
        positions: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rwkv_core::init::{init_tensors, InitSpec};

    #[test]
    fn parameters_outside_the_schema_are_refused_by_name() {
        for arch in [Generation::V4, Generation::V7] {
            let spec = InitSpec {
                arch,
                n_layer: 2,
                n_embd: 64,
                vocab: 50,
                head_size: 16,
                positions: 0,
                seed: 1,
            };
            let good = init_tensors(&spec).unwrap();
            assert!(Params::from_tensors(good.clone()).is_ok(), "{arch}");
            let mut bad = good.clone();
            let t = bad
                .iter_mut()
                .find(|t| t.0 == "blocks.1.ffn.key.weight")
                .unwrap();
            t.1 = vec![t.1[0] / 2, t.1[1]];
            t.2.truncate(t.1[0] * t.1[1]);
            let e = Params::from_tensors(bad)
                .err()
                .expect("mis-shaped")
                .to_string();
            assert!(e.contains("blocks.1.ffn.key.weight"), "{arch}: {e}");
            let mut short = good;
            short.retain(|t| t.0 != "blocks.1.ln2.bias");
            let e = Params::from_tensors(short)
                .err()
                .expect("missing")
                .to_string();
            assert!(
                e.contains("missing tensor blocks.1.ln2.bias"),
                "{arch}: {e}"
            );
        }
    }
}
