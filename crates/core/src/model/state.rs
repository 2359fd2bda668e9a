//! The recurrent state: a constant-size list of f32 tensors in the official package's layout.

use crate::checkpoint::{write_safetensors, Checkpoint, Generation, ModelInfo, OutTensor};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One tensor of a layer's state, by its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The time-mixing token shift: the layer's last normalised input (`att_x_prev`, `[C]`).
    AttShift,
    /// The WKV state of every head (`att_kv`, `[H, N, N]`, value index major; v5.2 to v7).
    AttKv,
    /// RWKV-4's WKV numerator `aa` (`[C]`).
    Aa,
    /// RWKV-4's WKV denominator `bb` (`[C]`).
    Bb,
    /// RWKV-4's running maximum exponent `pp` (`[C]`), which keeps `aa` and `bb` finite.
    Pp,
    /// The channel-mixing token shift (`ffn_x_prev`, `[C]`).
    FfnShift,
    /// The Transformer's keys of every position so far (`[positions, C]`, heads side by side).
    Keys,
    /// The Transformer's values, as [`Slot::Keys`].
    Values,
}

/// `pp` of a fresh RWKV-4 state: no history, so `e^pp` is zero (the official package's value).
pub const V4_PP_START: f32 = -1e30;

impl Slot {
    /// A layer's slots in the official package's order.
    pub fn layout(generation: Generation) -> &'static [Slot] {
        match generation {
            Generation::V4 => &[Slot::AttShift, Slot::Aa, Slot::Bb, Slot::Pp, Slot::FfnShift],
            Generation::Gpt => &[Slot::Keys, Slot::Values],
            _ => &[Slot::AttShift, Slot::AttKv, Slot::FfnShift],
        }
    }

    /// The official package's name of the slot.
    pub fn name(self) -> &'static str {
        match self {
            Slot::AttShift => "att_x_prev",
            Slot::AttKv => "att_kv",
            Slot::Aa => "aa",
            Slot::Bb => "bb",
            Slot::Pp => "pp",
            Slot::FfnShift => "ffn_x_prev",
            Slot::Keys => "k_cache",
            Slot::Values => "v_cache",
        }
    }

    /// The slot's place within a layer of `generation`'s state.
    fn offset(self, generation: Generation) -> usize {
        match (generation, self) {
            (Generation::Gpt, Slot::Keys) => 0,
            (Generation::Gpt, Slot::Values) => 1,
            (Generation::Gpt, s) => panic!("a Transformer's cache has no {}", s.name()),
            (_, Slot::AttShift) => 0,
            (Generation::V4, Slot::Aa) => 1,
            (Generation::V4, Slot::Bb) => 2,
            (Generation::V4, Slot::Pp) => 3,
            (Generation::V4, Slot::FfnShift) => 4,
            (Generation::V4, Slot::AttKv) => panic!("an RWKV-4 state has no att_kv"),
            (_, Slot::AttKv) => 1,
            (_, Slot::FfnShift) => 2,
            (g, s) => panic!("an RWKV {g} state has no {}", s.name()),
        }
    }
}

/// The recurrent state of one sequence.
///
/// Its tensors follow the official `rwkv` package's flat list: the slots of
/// [`Slot::layout`] for each layer in turn. Its size never depends on how many tokens it has
/// seen. (For the Transformer baseline it is the KV cache instead, room for every position
/// reserved up front and filled as tokens come: the memory the seed's comparison is about.)
/// Cloning forks a conversation. The state also carries the work buffers of the model's
/// token step, so that generating allocates nothing; they are not part of a clone or a file.
pub struct State {
    generation: Generation,
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    head_size: usize,
    pub(crate) tensors: Vec<Vec<f32>>,
    shapes: Vec<Vec<usize>>,
    /// The Transformer's tokens in its cache, in order (empty for RWKV).
    pub(crate) history: Vec<u32>,
    /// The Transformer's attention weights of one row (work space of its token step).
    pub(crate) scores: Vec<f32>,
    pub(crate) scratch: super::Scratch,
}

impl Clone for State {
    fn clone(&self) -> Self {
        State {
            generation: self.generation,
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_head: self.n_head,
            head_size: self.head_size,
            tensors: self.tensors.clone(),
            shapes: self.shapes.clone(),
            history: self.history.clone(),
            scores: Vec::new(),
            scratch: Default::default(),
        }
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "State({} layers={} width={} tensors={})",
            self.generation,
            self.n_layer,
            self.n_embd,
            self.tensors.len()
        )
    }
}

