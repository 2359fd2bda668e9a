//! `rwkv serve`: an OpenAI-compatible HTTP server with continuous batching and a prefix-state
//! cache.
//!
//! The HTTP side (axum on a single-threaded tokio runtime) parses and validates requests,
//! tokenizes prompts and turns engine events into JSON bodies or server-sent events. All model
//! work happens on the [`engine`] thread, which owns the model and advances every active
//! request with one batched forward pass per step, starting each prompt from the longest
//! prefix held in the [`cache`].
//!
//! Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /health`, `GET /metrics` (Prometheus text format).

pub mod api;
pub mod cache;
pub mod engine;
pub mod metrics;

use api::{ApiError, ChatPiece, Meta, Params, Prompt, Usage};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use engine::{Engine, EngineConfig, Event, Job, SubmitError};
use metrics::Metrics;
use rwkv_core::error::{Error, Result};
use rwkv_core::model::Model;
use rwkv_core::sample::SamplerConfig;
use rwkv_core::tokenizer::{self, Tokenizer};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Largest request body accepted (413 above it).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Completions answer this many tokens when the request gives no `max_tokens` (OpenAI's
/// default for that endpoint).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// Besides message ends, prompt states are cached every this many tokens, so that long
/// prompts sharing a beginning (a document, a long system text) share its state.
pub const CACHE_STRIDE: usize = 1024;

/// The settings of a server (with the `clap` feature, also the flags of `rwkv serve`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ServeConfig {
    /// Checkpoint file (.pth or .safetensors); default: the built-in tiny-Shakespeare model.
    #[cfg_attr(feature = "clap", arg(long, short = 'm'))]
    pub model: Option<PathBuf>,
    /// Tokenizer: world, bytes, or a Hugging Face tokenizer.json (default: chosen from the
    /// model's vocabulary size).
    #[cfg_attr(feature = "clap", arg(long))]
    pub tokenizer: Option<String>,
    /// Address to listen on.
    #[cfg_attr(feature = "clap", arg(long, default_value = "127.0.0.1"))]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 8000))]
    pub port: u16,
    /// Most requests generating at once (one batched forward pass advances all of them).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 32))]
    pub max_batch: usize,
    /// Memory for cached prompt-prefix states, in MiB (0 disables the cache).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 512))]
    pub cache_mb: usize,
    /// Longest prompt accepted, in tokens.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 16384))]
    pub max_prompt_tokens: usize,
    /// Largest max_tokens a request may ask for (also the default for chat).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 4096))]
    pub max_tokens_limit: usize,
    /// Most requests waiting for a batch slot; more are answered with 429.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 64))]
    pub queue: usize,
    /// Worker threads of the model (default: all cores).
    #[cfg_attr(feature = "clap", arg(long))]
    pub threads: Option<usize>,
    /// Weight format at load: f32, f16, bf16, int8 or q4 (default: as stored).
    #[cfg_attr(feature = "clap", arg(long))]
    pub quant: Option<String>,
    /// Seconds that in-flight requests may still run after SIGTERM or Ctrl-C; then their
    /// streams are ended (finish reason "length").
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 10.0))]
    pub shutdown_grace: f64,
}

