//! The engine: one thread owns the model and advances every active sequence with one batched
//! forward pass per step (continuous batching).
//!
//! Requests arrive over a channel; at most `queue` wait there. Between steps the engine admits
//! waiting requests up to `max_batch` active sequences. A step then
//!
//! 1. drops sequences whose client went away (their event receiver is gone),
//! 2. samples a token for every sequence that has next-token logits, streams its text and
//!    retires the sequences that finished,
//! 3. runs one [`Model::forward_batch`] over the rest: a prompt chunk for sequences still
//!    reading their prompt, the last sampled token for the others,
//!
//! and stores the state at each cache boundary of a prompt in the [`PrefixCache`].

use super::cache::PrefixCache;
use super::metrics::Metrics;
use llguidance::Matcher;
use rwkv_core::model::{BatchItem, Logits, Model, Scratch, Slot, State};
use rwkv_core::sample::{penalty_weight, Sampler, SamplerConfig};
use rwkv_core::session::Finish;
use rwkv_core::tokenizer::{StreamDecoder, Tokenizer};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Most prompt tokens one sequence feeds in one step. Long prompts take several steps, so the
/// sequences that are generating keep getting a token per step while a prompt is read.
pub const PREFILL_CHUNK: usize = 256;

/// Most prompt tokens all sequences together feed in one step (the first prompt in line
/// always gets its chunk): bounds the latency a burst of new prompts adds to a step.
pub const PREFILL_BUDGET: usize = 512;

/// A request for the engine: prompt tokens, sampling and stopping rules, and where to send
/// its output.
pub struct Job {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Prompt positions after which the state is worth caching (e.g. the end of each chat
    /// message), ascending; the end of the prompt is always one.
    pub boundaries: Vec<usize>,
    /// Sampling parameters.
    pub sampler: SamplerConfig,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation (not emitted).
    pub stop: Vec<String>,
    /// Token ids that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Added to these tokens' logits before sampling; -100 or less bans the token.
    pub logit_bias: Vec<(u32, f32)>,
    /// Choices to generate from the prompt: it is read once and its state forked per choice.
    pub n: usize,
    /// The index of the job's first choice in its response (a request with several prompts
    /// numbers the choices prompt by prompt, `n` each).
    pub first_choice: usize,
    /// With `Some(k)`, each generated token's log-probability and the `k` most likely tokens
    /// at its place are reported ([`Event::Logprob`]).
    pub logprobs: Option<usize>,
    /// Report the log-probability of every prompt token ([`Event::Prompt`]): the prompt is
    /// then read from the start (the cache holds no logits of its inner positions).
    pub prompt_logprobs: bool,
    /// Read the prompt and answer its embedding ([`Event::Embedding`]) instead of generating.
    pub embed: bool,
    /// The grammar every generated token must follow (its matcher at the start).
    pub grammar: Option<Matcher>,
    /// The state the prompt is read from (a `--state-dir` state) instead of the zero state,
    /// with its number among the server's states (which keys its prompts in the cache apart).
    pub initial: Option<(u32, Arc<State>)>,
    /// Where the output goes (one sender may serve the jobs of one request); dropping the
    /// receiver cancels the job.
    pub events: UnboundedSender<Event>,
}

/// One token's log-probability under the model (log-softmax of its logits over the tokens
/// the tokenizer can produce, which for the released models is the whole vocabulary; before
/// sampling settings and `logit_bias`) and the most likely tokens at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What the engine tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More generated text of a choice.
    Text {
        /// The choice's index in the response.
        choice: usize,
        /// The text.
        text: String,
    },
    /// A generated token's log-probability (sent before the token's text, which a stop
    /// string may hold back or drop).
    Logprob {
        /// The choice's index in the response.
        choice: usize,
        /// The token.
        lp: TokenLogprob,
    },
    /// The log-probabilities of a job's prompt tokens (`None` for the first, which nothing
    /// predicts), for its choices `first_choice..first_choice + n`; sent before their text.
    Prompt {
        /// The job's first choice.
        first_choice: usize,
        /// Its number of choices.
        n: usize,
        /// One per prompt token.
        logprobs: Vec<Option<TokenLogprob>>,
    },
    /// The embedding of an `embed` job's prompt: [`embedding`] of the state it left.
    Embedding {
        /// The job's index in the response.
        choice: usize,
        /// The unit vector.
        vector: Vec<f32>,
    },
    /// A choice ended.
    Done {
        /// The choice's index in the response.
        choice: usize,
        /// Its summary.
        done: Done,
    },
    /// The request failed (after it was accepted).
    Error(String),
}

