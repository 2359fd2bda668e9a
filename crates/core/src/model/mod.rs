//! The RWKV generations: one file each, two entry points over the same weights.
//!
//! Every generation is computed by one chunk routine over `T` tokens: the linear layers run as
//! matrix-matrix products over the chunk and only the WKV recurrence is scanned token by token.
//! Time-sequential mode ([`Model::step`]) is the same routine with `T = 1` on buffers that live
//! in the [`State`], so generating a token allocates nothing.

mod common;
pub mod consts;
pub mod gpt;
mod state;
pub mod v4;
pub mod v5;
pub mod v6;
pub mod v7;

pub use state::{Slot, State, V4_PP_START};

use crate::checkpoint::{detect::detect, Checkpoint, Generation, ModelInfo};
use crate::error::{Error, Result};
use crate::kernels;
use crate::schema::{self, Dims, Param, Role};
use crate::tensor::{FloatData, Layout, Matrix, WeightFormat};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Which logits a chunk computes. The head is the largest matrix of a small model, so skipping
/// it for prompt tokens whose logits nobody reads is a real saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// One row per input token.
    All,
    /// Only the last token's row.
    Last,
    /// None (prompt prefill whose logits are discarded).
    None,
}

/// Tokens processed per chunk in time-parallel mode; bounds the activation memory.
pub const CHUNK: usize = 256;

/// Reusable work buffers of the forward pass. A [`State`] carries one for single-sequence
/// calls; batched calls take one from the caller.
#[derive(Default)]
pub struct Scratch {
    bufs: Vec<Vec<f32>>,
    /// When set, RWKV-6 and RWKV-7 append every token's decay factors to their layer's
    /// list ([`Model::decay_factors`]).
    pub(crate) decays: Option<Vec<Vec<f32>>>,
}

impl Scratch {
    /// `N` buffers (their sizes are set by [`buf`] on use, and kept).
    pub(crate) fn bufs<const N: usize>(&mut self) -> &mut [Vec<f32>; N] {
        if self.bufs.len() < N {
            self.bufs.resize_with(N, Vec::new);
        }
        <&mut [Vec<f32>; N]>::try_from(&mut self.bufs[..N]).expect("N buffers")
    }
}

/// One sequence of a (possibly ragged) batch, as the generations see it: its rows are
/// consecutive in the activations, in batch order.
pub(crate) struct Seq<'s> {
    /// Its first row in the activations.
    pub row0: usize,
    /// Number of tokens (rows).
    pub n: usize,
    /// Its recurrent state.
    pub state: &'s mut State,
    /// Which logits it wants.
    pub which: Logits,
    /// Where they go (`[n, vocab]`, `[vocab]` or empty).
    pub out: &'s mut [f32],
}

/// One sequence of a batched call: its new tokens, its state and the logits it wants.
pub struct BatchItem<'a> {
    /// Tokens to process (prompt tokens or the one token just generated).
    pub tokens: &'a [u32],
    /// The sequence's state, advanced in place.
    pub state: &'a mut State,
    /// Which logits to return.
    pub logits: Logits,
}

/// A loaded model of any supported generation.
pub enum Model {
    /// RWKV-4.
    V4(v4::V4),
    /// RWKV-5.2.
    V5(v5::V5),
    /// RWKV-6.0.
    V6(v6::V6),
    /// RWKV-7.
    V7(v7::V7),
    /// The Transformer baseline (not RWKV).
    Gpt(gpt::Gpt),
}

