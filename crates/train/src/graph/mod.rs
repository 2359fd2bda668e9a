//! The differentiable RWKV-7 and RWKV-4, time-parallel over `[batch, T]`, on candle.
//!
//! Parameters are candle `Var`s named and shaped exactly as in the official checkpoints, so a
//! model is saved by writing its variables and loaded by any RWKV runtime. The forward pass
//! follows RWKV-LM (`RWKV-v7/train_temp/src/model.py`, `RWKV-v4neo/src/model.py`) with the
//! element-wise chains and the WKV scans fused into the ops of [`ops`].
//!
//! It is the gradient oracle the hand-written passes (`v4/`, `v7/`) are tested against, built
//! only with the `graph` feature (the tests'); training never runs it.

pub mod ops;

use crate::params::{infer_dims, Dims};
use candle_core::{DType, Device, Tensor, Var};
use ops::{Act, CrossEntropy, Heads, Norm, ShiftMix, Wkv4, Wkv7, Wkv7Out};
use rwkv_core::checkpoint::{Checkpoint, Generation};
use rwkv_core::error::{Error, Result};
use rwkv_core::init::NamedTensor;
use rwkv_core::model::consts::{GN_EPS, LN_EPS};
use std::collections::HashMap;

fn ce(e: candle_core::Error) -> Error {
    Error::Internal(format!("tensor: {e}"))
}

/// Converts candle errors into this crate's.
pub(crate) trait Ce<T> {
    /// Maps the error.
    fn ce(self) -> Result<T>;
}

impl<T> Ce<T> for candle_core::Result<T> {
    fn ce(self) -> Result<T> {
        self.map_err(ce)
    }
}

/// A trainable RWKV model: named variables in checkpoint order.
pub struct TrainModel {
    /// Shape.
    pub dims: Dims,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    dtype: DType,
}

impl TrainModel {
    /// A model from named tensors (from `init_tensors` or a checkpoint), in `dtype` (F32 to
    /// train, F64 for exactness checks).
    pub fn from_tensors(tensors: Vec<NamedTensor>, dtype: DType) -> Result<TrainModel> {
        let dims = infer_dims(
            &tensors
                .iter()
                .map(|(n, s, _)| (n.as_str(), s.as_slice()))
                .collect(),
            None,
        )?;
        let dev = Device::Cpu;
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut vars = Vec::new();
        let mut index = HashMap::new();
        for (name, shape, data) in tensors {
            let t = Tensor::from_vec(data, shape.as_slice(), &dev)
                .and_then(|t| t.to_dtype(dtype))
                .ce()?;
            index.insert(name.clone(), vars.len());
            vars.push(Var::from_tensor(&t).ce()?);
            names.push(name);
            shapes.push(shape);
        }
        Ok(TrainModel {
            dims,
            names,
            shapes,
            vars,
            index,
            dtype,
        })
    }

    /// The graph of a model being trained, on a copy of its parameters.
    pub fn from_params(p: &crate::params::Params, dtype: DType) -> Result<TrainModel> {
        Self::from_tensors(p.tensors(), dtype)
    }

    /// Loads every tensor of an official checkpoint (any dtype) for training.
    pub fn from_checkpoint(ck: &Checkpoint, dtype: DType) -> Result<TrainModel> {
        Self::from_checkpoint_keys(ck, dtype, |_| true)
    }

    /// Loads the tensors of a checkpoint whose names pass `keep`.
    pub(crate) fn from_checkpoint_keys(
        ck: &Checkpoint,
        dtype: DType,
        keep: impl Fn(&str) -> bool,
    ) -> Result<TrainModel> {
        let mut ts = Vec::new();
        for name in ck.names().iter().filter(|n| keep(n)) {
            let meta = ck.get(name).ok_or_else(|| Error::Internal(name.clone()))?;
            ts.push((name.clone(), meta.shape.clone(), ck.f32_vec(name)?));
        }
        Self::from_tensors(ts, dtype)
    }

