//! The two ends every generation has around its blocks, with their backward passes: in front
//! the embedding and its LayerNorm (`blocks.0.ln0`), behind the final LayerNorm (`ln_out`)
//! and the head.

use super::kernels::{add, layer_norm, layer_norm_back, two};
use super::products::{Prepared, Products};
use crate::params::Params;
use rwkv_core::error::Result;

/// Where the embedding, the two norms and the head are in the parameter list.
pub struct Ends {
    /// Width.
    pub c: usize,
    /// Vocabulary size.
    pub vocab: usize,
    emb: usize,
    ln0: (usize, usize),
    ln_out: (usize, usize),
    head: usize,
}

/// The ends' saved activations for windows of `M` tokens in all, and the logits.
pub struct EndsWork {
    x0: Vec<f32>,
    hat0: Vec<f32>,
    rstd0: Vec<f32>,
    hat_o: Vec<f32>,
    rstd_o: Vec<f32>,
    xo: Vec<f32>,
    /// `[M, V]`: the logits after the forward pass, their gradient before the backward one.
    pub logits: Vec<f32>,
}

impl Ends {
    /// Finds the ends' tensors among the parameters.
    pub fn new(p: &Params) -> Result<Ends> {
        let ln = |s: &str| -> Result<(usize, usize)> {
            Ok((
                p.find(&format!("{s}.weight"))?,
                p.find(&format!("{s}.bias"))?,
            ))
        };
        Ok(Ends {
            c: p.dims.n_embd,
            vocab: p.dims.vocab,
            emb: p.find("emb.weight")?,
            ln0: ln("blocks.0.ln0")?,
            ln_out: ln("ln_out")?,
            head: p.find("head.weight")?,
        })
    }

    /// Buffers for `m` tokens.
    pub fn work(&self, m: usize) -> EndsWork {
        let (c, z) = (self.c, |k: usize| vec![0f32; k]);
        EndsWork {
            x0: z(m * c),
            hat0: z(m * c),
            rstd0: z(m),
            hat_o: z(m * c),
            rstd_o: z(m),
            xo: z(m * c),
            logits: z(m * self.vocab),
        }
    }

    /// The blocks' input: `x = LayerNorm(emb[tokens])`.
    pub fn embed(&self, p: &[&[f32]], tokens: &[u32], e: &mut EndsWork, x: &mut [f32]) {
        let c = self.c;
        for (r, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            e.x0[r * c..(r + 1) * c].copy_from_slice(&p[self.emb][tok * c..(tok + 1) * c]);
        }
        let (w, b) = (p[self.ln0.0], p[self.ln0.1]);
        layer_norm(&e.x0, w, b, x, &mut e.hat0, &mut e.rstd0);
    }

    /// The logits of the blocks' output: `LayerNorm(x) · headᵀ`, into `e.logits`.
    pub fn head(&self, pd: &Products, p: &[&[f32]], pr: &Prepared, x: &[f32], e: &mut EndsWork) {
        let (w, b) = (p[self.ln_out.0], p[self.ln_out.1]);
        layer_norm(x, w, b, &mut e.xo, &mut e.hat_o, &mut e.rstd_o);
        let m = e.rstd_o.len();
        pd.mw(&e.xo, pr, self.head, m, &mut e.logits, false, None);
    }

    /// The backward pass of [`Ends::head`] from the logits' gradient in `e.logits`: sets `dx`
    /// (the blocks' output gradient) and adds the head's and `ln_out`'s gradients into `g`
    /// (`dxn` is scratch of `dx`'s size).
    #[allow(clippy::too_many_arguments)]
    pub fn head_back(
        &self,
        pd: &Products,
        p: &[&[f32]],
        pr: &Prepared,
        e: &EndsWork,
        g: &mut [Vec<f32>],
        dxn: &mut [f32],
        dx: &mut [f32],
    ) {
        let m = e.rstd_o.len();
        pd.lin_dw(pr, self.head, &e.logits, &e.xo, m, g);
        pd.mw_dx(&e.logits, pr, p, self.head, m, dxn, false);
        let (gw, gb) = two(g, self.ln_out.0, self.ln_out.1);
        let (hat, rstd, w) = (&e.hat_o, &e.rstd_o, p[self.ln_out.0]);
        layer_norm_back(dxn, hat, rstd, w, dx, false, gw, gb);
    }

    /// The backward pass of [`Ends::embed`] from the blocks' input gradient `dx`: adds the
    /// gradients of `ln0` and of the embedding rows of `tokens` into `g` (`dxn` is scratch).
    pub fn embed_back(
        &self,
        p: &[&[f32]],
        tokens: &[u32],
        e: &EndsWork,
        dx: &[f32],
        dxn: &mut [f32],
        g: &mut [Vec<f32>],
    ) {
        let c = self.c;
        {
            let (gw, gb) = two(g, self.ln0.0, self.ln0.1);
            let (hat, rstd, w) = (&e.hat0, &e.rstd0, p[self.ln0.0]);
            layer_norm_back(dx, hat, rstd, w, dxn, false, gw, gb);
        }
        // A frozen embedding has no gradient buffer.
        let ge = &mut g[self.emb];
        if ge.is_empty() {
            return;
        }
        for (r, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            add(&mut ge[tok * c..(tok + 1) * c], &dxn[r * c..(r + 1) * c]);
        }
    }
}