/// Loads the model and serves until SIGTERM or Ctrl-C, then drains and returns.
pub fn serve(args: ServeConfig) -> Result<()> {
    if args.max_batch == 0 || args.queue == 0 {
        return Err(Error::bad("max-batch and queue must be at least 1"));
    }
    if !(args.shutdown_grace >= 0.0 && args.shutdown_grace <= 86_400.0) {
        return Err(Error::bad(
            "shutdown-grace must be between 0 and 86400 seconds",
        ));
    }
    rwkv_core::kernels::set_threads(args.threads)?;
    let quant = args.quant.as_deref().map(str::parse).transpose()?;
    let path = match &args.model {
        Some(p) => p.clone(),
        None => rwkv_core::default_model()?,
    };
    let model = Model::load_as(&path, quant)?;
    let tok: Arc<dyn Tokenizer> = match &args.tokenizer {
        Some(spec) => tokenizer::load(spec)?.into(),
        None => tokenizer::for_vocab(model.vocab_size())
            .map_err(|e| Error::bad(format!("{}: {e}", path.display())))?
            .into(),
    };
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rwkv".into());
    let vocab = model.vocab_size();
    let metrics = Arc::new(Metrics::default());
    let cfg = EngineConfig {
        max_batch: args.max_batch,
        queue: args.queue,
        cache_bytes: args.cache_mb.saturating_mul(1 << 20),
    };
    let engine = Engine::start(model, tok.clone(), cfg, metrics.clone())
        .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?;
    let app = App(Arc::new(AppState {
        engine,
        tokenizer: tok,
        metrics,
        model: name,
        vocab,
        created: unix_now(),
        max_prompt_tokens: args.max_prompt_tokens,
        max_tokens_limit: args.max_tokens_limit,
    }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the runtime: {e}")))?;
    let grace = Duration::from_secs_f64(args.shutdown_grace);
    let res = rt.block_on(run(app.clone(), &args, grace));
    // Tasks still running here are connections that outlived the grace period.
    rt.shutdown_timeout(Duration::from_secs(1));
    // Also when the server failed (e.g. the port was taken) and no signal stopped the engine.
    app.0.engine.shutdown(Instant::now());
    app.0.engine.join();
    res
}

async fn run(app: App, args: &ServeConfig, grace: Duration) -> Result<()> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::bad(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    eprintln!(
        "rwkv serve: listening on http://{local} (model {}, max batch {}, queue {}, cache {} MiB)",
        app.0.model, args.max_batch, args.queue, args.cache_mb
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal_app = app.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!(
            "rwkv serve: shutting down (in-flight requests have {:.1} s)",
            grace.as_secs_f64()
        );
        signal_app.0.engine.shutdown(Instant::now() + grace);
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|&s| s).await;
    };
    let server = axum::serve(listener, router(app))
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future();
    // The engine ends every stream by the deadline; a client that stops reading could still
    // hold its connection open, so the wait for connections to close is bounded too.
    let watchdog = async {
        stopped(stop_rx).await;
        tokio::time::sleep(grace + Duration::from_secs(5)).await;
    };
    tokio::select! {
        r = server => r.map_err(|e| Error::Internal(format!("server: {e}")))?,
        _ = watchdog => eprintln!("rwkv serve: closing connections still open after the grace period"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// What the handlers share.
struct AppState {
    engine: Engine,
    tokenizer: Arc<dyn Tokenizer>,
    metrics: Arc<Metrics>,
    model: String,
    vocab: usize,
    created: u64,
    max_prompt_tokens: usize,
    max_tokens_limit: usize,
}

#[derive(Clone)]
struct App(Arc<AppState>);

fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// The endpoint label of a path: route patterns only, so the metric's label set stays small.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
}

async fn count_requests(State(app): State<App>, req: Request, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let resp = next.run(req).await;
    app.0.metrics.request(endpoint, resp.status().as_u16());
    resp
}

fn json_response(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn error_response(e: ApiError) -> Response {
    json_response(e.status, e.body())
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error_response(
        ApiError::new(
            404,
            "invalid_request_error",
            format!("Unknown request URL: {method} {}", uri.path()),
        )
        .with_code("unknown_url"),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_response(ApiError::new(
        405,
        "invalid_request_error",
        format!("Method {method} is not allowed for {}", uri.path()),
    ))
}

async fn health(State(app): State<App>) -> Response {
    if !app.0.engine.is_alive() {
        json_response(503, r#"{"status":"engine stopped"}"#.into())
    } else if app.0.engine.is_shutting_down() {
        json_response(503, r#"{"status":"shutting down"}"#.into())
    } else {
        json_response(200, r#"{"status":"ok"}"#.into())
    }
}

async fn metrics_text(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.0.metrics.render(),
    )
        .into_response()
}

fn model_object(app: &App) -> serde_json::Value {
    serde_json::json!({
        "id": app.0.model,
        "object": "model",
        "created": app.0.created,
        "owned_by": "rwkv",
    })
}

async fn models(State(app): State<App>) -> Response {
    let body = serde_json::json!({"object": "list", "data": [model_object(&app)]});
    json_response(200, body.to_string())
}

async fn model_by_id(State(app): State<App>, UrlPath(id): UrlPath<String>) -> Response {
    if id == app.0.model {
        json_response(200, model_object(&app).to_string())
    } else {
        error_response(
            ApiError::new(
                404,
                "invalid_request_error",
                format!(
                    "The model '{id}' does not exist (this server serves '{}')",
                    app.0.model
                ),
            )
            .with_code("model_not_found"),
        )
    }
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    completions_inner(app, headers, body)
        .await
        .unwrap_or_else(error_response)
}

async fn chat_completions(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    chat_inner(app, headers, body)
        .await
        .unwrap_or_else(error_response)
}

async fn completions_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&headers, body).await?;
    let req = api::parse_completion(&body)?;
    let prompt = match req.prompt {
        Prompt::Text(t) => tokenize(&app, vec![t]).await?.0,
        // Checked against the vocabulary with every prompt in `App::job`.
        Prompt::Tokens(ids) => ids,
    };
    let boundaries = vec![prompt.len()];
    let job = app.job(
        prompt,
        boundaries,
        &req.params,
        DEFAULT_COMPLETION_TOKENS,
        &[],
        "prompt",
    )?;
    respond(app, job, req.params, Kind::Completion).await
}

async fn chat_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&headers, body).await?;
    let req = api::parse_chat(&body)?;
    let (prompt, ends) = tokenize(&app, api::chat_segments(&req.messages)).await?;
    // A reply ends where the model starts a new paragraph or a new turn.
    let job = app.job(
        prompt,
        ends,
        &req.params,
        app.0.max_tokens_limit,
        &["\n\n", "\nUser:"],
        "messages",
    )?;
    respond(app, job, req.params, Kind::Chat).await
}

/// Reads the body up to [`MAX_BODY_BYTES`]: 413 beyond, whether announced by Content-Length
/// or not.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
        )
        .with_code("request_too_large")
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}"), None))?;
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

/// Tokenizes text segments (off the async thread: a long prompt takes a while) and returns
/// their concatenated ids and the token position where each segment ends.
async fn tokenize(app: &App, segments: Vec<String>) -> Result<(Vec<u32>, Vec<usize>), ApiError> {
    let tok = app.0.tokenizer.clone();
    let res = tokio::task::spawn_blocking(move || {
        let mut ids = Vec::new();
        let mut ends = Vec::with_capacity(segments.len());
        for s in &segments {
            ids.extend(tok.encode(s)?);
            ends.push(ids.len());
        }
        Ok::<_, Error>((ids, ends))
    })
    .await
    .map_err(|e| ApiError::new(500, "server_error", format!("tokenizer failed: {e}")))?;
    res.map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}"), None))
}

