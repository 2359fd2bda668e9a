//! The `rwkv_rs._native` Python extension: `rwkv-core`'s models, states, tokenizers and
//! sampler as Python classes.
//!
//! The Python side (`python/rwkv_rs/`) adds the official `rwkv` package's API on top
//! (`rwkv_rs.model.RWKV`, `rwkv_rs.utils.PIPELINE`). Everything here computes with the GIL
//! released; logits come back as NumPy arrays that own the engine's buffers (no copy).

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use rwkv_core::model::{BatchItem, Logits, Model, Scratch, State};
use rwkv_core::sample::{self, SampleScratch, Sampler, SamplerConfig};
use rwkv_core::tensor::WeightFormat;
use rwkv_core::tokenizer::{self, Tokenizer};
use rwkv_core::Error;
use std::path::PathBuf;

/// The library's errors as Python exceptions, with the CLI's one-line messages: bad input is a
/// `ValueError`, a missing file `FileNotFoundError`, another I/O failure `OSError`.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::BadInput(_) => PyValueError::new_err(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Internal(_) => PyRuntimeError::new_err(msg),
    }
}

/// Token ids from Python integers: a negative or too large id is a `ValueError` naming it.
fn token_ids(tokens: Vec<i64>, what: &str) -> PyResult<Vec<u32>> {
    tokens
        .into_iter()
        .map(|t| {
            u32::try_from(t)
                .map_err(|_| PyValueError::new_err(format!("{what}: token id {t} is out of range")))
        })
        .collect()
}

/// A loaded RWKV model (RWKV-4, 5.2, 6.0 or 7), its weights memory-mapped.
///
/// `Model(path, quant=None, threads=None)`: `path` is a `.pth` or `.safetensors` checkpoint;
/// `quant` converts the weight matrices at load (`"f32"`, `"f16"`, `"bf16"`, `"int8"`,
/// `"q4"`; `None` keeps them as stored); `threads` gives the model a thread pool of its own
/// (`None` shares one pool of one thread per core).
#[pyclass(frozen, module = "rwkv_rs._native", name = "Model")]
struct PyModel {
    model: Model,
    pool: Option<rayon::ThreadPool>,
    path: PathBuf,
}

impl PyModel {
    /// Runs `f` on the model's thread pool with the GIL released.
    fn compute<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&Model) -> T + Send) -> T {
        py.detach(|| match &self.pool {
            Some(pool) => pool.install(|| f(&self.model)),
            None => f(&self.model),
        })
    }
}