/// The summary of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Why it ended.
    pub finish: Finish,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose state came from the cache.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full.
    QueueFull,
    /// The server is shutting down (or the engine has stopped).
    ShuttingDown,
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// Most requests waiting for a slot.
    pub queue: usize,
    /// Byte budget of the prefix cache.
    pub cache_bytes: usize,
}

enum Msg {
    Job(Box<Job>),
    /// Wakes an idle engine (to notice a shutdown).
    Wake,
}

/// State shared between the handle and the engine thread.
struct Shared {
    /// Jobs sent but not yet admitted.
    queued: AtomicUsize,
    /// When set, no new jobs are accepted, and at this instant every remaining job is ended.
    deadline: OnceLock<Instant>,
    /// False once the engine thread has exited.
    alive: AtomicBool,
}

/// The handle to the engine thread.
pub struct Engine {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    cfg: EngineConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread.
    pub fn start(
        model: Model,
        tokenizer: Arc<dyn Tokenizer>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Engine> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            deadline: OnceLock::new(),
            alive: AtomicBool::new(true),
        });
        let worker = Worker {
            vocab: model.vocab_size(),
            decodable: tokenizer.vocab_size().min(model.vocab_size()),
            model,
            tokenizer,
            cfg,
            cache: PrefixCache::new(cfg.cache_bytes),
            metrics,
            shared: shared.clone(),
            rx,
            active: Vec::new(),
            scratch: Scratch::default(),
            token_buf: Vec::with_capacity(64),
            raw: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("rwkv-engine".into())
            .spawn(move || worker.run())?;
        Ok(Engine {
            tx,
            shared,
            cfg,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job, or says why not (without blocking).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.shared.deadline.get().is_some() || !self.is_alive() {
            return Err(SubmitError::ShuttingDown);
        }
        let cap = self.cfg.queue;
        self.shared
            .queued
            .fetch_update(SeqCst, SeqCst, |q| (q < cap).then_some(q + 1))
            .map_err(|_| SubmitError::QueueFull)?;
        self.tx.send(Msg::Job(Box::new(job))).map_err(|_| {
            self.shared.queued.fetch_sub(1, SeqCst);
            SubmitError::ShuttingDown
        })
    }

    /// Whether the engine thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(SeqCst)
    }

    /// Stops accepting jobs; jobs already accepted may run until `deadline`, when the
    /// remaining ones are ended (finish reason `length`, or an error for those still queued).
    pub fn shutdown(&self, deadline: Instant) {
        let _ = self.shared.deadline.set(deadline);
        let _ = self.tx.send(Msg::Wake);
    }

    /// Whether [`Engine::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.deadline.get().is_some()
    }

    /// Waits for the engine thread to exit (after [`Engine::shutdown`]).
    pub fn join(&self) {
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = handle {
            let _ = t.join();
        }
    }
}

/// Turns generated token bytes into text deltas: completes UTF-8 characters split across
/// tokens and holds back a suffix that could still grow into a stop string, as
/// [`rwkv_core::session::Session::generate`] does.
#[derive(Debug, Default)]
pub struct TextStream {
    decoder: StreamDecoder,
    pending: String,
    stops: Vec<String>,
}