impl App {
    /// Builds an engine job from a tokenized prompt and checks it against the limits.
    fn job(
        &self,
        mut prompt: Vec<u32>,
        mut boundaries: Vec<usize>,
        p: &Params,
        default_max: usize,
        extra_stops: &[&str],
        prompt_param: &str,
    ) -> Result<Job, ApiError> {
        let s = &self.0;
        if prompt.len() > s.max_prompt_tokens {
            return Err(ApiError::invalid(
                format!(
                    "the prompt has {} tokens, more than this server's limit of {}",
                    prompt.len(),
                    s.max_prompt_tokens
                ),
                Some(prompt_param),
            )
            .with_code("context_length_exceeded"));
        }
        if let Some(&(bad, _)) = p.logit_bias.iter().find(|(t, _)| *t as usize >= s.vocab) {
            return Err(ApiError::invalid(
                format!(
                    "logit_bias: token id {bad} is out of range (vocabulary size {})",
                    s.vocab
                ),
                Some("logit_bias"),
            ));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= s.vocab) {
            return Err(ApiError::invalid(
                format!(
                    "the prompt holds token id {bad}, outside the model's vocabulary of {}",
                    s.vocab
                ),
                Some(prompt_param),
            ));
        }
        let max_tokens = match p.max_tokens {
            None => default_max.min(s.max_tokens_limit),
            Some(n) if n > s.max_tokens_limit as u64 => {
                return Err(ApiError::invalid(
                    format!(
                        "max_tokens is {n}, more than this server's limit of {}",
                        s.max_tokens_limit
                    ),
                    Some("max_tokens"),
                ))
            }
            Some(n) => n as usize,
        };
        if prompt.is_empty() {
            // Nothing to condition on: start from the end-of-text token, as the models were
            // trained (and as OpenAI does for an empty prompt).
            prompt.push(0);
        }
        // Cache the state at every segment end and every CACHE_STRIDE tokens.
        boundaries.extend((1..=prompt.len() / CACHE_STRIDE).map(|k| k * CACHE_STRIDE));
        boundaries.push(prompt.len());
        boundaries.retain(|&b| b > 0 && b <= prompt.len());
        boundaries.sort_unstable();
        boundaries.dedup();
        let mut stop = p.stop.clone();
        for x in extra_stops {
            if !stop.iter().any(|s| s == x) {
                stop.push(x.to_string());
            }
        }
        Ok(Job {
            prompt,
            boundaries,
            sampler: SamplerConfig {
                temperature: p.temperature,
                top_p: p.top_p,
                top_k: 0,
                presence_penalty: p.presence_penalty,
                frequency_penalty: p.frequency_penalty,
                seed: p.seed,
                ..SamplerConfig::default()
            },
            max_tokens,
            stop,
            // Token 0 is end-of-text for the World, 20B and byte vocabularies alike.
            stop_tokens: vec![0],
            logit_bias: p.logit_bias.clone(),
            events: tokio::sync::mpsc::unbounded_channel().0,
        })
    }

