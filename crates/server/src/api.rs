//! The OpenAI wire format: request parsing and validation, the RWKV chat rendering, response
//! and stream-chunk bodies, and errors.
//!
//! Requests are parsed field by field from a JSON object rather than through one derived
//! struct, so that an error names the offending field in `param` as OpenAI's does, and so that
//! fields this server does not know (clients send many) are ignored instead of rejected.

use crate::grammar::Constraint;
use crate::tools::{Call, Tool, ToolChoice};
use rwkv_core::session::Finish;
use serde::Serialize;
use serde_json::{json, Map, Value};

/// An error in OpenAI's format: `{"error":{"message","type","param","code"}}` with an HTTP
/// status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's error type, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// An error with any status and type.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// The JSON body, fields in OpenAI's order.
    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        to_json(&Outer {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
    }
}

/// Sampling and stopping parameters shared by both endpoints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    /// `max_tokens` (or chat's `max_completion_tokens`); `None` uses the endpoint's default.
    pub max_tokens: Option<u64>,
    /// `temperature` in [0, 2], default 1.
    pub temperature: f32,
    /// `top_p` in [0, 1], default 1.
    pub top_p: f32,
    /// `presence_penalty` in [-2, 2], default 0.
    pub presence_penalty: f32,
    /// `frequency_penalty` in [-2, 2], default 0.
    pub frequency_penalty: f32,
    /// `stop`: up to 4 non-empty strings.
    pub stop: Vec<String>,
    /// `seed` for reproducible sampling.
    pub seed: Option<u64>,
    /// `stream`: answer with server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// `logit_bias`: added to a token's logit before sampling; -100 bans the token.
    pub logit_bias: Vec<(u32, f32)>,
    /// `n`: choices per prompt, 1 to [`MAX_N`].
    pub n: usize,
    /// Log-probabilities of the generated tokens with this many alternatives (chat:
    /// `logprobs: true` and `top_logprobs`; completions: `logprobs: k`), at most
    /// [`MAX_TOP_LOGPROBS`].
    pub logprobs: Option<usize>,
    /// `response_format` (JSON) or `grammar` (Lark, regex): what the output must follow.
    pub constraint: Option<Constraint>,
    /// `state`: the name of a `--state-dir` state to read the prompt from.
    pub state: Option<String>,
}

impl Params {
    /// The request field that set [`Params::constraint`].
    pub fn constraint_field(&self) -> &'static str {
        match self.constraint {
            Some(Constraint::Lark(_) | Constraint::Regex(_)) => "grammar",
            Some(Constraint::Tools(_)) => "tools",
            _ => "response_format",
        }
    }
}

/// Most choices per prompt (`n`): each is a sequence in the engine's batch.
pub const MAX_N: u64 = 16;

/// Most alternatives per token in `logprobs` (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 64;

/// A completions prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text to tokenize.
    Text(String),
    /// Token ids, as OpenAI accepts them.
    Tokens(Vec<u32>),
}

/// A parsed `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The prompts (one or more; `n` choices each).
    pub prompts: Vec<Prompt>,
    /// `echo`: each choice's text starts with its prompt (and, with `logprobs`, so do its
    /// log-probabilities).
    pub echo: bool,
    /// Sampling and stopping.
    pub params: Params,
}

/// Who said a chat message, as the RWKV chat format names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `system` or `developer`: rendered as `System: ...`.
    System,
    /// `user`: rendered as `User: ...`.
    User,
    /// `assistant`: rendered as `Assistant: ...`.
    Assistant,
    /// `tool`: a function's result, rendered as `Tool: ...`.
    Tool,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Its author.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// The functions an assistant turn called.
    pub tool_calls: Vec<Call>,
}

/// A parsed `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// The functions the model may call.
    pub tools: Vec<Tool>,
    /// Whether and which it must call.
    pub tool_choice: ToolChoice,
    /// `parallel_tool_calls` (default true): several calls in one reply.
    pub parallel_tool_calls: bool,
    /// Sampling and stopping.
    pub params: Params,
}

/// Parses the body of a completions request.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let prompts = match f.get("prompt") {
        None => return Err(ApiError::invalid("'prompt' is required", Some("prompt"))),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(items)) => parse_prompt_array(items, "prompt")?,
        Some(_) => return Err(bad_prompt("prompt")),
    };
    if matches!(f.get("suffix"), Some(Value::String(s)) if !s.is_empty()) {
        return Err(ApiError::invalid(
            "'suffix' is not supported",
            Some("suffix"),
        ));
    }
    let echo = f.bool("echo")?;
    let mut params = parse_params(&f, None)?;
    params.logprobs = match f.get("logprobs") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= MAX_TOP_LOGPROBS => Some(k as usize),
            _ => {
                return Err(ApiError::invalid(
                    format!("'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}"),
                    Some("logprobs"),
                ))
            }
        },
    };
    // best_of: the choices to sample of which n are returned; only best_of = n is served.
    if let Some(b) = f.uint("best_of")? {
        if b != params.n as u64 {
            return Err(ApiError::invalid(
                format!(
                    "'best_of' is {b}, but only best_of = n ({}) is supported",
                    params.n
                ),
                Some("best_of"),
            ));
        }
    }
    Ok(CompletionRequest {
        prompts,
        echo,
        params,
    })
}