impl State {
    /// The zero state for a model (v4's `pp` starts at [`V4_PP_START`], everything else at 0).
    pub fn zeros(info: &ModelInfo) -> State {
        let c = info.n_embd;
        let (h, n) = (info.n_head, info.head_size);
        let mut tensors = Vec::new();
        let mut shapes = Vec::new();
        for _ in 0..info.n_layer {
            for &slot in Slot::layout(info.generation) {
                let (shape, start) = match slot {
                    Slot::AttKv => (vec![h, n, n], 0.0),
                    Slot::Keys | Slot::Values => (vec![info.positions, c], 0.0),
                    Slot::Pp => (vec![c], V4_PP_START),
                    _ => (vec![c], 0.0),
                };
                tensors.push(vec![start; shape.iter().product()]);
                shapes.push(shape);
            }
        }
        State {
            generation: info.generation,
            n_layer: info.n_layer,
            n_embd: c,
            n_head: h,
            head_size: n,
            tensors,
            shapes,
            history: Vec::with_capacity(info.positions),
            scores: Vec::new(),
            scratch: Default::default(),
        }
    }

    /// The number of tokens a Transformer's cache holds (0 for RWKV, which keeps none).
    pub fn cached_tokens(&self) -> usize {
        self.history.len()
    }

    /// The number of layers.
    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    /// The generation this state belongs to.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Number of tensors (`P * n_layer`).
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the state has no tensors (never true for a real model).
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Where layer `layer`'s `slot` is in the flat list.
    pub fn index(&self, layer: usize, slot: Slot) -> usize {
        layer * Slot::layout(self.generation).len() + slot.offset(self.generation)
    }

    /// Layer `layer`'s `slot`.
    pub fn get(&self, layer: usize, slot: Slot) -> &[f32] {
        &self.tensors[self.index(layer, slot)]
    }

    /// Layer `layer`'s `slot`, to update.
    pub fn get_mut(&mut self, layer: usize, slot: Slot) -> &mut [f32] {
        let j = self.index(layer, slot);
        &mut self.tensors[j]
    }

    /// RWKV-4's `aa`, `bb` and `pp` of layer `layer`, updated together by its WKV scan.
    pub(crate) fn v4_wkv_mut(&mut self, layer: usize) -> [&mut [f32]; 3] {
        let j = self.index(layer, Slot::Aa);
        debug_assert_eq!(self.index(layer, Slot::Pp), j + 2);
        let [aa, bb, pp] = &mut self.tensors[j..j + 3] else {
            unreachable!("three consecutive slots")
        };
        [aa, bb, pp]
    }

    /// Tensor `j` of the flat list.
    pub fn tensor(&self, j: usize) -> &[f32] {
        &self.tensors[j]
    }

    /// Shape of tensor `j`.
    pub fn shape(&self, j: usize) -> &[usize] {
        &self.shapes[j]
    }

    /// Mutable access to tensor `j` (for tests and tools that edit a state).
    pub fn tensor_mut(&mut self, j: usize) -> &mut [f32] {
        &mut self.tensors[j]
    }

