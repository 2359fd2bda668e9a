//! What the hand-written training passes of every generation share: the matrix products
//! ([`products`]), the element-wise kernels with their backward passes ([`kernels`]), and the
//! [`Pass`] the trainer drives. Each generation's folder (`v4/`, `v7/`) writes its forward and
//! backward pass out in terms of these, in the order the data flows.

pub mod ends;
pub mod kernels;
pub mod products;

use crate::common::dispatch;
use products::{Prepared, Products};
use rwkv_core::error::{Error, Result};

/// A target that is not trained on (a chat prompt's tokens, padding): its row adds nothing to
/// the loss or the gradients.
pub const IGNORE: u32 = u32::MAX;

/// A generation's forward and backward pass over a shard of training windows, every buffer
/// in a work area that lives as long as the trainer.
pub trait Pass: Sync {
    /// One shard's activations and scratch.
    type Work: Send;

    /// The model's matrix products.
    fn products(&self) -> &Products;
    /// The same, to set their precision.
    fn products_mut(&mut self) -> &mut Products;
    /// The vocabulary size (the length of a logits row).
    fn vocab(&self) -> usize;
    /// A work area for shards of `bs` windows of `t` tokens.
    fn work(&self, bs: usize, t: usize) -> Self::Work;
    /// The windows per shard and tokens per window a work area was made for.
    fn shape(w: &Self::Work) -> (usize, usize);
    /// Where the forward pass leaves the logits `[M, V]` and the backward pass reads their
    /// gradient.
    fn logits(w: &mut Self::Work) -> &mut [f32];
    /// The forward pass of checked inputs, keeping what the backward pass needs.
    fn forward(&self, p: &[&[f32]], pr: &Prepared, tokens: &[u32], w: &mut Self::Work);
    /// The backward pass from the logits' gradient, adding every parameter's into `g`.
    fn backward(
        &self,
        p: &[&[f32]],
        pr: &Prepared,
        tokens: &[u32],
        w: &mut Self::Work,
        g: &mut [Vec<f32>],
    );

    /// Runs the forward and backward pass over the work area's windows: returns the sum of
    /// the rows' cross-entropies (rows whose target is [`IGNORE`] left out) and adds `scale ×` its gradient (with RWKV-LM's L2Wrap term
    /// of `l2wrap · scale` per row) into `g`. `p` holds every parameter's values, in order,
    /// and `pr` their forms for the products, from [`Products::prepare`].
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        &self,
        p: &[&[f32]],
        pr: &Prepared,
        tokens: &[u32],
        targets: &[u32],
        scale: f32,
        l2wrap: f32,
        w: &mut Self::Work,
        g: &mut [Vec<f32>],
    ) -> Result<f64> {
        let (bs, t) = Self::shape(w);
        let m = bs * t;
        if tokens.len() != m || targets.len() != m {
            return Err(Error::bad(format!(
                "{} tokens and {} targets do not make {bs} windows of {t}",
                tokens.len(),
                targets.len()
            )));
        }
        self.products().check(p, pr, g)?;
        let v = self.vocab();
        let trained = targets.iter().filter(|&&x| x != IGNORE);
        if let Some(&bad) = tokens.iter().chain(trained).find(|&&x| x as usize >= v) {
            return Err(Error::bad(format!(
                "token id {bad} is outside the vocabulary of {v}"
            )));
        }
        self.forward(p, pr, tokens, w);
        let loss = dispatch!(kernels::cross_entropy(
            Self::logits(w),
            targets,
            v,
            scale,
            l2wrap * scale
        ));
        self.backward(p, pr, tokens, w, g);
        Ok(loss)
    }
}

#[cfg(all(test, feature = "graph"))]
pub(crate) mod oracle;