impl TextStream {
    /// A stream that ends at any of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            decoder: StreamDecoder::new(),
            pending: String::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Adds one token's bytes. Returns the text that is now safe to emit and whether a stop
    /// string was completed (the stop string and anything after it are dropped).
    pub fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        self.decoder.push_into(bytes, &mut self.pending);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Emit all but the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len()) + 1)
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let emit = self.pending.len() - keep;
        (self.pending.drain(..emit).collect(), false)
    }

    /// The text held back, once generation has ended without a stop string.
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.pending);
        out.push_str(&self.decoder.finish());
        out
    }
}

/// One active sequence (one choice of a job).
struct Seq {
    /// The job, shared by its choices.
    job: Arc<Job>,
    /// The index of this choice in the response.
    choice: usize,
    /// Whether the job's other choices were forked from this one (or it is one of them).
    forked: bool,
    /// The prompt tokens' log-probabilities so far, when the job asks for them.
    prompt_lp: Vec<Option<TokenLogprob>>,
    /// This choice's grammar state.
    grammar: Option<Matcher>,
    state: State,
    /// Prompt tokens already in `state`.
    pos: usize,
    cached: usize,
    /// Next-token logits, when the sequence is ready to sample.
    logits: Option<Vec<f32>>,
    /// The token to feed in the next step (once the prompt is done).
    last: u32,
    sampler: Sampler,
    text: TextStream,
    generated: usize,
    /// Set when the sequence is to be retired at the end of this step.
    finished: Option<Finish>,
    /// The client went away (or it failed): retire without a `Done`.
    dropped: bool,
}

impl Seq {
    fn send(&mut self, ev: Event) {
        if self.job.events.send(ev).is_err() {
            self.dropped = true;
        }
    }
}

/// The engine thread's state.
struct Worker {
    model: Model,
    tokenizer: Arc<dyn Tokenizer>,
    vocab: usize,
    /// Ids at or above this are never sampled (head rows the tokenizer cannot decode).
    decodable: usize,
    cfg: EngineConfig,
    cache: PrefixCache,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    active: Vec<Seq>,
    scratch: Scratch,
    token_buf: Vec<u8>,
    /// The logits before sampling changes them, for [`Job::logprobs`].
    raw: Vec<f32>,
}

/// Marks the engine dead however its thread ends (including a panic), so that `/health`
/// reports it and new requests are refused.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, SeqCst);
    }
}

impl Worker {
    fn run(mut self) {
        let _guard = AliveGuard(self.shared.clone());
        loop {
            if !self.admit() {
                return;
            }
            self.enforce_deadline();
            self.step();
            self.publish();
        }
    }

