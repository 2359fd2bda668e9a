//! Structured output: `response_format` (`json_object`, `json_schema`) and the `grammar`
//! option (a Lark grammar or a regular expression) become an llguidance matcher over this
//! model's vocabulary, which the engine asks for the allowed tokens before every sample and
//! tells every sampled token. Every generated token is one the grammar allows, so a reply that
//! ends by the grammar parses.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use rwkv_core::tokenizer::Tokenizer;
use std::sync::Arc;
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON matching a schema (`response_format: {"type": "json_schema", …}`).
    JsonSchema(serde_json::Value),
    /// A Lark grammar (`grammar: {"type": "lark", "lark": …}`).
    Lark(String),
    /// A regular expression (`grammar: {"type": "regex", "regex": …}`).
    Regex(String),
    /// The Lark grammar of a reply to a request with `tools` ([`crate::tools::grammar`]).
    Tools(String),
}

/// The grammar compiler for one model's vocabulary, made once at start-up.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// The vocabulary as llguidance sees it: each id's bytes, with token 0 (end of text) and
    /// the ids the tokenizer cannot decode as special tokens that no grammar produces (token 0
    /// then ends a reply where the grammar is complete).
    pub fn new(tokenizer: &dyn Tokenizer, vocab: usize) -> Result<Grammars, String> {
        let mut words = Vec::with_capacity(vocab);
        let mut buf = Vec::new();
        for id in 0..vocab as u32 {
            buf.clear();
            let ok = id != 0 && tokenizer.token_bytes_into(id, &mut buf).is_ok() && !buf.is_empty();
            words.push(if ok {
                buf.clone()
            } else if id == 0 {
                b"\xFF<|endoftext|>".to_vec()
            } else {
                let mut w = vec![0xFF];
                w.extend_from_slice(format!("<|unused_{id}|>").as_bytes());
                w
            });
        }
        let info = TokRxInfo::new(vocab as u32, 0);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("grammar: {e}"))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A fresh matcher for `c`, or the reason the grammar is refused.
    pub fn matcher(&self, c: &Constraint) -> Result<Matcher, String> {
        let grammar = match c {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Constraint::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s.clone())),
            Constraint::Lark(g) | Constraint::Tools(g) => TopLevelGrammar::from_lark(g.clone()),
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(e),
            None => Ok(m),
        }
    }
}

/// A schema laid out as `json.dumps` writes JSON (`", "` between items, `": "` after keys, no
/// other whitespace) unless it says otherwise in its own `x-guidance`: with any whitespace
/// allowed, a model that likes blank lines can fill its whole reply with them.
pub(crate) fn compact(schema: serde_json::Value) -> serde_json::Value {
    let mut schema = match schema {
        serde_json::Value::Bool(true) => serde_json::json!({}),
        s => s,
    };
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}