/// Parses the body of a chat completions request.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let Some(list) = f.get("messages") else {
        return Err(ApiError::invalid(
            "'messages' is required",
            Some("messages"),
        ));
    };
    let Value::Array(list) = list else {
        return Err(ApiError::invalid(
            "'messages' must be an array",
            Some("messages"),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "'messages' must hold at least one message",
            Some("messages"),
        ));
    }
    let messages = list
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    if matches!(f.get("functions"), Some(Value::Array(a)) if !a.is_empty()) {
        return Err(ApiError::invalid(
            "'functions' (the old form of tools) is not supported: use 'tools'",
            Some("functions"),
        ));
    }
    let tools = parse_tools(&f)?;
    let tool_choice = parse_tool_choice(&f, &tools)?;
    let mut params = parse_params(&f, Some("max_completion_tokens"))?;
    let top = f.uint("top_logprobs")?;
    params.logprobs = match (f.bool("logprobs")?, top) {
        (_, Some(k)) if k > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                format!("'top_logprobs' is {k}, more than {MAX_TOP_LOGPROBS}"),
                Some("top_logprobs"),
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "'top_logprobs' needs 'logprobs': true",
                Some("top_logprobs"),
            ))
        }
        (false, None) => None,
    };
    if !tools.is_empty() && tool_choice != ToolChoice::None && params.constraint.is_some() {
        return Err(ApiError::invalid(
            "'tools' cannot be combined with a 'response_format' or 'grammar'",
            Some("tools"),
        ));
    }
    let parallel_tool_calls = match f.get("parallel_tool_calls") {
        None => true,
        Some(_) => f.bool("parallel_tool_calls")?,
    };
    Ok(ChatRequest {
        messages,
        tools,
        tool_choice,
        parallel_tool_calls,
        params,
    })
}

/// Parses a `POST /tokenize` body: `{"prompt": "…"}` or `{"messages": […]}` (rendered as
/// the chat endpoint renders them); returns the text segments to tokenize. Special tokens are
/// never added, so `add_special_tokens` is accepted and has no effect.
pub fn parse_tokenize(body: &[u8]) -> Result<Vec<String>, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    f.bool("add_special_tokens")?;
    match (f.get("prompt"), f.get("messages")) {
        (Some(Value::String(s)), None) => Ok(vec![s.clone()]),
        (None, Some(Value::Array(list))) if !list.is_empty() => {
            let messages = list
                .iter()
                .enumerate()
                .map(|(i, m)| parse_message(i, m))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(chat_segments(&messages))
        }
        (None, Some(_)) => Err(ApiError::invalid(
            "'messages' must be a non-empty array",
            Some("messages"),
        )),
        (Some(_), None) => Err(ApiError::invalid(
            "'prompt' must be a string",
            Some("prompt"),
        )),
        _ => Err(ApiError::invalid(
            "give either 'prompt' or 'messages'",
            Some("prompt"),
        )),
    }
}

/// Parses a `POST /detokenize` body: `{"tokens": [id, …]}`.
pub fn parse_detokenize(body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let obj = parse_object(body)?;
    match Fields(&obj).get("tokens") {
        Some(Value::Array(ids)) => token_ids(ids).ok_or_else(|| {
            ApiError::invalid("'tokens' must be an array of token ids", Some("tokens"))
        }),
        _ => Err(ApiError::invalid(
            "'tokens' (an array of token ids) is required",
            Some("tokens"),
        )),
    }
}

/// `tools`: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
fn parse_tools(f: &Fields<'_>) -> Result<Vec<Tool>, ApiError> {
    let list = match f.get("tools") {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("'tools' must be an array", Some("tools"))),
    };
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        let bad = |what: &str| ApiError::invalid(format!("{param}: {what}"), Some(&param));
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("'type' must be \"function\""));
        }
        let func = t
            .get("function")
            .ok_or_else(|| bad("'function' is required"))?;
        let name = func
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| {
                (1..=64).contains(&n.len())
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .ok_or_else(|| bad("'function.name' must be 1 to 64 of a-z, A-Z, 0-9, _ and -"))?;
        if tools.iter().any(|t| t.name == name) {
            return Err(bad(&format!("the function '{name}' is offered twice")));
        }
        let parameters = match func.get("parameters") {
            None | Some(Value::Null) => serde_json::json!({"type": "object"}),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => return Err(bad("'function.parameters' must be a JSON schema object")),
        };
        tools.push(Tool {
            name: name.to_string(),
            description: match func.get("description") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(d)) => d.clone(),
                Some(_) => return Err(bad("'function.description' must be a string")),
            },
            parameters,
        });
    }
    Ok(tools)
}