    /// Takes waiting jobs into the batch; blocks while there is nothing to do. Returns false
    /// when the engine should exit.
    fn admit(&mut self) -> bool {
        while self.active.is_empty() {
            let msg = if self.shared.deadline.get().is_some() {
                // Shutting down: finish what is queued, then exit.
                match self.rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => return false,
                }
            } else {
                self.publish();
                match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return false,
                }
            };
            if let Msg::Job(job) = msg {
                self.start(*job);
            }
        }
        while self.active.len() < self.cfg.max_batch {
            match self.rx.try_recv() {
                Ok(Msg::Job(job)) => self.start(*job),
                Ok(Msg::Wake) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        true
    }

    /// Admits one job: starts from the longest cached prefix of its prompt.
    fn start(&mut self, mut job: Job) {
        self.shared.queued.fetch_sub(1, SeqCst);
        if job.events.is_closed() {
            self.metrics.cancelled.fetch_add(1, SeqCst);
            return;
        }
        if self.past_deadline() {
            let _ = job
                .events
                .send(Event::Error("the server is shutting down".into()));
            return;
        }
        let sampler = match Sampler::new(job.sampler.clone(), self.vocab) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.events.send(Event::Error(e.to_string()));
                return;
            }
        };
        let lookup = if job.prompt_logprobs {
            None
        } else {
            self.cache.lookup(&cache_key(&job, job.prompt.len()))
        };
        let (state, pos, logits) = match lookup {
            Some(hit) => {
                self.metrics.cache_hits.fetch_add(1, SeqCst);
                let len = hit.len - key_offset(&job);
                let logits = (len == job.prompt.len()).then_some(hit.logits);
                (hit.state, len, logits)
            }
            None => {
                self.metrics.cache_misses.fetch_add(1, SeqCst);
                let state = match &job.initial {
                    Some((_, st)) => State::clone(st),
                    None => self.model.new_state(),
                };
                (state, 0, None)
            }
        };
        self.metrics
            .prompt_tokens
            .fetch_add(job.prompt.len() as u64, SeqCst);
        self.metrics
            .cached_prompt_tokens
            .fetch_add(pos as u64, SeqCst);
        let text = TextStream::new(job.stop.clone());
        let prompt_lp = if job.prompt_logprobs {
            // Nothing predicts the first token.
            vec![None]
        } else {
            Vec::new()
        };
        let grammar = job.grammar.take();
        self.active.push(Seq {
            grammar,
            choice: job.first_choice,
            forked: job.n <= 1,
            prompt_lp,
            job: Arc::new(job),
            state,
            pos,
            cached: pos,
            logits,
            last: 0,
            sampler,
            text,
            generated: 0,
            finished: None,
            dropped: false,
        });
    }

    fn past_deadline(&self) -> bool {
        self.shared
            .deadline
            .get()
            .is_some_and(|d| Instant::now() >= *d)
    }

    /// At the shutdown deadline, ends every active sequence (its text so far stands) and
    /// refuses every queued job.
    fn enforce_deadline(&mut self) {
        if !self.past_deadline() {
            return;
        }
        for s in &mut self.active {
            if s.finished.is_none() {
                let rest = s.text.finish();
                if !rest.is_empty() {
                    s.send(Event::Text {
                        choice: s.choice,
                        text: rest,
                    });
                }
                s.finished = Some(Finish::Length);
            }
        }
        self.retire();
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Job(job) = msg {
                self.start(*job);
            }
        }
    }

    fn step(&mut self) {
        for s in &mut self.active {
            if s.job.events.is_closed() {
                s.dropped = true;
            }
        }
        self.retire();
        self.fork();
        for i in 0..self.active.len() {
            if self.active[i].logits.is_some() {
                self.sample(i);
            }
        }
        self.retire();
        self.forward();
        self.retire();
    }

    /// Forks the other choices of every job whose prompt has just been read: each starts from
    /// the same state and next-token logits, with its own sampler (seeded `seed + k` for its
    /// `k`-th choice, when the job has a seed).
    fn fork(&mut self) {
        let mut clones = Vec::new();
        for s in &mut self.active {
            if s.forked || s.logits.is_none() {
                continue;
            }
            s.forked = true;
            for k in 1..s.job.n {
                let mut cfg = s.job.sampler.clone();
                cfg.seed = cfg.seed.map(|x| x.wrapping_add(k as u64));
                let sampler = match Sampler::new(cfg, self.vocab) {
                    Ok(x) => x,
                    Err(e) => {
                        s.send(Event::Error(e.to_string()));
                        s.dropped = true;
                        break;
                    }
                };
                clones.push(Seq {
                    grammar: s.grammar.as_ref().map(Matcher::deep_clone),
                    job: s.job.clone(),
                    choice: s.job.first_choice + k,
                    forked: true,
                    prompt_lp: Vec::new(),
                    state: s.state.clone(),
                    pos: s.pos,
                    cached: s.cached,
                    logits: s.logits.clone(),
                    last: 0,
                    sampler,
                    text: TextStream::new(s.job.stop.clone()),
                    generated: 0,
                    finished: None,
                    dropped: false,
                });
            }
        }
        self.active.extend(clones);
    }

    /// Samples the next token of sequence `i` and streams its text; marks the sequence
    /// finished on a stop token, a stop string or the token limit.
    fn sample(&mut self, i: usize) {
        let s = &mut self.active[i];
        if s.job.embed {
            let vector = embedding(&s.state);
            s.send(Event::Embedding {
                choice: s.choice,
                vector,
            });
            s.logits = None;
            s.finished = Some(Finish::Stop);
            return;
        }
        if s.generated >= s.job.max_tokens {
            s.finished = Some(Finish::Length);
            s.logits = None;
            return;
        }
        let Some(mut logits) = s.logits.take() else {
            return;
        };
        if s.job.logprobs.is_some() {
            self.raw.clear();
            self.raw.extend_from_slice(&logits);
        }
        if self.decodable < logits.len() {
            logits[self.decodable..].fill(f32::NEG_INFINITY);
        }
        let mut grammar_time = std::time::Duration::ZERO;
        if let Some(m) = &mut s.grammar {
            let t = Instant::now();
            match m.compute_mask() {
                Ok(mask) => {
                    for (id, l) in logits.iter_mut().enumerate() {
                        if !mask.is_allowed(id as u32) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                    grammar_time += t.elapsed();
                }
                Err(e) => {
                    s.send(Event::Error(format!("grammar: {e}")));
                    s.dropped = true;
                    return;
                }
            }
        }
        for &(id, bias) in &s.job.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                // OpenAI documents -100 as a ban; a finite -100 could still win a row
                // whose other logits are lower.
                *l = if bias <= -100.0 {
                    f32::NEG_INFINITY
                } else {
                    *l + bias
                };
            }
        }
        let tok = s.sampler.sample(&mut logits);
        if let Some(k) = s.job.logprobs {
            let lp = token_logprob(&self.raw[..self.decodable], tok, k);
            s.send(Event::Logprob {
                choice: s.choice,
                lp,
            });
        }
        s.generated += 1;
        self.metrics.completion_tokens.fetch_add(1, SeqCst);
        if s.job.stop_tokens.contains(&tok) {
            let rest = s.text.finish();
            if !rest.is_empty() {
                s.send(Event::Text {
                    choice: s.choice,
                    text: rest,
                });
            }
            s.finished = Some(Finish::Stop);
            return;
        }
        self.token_buf.clear();
        if let Err(e) = self.tokenizer.token_bytes_into(tok, &mut self.token_buf) {
            s.send(Event::Error(e.to_string()));
            s.dropped = true;
            return;
        }
        s.sampler.accept(tok, penalty_weight(&self.token_buf));
        // A grammar that is complete and admits nothing more ends the reply.
        let mut complete = false;
        if let Some(m) = &mut s.grammar {
            let t = Instant::now();
            if let Err(e) = m.consume_token(tok) {
                s.send(Event::Error(format!("grammar: {e}")));
                s.dropped = true;
                return;
            }
            complete = m.is_stopped();
            grammar_time += t.elapsed();
            let us = grammar_time.as_micros() as u64;
            self.metrics.grammar_micros.fetch_add(us, SeqCst);
            self.metrics.grammar_tokens.fetch_add(1, SeqCst);
        }
        let (mut text, stopped) = s.text.push(&self.token_buf);
        if complete && !stopped {
            // Text held back for a stop string that can no longer come.
            text.push_str(&s.text.finish());
        }
        if !text.is_empty() {
            s.send(Event::Text {
                choice: s.choice,
                text,
            });
        }
        if stopped || complete {
            s.finished = Some(Finish::Stop);
        } else if s.generated >= s.job.max_tokens {
            let rest = s.text.finish();
            if !rest.is_empty() {
                s.send(Event::Text {
                    choice: s.choice,
                    text: rest,
                });
            }
            s.finished = Some(Finish::Length);
        } else {
            s.last = tok;
        }
    }

    /// One batched forward pass over every sequence that needs one.
    fn forward(&mut self) {
        // (sequence index, prompt end of its chunk, or None for a generated token)
        let mut plan: Vec<(usize, Option<usize>)> = Vec::with_capacity(self.active.len());
        let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(self.active.len());
        let mut prefill = 0;
        let mut rows = 0;
        for (i, s) in self.active.iter_mut().enumerate() {
            if s.logits.is_some() || s.finished.is_some() || s.dropped {
                continue;
            }
            let n = s.job.prompt.len();
            if s.pos < n {
                // Chunks end at cache boundaries and are cut from the boundary before, so a
                // prompt is split the same way whatever else is in the batch.
                let boundary = boundary_of(&s.job, s.pos);
                let end = boundary.min(s.pos + PREFILL_CHUNK);
                if prefill > 0 && prefill + (end - s.pos) > PREFILL_BUDGET {
                    continue;
                }
                prefill += end - s.pos;
                rows += end - s.pos;
                let which = if s.job.prompt_logprobs {
                    Logits::All
                } else if end == boundary {
                    Logits::Last
                } else {
                    Logits::None
                };
                items.push(BatchItem {
                    tokens: &s.job.prompt[s.pos..end],
                    state: &mut s.state,
                    logits: which,
                });
                plan.push((i, Some(end)));
            } else {
                rows += 1;
                items.push(BatchItem {
                    tokens: std::slice::from_ref(&s.last),
                    state: &mut s.state,
                    logits: Logits::Last,
                });
                plan.push((i, None));
            }
        }
        if items.is_empty() {
            return;
        }
        let results = self.model.forward_batch(&mut items, &mut self.scratch);
        drop(items);
        self.metrics.steps.fetch_add(1, SeqCst);
        self.metrics.rows.fetch_add(rows as u64, SeqCst);
        for ((i, chunk_end), res) in plan.into_iter().zip(results) {
            let s = &mut self.active[i];
            let logits = match res {
                Ok(l) => l,
                Err(e) => {
                    s.send(Event::Error(e.to_string()));
                    s.dropped = true;
                    continue;
                }
            };
            match chunk_end {
                None => s.logits = Some(logits),
                Some(end) => {
                    let mut logits = logits;
                    if s.job.prompt_logprobs {
                        // Row j predicts prompt token pos + j + 1; the last row of the whole
                        // prompt predicts the first generated token.
                        let (v, d) = (self.vocab, self.decodable);
                        let k = s.job.logprobs.unwrap_or(0);
                        for (j, row) in logits.chunks_exact(v).enumerate() {
                            if let Some(&next) = s.job.prompt.get(s.pos + j + 1) {
                                s.prompt_lp.push(Some(token_logprob(&row[..d], next, k)));
                            }
                        }
                        let last = logits.len().saturating_sub(v);
                        logits.drain(..last);
                        if end == s.job.prompt.len() {
                            let ev = Event::Prompt {
                                first_choice: s.job.first_choice,
                                n: s.job.n,
                                logprobs: std::mem::take(&mut s.prompt_lp),
                            };
                            s.send(ev);
                        } else if end != boundary_of(&s.job, s.pos) {
                            // Not a cache boundary: the logits were only for the prompt.
                            logits.clear();
                        }
                    }
                    s.pos = end;
                    if !logits.is_empty() {
                        self.cache
                            .insert(&cache_key(&s.job, end), &s.state, &logits);
                        if end == s.job.prompt.len() {
                            s.logits = Some(logits);
                        }
                    }
                }
            }
        }
    }

    /// Removes finished and dropped sequences, telling finished ones' clients.
    fn retire(&mut self) {
        let metrics = &self.metrics;
        self.active.retain_mut(|s| {
            if s.dropped {
                metrics.cancelled.fetch_add(1, SeqCst);
                return false;
            }
            let Some(finish) = s.finished else {
                return true;
            };
            let done = Done {
                finish,
                prompt_tokens: s.job.prompt.len(),
                cached_tokens: s.cached,
                completion_tokens: s.generated,
            };
            let choice = s.choice;
            let _ = s.job.events.send(Event::Done { choice, done });
            false
        });
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.batch_size.store(self.active.len() as u64, SeqCst);
        m.queue_length
            .store(self.shared.queued.load(SeqCst) as u64, SeqCst);
        m.cache_entries.store(self.cache.len() as u64, SeqCst);
        m.cache_bytes.store(self.cache.bytes() as u64, SeqCst);
    }
}