    /// Total bytes of the state's tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.len() * 4).sum()
    }

    /// Errors unless this state fits a model with `info`.
    pub fn check_compatible(&self, info: &ModelInfo) -> Result<()> {
        if self.generation != info.generation
            || self.n_layer != info.n_layer
            || self.n_embd != info.n_embd
            || self.n_head != info.n_head
            || self.head_size != info.head_size
        {
            return Err(Error::bad(format!(
                "state is for a {} model with {} layers of width {}, but the model is {} with {} layers of width {}",
                self.generation, self.n_layer, self.n_embd, info.generation, info.n_layer, info.n_embd
            )));
        }
        Ok(())
    }

    /// The tensors as safetensors entries named `{prefix}{j}`.
    pub fn out_tensors(&self, prefix: &str) -> Vec<OutTensor<'static>> {
        self.tensors
            .iter()
            .zip(&self.shapes)
            .enumerate()
            .map(|(j, (t, s))| OutTensor::f32(format!("{prefix}{j}"), s.clone(), t))
            .collect()
    }

    /// Metadata that identifies the model a state belongs to.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), "rwkv-state".into());
        m.insert("generation".into(), self.generation.name().into());
        m.insert("n_layer".into(), self.n_layer.to_string());
        m.insert("n_embd".into(), self.n_embd.to_string());
        m.insert("n_head".into(), self.n_head.to_string());
        m.insert("head_size".into(), self.head_size.to_string());
        m
    }

    /// Saves the state as a safetensors file of `state.{j}` tensors (written atomically).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        if self.generation == Generation::Gpt {
            return Err(Error::bad(format!(
                "{}: a Transformer's KV cache is not saved as a state (only RWKV has one)",
                path.as_ref().display()
            )));
        }
        write_safetensors(path.as_ref(), &self.out_tensors("state."), &self.metadata())
    }

    /// Loads a state saved by [`State::save`] (or any file with `state.{j}` tensors of the
    /// right shapes, such as the output of `rwkv logits`), or an RWKV-PEFT tuned state
    /// (`.pth` or `.safetensors`), for a model with `info`.
    pub fn load(path: impl AsRef<Path>, info: &ModelInfo) -> Result<State> {
        Self::from_checkpoint(&Checkpoint::open(path)?, info)
    }

    /// Reads a state from an opened checkpoint (see [`State::load`]): our own `state.{j}`
    /// tensors, or an RWKV-PEFT state-tuning file ([`State::from_time_state`]).
    pub fn from_checkpoint(ck: &Checkpoint, info: &ModelInfo) -> Result<State> {
        if info.generation == Generation::Gpt {
            return Err(Error::bad(format!(
                "{}: the Transformer has no recurrent state to load (only RWKV has one)",
                ck.path().display()
            )));
        }
        if ck.has(&time_state_name(0)) {
            return Self::from_time_state(ck, info);
        }
        let what = ck.path().display();
        let md = ck.metadata();
        if let Some(g) = md.get("generation") {
            if g != info.generation.name() {
                return Err(Error::bad(format!(
                    "{what}: state file is for an RWKV {g} model, but the model is {}",
                    info.generation
                )));
            }
        }
        let mut st = State::zeros(info);
        let n = st.tensors.len();
        for j in 0..n {
            let name = format!("state.{j}");
            let m = ck.get(&name).ok_or_else(|| {
                Error::bad(format!(
                    "{what}: missing tensor {name}: not a state of this model ({} tensors expected)",
                    n
                ))
            })?;
            if m.shape != st.shapes[j] {
                return Err(Error::bad(format!(
                    "{what}: tensor {name} has shape {:?}, but this model's state needs {:?}",
                    m.shape, st.shapes[j]
                )));
            }
            st.tensors[j] = ck.f32_vec(&name)?;
        }
        if ck.has(&format!("state.{n}")) {
            return Err(Error::bad(format!(
                "{what}: has more than the {n} state tensors this model uses (a state of a deeper model?)"
            )));
        }
        Ok(st)
    }

    /// An RWKV-PEFT state-tuning file: one `blocks.{i}.att.time_state` `[H, N, N]` per layer,
    /// each head's WKV matrix transposed against the official package's `att_kv` (ChatRWKV
    /// and RWKV-PEFT's own demos load it with `.transpose(1, 2)`); the token shifts start at
    /// zero. RWKV-4 has no such matrix.
    pub fn from_time_state(ck: &Checkpoint, info: &ModelInfo) -> Result<State> {
        let what = ck.path().display();
        if info.generation == Generation::V4 {
            return Err(Error::bad(format!(
                "{what}: a tuned time_state (RWKV-PEFT) is for RWKV-5.2 and later, but the model is RWKV-4"
            )));
        }
        let (h, n) = (info.n_head, info.head_size);
        let mut st = State::zeros(info);
        for layer in 0..info.n_layer {
            let name = time_state_name(layer);
            let m = ck.get(&name).ok_or_else(|| {
                Error::bad(format!(
                    "{what}: missing tensor {name}: a tuned state of a shallower model ({} layers expected)",
                    info.n_layer
                ))
            })?;
            if m.shape != [h, n, n] {
                return Err(Error::bad(format!(
                    "{what}: tensor {name} has shape {:?}, but this model's heads need [{h}, {n}, {n}]",
                    m.shape
                )));
            }
            let t = ck.f32_vec(&name)?;
            let kv = st.get_mut(layer, Slot::AttKv);
            for head in 0..h {
                let (src, dst) = (
                    &t[head * n * n..][..n * n],
                    &mut kv[head * n * n..][..n * n],
                );
                for i in 0..n {
                    for j in 0..n {
                        dst[i * n + j] = src[j * n + i];
                    }
                }
            }
        }
        if let Some(extra) = ck
            .names()
            .iter()
            .find(|k| !(0..info.n_layer).any(|l| **k == time_state_name(l)))
        {
            return Err(Error::bad(format!(
                "{what}: unexpected tensor {extra} beside the time_state of {} layers (a state of a deeper model, or not a state file)",
                info.n_layer
            )));
        }
        Ok(st)
    }
}

/// The name of layer `layer`'s tuned initial WKV state in RWKV-PEFT's files.
fn time_state_name(layer: usize) -> String {
    format!("blocks.{layer}.att.time_state")
}