/// The logits a call returns: `[vocab]` for the last token, `[T, vocab]` for every token.
fn logits_array<'py>(
    py: Python<'py>,
    logits: Vec<f32>,
    rows: usize,
    vocab: usize,
    full: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let flat = PyArray1::from_vec(py, logits);
    Ok(if full {
        flat.reshape([rows, vocab])?.into_any()
    } else {
        flat.into_any()
    })
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (path, quant=None, threads=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        quant: Option<&str>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let format = quant
            .map(|q| q.parse::<WeightFormat>().map_err(py_err))
            .transpose()?;
        let pool = match threads {
            None => None,
            Some(0) => return Err(PyValueError::new_err("threads must be at least 1")),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| PyRuntimeError::new_err(format!("thread pool: {e}")))?,
            ),
        };
        let model = py
            .detach(|| Model::load_as(&path, format))
            .map_err(py_err)?;
        Ok(PyModel { model, pool, path })
    }

    /// The checkpoint's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// `"v4"`, `"v5.2"`, `"v6.0"` or `"v7"`.
    #[getter]
    fn generation(&self) -> &'static str {
        self.model.info().generation.name()
    }

    /// Number of blocks.
    #[getter]
    fn n_layer(&self) -> usize {
        self.model.info().n_layer
    }

    /// Width of the residual stream.
    #[getter]
    fn n_embd(&self) -> usize {
        self.model.info().n_embd
    }

    /// Number of heads (1 for RWKV-4).
    #[getter]
    fn n_head(&self) -> usize {
        self.model.info().n_head
    }

    /// Head size (0 for RWKV-4).
    #[getter]
    fn head_size(&self) -> usize {
        self.model.info().head_size
    }

    /// Channel-mixing hidden size.
    #[getter]
    fn ffn_dim(&self) -> usize {
        self.model.info().ffn_dim
    }

    /// Length of a logits row.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    /// Number of parameters.
    #[getter]
    fn params(&self) -> usize {
        self.model.info().params
    }

    /// The weight matrices' format: `"f32"`, `"f16"`, `"bf16"`, `"int8"` or `"q4"`.
    #[getter]
    fn weight_format(&self) -> String {
        self.model.weight_format()
    }

    /// A fresh state (the official package's `state=None`).
    fn new_state(&self) -> PyState {
        PyState {
            state: self.model.new_state(),
        }
    }

    /// Advances `state` over `tokens` and returns `(logits, state)` as the official package's
    /// `RWKV.forward` does: `state=None` starts from a fresh state, a given state is advanced
    /// in place (and returned); the logits are the last token's (`[vocab]`) or, with
    /// `full_output=True`, every token's (`[len(tokens), vocab]`).
    #[pyo3(signature = (tokens, state=None, full_output=false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<i64>,
        state: Option<Bound<'py, PyState>>,
        full_output: bool,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyState>)> {
        let tokens = token_ids(tokens, "tokens")?;
        if tokens.is_empty() {
            return Err(PyValueError::new_err(
                "tokens: empty (give at least one token)",
            ));
        }
        let state = match state {
            Some(s) => s,
            None => Bound::new(py, self.new_state())?,
        };
        let which = if full_output {
            Logits::All
        } else {
            Logits::Last
        };
        let logits = {
            let mut guard = state.try_borrow_mut().map_err(|_| {
                PyValueError::new_err("state: in use by another call (copy it to fork)")
            })?;
            let st = &mut guard.state;
            self.compute(py, |m| m.forward(&tokens, st, which))
                .map_err(py_err)?
        };
        let arr = logits_array(py, logits, tokens.len(), self.vocab_size(), full_output)?;
        Ok((arr, state))
    }

    /// Advances many sequences in one pass (a ragged batch: every linear layer is one product
    /// over the rows of all of them). `tokens` is a list of token lists; `states` a list of the
    /// same length whose entries are states or `None` (fresh), or `None` for all fresh.
    /// Returns `(logits, states)`, one entry per sequence, each as [`forward`] would give it.
    #[pyo3(signature = (tokens, states=None, full_output=false))]
    fn forward_batch<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<Vec<i64>>,
        states: Option<Vec<Option<Bound<'py, PyState>>>>,
        full_output: bool,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let n = tokens.len();
        let states = states.unwrap_or_else(|| vec![None; n]);
        if states.len() != n {
            return Err(PyValueError::new_err(format!(
                "states: {} entries for {n} token lists",
                states.len()
            )));
        }
        let mut ids = Vec::with_capacity(n);
        for (i, t) in tokens.into_iter().enumerate() {
            let t = token_ids(t, &format!("tokens[{i}]"))?;
            if t.is_empty() {
                return Err(PyValueError::new_err(format!(
                    "tokens[{i}]: empty (give at least one token)"
                )));
            }
            ids.push(t);
        }
        let states: Vec<Bound<'py, PyState>> = states
            .into_iter()
            .map(|s| match s {
                Some(s) => Ok(s),
                None => Bound::new(py, self.new_state()),
            })
            .collect::<PyResult<_>>()?;
        let mut guards = Vec::with_capacity(n);
        for (i, s) in states.iter().enumerate() {
            let g = s.try_borrow_mut().map_err(|_| {
                PyValueError::new_err(format!(
                    "states[{i}]: the same state as another entry, or in use by another call (copy it to fork)"
                ))
            })?;
            g.state
                .check_compatible(self.model.info())
                .map_err(|e| PyValueError::new_err(format!("states[{i}]: {e}")))?;
            guards.push(g);
        }
        let which = if full_output {
            Logits::All
        } else {
            Logits::Last
        };
        let results = {
            let mut items: Vec<BatchItem<'_>> = ids
                .iter()
                .zip(guards.iter_mut())
                .map(|(t, g)| BatchItem {
                    tokens: t,
                    state: &mut g.state,
                    logits: which,
                })
                .collect();
            self.compute(py, |m| m.forward_batch(&mut items, &mut Scratch::default()))
        };
        drop(guards);
        let out = PyList::empty(py);
        for (i, r) in results.into_iter().enumerate() {
            let logits = r.map_err(|e| batch_entry_error(i, e))?;
            out.append(logits_array(
                py,
                logits,
                ids[i].len(),
                self.vocab_size(),
                full_output,
            )?)?;
        }
        Ok((out, PyList::new(py, states)?))
    }

    fn __repr__(&self) -> String {
        let i = self.model.info();
        format!(
            "Model({:?}, RWKV {}, {} layers x {}, vocab {}, {})",
            self.path.display().to_string(),
            i.generation,
            i.n_layer,
            i.n_embd,
            i.vocab_size,
            self.model.weight_format()
        )
    }
}