/// The embedding of a text: the state's last channel-mix token shift after reading it — the
/// normalised residual stream entering the last block's channel mixing at the text's last
/// token, where the model has taken in the whole text — scaled to unit length. RWKV's state
/// summarises everything read, so the last position needs no pooling over the others.
pub fn embedding(state: &State) -> Vec<f32> {
    let last = state.n_layer().saturating_sub(1);
    let mut v = state.get(last, Slot::FfnShift).to_vec();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Tokens of cache keys above every vocabulary: a prompt read from initial state `k` is keyed
/// `[STATE_KEY - k, prompt…]`, so that it never shares an entry with the same prompt read
/// from another state.
const STATE_KEY: u32 = u32::MAX;

/// The prefix cache's key of the job's first `end` prompt tokens.
fn cache_key(job: &Job, end: usize) -> std::borrow::Cow<'_, [u32]> {
    match &job.initial {
        None => std::borrow::Cow::Borrowed(&job.prompt[..end]),
        Some((k, _)) => {
            let mut key = Vec::with_capacity(end + 1);
            key.push(STATE_KEY - k);
            key.extend_from_slice(&job.prompt[..end]);
            std::borrow::Cow::Owned(key)
        }
    }
}

/// How many tokens of a cache key come before the job's prompt.
fn key_offset(job: &Job) -> usize {
    usize::from(job.initial.is_some())
}