/// `tool_choice`: `none`, `auto` (the default with tools), `required`, or `{"type":
/// "function", "function": {"name"}}` naming an offered function.
fn parse_tool_choice(f: &Fields<'_>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    let p = "tool_choice";
    let choice = match f.get(p) {
        None => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(ApiError::invalid(
                    "'tool_choice' must be none, auto, required or a named function",
                    Some(p),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "'tool_choice' must be {\"type\": \"function\", \"function\": \
                         {\"name\": …}}",
                        Some(p),
                    )
                })?;
            ToolChoice::Named(name.to_string())
        }
    };
    let needs_tools = matches!(choice, ToolChoice::Required | ToolChoice::Named(_));
    if needs_tools && tools.is_empty() {
        return Err(ApiError::invalid("'tool_choice' needs 'tools'", Some(p)));
    }
    if let ToolChoice::Named(n) = &choice {
        if !tools.iter().any(|t| &t.name == n) {
            return Err(ApiError::invalid(
                format!("'tool_choice' names '{n}', which is not among the tools"),
                Some(p),
            ));
        }
    }
    Ok(choice)
}

/// Renders a conversation in the RWKV chat format, one segment per message plus the final
/// `Assistant:` cue. Each segment is tokenized on its own, so that two conversations that share
/// their first messages share their first tokens exactly (and with them the cached states).
///
/// A single user message renders as [`rwkv_core::session::chat_turn`] does, so the server prompts
/// like `rwkv chat`.
pub fn chat_segments(messages: &[Message]) -> Vec<String> {
    let mut out: Vec<String> = messages
        .iter()
        .map(|m| {
            let name = match m.role {
                Role::System => "System",
                Role::User => "User",
                Role::Assistant => "Assistant",
                Role::Tool => "Tool",
            };
            let calls = crate::tools::render_calls(&m.tool_calls);
            let text = normalize(&m.content);
            let sep = if text.is_empty() || calls.is_empty() {
                ""
            } else {
                " "
            };
            format!("{name}: {text}{sep}{calls}\n\n")
        })
        .collect();
    out.push("Assistant:".to_string());
    out
}

/// Blank lines inside a message would read as the end of a turn, so they are collapsed, as
/// `chat_turn` and the official chat demo do.
fn normalize(msg: &str) -> String {
    let mut msg = msg.replace("\r\n", "\n").trim().to_string();
    while msg.contains("\n\n") {
        msg = msg.replace("\n\n", "\n");
    }
    msg
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        // `model` is ignored (one model is served) but must still be what it claims to be.
        Ok(Value::Object(m))
            if !matches!(m.get("model"), None | Some(Value::Null | Value::String(_))) =>
        {
            Err(ApiError::invalid("'model' must be a string", Some("model")))
        }
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(ApiError::invalid(
            format!("the request body is not valid JSON: {e}"),
            None,
        )),
    }
}

fn bad_prompt(field: &str) -> ApiError {
    ApiError::invalid(
        format!(
            "'{field}' must be a string, an array of strings, an array of token ids, or an \
             array of arrays of token ids"
        ),
        Some(field),
    )
}

/// `[string, …]`, `[id, …]` (one tokenized prompt) or `[[id, …], …]`, as field `field`.
fn parse_prompt_array(items: &[Value], field: &str) -> Result<Vec<Prompt>, ApiError> {
    let bad = || bad_prompt(field);
    let prompts = if items.iter().all(Value::is_number) {
        vec![Prompt::Tokens(token_ids(items).ok_or_else(bad)?)]
    } else {
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(ids) => token_ids(ids).map(Prompt::Tokens).ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            format!("'{field}' must hold 1 to {MAX_PROMPTS} items"),
            Some(field),
        ));
    }
    Ok(prompts)
}

/// A parsed `POST /v1/embeddings` body.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequest {
    /// The texts (or token ids) to embed.
    pub inputs: Vec<Prompt>,
    /// `encoding_format: "base64"`: each vector as the base64 of its little-endian f32s.
    pub base64: bool,
}

/// Parses the body of an embeddings request; `dimensions`, when given, must be the model's
/// width `width` (the vectors are not truncatable).
pub fn parse_embeddings(body: &[u8], width: usize) -> Result<EmbeddingRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let inputs = match f.get("input") {
        None => return Err(ApiError::invalid("'input' is required", Some("input"))),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(items)) => parse_prompt_array(items, "input")?,
        Some(_) => return Err(bad_prompt("input")),
    };
    let base64 = match f.get("encoding_format") {
        None => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "'encoding_format' must be \"float\" or \"base64\"",
                Some("encoding_format"),
            ))
        }
    };
    if let Some(d) = f.uint("dimensions")? {
        if d != width as u64 {
            return Err(ApiError::invalid(
                format!("'dimensions' is {d}; this model's embeddings have {width}"),
                Some("dimensions"),
            ));
        }
    }
    Ok(EmbeddingRequest { inputs, base64 })
}