    /// The variables, in checkpoint order, with their names.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(|s| s.as_str()).zip(&self.vars)
    }

    /// The current values as f32 named tensors (to write a checkpoint).
    pub fn tensors(&self) -> Result<Vec<NamedTensor>> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.vars)
            .map(|((n, s), v)| {
                let data = v
                    .as_tensor()
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .ce()?;
                Ok((n.clone(), s.clone(), data))
            })
            .collect()
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.index
            .get(name)
            .map(|&i| self.vars[i].as_tensor())
            .ok_or_else(|| Error::bad(format!("tensor {name} is missing")))
    }

    /// A `[K, C]` stack of per-channel vectors.
    fn rows(&self, names: &[String]) -> Result<Tensor> {
        let c = self.dims.n_embd;
        let ts = names
            .iter()
            .map(|n| self.p(n)?.reshape((1, c)).ce())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&ts, 0).ce()
    }

    fn ln(&self, x: &Tensor, name: &str, groups: usize, eps: f64) -> Result<Tensor> {
        let op = Norm {
            c: self.dims.n_embd,
            groups,
            eps,
        };
        x.apply_op3(
            self.p(&format!("{name}.weight"))?,
            self.p(&format!("{name}.bias"))?,
            op,
        )
        .ce()
    }

    /// Token shift of `x [B·T, C]` mixed with the vector `name` (one op per mix, so that each
    /// result is its own tensor: slicing a packed result would make the backward pass pad every
    /// slice's gradient back to full size).
    fn shift(&self, x: &Tensor, name: &str, b: usize, t: usize, v4: bool) -> Result<Tensor> {
        let c = self.dims.n_embd;
        let mix = self.p(name)?.reshape((1, c)).ce()?;
        x.reshape((b, t, c))
            .and_then(|z| z.apply_op2(&mix, ShiftMix { t, c, v4 }))
            .and_then(|z| z.reshape((b * t, c)))
            .ce()
    }

    /// `x @ Wᵀ` for an `[out, in]` weight.
    fn lin(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        x.matmul(&self.p(name)?.t().ce()?).ce()
    }

    /// `x @ W` for an `[in, out]` (LoRA) weight.
    fn mm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        x.matmul(self.p(name)?).ce()
    }

    /// Logits `[B·T, V]` for `tokens` (`B` sequences of `T`, row-major), each sequence from a
    /// fresh state.
    pub fn logits(&self, tokens: &[u32], b: usize, t: usize) -> Result<Tensor> {
        if tokens.len() != b * t || b == 0 || t == 0 {
            return Err(Error::bad(format!(
                "{} tokens do not make {b} sequences of {t}",
                tokens.len()
            )));
        }
        let v = self.dims.vocab;
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= v) {
            return Err(Error::bad(format!(
                "token id {bad} is outside the vocabulary of {v}"
            )));
        }
        let ids = Tensor::from_vec(tokens.to_vec(), tokens.len(), &Device::Cpu).ce()?;
        let x = self.p("emb.weight")?.index_select(&ids, 0).ce()?;
        let x = self.ln(&x, "blocks.0.ln0", 1, LN_EPS)?;
        let x = match self.dims.arch {
            Generation::V4 => self.blocks_v4(x, b, t)?,
            _ => self.blocks_v7(x, b, t)?,
        };
        let x = self.ln(&x, "ln_out", 1, LN_EPS)?;
        self.lin(&x, "head.weight")
    }

    /// The logits `[T·V]` of one sequence as f32 values.
    pub fn logits_vec(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.logits(tokens, 1, tokens.len())?
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .ce()
    }

    /// Mean cross-entropy of predicting `targets` from `tokens` (both `B·T`), with L2Wrap in
    /// the backward pass.
    pub fn loss(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        l2wrap: f64,
    ) -> Result<Tensor> {
        let logits = self.logits(tokens, b, t)?;
        logits
            .apply_op1(CrossEntropy {
                targets: targets.to_vec(),
                l2wrap,
            })
            .ce()
    }

    fn blocks_v7(&self, mut x: Tensor, b: usize, t: usize) -> Result<Tensor> {
        let c = self.dims.n_embd;
        let n = self.dims.head_size;
        let heads = Heads { b, t, h: c / n, n };
        let bt = b * t;
        let sig = |x: Tensor| x.apply_op1(Act::Sigmoid).ce();
        let mut v_first: Option<Tensor> = None;
        for i in 0..self.dims.n_layer {
            let p = format!("blocks.{i}.att.");
            let xn = self.ln(&x, &format!("blocks.{i}.ln1"), 1, LN_EPS)?;
            let part = |k: &str| self.shift(&xn, &format!("{p}{k}"), b, t, false);
            let (xr, xw, xk) = (part("x_r")?, part("x_w")?, part("x_k")?);
            let (xv, xa, xg) = (part("x_v")?, part("x_a")?, part("x_g")?);
            let r = self.lin(&xr, &format!("{p}receptance.weight"))?;
            let k = self.lin(&xk, &format!("{p}key.weight"))?;
            let mut v = self.lin(&xv, &format!("{p}value.weight"))?;
            let vec = |s: &str| self.p(&format!("{p}{s}"))?.reshape(c).ce();
            // Decay logits w0 + tanh(xw W1) W2 (the decay itself is formed inside Wkv7).
            let w = self
                .mm(
                    &self.mm(&xw, &format!("{p}w1"))?.tanh().ce()?,
                    &format!("{p}w2"),
                )?
                .broadcast_add(&vec("w0")?)
                .ce()?;
            let a = sig(self
                .mm(&self.mm(&xa, &format!("{p}a1"))?, &format!("{p}a2"))?
                .broadcast_add(&vec("a0")?)
                .ce()?)?;
            match &v_first {
                None => v_first = Some(v.clone()),
                Some(vf) => {
                    let gate = sig(self
                        .mm(&self.mm(&xv, &format!("{p}v1"))?, &format!("{p}v2"))?
                        .broadcast_add(&vec("v0")?)
                        .ce()?)?;
                    v = (&v + ((vf - &v).ce()? * gate).ce()?).ce()?;
                }
            }
            let g = self.mm(&sig(self.mm(&xg, &format!("{p}g1"))?)?, &format!("{p}g2"))?;
            let acts = Tensor::stack(&[&r, &w, &k, &v, &a, &g], 0).ce()?;
            let params = self.rows(&[
                format!("{p}k_k"),
                format!("{p}k_a"),
                format!("{p}r_k"),
                format!("{p}ln_x.weight"),
                format!("{p}ln_x.bias"),
            ])?;
            let y = acts
                .apply_op2(&params, Wkv7::new(heads))
                .and_then(|y| y.reshape((bt, c)))
                .ce()?;
            let o = y
                .apply_op3(
                    &acts,
                    &params,
                    Wkv7Out {
                        d: heads,
                        eps: GN_EPS,
                    },
                )
                .ce()?;
            x = (x + self.lin(&o, &format!("{p}output.weight"))?).ce()?;
            // Channel mixing: relu(xk Wk)² Wv.
            let q = format!("blocks.{i}.ffn.");
            let xn = self.ln(&x, &format!("blocks.{i}.ln2"), 1, LN_EPS)?;
            let xk = self.shift(&xn, &format!("{q}x_k"), b, t, false)?;
            let h = self
                .lin(&xk, &format!("{q}key.weight"))?
                .apply_op1(Act::ReluSq)
                .ce()?;
            x = (x + self.lin(&h, &format!("{q}value.weight"))?).ce()?;
        }
        Ok(x)
    }

    fn blocks_v4(&self, mut x: Tensor, b: usize, t: usize) -> Result<Tensor> {
        let c = self.dims.n_embd;
        let bt = b * t;
        let sig = |x: Tensor| x.apply_op1(Act::Sigmoid).ce();
        for i in 0..self.dims.n_layer {
            let p = format!("blocks.{i}.att.");
            let xn = self.ln(&x, &format!("blocks.{i}.ln1"), 1, LN_EPS)?;
            let part = |k: &str| self.shift(&xn, &format!("{p}{k}"), b, t, true);
            let k = self.lin(&part("time_mix_k")?, &format!("{p}key.weight"))?;
            let v = self.lin(&part("time_mix_v")?, &format!("{p}value.weight"))?;
            let r = sig(self.lin(&part("time_mix_r")?, &format!("{p}receptance.weight"))?)?;
            let kv = Tensor::stack(&[&k, &v], 0).ce()?;
            let params = self.rows(&[format!("{p}time_decay"), format!("{p}time_first")])?;
            let y = kv
                .apply_op2(&params, Wkv4 { b, t, c })
                .and_then(|y| y.reshape((bt, c)))
                .ce()?;
            x = (x + self.lin(&(r * y).ce()?, &format!("{p}output.weight"))?).ce()?;
            let q = format!("blocks.{i}.ffn.");
            let xn = self.ln(&x, &format!("blocks.{i}.ln2"), 1, LN_EPS)?;
            let part = |k: &str| self.shift(&xn, &format!("{q}{k}"), b, t, true);
            let h = self
                .lin(&part("time_mix_k")?, &format!("{q}key.weight"))?
                .apply_op1(Act::ReluSq)
                .ce()?;
            let kv = self.lin(&h, &format!("{q}value.weight"))?;
            let r = sig(self.lin(&part("time_mix_r")?, &format!("{q}receptance.weight"))?)?;
            x = (x + (r * kv).ce()?).ce()?;
        }
        Ok(x)
    }

    /// The dtype the variables are held in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
