//! The Transformer baseline (nanoGPT's architecture, [`crate::schema::gpt`]), run by the
//! same chunk routine as the RWKV generations so that every command that runs a model runs it
//! too, and their speeds and memory are compared on equal terms.
//!
//! Per block: `x += c_proj(attn(ln_1(x)))`, `x += mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))`, where
//! each head's attention reads the keys and values of every earlier position from the
//! sequence's KV cache (the [`State`] of this model), so that generating a token costs time
//! proportional to the positions before it. The positions are learned, so a sequence holds at
//! most `positions` tokens; a single sequence that goes past them is cropped to its last
//! `positions` tokens and re-encoded, as nanoGPT's `generate` crops its context.

use super::{buf, head_logits, per_seq, Loader, Norm, Scratch, Seq, Slot, State};
use crate::checkpoint::ModelInfo;
use crate::error::Result;
use crate::kernels::{dot_f32, embedding_row, gelu, matmul};
use crate::schema::gpt::{block, LN_F, WPE, WTE};
use crate::tensor::{FloatData, Matrix};

struct Layer {
    ln1: Norm,
    /// `[3C, C]`: queries, keys, values.
    attn: Matrix,
    proj: Matrix,
    ln2: Norm,
    fc: Matrix,
    fc_proj: Matrix,
}

/// A Transformer baseline model.
pub struct Gpt {
    pub(crate) info: ModelInfo,
    /// The embedding, which is also the head (`[V, C]`).
    pub(crate) wte: Matrix,
    wpe: FloatData,
    ln_f: Norm,
    layers: Vec<Layer>,
}

/// A LayerNorm without a bias (nanoGPT's `bias = False`).
fn norm(ld: &mut Loader, name: &str) -> Result<Norm> {
    let w = ld.vec(name)?;
    let b = vec![0.0; w.len()];
    Ok(Norm { w, b })
}

