//! The Transformer baseline: nanoGPT's `model.py` with the settings its `train.py` trains
//! (`bias = False`), under its tensor names. Per block, pre-LayerNorm:
//!
//! - `x += c_proj(attention(ln_1(x)))`, where `c_attn` makes the queries, keys and values
//!   (`[3C, C]`, in that order) and each head attends causally with `softmax(q·kᵀ/√N)`;
//! - `x += mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))` (GELU of the error function, F = 4C).
//!
//! The input is `wte[token] + wpe[position]`, the output `ln_f(x)·wteᵀ` (the head is tied to
//! the embedding, as nanoGPT ties it, so `wte` is stored once, as the head's `[out, in]`
//! matrix). Every LayerNorm has a weight and no bias. Initialisation is nanoGPT's: every
//! matrix and both embeddings normal with standard deviation 0.02, the two residual
//! projections `c_proj` with `0.02/√(2L)`.

use super::{Dims, Init, Params, Role};
use crate::tensor::Layout;

/// The names detection reads (kept with it, below the schema).
pub use crate::checkpoint::detect::gpt::{BLOCKS, HEAD_SIZE_KEY, WPE, WTE};
/// The final LayerNorm's weight.
pub const LN_F: &str = "transformer.ln_f.weight";
/// nanoGPT's initial standard deviation.
const STD: f64 = 0.02;

/// Block `i`'s key prefix.
pub fn block(i: usize) -> String {
    format!("{BLOCKS}{i}.")
}

pub(super) fn params(d: &Dims, o: &mut Params) {
    let (l, c, f) = (d.n_layer, d.n_embd, d.ffn_dim);
    let matrix = Role::Matrix(Layout::OutIn);
    o.push(WTE, &[d.vocab, c], matrix, Init::Normal(STD));
    o.push(WPE, &[d.positions, c], Role::Table, Init::Normal(STD));
    let residual = Init::Normal(STD / (2.0 * l as f64).sqrt());
    for i in 0..l {
        let b = block(i);
        o.push(format!("{b}ln_1.weight"), &[c], Role::Vector, Init::Ones);
        o.push(
            format!("{b}attn.c_attn.weight"),
            &[3 * c, c],
            matrix,
            Init::Normal(STD),
        );
        o.push(
            format!("{b}attn.c_proj.weight"),
            &[c, c],
            matrix,
            residual.clone(),
        );
        o.push(format!("{b}ln_2.weight"), &[c], Role::Vector, Init::Ones);
        o.push(
            format!("{b}mlp.c_fc.weight"),
            &[f, c],
            matrix,
            Init::Normal(STD),
        );
        o.push(
            format!("{b}mlp.c_proj.weight"),
            &[c, f],
            matrix,
            residual.clone(),
        );
    }
    o.push(LN_F, &[c], Role::Vector, Init::Ones);
}