/// An error of batch entry `i`, its place in front of the library's message.
fn batch_entry_error(i: usize, e: Error) -> PyErr {
    let msg = format!("tokens[{i}]: {e}");
    match e {
        Error::BadInput(_) => PyValueError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

/// The recurrent state of one sequence: a constant-size list of f32 tensors in the official
/// package's layout (per layer `att_x_prev, att_kv, ffn_x_prev`; RWKV-4:
/// `att_x_prev, aa, bb, pp, ffn_x_prev`). Copy it (`copy.copy`, `copy.deepcopy`, `.copy()`)
/// to fork a conversation.
#[pyclass(module = "rwkv_rs._native", name = "State")]
struct PyState {
    state: State,
}

#[pymethods]
impl PyState {
    /// A fresh state for `model`.
    #[staticmethod]
    fn zeros(model: &Bound<'_, PyModel>) -> PyState {
        model.get().new_state()
    }

    /// An independent copy (a fork of the conversation).
    fn copy(&self) -> PyState {
        PyState {
            state: self.state.clone(),
        }
    }

    fn __copy__(&self) -> PyState {
        self.copy()
    }

    fn __deepcopy__(&self, _memo: &Bound<'_, PyAny>) -> PyState {
        self.copy()
    }

    /// Number of tensors.
    fn __len__(&self) -> usize {
        self.state.len()
    }

    /// Bytes of the state's tensors (independent of how many tokens it has seen).
    #[getter]
    fn nbytes(&self) -> usize {
        self.state.bytes()
    }

    /// The generation of the model it belongs to.
    #[getter]
    fn generation(&self) -> &'static str {
        self.state.generation().name()
    }

    /// The tensors as a list of NumPy float32 arrays, the official package's state list
    /// (copies: editing them does not change this state).
    fn to_list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let arrays = (0..self.state.len())
            .map(|j| {
                PyArray1::from_slice(py, self.state.tensor(j)).reshape(self.state.shape(j).to_vec())
            })
            .collect::<PyResult<Vec<Bound<'py, PyArrayDyn<f32>>>>>()?;
        PyList::new(py, arrays)
    }

    /// A state for `model` from a list of arrays in the official package's layout (float32,
    /// the shapes of [`to_list`]).
    #[staticmethod]
    fn from_list(
        model: &Bound<'_, PyModel>,
        tensors: Vec<PyReadonlyArrayDyn<'_, f32>>,
    ) -> PyResult<PyState> {
        let mut state = model.get().model.new_state();
        if tensors.len() != state.len() {
            return Err(PyValueError::new_err(format!(
                "state list has {} tensors, but this model's state has {}",
                tensors.len(),
                state.len()
            )));
        }
        for (j, t) in tensors.iter().enumerate() {
            let want = state.shape(j).to_vec();
            let a = t.as_array();
            if a.shape() != want.as_slice() {
                return Err(PyValueError::new_err(format!(
                    "state list entry {j} has shape {:?}, but this model's state needs {want:?}",
                    a.shape()
                )));
            }
            for (dst, src) in state.tensor_mut(j).iter_mut().zip(a.iter()) {
                *dst = *src;
            }
        }
        Ok(PyState { state })
    }

    /// Saves the state as a safetensors file (written to a temporary name and renamed).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.state.save(&path)).map_err(py_err)
    }

    /// Loads a state saved by [`save`] (or by `rwkv generate --state-out`) for `model`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf, model: &Bound<'_, PyModel>) -> PyResult<PyState> {
        let info = model.get().model.info();
        let state = py.detach(|| State::load(&path, info)).map_err(py_err)?;
        Ok(PyState { state })
    }

    fn __repr__(&self) -> String {
        format!(
            "State(RWKV {}, {} layers, {} tensors, {} bytes)",
            self.state.generation(),
            self.state.n_layer(),
            self.state.len(),
            self.state.bytes()
        )
    }
}

/// A tokenizer: `"world"` (the RWKV World vocabulary, `rwkv_vocab_v20230424`), `"bytes"`, a
/// World-format vocabulary `.txt` or a Hugging Face `tokenizer.json`.
#[pyclass(frozen, module = "rwkv_rs._native", name = "Tokenizer")]
struct PyTokenizer {
    inner: Box<dyn Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    #[new]
    #[pyo3(signature = (spec="world"))]
    fn new(spec: &str) -> PyResult<Self> {
        if !matches!(spec, "world" | "bytes") && !std::path::Path::new(spec).is_file() {
            return Err(PyFileNotFoundError::new_err(
                tokenizer::load(spec)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            ));
        }
        Ok(PyTokenizer {
            inner: tokenizer::load(spec).map_err(py_err)?,
        })
    }

