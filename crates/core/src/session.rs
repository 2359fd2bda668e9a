//! The generation loop shared by the CLI and the server: prompt → tokens → logits → sampler →
//! text stream, with stop tokens, stop strings and a state that can be forked, saved and loaded.

use crate::error::{Error, Result};
use crate::model::{Logits, Model, State};
use crate::sample::{penalty_weight, Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// When to stop generating.
#[derive(Debug, Clone, Default)]
pub struct StopRules {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Token ids that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation (not emitted; text before them is).
    pub stop_strings: Vec<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string was produced.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The text callback asked to stop (e.g. a client went away).
    Cancelled,
}

impl Finish {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// What one call to [`Session::generate`] did.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Tokens sampled (including a final stop token, which is consumed by the state).
    pub tokens: usize,
    /// Why it ended.
    pub finish: Finish,
    /// The stop string that ended it, if one did (its tokens are in the state).
    pub stop_string: Option<String>,
    /// Seconds spent (sampling and model steps).
    pub seconds: f64,
}

/// A conversation with a model: its state, the pending next-token logits and a sampler.
pub struct Session<'a> {
    model: &'a Model,
    tokenizer: &'a dyn Tokenizer,
    state: State,
    logits: Vec<f32>,
    work: Vec<f32>,
    has_logits: bool,
    sampler: Sampler,
    token_buf: Vec<u8>,
}

impl<'a> Session<'a> {
    /// The model the session runs.
    pub fn model(&self) -> &'a Model {
        self.model
    }

    /// A session from the zero state.
    pub fn new(model: &'a Model, tokenizer: &'a dyn Tokenizer, cfg: SamplerConfig) -> Result<Self> {
        let v = model.vocab_size();
        Ok(Session {
            model,
            tokenizer,
            state: model.new_state(),
            logits: vec![0.0; v],
            work: vec![0.0; v],
            has_logits: false,
            sampler: Sampler::new(cfg, v)?,
            token_buf: Vec::with_capacity(64),
        })
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Replaces the state (e.g. one loaded from a file). The next-token logits are unknown
    /// until more text is fed.
    pub fn set_state(&mut self, state: State) -> Result<()> {
        state.check_compatible(self.model.info())?;
        self.state = state;
        self.has_logits = false;
        Ok(())
    }

    /// Back to the zero state with fresh penalty counts.
    pub fn reset(&mut self) {
        self.state = self.model.new_state();
        self.has_logits = false;
        self.sampler.reset();
    }

    /// The sampler (its seed, its counts).
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Feeds prompt tokens in time-parallel mode, keeping only the last logits.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let out = self.model.forward(tokens, &mut self.state, Logits::Last)?;
        self.logits.copy_from_slice(&out);
        self.has_logits = true;
        Ok(())
    }

    /// Encodes and feeds text; returns the number of tokens.
    pub fn feed_text(&mut self, text: &str) -> Result<usize> {
        let ids = self.tokenizer.encode(text)?;
        self.feed(&ids)?;
        Ok(ids.len())
    }

    /// Samples up to `rules.max_tokens` tokens, streaming their text to `on_text` as soon as it
    /// is complete (characters split across tokens and possible starts of a stop string are
    /// held back). `on_text` returns `false` to cancel. Every sampled token is fed to the
    /// state, so a later turn continues right after this one.
    pub fn generate(
        &mut self,
        rules: &StopRules,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generated> {
        let start = std::time::Instant::now();
        if !self.has_logits {
            // Nothing fed yet: start from the end-of-text token, as the models were trained.
            self.feed(&[0])?;
        }
        let decodable = self.tokenizer.vocab_size();
        let mut decoder = StreamDecoder::new();
        let mut pending = String::new();
        let hold = rules
            .stop_strings
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0);
        let mut n = 0;
        let mut finish = Finish::Length;
        let mut by_string: Option<String> = None;
        while n < rules.max_tokens {
            self.work.copy_from_slice(&self.logits);
            // Ids the tokenizer cannot decode (padding rows of the head) are never sampled.
            if decodable < self.work.len() {
                self.work[decodable..].fill(f32::NEG_INFINITY);
            }
            let tok = self.sampler.sample(&mut self.work);
            n += 1;
            self.model
                .step_into(tok, &mut self.state, &mut self.logits)?;
            if rules.stop_tokens.contains(&tok) {
                finish = Finish::Stop;
                break;
            }
            self.token_buf.clear();
            self.tokenizer.token_bytes_into(tok, &mut self.token_buf)?;
            self.sampler.accept(tok, penalty_weight(&self.token_buf));
            decoder.push_into(&self.token_buf, &mut pending);
            if hold == 0 {
                if !pending.is_empty() {
                    if !on_text(&pending) {
                        finish = Finish::Cancelled;
                        break;
                    }
                    pending.clear();
                }
                continue;
            }
            if let Some((pos, s)) = rules
                .stop_strings
                .iter()
                .filter_map(|s| pending.find(s.as_str()).map(|p| (p, s)))
                .min_by_key(|(p, _)| *p)
            {
                by_string = Some(s.clone());
                if pos > 0 {
                    on_text(&pending[..pos]);
                }
                pending.clear();
                finish = Finish::Stop;
                break;
            }
            // Emit all but a suffix that could still grow into a stop string.
            let keep = rules
                .stop_strings
                .iter()
                .map(|s| {
                    (1..s.len().min(pending.len()) + 1)
                        .rev()
                        .find(|&k| s.is_char_boundary(k) && pending.ends_with(&s[..k]))
                        .unwrap_or(0)
                })
                .max()
                .unwrap_or(0);
            let emit = pending.len() - keep;
            if emit > 0 {
                if !on_text(&pending[..emit]) {
                    finish = Finish::Cancelled;
                    break;
                }
                pending.drain(..emit);
            }
        }
        if finish != Finish::Cancelled && by_string.is_none() {
            pending.push_str(&decoder.finish());
            if !pending.is_empty() {
                on_text(&pending);
            }
        }
        Ok(Generated {
            tokens: n,
            finish,
            stop_string: by_string,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Renders one chat turn in the RWKV chat format. Blank lines inside a message would read as
/// the end of a turn, so they are collapsed, as the official chat demo does.
pub fn chat_turn(user: &str) -> String {
    let mut msg = user.replace("\r\n", "\n").trim().to_string();
    while msg.contains("\n\n") {
        msg = msg.replace("\n\n", "\n");
    }
    format!("User: {msg}\n\nAssistant:")
}

/// Parses a comma-separated list of token ids.
pub fn parse_ids(s: &str, what: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .map_err(|_| Error::bad(format!("{what}: '{x}' is not a token id")))
        })
        .collect()
}