/// The embeddings response: `{"object": "list", "data": [{"object": "embedding", "index",
/// "embedding"}], "model", "usage"}`.
pub fn embeddings(model: &str, vectors: &[Vec<f32>], base64: bool, prompt_tokens: usize) -> String {
    use base64::Engine as _;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
    .to_string()
}

fn token_ids(ids: &[Value]) -> Option<Vec<u32>> {
    ids.iter()
        .map(|v| as_uint(v).and_then(|x| u32::try_from(x).ok()))
        .collect()
}

/// A non-negative integer, also when written with a zero fraction (`5.0` is the integer 5 in
/// JSON Schema, and some clients write numbers so).
fn as_uint(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|x| x.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(x))
            .map(|x| x as u64)
    })
}

fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(m) = m else {
        return Err(ApiError::invalid(
            format!("{param} must be an object"),
            Some(&param),
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => match r.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "{param}.role '{other}' is not supported (use system, user, assistant \
                         or tool)"
                    ),
                    Some(&format!("{param}.role")),
                ))
            }
        },
        _ => {
            return Err(ApiError::invalid(
                format!("{param}.role must be a string"),
                Some(&format!("{param}.role")),
            ))
        }
    };
    let cparam = format!("{param}.content");
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        // An assistant turn that only called tools has no content.
        None | Some(Value::Null) if role == Role::Assistant => String::new(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{cparam}: only text parts are supported"),
                            Some(&cparam),
                        ))
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                format!("{cparam} must be a string or an array of text parts"),
                Some(&cparam),
            ))
        }
    };
    if !matches!(
        m.get("tool_call_id"),
        None | Some(Value::Null | Value::String(_))
    ) {
        let p = format!("{param}.tool_call_id");
        return Err(ApiError::invalid(format!("{p} must be a string"), Some(&p)));
    }
    let mut tool_calls = Vec::new();
    if let Some(list) = m.get("tool_calls").filter(|v| !v.is_null()) {
        let tparam = format!("{param}.tool_calls");
        let bad = || {
            ApiError::invalid(
                format!(
                    "{tparam} must be an array of {{\"function\": {{\"name\", \"arguments\"}}}}"
                ),
                Some(&tparam),
            )
        };
        for c in list.as_array().ok_or_else(bad)? {
            let func = c.get("function").ok_or_else(bad)?;
            let name = func.get("name").and_then(Value::as_str).ok_or_else(bad)?;
            // Arguments come as JSON text; written back compactly, they read as the model
            // writes them.
            let arguments = match func.get("arguments") {
                Some(Value::String(a)) => serde_json::from_str::<Value>(a)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| a.clone()),
                Some(v) if v.is_object() => v.to_string(),
                _ => return Err(bad()),
            };
            tool_calls.push(Call {
                name: name.to_string(),
                arguments,
            });
        }
    }
    Ok(Message {
        role,
        content,
        tool_calls,
    })
}

fn parse_params(f: &Fields<'_>, max_alias: Option<&str>) -> Result<Params, ApiError> {
    let n = match f.uint("n")? {
        None => 1,
        Some(n) if (1..=MAX_N).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                format!("'n' is {n}; it must be from 1 to {MAX_N}"),
                Some("n"),
            ))
        }
    };
    let mut max_tokens = f.uint("max_tokens")?;
    if let Some(alias) = max_alias {
        max_tokens = max_tokens.or(f.uint(alias)?);
    }
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid(
                    "'stop' must be a string or an array of strings",
                    Some("stop"),
                )
            })?,
        Some(_) => {
            return Err(ApiError::invalid(
                "'stop' must be a string or an array of strings",
                Some("stop"),
            ))
        }
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            "'stop' holds at most 4 sequences",
            Some("stop"),
        ));
    }
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let seed = match f.get("seed") {
        None => None,
        // Any integer is a valid seed; negative ones keep their bits.
        Some(v) => Some(
            as_uint(v)
                .or(v.as_i64().map(|x| x as u64))
                .or(v
                    .as_f64()
                    .filter(|x| x.fract() == 0.0 && *x >= i64::MIN as f64)
                    .map(|x| x as i64 as u64))
                .ok_or_else(|| ApiError::invalid("'seed' must be an integer", Some("seed")))?,
        ),
    };
    let stream = f.bool("stream")?;
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage").map_err(|_| {
            ApiError::invalid(
                "'stream_options.include_usage' must be a boolean",
                Some("stream_options.include_usage"),
            )
        })?,
        Some(_) => {
            return Err(ApiError::invalid(
                "'stream_options' must be an object",
                Some("stream_options"),
            ))
        }
    };
    let logit_bias = match f.get("logit_bias") {
        None => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match (k.parse::<u32>(), v.as_f64()) {
                (Ok(id), Some(b)) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(ApiError::invalid(
                    format!(
                        "'logit_bias' maps token ids to numbers in [-100, 100]; got {k:?}: {v}"
                    ),
                    Some("logit_bias"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "'logit_bias' must be an object",
                Some("logit_bias"),
            ))
        }
    };
    Ok(Params {
        logit_bias,
        max_tokens,
        temperature: f.number("temperature", 1.0, 0.0, 2.0)?,
        top_p: f.number("top_p", 1.0, 0.0, 1.0)?,
        presence_penalty: f.number("presence_penalty", 0.0, -2.0, 2.0)?,
        frequency_penalty: f.number("frequency_penalty", 0.0, -2.0, 2.0)?,
        stop,
        seed,
        stream,
        include_usage,
        n,
        logprobs: None,
        constraint: parse_constraint(f)?,
        state: match f.get("state") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(ApiError::invalid(
                    "'state' must be the name of a state (GET /v1/states lists them)",
                    Some("state"),
                ))
            }
        },
    })
}