impl Model {
    /// Opens a checkpoint file and loads the model it holds, weights as stored.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Self::load_as(path, None)
    }

    /// Opens a checkpoint file and loads the model with its `[out, in]` weight matrices in
    /// `format` (converted or quantized at load), or as stored when `None`.
    pub fn load_as(path: impl AsRef<Path>, format: Option<WeightFormat>) -> Result<Model> {
        let ck = Checkpoint::open(path)?;
        Self::from_checkpoint(&ck, format)
    }

    /// [`Model::load_as`] with a LoRA file folded into the weights first: `lora` is
    /// `FILE[:ALPHA]` (RWKV-PEFT's `lora_A`/`lora_B`; see [`crate::checkpoint::lora`]). The
    /// adapted matrices are kept in f32 unless `format` says otherwise.
    pub fn load_with_lora(
        path: impl AsRef<Path>,
        format: Option<WeightFormat>,
        lora: Option<&str>,
    ) -> Result<Model> {
        let mut ck = Checkpoint::open(path)?;
        if let Some(spec) = lora {
            let (file, alpha) = crate::checkpoint::lora::parse_spec(spec)?;
            let l = Checkpoint::open(&file)?;
            crate::checkpoint::lora::merge_lora(&mut ck, &l, alpha, false)?;
        }
        Self::from_checkpoint(&ck, format)
    }

    /// Loads a model from an opened checkpoint (see [`Model::load_as`]).
    pub fn from_checkpoint(ck: &Checkpoint, format: Option<WeightFormat>) -> Result<Model> {
        let info = detect(ck)?;
        let mut ld = Loader::new(ck, &info, format);
        let m = match info.generation {
            Generation::V4 => Model::V4(v4::V4::load(&mut ld, info)?),
            Generation::V5_2 => Model::V5(v5::V5::load(&mut ld, info)?),
            Generation::V6_0 => Model::V6(v6::V6::load(&mut ld, info)?),
            Generation::V7 => Model::V7(v7::V7::load(&mut ld, info)?),
            Generation::Gpt => Model::Gpt(gpt::Gpt::load(&mut ld, info)?),
        };
        ld.finish()?;
        Ok(m)
    }

    /// Architecture and dimensions.
    pub fn info(&self) -> &ModelInfo {
        match self {
            Model::V4(m) => &m.info,
            Model::V5(m) => &m.info,
            Model::V6(m) => &m.info,
            Model::V7(m) => &m.info,
            Model::Gpt(m) => &m.info,
        }
    }

    /// Vocabulary size (length of a logits row).
    pub fn vocab_size(&self) -> usize {
        self.info().vocab_size
    }

    /// The format of the weight matrices (that of the head, which they share).
    pub fn weight_format(&self) -> String {
        let head = match self {
            Model::V4(m) => &m.io.head,
            Model::V5(m) => &m.io.head,
            Model::V6(m) => &m.io.head,
            Model::V7(m) => &m.io.head,
            Model::Gpt(m) => &m.wte,
        };
        head.data.format_name().to_string()
    }

    /// A fresh zero state.
    pub fn new_state(&self) -> State {
        State::zeros(self.info())
    }

    /// Each layer's decay factors: the per-channel multiplier in `(0, 1)` that a channel's
    /// WKV state keeps from one token to the next. RWKV-4 and RWKV-5.2 decay by a constant,
    /// one row of `C`; RWKV-6 and RWKV-7's decay depends on the token, so `tokens` run
    /// through the model from a fresh state and each layer gets one row per token
    /// (`[T, C]`). The Transformer has none.
    pub fn decay_factors(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        match self {
            Model::V4(m) => Ok(m.decay_factors()),
            Model::V5(m) => Ok(m.decay_factors()),
            Model::V6(_) | Model::V7(_) => {
                if tokens.is_empty() {
                    return Err(Error::bad("no tokens to measure the decay over"));
                }
                let mut st = self.new_state();
                st.scratch.decays = Some(vec![Vec::new(); self.info().n_layer]);
                self.forward(tokens, &mut st, Logits::None)?;
                Ok(st.scratch.decays.take().unwrap_or_default())
            }
            Model::Gpt(_) => Err(Error::bad(
                "the Transformer has no decay (its attention weighs positions by content)",
            )),
        }
    }

    /// Bytes of weights read to generate one token (all matrices and the head, one embedding row).
    pub fn bytes_per_token(&self) -> usize {
        match self {
            Model::V4(m) => m.bytes_per_token(),
            Model::V5(m) => m.bytes_per_token(),
            Model::V6(m) => m.bytes_per_token(),
            Model::V7(m) => m.bytes_per_token(),
            Model::Gpt(m) => m.bytes_per_token(),
        }
    }

    fn check(&self, tokens: &[u32], state: &State) -> Result<()> {
        state.check_compatible(self.info())?;
        let v = self.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::bad(format!(
                "token id {bad} is out of range for this model (vocab size {v})"
            )));
        }
        Ok(())
    }

    /// Errors when `n` more tokens do not fit in a Transformer's context (RWKV has no limit).
    fn check_fits(&self, n: usize, state: &State) -> Result<()> {
        let room = self.info().positions;
        let held = state.cached_tokens();
        if self.info().generation == Generation::Gpt && held + n > room {
            return Err(Error::bad(format!(
                "{n} tokens do not fit after the {held} in the Transformer's context of {room} positions"
            )));
        }
        Ok(())
    }

    /// The most tokens one chunk runs: [`CHUNK`], or fewer for a Transformer of a shorter
    /// context.
    fn chunk_len(&self) -> usize {
        match self.info().positions {
            0 => CHUNK,
            p => p.min(CHUNK),
        }
    }

    /// Time-sequential mode: advances `state` by one token and writes the next-token logits
    /// into `logits` (length = vocab). Allocation-free once the state's buffers exist.
    pub fn step_into(&self, token: u32, state: &mut State, logits: &mut [f32]) -> Result<()> {
        self.check(&[token], state)?;
        if logits.len() != self.vocab_size() {
            return Err(Error::Internal(format!(
                "logits buffer has {} entries, vocab is {}",
                logits.len(),
                self.vocab_size()
            )));
        }
        self.chunk(&[token], state, Logits::Last, logits);
        Ok(())
    }

    /// Time-sequential mode: advances `state` by one token and returns the logits.
    pub fn step(&self, token: u32, state: &mut State) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.vocab_size()];
        self.step_into(token, state, &mut out)?;
        Ok(out)
    }

    /// Time-parallel mode: advances `state` over `tokens` in chunks of [`CHUNK`] and returns
    /// the requested logits (`[T, vocab]` for [`Logits::All`], `[vocab]` for
    /// [`Logits::Last`], empty for [`Logits::None`]).
    pub fn forward(&self, tokens: &[u32], state: &mut State, which: Logits) -> Result<Vec<f32>> {
        self.check(tokens, state)?;
        let v = self.vocab_size();
        let mut out = match which {
            Logits::All => vec![0.0; tokens.len() * v],
            Logits::Last if !tokens.is_empty() => vec![0.0; v],
            _ => Vec::new(),
        };
        let n = tokens.len();
        let mut start = 0;
        while start < n {
            let end = (start + self.chunk_len()).min(n);
            let part = &tokens[start..end];
            match which {
                Logits::All => self.chunk(part, state, Logits::All, &mut out[start * v..end * v]),
                Logits::Last if end == n => self.chunk(part, state, Logits::Last, &mut out),
                _ => self.chunk(part, state, Logits::None, &mut []),
            }
            start = end;
        }
        Ok(out)
    }

    /// Advances many independent sequences in one pass: every linear layer runs as one
    /// matrix-matrix product over the rows of all sequences (a ragged batch: some may be
    /// prompts, some single generated tokens); only the WKV scans run per sequence.
    ///
    /// Returns one result per item, in order: the logits it asked for (as [`Model::forward`]),
    /// or the error that excluded it (a bad token id, a state of another model). One failing
    /// item does not affect the others. Each item's results equal a separate
    /// [`Model::forward`] of that item.
    pub fn forward_batch(
        &self,
        items: &mut [BatchItem<'_>],
        scratch: &mut Scratch,
    ) -> Vec<Result<Vec<f32>>> {
        let v = self.vocab_size();
        let mut results: Vec<Result<Vec<f32>>> = items
            .iter()
            .map(|it| {
                self.check(it.tokens, it.state)?;
                self.check_fits(it.tokens.len(), it.state)?;
                Ok(match it.logits {
                    Logits::All => vec![0.0; it.tokens.len() * v],
                    Logits::Last if !it.tokens.is_empty() => vec![0.0; v],
                    _ => Vec::new(),
                })
            })
            .collect();
        // Rounds: each live item contributes its next tokens, at most CHUNK rows in all (and
        // at least one row per item), until every item is done.
        let mut done = vec![0usize; items.len()];
        let mut tokens = Vec::new();
        loop {
            let live: Vec<usize> = (0..items.len())
                .filter(|&i| results[i].is_ok() && done[i] < items[i].tokens.len())
                .collect();
            if live.is_empty() {
                break;
            }
            let per = (CHUNK / live.len()).max(1);
            tokens.clear();
            let mut seqs = Vec::with_capacity(live.len());
            let mut live_iter = live.iter().peekable();
            // Split the borrows: each live item lends its state and its output rows.
            for (i, (it, res)) in items.iter_mut().zip(results.iter_mut()).enumerate() {
                if live_iter.peek() != Some(&&i) {
                    continue;
                }
                live_iter.next();
                let out = match res {
                    Ok(o) => o,
                    Err(_) => continue,
                };
                let start = done[i];
                let end = (start + per).min(it.tokens.len());
                let (which, out): (Logits, &mut [f32]) = match it.logits {
                    Logits::All => (Logits::All, &mut out[start * v..end * v]),
                    Logits::Last if end == it.tokens.len() => (Logits::Last, &mut out[..]),
                    _ => (Logits::None, &mut []),
                };
                done[i] = end;
                seqs.push(Seq {
                    row0: tokens.len(),
                    n: end - start,
                    state: &mut *it.state,
                    which,
                    out,
                });
                tokens.extend_from_slice(&it.tokens[start..end]);
            }
            self.run(&tokens, &mut seqs, scratch);
        }
        results
    }

    /// Runs one chunk of at most [`Model::chunk_len`] tokens of a single sequence. A
    /// Transformer whose context would overflow is cropped to its last `positions` tokens
    /// first (those before the chunk re-encoded from position 0), as nanoGPT crops its
    /// context to `block_size` when it generates.
    fn chunk(&self, tokens: &[u32], state: &mut State, which: Logits, out: &mut [f32]) {
        let room = self.info().positions;
        if room > 0 && state.cached_tokens() + tokens.len() > room {
            let keep = room - tokens.len();
            let h = std::mem::take(&mut state.history);
            let kept = &h[h.len() - keep..];
            if !kept.is_empty() {
                self.chunk(kept, state, Logits::None, &mut []);
            }
        }
        let mut scratch = std::mem::take(&mut state.scratch);
        let mut seqs = [Seq {
            row0: 0,
            n: tokens.len(),
            state,
            which,
            out,
        }];
        self.run(tokens, &mut seqs, &mut scratch);
        seqs[0].state.scratch = scratch;
    }

    fn run(&self, tokens: &[u32], seqs: &mut [Seq<'_>], scratch: &mut Scratch) {
        if tokens.is_empty() {
            return;
        }
        // The whole pass runs on a worker of the thread pool: its ~100 parallel products per
        // token then split between pool threads directly, instead of each one handing work
        // from the calling thread to the pool and back.
        // Models too small for any parallel product skip it (it costs a queue push per call).
        let c = self.info().n_embd;
        let parallel = tokens.len() * c * c >= kernels::PAR_MIN_WORK;
        if parallel && rayon::current_thread_index().is_none() && rayon::current_num_threads() > 1 {
            rayon::scope(|_| self.run_here(tokens, seqs, scratch));
        } else {
            self.run_here(tokens, seqs, scratch);
        }
    }

    fn run_here(&self, tokens: &[u32], seqs: &mut [Seq<'_>], scratch: &mut Scratch) {
        match self {
            Model::V4(m) => m.run(tokens, seqs, scratch),
            Model::V5(m) => m.run(tokens, seqs, scratch),
            Model::V6(m) => m.run(tokens, seqs, scratch),
            Model::V7(m) => m.run(tokens, seqs, scratch),
            Model::Gpt(m) => m.run(tokens, seqs, scratch),
        }
    }
}

/// Calls `f(row, current, previous)` for every row of every sequence, where `previous` is the
/// row before it in the same sequence or, for a sequence's first row, layer `layer`'s state
/// tensor `slot`; then stores each sequence's last row in that slot (the token shift).
pub(crate) fn token_shift(
    xn: &[f32],
    c: usize,
    seqs: &mut [Seq<'_>],
    (layer, slot): (usize, Slot),
    mut f: impl FnMut(usize, &[f32], &[f32]),
) {
    for s in seqs.iter_mut() {
        let o = s.row0;
        let prev_state = s.state.get_mut(layer, slot);
        for ti in 0..s.n {
            let r = o + ti;
            let cur = &xn[r * c..(r + 1) * c];
            let prev: &[f32] = if ti == 0 {
                prev_state
            } else {
                &xn[(r - 1) * c..r * c]
            };
            f(r, cur, prev);
        }
        prev_state.copy_from_slice(&xn[(o + s.n - 1) * c..(o + s.n) * c]);
    }
}

impl Seq<'_> {
    /// The rows of the batch's activations whose logits this sequence asked for.
    fn logit_rows(&self) -> std::ops::Range<usize> {
        let end = self.row0 + self.n;
        match self.which {
            Logits::None => end..end,
            Logits::Last => end - 1..end,
            Logits::All => self.row0..end,
        }
    }
}

/// Calls `f(seq, y_rows)` for every sequence with its rows of `y` (`c` values per row): the
/// per-sequence recurrences of a batch. Sequences own their states and rows, so several run
/// in parallel (a decode batch has one row each, too little to split a sequence's heads).
pub(crate) fn per_seq(
    seqs: &mut [Seq<'_>],
    c: usize,
    y: &mut [f32],
    f: impl Fn(&mut Seq<'_>, &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    if let [s] = seqs {
        return f(s, &mut y[s.row0 * c..(s.row0 + s.n) * c]);
    }
    let total: usize = seqs.iter().map(|s| s.n).sum();
    assert!(y.len() >= total * c && seqs.iter().all(|s| s.row0 + s.n <= total));
    let yp = crate::kernels::SendPtr(y.as_mut_ptr());
    seqs.par_iter_mut().for_each(|s| {
        // SAFETY: sequences' row ranges are disjoint (consecutive, in batch order) and inside
        // `y`, as asserted above.
        let ys = unsafe { std::slice::from_raw_parts_mut(yp.get().add(s.row0 * c), s.n * c) };
        f(s, ys)
    });
}

/// Reads the tensors of the generation's [`schema`] by name, checking each against the shape
/// the schema gives it and using it as its role says, and records which were used, so that
/// tensors the model does not know are reported instead of silently ignored.
pub(crate) struct Loader<'a> {
    ck: &'a Checkpoint,
    schema: HashMap<String, Param>,
    used: HashSet<String>,
    quant: Option<WeightFormat>,
}

impl<'a> Loader<'a> {
    fn new(ck: &'a Checkpoint, info: &ModelInfo, quant: Option<WeightFormat>) -> Self {
        Loader {
            ck,
            schema: schema::by_name(&Dims::of(info)),
            used: HashSet::new(),
            quant,
        }
    }

    fn what(&self) -> String {
        self.ck.path().display().to_string()
    }

    /// The schema's entry for `name` (the model asking for a tensor its schema lacks is a bug).
    fn param(&self, name: &str) -> Result<&Param> {
        self.schema
            .get(name)
            .ok_or_else(|| Error::Internal(format!("tensor {name} is not in the schema")))
    }

    /// Marks a tensor as known but unused by the math.
    pub fn ignore(&mut self, name: &str) {
        self.used.insert(name.to_string());
    }

    /// A small tensor as owned f32, shape-checked (size-1 dimensions are ignored).
    pub fn vec(&mut self, name: &str) -> Result<Vec<f32>> {
        let want = &self.param(name)?.shape;
        let m = self
            .ck
            .get(name)
            .ok_or_else(|| Error::bad(format!("{}: missing tensor {name}", self.what())))?;
        if schema::squeeze(&m.shape) != schema::squeeze(want) {
            return Err(Error::bad(format!(
                "{}: tensor {name} has shape {:?}, expected {:?}",
                self.what(),
                m.shape,
                want
            )));
        }
        self.used.insert(name.to_string());
        self.ck.f32_vec(name)
    }

    /// A weight matrix: `[out, in]` ones are stored `[n_out, n_in]` (or in their quantized
    /// packing) and converted to the requested weight format, if any; the small `[in, out]`
    /// LoRA matrices stay as stored.
    pub fn matrix(&mut self, name: &str) -> Result<Matrix> {
        let p = self.param(name)?;
        let (layout, shape) = match (p.role, p.shape.as_slice()) {
            (Role::Matrix(l), &[a, b]) => (l, (a, b)),
            _ => return Err(Error::Internal(format!("tensor {name} is not a matrix"))),
        };
        let (n_in, n_out) = match layout {
            Layout::OutIn => (shape.1, shape.0),
            Layout::InOut => shape,
        };
        let mut data = match layout {
            Layout::OutIn => match self.ck.quantized_matrix(name, n_out, n_in)? {
                Some(q) => {
                    self.used.insert(format!("{name}.scales"));
                    q
                }
                None => {
                    self.ck.expect_shape(name, &[n_out, n_in])?;
                    self.ck.float_tensor(name)?
                }
            },
            Layout::InOut => {
                self.ck.expect_shape(name, &[n_in, n_out])?;
                self.ck.float_tensor(name)?
            }
        };
        self.used.insert(name.to_string());
        if let (Some(f), Layout::OutIn) = (self.quant, layout) {
            // Rows that do not divide into blocks keep their stored format.
            if let Some(d) = f.convert(&data, n_in) {
                data = d;
            }
        }
        Ok(Matrix {
            n_in,
            n_out,
            layout,
            data,
        })
    }

    /// A tensor of exactly its schema shape in its stored format (the embedding table, which
    /// may be block-quantized, stacked LoRA blocks).
    pub fn stored(&mut self, name: &str) -> Result<FloatData> {
        let shape = self.param(name)?.shape.clone();
        if let [rows, cols] = shape[..] {
            if let Some(q) = self.ck.quantized_matrix(name, rows, cols)? {
                self.used.insert(name.to_string());
                self.used.insert(format!("{name}.scales"));
                return Ok(q);
            }
        }
        self.ck.expect_shape(name, &shape)?;
        self.used.insert(name.to_string());
        self.ck.float_tensor(name)
    }

    fn finish(self) -> Result<()> {
        for n in self.ck.names() {
            if !self.used.contains(n) {
                return Err(Error::bad(format!(
                    "{}: unknown tensor {n} (not part of this model's architecture)",
                    self.what()
                )));
            }
        }
        // The model reads every tensor of its schema; one it skipped is a bug in one of them.
        if let Some(n) = self.schema.keys().find(|n| !self.used.contains(*n)) {
            return Err(Error::Internal(format!(
                "the model did not read tensor {n}"
            )));
        }
        Ok(())
    }
}

/// LayerNorm parameters.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl Norm {
    pub fn load(ld: &mut Loader, prefix: &str) -> Result<Norm> {
        Ok(Norm {
            w: ld.vec(&format!("{prefix}.weight"))?,
            b: ld.vec(&format!("{prefix}.bias"))?,
        })
    }
    /// LayerNorm of each `c`-wide row of `x` into `out`.
    pub fn rows(&self, x: &[f32], out: &mut [f32]) {
        let c = self.w.len();
        for (xr, or) in x.chunks(c).zip(out.chunks_mut(c)) {
            kernels::layer_norm(xr, &self.w, &self.b, consts::LN_EPS as f32, or);
        }
    }
}

/// The parts every generation shares: the embedding (with ln0 applied on lookup), the final
/// norm and the head.
pub(crate) struct Io {
    pub emb: FloatData,
    pub ln0: Norm,
    pub ln_out: Norm,
    pub head: Matrix,
}

impl Io {
    pub fn load(ld: &mut Loader) -> Result<Io> {
        Ok(Io {
            emb: ld.stored("emb.weight")?,
            ln0: Norm::load(ld, "blocks.0.ln0")?,
            ln_out: Norm::load(ld, "ln_out")?,
            head: ld.matrix("head.weight")?,
        })
    }

    /// `x[t] = LN(emb[token_t]; ln0)` — the reference applies ln0 once to the f32 table; doing
    /// it per lookup gives the same numbers without a second copy of the table.
    pub fn embed(&self, tokens: &[u32], x: &mut [f32], tmp: &mut [f32]) {
        let c = self.ln0.w.len();
        for (t, &tok) in tokens.iter().enumerate() {
            kernels::embedding_row(&self.emb, tok as usize, tmp);
            kernels::layer_norm(
                tmp,
                &self.ln0.w,
                &self.ln0.b,
                consts::LN_EPS as f32,
                &mut x[t * c..(t + 1) * c],
            );
        }
    }

    /// Final norm and head for the rows each sequence asked for. `xn` and `tmp` are work
    /// buffers.
    pub fn logits(&self, x: &[f32], seqs: &mut [Seq<'_>], xn: &mut Vec<f32>, tmp: &mut Vec<f32>) {
        head_logits(&self.ln_out, &self.head, x, seqs, xn, tmp)
    }

    pub fn bytes_per_token(&self) -> usize {
        self.head.bytes() + self.ln0.w.len() * self.emb.dtype().size()
    }
}

/// The final norm `ln_out` and the `head` for the rows of `x` each sequence asked for, into
/// their outputs. `xn` and `tmp` are work buffers.
pub(crate) fn head_logits(
    ln_out: &Norm,
    head: &Matrix,
    x: &[f32],
    seqs: &mut [Seq<'_>],
    xn: &mut Vec<f32>,
    tmp: &mut Vec<f32>,
) {
    let c = head.n_in;
    let v = head.n_out;
    // A lone sequence gets its logits written straight into its output.
    if let [s] = seqs {
        let rows = s.logit_rows();
        if rows.is_empty() {
            return;
        }
        let r = rows.len();
        let xn = buf(xn, r * c);
        ln_out.rows(&x[rows.start * c..rows.end * c], xn);
        kernels::matmul(head, xn, r, &mut s.out[..r * v]);
        return;
    }
    let total: usize = seqs.iter().map(|s| s.logit_rows().len()).sum();
    if total == 0 {
        return;
    }
    let xn = buf(xn, total * c);
    let mut r = 0;
    for s in seqs.iter() {
        let rows = s.logit_rows();
        let k = rows.len();
        ln_out.rows(
            &x[rows.start * c..rows.end * c],
            &mut xn[r * c..(r + k) * c],
        );
        r += k;
    }
    let tmp = buf(tmp, total * v);
    kernels::matmul(head, xn, total, tmp);
    let mut r = 0;
    for s in seqs.iter_mut() {
        let k = s.logit_rows().len();
        s.out[..k * v].copy_from_slice(&tmp[r * v..(r + k) * v]);
        r += k;
    }
}

/// Grows `v` to at least `n` elements (keeps its allocation once large enough).
#[inline]
pub(crate) fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}