impl Gpt {
    pub(crate) fn load(ld: &mut Loader, info: ModelInfo) -> Result<Gpt> {
        let layers = (0..info.n_layer)
            .map(|i| {
                let b = block(i);
                Ok(Layer {
                    ln1: norm(ld, &format!("{b}ln_1.weight"))?,
                    attn: ld.matrix(&format!("{b}attn.c_attn.weight"))?,
                    proj: ld.matrix(&format!("{b}attn.c_proj.weight"))?,
                    ln2: norm(ld, &format!("{b}ln_2.weight"))?,
                    fc: ld.matrix(&format!("{b}mlp.c_fc.weight"))?,
                    fc_proj: ld.matrix(&format!("{b}mlp.c_proj.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gpt {
            wte: ld.matrix(WTE)?,
            wpe: ld.stored(WPE)?,
            ln_f: norm(ld, LN_F)?,
            layers,
            info,
        })
    }

    pub(crate) fn bytes_per_token(&self) -> usize {
        let c = self.info.n_embd;
        self.wte.bytes()
            + c * self.wpe.dtype().size()
            + self
                .layers
                .iter()
                .map(|l| l.attn.bytes() + l.proj.bytes() + l.fc.bytes() + l.fc_proj.bytes())
                .sum::<usize>()
    }

    /// Runs the concatenated `tokens` of `seqs` through the model, appending each sequence's
    /// keys and values to its cache (the caller has checked that they fit).
    pub(crate) fn run(&self, tokens: &[u32], seqs: &mut [Seq<'_>], sc: &mut Scratch) {
        let t = tokens.len();
        let (c, f) = (self.info.n_embd, self.info.ffn_dim);
        let [bx, bxn, bqkv, by, bo, bhid, btmp] = sc.bufs::<7>();
        let x = buf(bx, t * c);
        let xn = buf(bxn, t * c);
        let qkv = buf(bqkv, t * 3 * c);
        let y = buf(by, t * c);
        let o = buf(bo, t * c);
        let hid = buf(bhid, t * f);
        // The input: token embedding plus the learned position of each row.
        for s in seqs.iter() {
            let p0 = s.state.history.len();
            for i in 0..s.n {
                let r = s.row0 + i;
                let row = &mut x[r * c..(r + 1) * c];
                embedding_row(&self.wte.data, tokens[r] as usize, row);
                embedding_row(&self.wpe, p0 + i, &mut o[..c]);
                row.iter_mut().zip(&o[..c]).for_each(|(a, b)| *a += b);
            }
        }
        for (li, l) in self.layers.iter().enumerate() {
            // ---- attention ----
            l.ln1.rows(x, xn);
            matmul(&l.attn, xn, t, qkv);
            let qkv = &*qkv;
            per_seq(seqs, c, y, |s, ys| self.attend(li, s, qkv, ys));
            matmul(&l.proj, y, t, o);
            x.iter_mut().zip(o.iter()).for_each(|(a, b)| *a += b);
            // ---- MLP ----
            l.ln2.rows(x, xn);
            matmul(&l.fc, xn, t, hid);
            hid.iter_mut().for_each(|h| *h = gelu(*h));
            matmul(&l.fc_proj, hid, t, o);
            x.iter_mut().zip(o.iter()).for_each(|(a, b)| *a += b);
        }
        for s in seqs.iter_mut() {
            let r = s.row0..s.row0 + s.n;
            s.state.history.extend_from_slice(&tokens[r]);
        }
        head_logits(&self.ln_f, &self.wte, x, seqs, bxn, btmp);
    }

    /// One sequence's causal attention in layer `li`: stores its rows' keys and values in the
    /// cache after the positions it holds, then each row's heads attend to every position up
    /// to its own, into `ys`.
    fn attend(&self, li: usize, s: &mut Seq<'_>, qkv: &[f32], ys: &mut [f32]) {
        let (c, n) = (self.info.n_embd, self.info.head_size);
        let p0 = s.state.history.len();
        let st: &mut State = s.state;
        let (ki, vi) = (st.index(li, Slot::Keys), st.index(li, Slot::Values));
        for i in 0..s.n {
            let row = &qkv[(s.row0 + i) * 3 * c..(s.row0 + i + 1) * 3 * c];
            let p = p0 + i;
            st.tensors[ki][p * c..(p + 1) * c].copy_from_slice(&row[c..2 * c]);
            st.tensors[vi][p * c..(p + 1) * c].copy_from_slice(&row[2 * c..]);
        }
        let scale = 1.0 / (n as f32).sqrt();
        let heads = c / n;
        let mut scores = std::mem::take(&mut st.scores);
        let (keys, values) = (&st.tensors[ki], &st.tensors[vi]);
        for i in 0..s.n {
            let q = &qkv[(s.row0 + i) * 3 * c..][..c];
            let len = p0 + i + 1;
            let a = buf(&mut scores, heads * len);
            let out = &mut ys[i * c..(i + 1) * c];
            // One head: softmax(q·kᵀ·scale)·v over the positions so far.
            let head = |h: usize, oh: &mut [f32], a: &mut [f32]| {
                let qh = &q[h * n..(h + 1) * n];
                let mut mx = f32::NEG_INFINITY;
                for (j, aj) in a.iter_mut().enumerate() {
                    *aj = dot_f32(qh, &keys[j * c + h * n..][..n]) * scale;
                    mx = mx.max(*aj);
                }
                let mut sum = 0.0;
                for aj in a.iter_mut() {
                    *aj = crate::kernels::exp(*aj - mx);
                    sum += *aj;
                }
                oh.fill(0.0);
                for (j, &aj) in a.iter().enumerate() {
                    let w = aj / sum;
                    let vj = &values[j * c + h * n..][..n];
                    oh.iter_mut().zip(vj).for_each(|(o, v)| *o += w * v);
                }
            };
            // A long context's heads side by side (its cache reads dominate a token's time).
            if len * c >= crate::kernels::PAR_MIN_WORK && rayon::current_num_threads() > 1 {
                use rayon::prelude::*;
                out.par_chunks_mut(n)
                    .zip(a.par_chunks_mut(len))
                    .enumerate()
                    .for_each(|(h, (oh, ah))| head(h, oh, ah));
            } else {
                for (h, (oh, ah)) in out.chunks_mut(n).zip(a.chunks_mut(len)).enumerate() {
                    head(h, oh, ah);
                }
            }
        }
        st.scores = scores;
    }
}