/// `response_format` (`text`, `json_object`, `json_schema` with `json_schema.schema`) and
/// `grammar` (`{"type": "lark", "lark": …}`, `{"type": "regex", "regex": …}`, or a Lark string).
fn parse_constraint(f: &Fields<'_>) -> Result<Option<Constraint>, ApiError> {
    let rf = "response_format";
    let json = match f.get(rf) {
        None => None,
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(Constraint::JsonObject),
            Some("json_schema") => {
                let field = "response_format.json_schema.schema";
                let schema = o
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| s.is_object() || s.is_boolean())
                    .ok_or_else(|| {
                        ApiError::invalid(format!("'{field}' (an object) is required"), Some(field))
                    })?;
                Some(Constraint::JsonSchema(schema.clone()))
            }
            _ => {
                return Err(ApiError::invalid(
                    "'response_format.type' must be text, json_object or json_schema",
                    Some("response_format.type"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "'response_format' must be an object",
                Some(rf),
            ))
        }
    };
    let grammar = match f.get("grammar") {
        None => None,
        Some(Value::String(g)) => Some(Constraint::Lark(g.clone())),
        Some(Value::Object(o)) => {
            let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
            match (
                o.get("type").and_then(Value::as_str),
                text("lark"),
                text("regex"),
            ) {
                (Some("lark"), Some(g), _) => Some(Constraint::Lark(g)),
                (Some("regex"), _, Some(r)) => Some(Constraint::Regex(r)),
                _ => {
                    return Err(ApiError::invalid(
                        "'grammar' must be {\"type\": \"lark\", \"lark\": …}, {\"type\": \
                         \"regex\", \"regex\": …} or a Lark string",
                        Some("grammar"),
                    ))
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "'grammar' must be an object or a string",
                Some("grammar"),
            ))
        }
    };
    match (json, grammar) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "give either a JSON 'response_format' or a 'grammar', not both",
            Some("grammar"),
        )),
        (j, g) => Ok(j.or(g)),
    }
}

/// Typed access to the fields of a request object; `null` counts as absent, as in OpenAI's API.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn number(&self, k: &str, default: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if (f64::from(lo)..=f64::from(hi)).contains(&x) => Ok(x as f32),
                Some(x) => Err(ApiError::invalid(
                    format!("'{k}' is {x}, but must be between {lo} and {hi}"),
                    Some(k),
                )),
                None => Err(ApiError::invalid(
                    format!("'{k}' must be a number"),
                    Some(k),
                )),
            },
        }
    }

    fn uint(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => as_uint(v).map(Some).ok_or_else(|| {
                ApiError::invalid(format!("'{k}' must be a non-negative integer"), Some(k))
            }),
        }
    }

    fn bool(&self, k: &str) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid(
                format!("'{k}' must be a boolean"),
                Some(k),
            )),
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// How many prompt tokens came from the prefix-state cache.
    pub prompt_tokens_details: PromptDetails,
}

/// The prompt-token breakdown of [`Usage`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptDetails {
    /// Prompt tokens whose state was taken from the cache.
    pub cached_tokens: usize,
}

impl Usage {
    /// Usage from the counts.
    pub fn new(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptDetails { cached_tokens },
        }
    }
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `chatcmpl-...` or `cmpl-...`.
    pub id: String,
    /// Unix time of the request.
    pub created: u64,
    /// The served model's name.
    pub model: String,
}

/// The OpenAI name of a finish reason. Generation cut short by a shutdown reports `length`,
/// the only standard reason that means "the text was truncated".
pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length | Finish::Cancelled => "length",
    }
}