    /// The tokenizer a model of `vocab_size` tokens uses when none is named (World for
    /// 65530..65536, bytes for 256).
    #[staticmethod]
    fn for_vocab(vocab_size: usize) -> PyResult<Self> {
        Ok(PyTokenizer {
            inner: tokenizer::for_vocab(vocab_size).map_err(py_err)?,
        })
    }

    /// Text to token ids.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.encode(text)).map_err(py_err)
    }

    /// Token ids to text, as the official package decodes: the UTF-8 text, or `"\ufffd"` when
    /// the bytes are not whole UTF-8 (a character split across tokens).
    fn decode(&self, tokens: Vec<i64>) -> PyResult<String> {
        let bytes = self.decode_bytes(tokens)?;
        Ok(tokenizer::decode_text_strict(&bytes))
    }

    /// Token ids to their raw bytes.
    fn decode_bytes(&self, tokens: Vec<i64>) -> PyResult<Vec<u8>> {
        let ids = token_ids(tokens, "tokens")?;
        self.inner.decode_bytes(&ids).map_err(py_err)
    }

    /// One past the largest id it decodes.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// `"world"`, `"bytes"` or the file's path.
    #[getter]
    fn name(&self) -> String {
        self.inner.name()
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer({:?})", self.inner.name())
    }
}

/// The official package's `PIPELINE.sample_logits` distribution before the draw: softmax,
/// top-p (ties with the cutoff kept), top-k, then temperature on the kept probabilities,
/// renormalised. `temperature=0` keeps only the most likely token(s).
#[pyfunction]
#[pyo3(signature = (logits, temperature=1.0, top_p=0.85, top_k=0))]
fn distribution<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray1<'py, f32>,
    temperature: f32,
    top_p: f32,
    top_k: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    sample::check_filter(temperature, top_p).map_err(py_err)?;
    let logits = logits.as_array().to_vec();
    let mut out = Vec::new();
    sample::distribution(
        &logits,
        temperature,
        top_p,
        top_k,
        &mut out,
        &mut SampleScratch::default(),
    );
    Ok(PyArray1::from_vec(py, out))
}

/// Draws tokens from logits with the official package's sampling and penalties
/// (`alpha_presence`, `alpha_frequency`, `alpha_decay`), bans, and a seeded generator of its
/// own (`seed=None` seeds from entropy).
#[pyclass(module = "rwkv_rs._native", name = "Sampler")]
struct PySampler {
    inner: Sampler,
    logits: Vec<f32>,
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (vocab_size, temperature=1.0, top_p=0.85, top_k=0, presence_penalty=0.0,
        frequency_penalty=0.0, penalty_decay=0.996, banned=Vec::new(), seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vocab_size: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        presence_penalty: f32,
        frequency_penalty: f32,
        penalty_decay: f32,
        banned: Vec<i64>,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let cfg = SamplerConfig {
            temperature,
            top_p,
            top_k,
            presence_penalty,
            frequency_penalty,
            penalty_decay,
            banned: token_ids(banned, "banned")?,
            seed,
        };
        Ok(PySampler {
            inner: Sampler::new(cfg, vocab_size).map_err(py_err)?,
            logits: Vec::with_capacity(vocab_size),
        })
    }

    /// Draws a token from `logits` after bans and penalties (the array is not modified).
    fn sample(&mut self, logits: PyReadonlyArray1<'_, f32>) -> PyResult<u32> {
        self.logits.clear();
        self.logits.extend(logits.as_array().iter());
        Ok(self.inner.sample(&mut self.logits))
    }

    /// Records a generated token for the penalties (`weight` 1, or 0 for the official
    /// package's spaces and digits).
    #[pyo3(signature = (token, weight=1.0))]
    fn accept(&mut self, token: u32, weight: f32) {
        self.inner.accept(token, weight);
    }

    /// Forgets the penalty counts (a new conversation).
    fn reset(&mut self) {
        self.inner.reset();
    }

    /// The seed in use.
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed()
    }
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add_class::<PyState>()?;
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PySampler>()?;
    m.add_function(wrap_pyfunction!(distribution, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