/// The first cache boundary after prompt position `pos` (or the prompt's end).
fn boundary_of(job: &Job, pos: usize) -> usize {
    let n = job.prompt.len();
    job.boundaries
        .iter()
        .copied()
        .find(|&b| b > pos)
        .unwrap_or(n)
        .min(n)
}

/// The log-probability of `token` under `logits` (log-softmax) and the `k` most likely tokens,
/// most likely first (ties to the lower id).
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == k && l <= top[k - 1].1 {
                continue;
            }
            let at = top.partition_point(|&(_, x)| x >= l);
            top.insert(at, (i as u32, l));
            top.truncate(k);
        }
    }
    for t in &mut top {
        t.1 -= lse;
    }
    let logprob = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - lse);
    TokenLogprob {
        token,
        logprob,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut t = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (s, stop) = t.push(p.as_bytes());
            out.push_str(&s);
            if stop {
                return (out, true);
            }
        }
        out.push_str(&t.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_split_across_tokens() {
        assert_eq!(
            run(&["\n\n"], &["a", "b\n", "\n", "c"]),
            ("ab".into(), true)
        );
        assert_eq!(run(&["User:"], &["x\nUs", "er: y"]), ("x\n".into(), true));
        assert_eq!(run(&["xyz"], &["ax", "y"]), ("axy".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn held_back_text_is_not_emitted_early() {
        let mut t = TextStream::new(vec!["\n\n".into()]);
        assert_eq!(t.push(b"hi\n"), ("hi".into(), false));
        assert_eq!(t.push(b"ok"), ("\nok".into(), false));
    }

    #[test]
    fn split_utf8_characters_wait() {
        let e = "é".as_bytes();
        let mut t = TextStream::new(Vec::new());
        assert_eq!(t.push(&e[..1]), (String::new(), false));
        assert_eq!(t.push(&e[1..]), ("é".into(), false));
    }
}