    fn meta(&self, kind: Kind) -> Meta {
        Meta {
            id: new_id(match kind {
                Kind::Chat => "chatcmpl",
                Kind::Completion => "cmpl",
            }),
            created: unix_now(),
            model: self.0.model.clone(),
        }
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// Queues the job and answers: one JSON body, or a stream of server-sent events.
async fn respond(app: App, mut job: Job, params: Params, kind: Kind) -> Result<Response, ApiError> {
    let (tx, rx) = unbounded_channel();
    job.events = tx;
    app.0.engine.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::new(
            429,
            "rate_limit_error",
            "the server is busy (its request queue is full); retry later",
        )
        .with_code("queue_full"),
        SubmitError::ShuttingDown => {
            ApiError::new(503, "server_error", "the server is shutting down")
        }
    })?;
    let meta = app.meta(kind);
    let sse = Sse {
        rx,
        meta,
        kind,
        include_usage: params.include_usage,
        frames: VecDeque::new(),
        started: false,
        ended: false,
    };
    if params.stream {
        let mut sse = sse;
        if kind == Kind::Chat {
            sse.frame(api::chat_chunk(
                &sse.meta,
                ChatPiece::Role,
                sse.include_usage,
            ));
        }
        let stream = futures_util::stream::unfold(sse, |mut s| async move {
            let frame = s.next_frame().await?;
            Some((Ok::<Bytes, Infallible>(frame), s))
        });
        let mut resp = Body::from_stream(stream).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(resp);
    }
    Ok(whole(sse).await)
}

/// Strips the space the model puts after `Assistant:` (and any other leading whitespace)
/// from a chat reply; `started` records that the reply's first visible character was seen.
fn trim_reply_start<'a>(text: &'a str, started: &mut bool) -> &'a str {
    if *started {
        return text;
    }
    let t = text.trim_start();
    *started = !t.is_empty();
    t
}

/// The engine events of one request, turned into response text.
struct Sse {
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    kind: Kind,
    include_usage: bool,
    frames: VecDeque<Bytes>,
    started: bool,
    ended: bool,
}

impl Sse {
    fn frame(&mut self, json: String) {
        self.frames
            .push_back(Bytes::from(format!("data: {json}\n\n")));
    }

    /// The next server-sent event, or `None` after `data: [DONE]`.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Some(f);
            }
            if self.ended {
                return None;
            }
            let ev = self.rx.recv().await;
            let (meta, usage) = (&self.meta, self.include_usage);
            match ev {
                Some(Event::Text(t)) => {
                    let t = match self.kind {
                        Kind::Chat => trim_reply_start(&t, &mut self.started),
                        Kind::Completion => &t,
                    };
                    if !t.is_empty() {
                        let json = match self.kind {
                            Kind::Chat => api::chat_chunk(meta, ChatPiece::Text(t), usage),
                            Kind::Completion => api::completion_chunk(meta, t, None, usage),
                        };
                        self.frame(json);
                    }
                }
                Some(Event::Done(d)) => {
                    let u = Usage::new(d.prompt_tokens, d.cached_tokens, d.completion_tokens);
                    let (last, usage_chunk) = match self.kind {
                        Kind::Chat => (
                            api::chat_chunk(meta, ChatPiece::Finish(d.finish), usage),
                            api::chat_chunk(meta, ChatPiece::Usage(u), usage),
                        ),
                        Kind::Completion => (
                            api::completion_chunk(meta, "", Some(d.finish), usage),
                            api::completion_usage_chunk(meta, u),
                        ),
                    };
                    self.frame(last);
                    if usage {
                        self.frame(usage_chunk);
                    }
                    self.end();
                }
                Some(Event::Error(m)) => {
                    let e = ApiError::new(500, "server_error", m);
                    self.frame(e.body());
                    self.end();
                }
                None => {
                    let e = ApiError::new(503, "server_error", "the engine stopped");
                    self.frame(e.body());
                    self.end();
                }
            }
        }
    }

    fn end(&mut self) {
        self.frames
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.ended = true;
    }
}

/// Waits for the whole generation and builds the JSON response.
async fn whole(mut s: Sse) -> Response {
    let mut text = String::new();
    let done = loop {
        match s.rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(d)) => break d,
            Some(Event::Error(m)) => return error_response(ApiError::new(500, "server_error", m)),
            None => {
                return error_response(ApiError::new(503, "server_error", "the engine stopped"))
            }
        }
    };
    let usage = Usage::new(
        done.prompt_tokens,
        done.cached_tokens,
        done.completion_tokens,
    );
    let body = match s.kind {
        Kind::Chat => {
            let mut started = false;
            api::chat_completion(
                &s.meta,
                trim_reply_start(&text, &mut started),
                done.finish,
                usage,
            )
        }
        Kind::Completion => api::completion(&s.meta, &text, done.finish, usage),
    };
    json_response(200, body)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A unique id such as `chatcmpl-3f9c...`: a per-process random base mixed with a counter.
fn new_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.write_u64(unix_now());
    format!("{prefix}-{:016x}{n:08x}", h.finish())
}