/// One token as `logprobs` shows it: its text (invalid UTF-8 replaced) and its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    /// The text.
    pub text: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// One token's entry in a `logprobs` list: the token, its log-probability (`None` for a
/// prompt's first token, which nothing predicts) and the most likely tokens at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    /// The token.
    pub token: TokenText,
    /// Its log-probability.
    pub logprob: Option<f32>,
    /// The alternatives, most likely first.
    pub top: Vec<(TokenText, f32)>,
}

/// Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal":
/// null}`.
pub fn chat_logprobs(entries: &[LogprobEntry]) -> Value {
    let one = |t: &TokenText, lp: f32| json!({"token": t.text, "logprob": lp, "bytes": t.bytes});
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = one(&e.token, e.logprob.unwrap_or(0.0));
            v["top_logprobs"] = e.top.iter().map(|(t, lp)| one(t, *lp)).collect();
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The completions' `logprobs` object: parallel lists `tokens`, `token_logprobs`,
/// `top_logprobs` (a map from token text to log-probability, `null` where the log-probability
/// is) and `text_offset` (each token's character offset in the choice's text, counted from
/// `offset`).
pub fn completion_logprobs(entries: &[LogprobEntry], offset: usize) -> Value {
    let mut at = offset;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        tokens.push(json!(e.token.text));
        lps.push(json!(e.logprob));
        tops.push(match e.logprob {
            None => Value::Null,
            Some(_) => Value::Object(
                e.top
                    .iter()
                    .map(|(t, lp)| (t.text.clone(), json!(lp)))
                    .collect(),
            ),
        });
        offsets.push(json!(at));
        at += e.token.text.chars().count();
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// One choice of a response (or of a chunk).
#[derive(Debug, Clone, Copy)]
pub struct Choice<'a> {
    /// Its index.
    pub index: usize,
    /// Its text (a chunk's: the new text).
    pub text: &'a str,
    /// Why it ended (a chunk's: only on its last chunk).
    pub finish: Option<Finish>,
    /// Its `logprobs` object ([`chat_logprobs`] or [`completion_logprobs`]).
    pub logprobs: Option<&'a Value>,
    /// The functions the reply calls (chat): then `content` is null and the finish reason
    /// `tool_calls`.
    pub tool_calls: Option<&'a Value>,
}

impl Choice<'_> {
    /// The OpenAI finish reason.
    fn finish_reason(&self) -> Option<&'static str> {
        match (self.finish, self.tool_calls) {
            (Some(Finish::Stop), Some(_)) => Some("tool_calls"),
            (f, _) => f.map(finish_reason),
        }
    }
}

#[derive(Serialize)]
struct ChatMessageOut<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a Value>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: usize,
    message: ChatMessageOut<'a>,
    logprobs: Option<&'a Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<()>,
    choices: Vec<ChatChoice<'a>>,
    usage: Usage,
}

/// A whole `chat.completion` body.
pub fn chat_completion(meta: &Meta, choices: &[Choice<'_>], usage: Usage) -> String {
    to_json(&ChatCompletion {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        system_fingerprint: None,
        choices: choices
            .iter()
            .map(|c| ChatChoice {
                index: c.index,
                message: ChatMessageOut {
                    role: "assistant",
                    content: c.tool_calls.is_none().then_some(c.text),
                    tool_calls: c.tool_calls,
                },
                logprobs: c.logprobs,
                finish_reason: c.finish_reason(),
            })
            .collect(),
        usage,
    })
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a Value>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: usize,
    delta: Delta<'a>,
    logprobs: Option<&'a Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<()>,
    choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

/// What a chat stream chunk carries.
#[derive(Debug, Clone, Copy)]
pub enum ChatPiece<'a> {
    /// A choice's first chunk: the assistant role and empty content.
    Role(usize),
    /// Some generated text of a choice (with its tokens' log-probabilities, if asked for);
    /// with `finish`, the choice's last chunk.
    Text(Choice<'a>),
    /// After every choice's finish chunk when usage was asked for: no choices, the usage.
    Usage(Usage),
}

/// One `chat.completion.chunk`. With `include_usage`, every chunk carries `"usage": null`
/// except the usage chunk, as OpenAI's do.
pub fn chat_chunk(meta: &Meta, piece: ChatPiece<'_>, include_usage: bool) -> String {
    let (choices, usage) = match piece {
        ChatPiece::Role(index) => (
            vec![ChunkChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        ),
        ChatPiece::Text(c) => (
            vec![ChunkChoice {
                index: c.index,
                delta: Delta {
                    role: None,
                    // The finish chunk has an empty delta (or the whole tool calls).
                    content: (c.tool_calls.is_none() && (c.finish.is_none() || !c.text.is_empty()))
                        .then_some(c.text),
                    tool_calls: c.tool_calls,
                },
                logprobs: c.logprobs,
                finish_reason: c.finish_reason(),
            }],
            None,
        ),
        ChatPiece::Usage(u) => (Vec::new(), Some(u)),
    };
    to_json(&ChatChunk {
        id: &meta.id,
        object: "chat.completion.chunk",
        created: meta.created,
        model: &meta.model,
        system_fingerprint: None,
        choices,
        usage: include_usage.then_some(usage),
    })
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: usize,
    logprobs: Option<&'a Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<()>,
    choices: Vec<TextChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

/// A whole `text_completion` body.
pub fn completion(meta: &Meta, choices: &[Choice<'_>], usage: Usage) -> String {
    text_completion(meta, choices, Some(Some(usage)))
}

/// One streamed `text_completion` chunk: some text of a choice, or (with `finish`) its last
/// chunk.
pub fn completion_chunk(meta: &Meta, choice: Choice<'_>, include_usage: bool) -> String {
    text_completion(meta, &[choice], include_usage.then_some(None))
}

/// The usage chunk that ends a completions stream when usage was asked for.
pub fn completion_usage_chunk(meta: &Meta, usage: Usage) -> String {
    text_completion(meta, &[], Some(Some(usage)))
}

fn text_completion(meta: &Meta, choices: &[Choice<'_>], usage: Option<Option<Usage>>) -> String {
    to_json(&TextCompletion {
        id: &meta.id,
        object: "text_completion",
        created: meta.created,
        model: &meta.model,
        system_fingerprint: None,
        choices: choices
            .iter()
            .map(|c| TextChoice {
                text: c.text,
                index: c.index,
                logprobs: c.logprobs,
                finish_reason: c.finish_reason(),
            })
            .collect(),
        usage,
    })
}

/// Serialising these plain structs cannot fail; a failure would be a bug, reported as JSON
/// rather than a panic.
fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v)
        .unwrap_or_else(|e| format!(r#"{{"error":{{"message":"serialisation failed: {e}"}}}}"#))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rwkv_core::session::chat_turn;

    #[test]
    fn one_user_message_renders_like_chat_turn() {
        let m = [Message {
            role: Role::User,
            content: " Hi\n\n\nthere \r\n".into(),
            tool_calls: Vec::new(),
        }];
        assert_eq!(chat_segments(&m).concat(), chat_turn(" Hi\n\n\nthere \r\n"));
    }

    #[test]
    fn conversation_rendering() {
        let m = [
            Message {
                role: Role::System,
                content: "Be brief.".into(),
                tool_calls: Vec::new(),
            },
            Message {
                role: Role::User,
                content: "Hi".into(),
                tool_calls: Vec::new(),
            },
            Message {
                role: Role::Assistant,
                content: "Hello!".into(),
                tool_calls: Vec::new(),
            },
            Message {
                role: Role::User,
                content: "Bye".into(),
                tool_calls: Vec::new(),
            },
        ];
        assert_eq!(
            chat_segments(&m).concat(),
            "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant:"
        );
    }

    #[test]
    fn field_errors_name_the_field() {
        let e = parse_completion(br#"{"prompt":"x","temperature":"hot"}"#).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("temperature")));
        let e = parse_completion(br#"{"prompt":"x","n":0}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = parse_completion(br#"{"prompt":"x","n":17}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = parse_completion(br#"{"prompt":"x","logprobs":21}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logprobs"));
        let e = parse_completion(br#"{"prompt":"x","n":2,"best_of":3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("best_of"));
        let e = parse_completion(br#"{"prompt":[[1],"a",{}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let many = format!(r#"{{"prompt":{:?}}}"#, vec!["a"; MAX_PROMPTS + 1]);
        let e = parse_completion(many.as_bytes()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let msg = r#""messages":[{"role":"user","content":"x"}]"#;
        let e = parse_chat(format!(r#"{{{msg},"top_logprobs":2}}"#).as_bytes()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = parse_chat(format!(r#"{{{msg},"logprobs":true,"top_logprobs":21}}"#).as_bytes())
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = parse_chat(br#"{"messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e =
            parse_chat(br#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        assert!(parse_chat(b"{not json")
            .unwrap_err()
            .message
            .contains("JSON"));
        assert!(parse_chat(b"[]").is_err());
        let e = parse_completion(br#"{"prompt":"x","logit_bias":{"a":1}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logit_bias"));
    }

    #[test]
    fn accepted_shapes() {
        let r = parse_completion(
            br#"{"prompt":[1,2,3],"stop":"x","seed":-1,"n":null,"logit_bias":{"7":-100}}"#,
        )
        .unwrap();
        assert_eq!(r.params.logit_bias, vec![(7, -100.0)]);
        assert_eq!(r.prompts, vec![Prompt::Tokens(vec![1, 2, 3])]);
        assert_eq!(r.params.stop, vec!["x".to_string()]);
        assert_eq!(r.params.seed, Some(u64::MAX));
        assert_eq!((r.params.temperature, r.params.top_p), (1.0, 1.0));
        let r = parse_completion(br#"{"prompt":["hi"],"max_tokens":5,"stream":true}"#).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Text("hi".into())]);
        assert_eq!((r.params.max_tokens, r.params.stream), (Some(5), true));
        let r = parse_completion(
            br#"{"prompt":["a",[5,6]],"echo":true,"logprobs":3,"n":2,"best_of":2,"max_tokens":0}"#,
        )
        .unwrap();
        let want = vec![Prompt::Text("a".into()), Prompt::Tokens(vec![5, 6])];
        assert_eq!((r.prompts, r.echo), (want, true));
        assert_eq!((r.params.logprobs, r.params.n), (Some(3), 2));
        assert_eq!(r.params.max_tokens, Some(0));
        let r = parse_completion(br#"{"prompt":[[1,2],[3]]}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
        let r = parse_chat(
            br#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":5}"#,
        )
        .unwrap();
        assert_eq!(r.params.logprobs, Some(5));
        let r = parse_chat(
            br#"{"messages":[{"role":"developer","content":[{"type":"text","text":"a"}]}],
                 "max_completion_tokens":7,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].role, Role::System);
        assert_eq!(
            (r.params.max_tokens, r.params.include_usage),
            (Some(7), true)
        );
    }

    #[test]
    fn chunk_shapes() {
        let meta = Meta {
            id: "chatcmpl-1".into(),
            created: 5,
            model: "m".into(),
        };
        let v: Value = serde_json::from_str(&chat_chunk(&meta, ChatPiece::Role(1), false)).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v["choices"][0]["index"], 1);
        assert!(v.get("usage").is_none());
        let last = Choice {
            index: 0,
            text: "",
            finish: Some(Finish::Stop),
            logprobs: None,
            tool_calls: None,
        };
        let v: Value =
            serde_json::from_str(&chat_chunk(&meta, ChatPiece::Text(last), true)).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["choices"][0]["delta"].get("content").is_none());
        assert!(v["usage"].is_null() && v.get("usage").is_some());
        let u = Usage::new(3, 1, 4);
        let v: Value = serde_json::from_str(&completion_usage_chunk(&meta, u)).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 7);
        assert_eq!(v["choices"].as_array().unwrap().len(), 0);
    }

    fn tok(t: &str) -> TokenText {
        TokenText {
            text: t.into(),
            bytes: t.as_bytes().to_vec(),
        }
    }

    #[test]
    fn logprob_shapes() {
        let entries = [
            LogprobEntry {
                token: tok("He"),
                logprob: None,
                top: vec![],
            },
            LogprobEntry {
                token: tok("llo"),
                logprob: Some(-0.5),
                top: vec![(tok("llo"), -0.5), (tok("y"), -1.5)],
            },
        ];
        let v = completion_logprobs(&entries, 0);
        assert_eq!(v["tokens"], json!(["He", "llo"]));
        assert_eq!(v["token_logprobs"], json!([null, -0.5]));
        assert_eq!(v["top_logprobs"], json!([null, {"llo": -0.5, "y": -1.5}]));
        assert_eq!(v["text_offset"], json!([0, 2]));
        let v = chat_logprobs(&entries[1..]);
        let c = &v["content"][0];
        assert_eq!((&c["token"], &c["logprob"]), (&json!("llo"), &json!(-0.5)));
        assert_eq!(c["bytes"], json!([108, 108, 111]));
        assert_eq!(c["top_logprobs"][1]["token"], "y");
        assert!(v["refusal"].is_null());
    }

    /// What the OpenAPI description promises (schemathesis checks the server against it):
    /// a field of the wrong type is refused, an integer written with a zero fraction is one.
    #[test]
    fn fields_hold_to_the_openapi_description() {
        let refused = |body: &str, param: &str| {
            let e = parse_chat(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        };
        refused(
            r#"{"model":{},"messages":[{"role":"user","content":"x"}]}"#,
            "model",
        );
        refused(
            r#"{"messages":[{"role":"tool","content":"x","tool_call_id":{}}]}"#,
            "messages[0].tool_call_id",
        );
        refused(
            r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","description":{}}}]}"#,
            "tools[0]",
        );
        let r = parse_completion(br#"{"prompt":[1.0,2],"max_tokens":3.0,"seed":-4.0}"#).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Tokens(vec![1, 2])]);
        assert_eq!(r.params.max_tokens, Some(3));
        assert_eq!(r.params.seed, Some(-4i64 as u64));
        assert!(parse_completion(br#"{"prompt":[1.5]}"#).is_err());
        assert!(parse_completion(br#"{"prompt":"x","model":null}"#).is_ok());
    }
}
