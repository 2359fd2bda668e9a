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
//! `POST /v1/chat/completions`, `GET /health`, `GET /metrics` (Prometheus text format), and
//! vLLM's tokenizer endpoints `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize` (the
//! remote tokenizer of lm-evaluation-harness).

pub mod api;
pub mod cache;
pub mod engine;
pub mod grammar;
pub mod metrics;
pub mod tools;

use api::{ApiError, ChatPiece, Choice, LogprobEntry, Meta, Params, Prompt, TokenText, Usage};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use engine::{Engine, EngineConfig, Event, Job, SubmitError, TokenLogprob};
use metrics::Metrics;
use rwkv_core::error::{Error, Result};
use rwkv_core::model::Model;
use rwkv_core::sample::SamplerConfig;
use rwkv_core::session::Finish;
use rwkv_core::tokenizer::{self, Tokenizer};
use std::collections::VecDeque;
use std::convert::Infallible;
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
    /// Fold an RWKV-PEFT LoRA file into the weights at load: FILE[:ALPHA] (ALPHA default 16).
    #[cfg_attr(feature = "clap", arg(long))]
    pub lora: Option<String>,
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
    /// Seconds a client has to send a request's headers before its connection is closed (a
    /// client that trickles them must not hold a connection; bodies have 30 s).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 30.0))]
    pub header_timeout: f64,
    /// Accept only requests with `Authorization: Bearer KEY` (every endpoint but /health).
    #[cfg_attr(feature = "clap", arg(long))]
    pub api_key: Option<String>,
    /// A file of accepted keys, one per line (blank lines and `#` comments ignored); adds to
    /// `--api-key`.
    #[cfg_attr(feature = "clap", arg(long))]
    pub api_key_file: Option<PathBuf>,
    /// A folder of state files (`rwkv logits --out`, a saved conversation, or RWKV-PEFT tuned
    /// states): each `NAME.safetensors` or `NAME.pth` is a state a request may start from
    /// with `"state": "NAME"`.
    #[cfg_attr(feature = "clap", arg(long))]
    pub state_dir: Option<PathBuf>,
}

/// The states of `--state-dir`, by name (the file stem), sorted; each checked against the
/// model.
fn load_states(
    dir: &std::path::Path,
    model: &Model,
) -> Result<Vec<(String, Arc<rwkv_core::model::State>)>> {
    let what = dir.display();
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::bad(format!("state-dir {what}: {e}")))?;
    let mut states = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| Error::bad(format!("state-dir {what}: {e}")))?
            .path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("safetensors" | "pth")
        ) {
            continue;
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let st = rwkv_core::model::State::load(&path, model.info())?;
        states.push((name, Arc::new(st)));
    }
    if states.len() >= (u32::MAX / 2) as usize {
        return Err(Error::bad(format!("state-dir {what}: too many states")));
    }
    states.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(states)
}

/// Seconds a client has to send a whole request body (408 after).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The accepted API keys: `--api-key` and the lines of `--api-key-file`.
fn api_keys(args: &ServeConfig) -> Result<Vec<String>> {
    let mut keys: Vec<String> = args.api_key.iter().cloned().collect();
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::bad(format!("{}: {e}", path.display())))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
        if keys.is_empty() {
            return Err(Error::bad(format!(
                "{}: no keys in the file",
                path.display()
            )));
        }
    }
    if keys
        .iter()
        .any(|k| k.is_empty() || k.chars().any(char::is_whitespace))
    {
        return Err(Error::bad(
            "api-key: a key must be non-empty, without spaces",
        ));
    }
    Ok(keys)
}

/// Whether `host` names this machine only (so that serving it without a key is safe).
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    if !(args.header_timeout > 0.0 && args.header_timeout <= 86_400.0) {
        return Err(Error::bad(
            "header-timeout must be more than 0 and at most 86400 seconds",
        ));
    }
    let keys = api_keys(&args)?;
    if keys.is_empty() && !is_loopback(&args.host) {
        eprintln!(
            "rwkv serve: warning: listening on {} without --api-key: anyone who can reach it \
             can use it",
            args.host
        );
    }
    rwkv_core::kernels::set_threads(args.threads)?;
    let quant = args.quant.as_deref().map(str::parse).transpose()?;
    let path = match &args.model {
        Some(p) => p.clone(),
        None => rwkv_core::default_model()?,
    };
    let model = Model::load_with_lora(&path, quant, args.lora.as_deref())?;
    let states = match &args.state_dir {
        Some(d) => load_states(d, &model)?,
        None => Vec::new(),
    };
    let tok: Arc<dyn Tokenizer> = match &args.tokenizer {
        Some(spec) => tokenizer::load(spec)?.into(),
        None => tokenizer::for_model(model.info())
            .map_err(|e| Error::bad(format!("{}: {e}", path.display())))?
            .into(),
    };
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rwkv".into());
    let vocab = model.vocab_size();
    let width = model.info().n_embd;
    let context = model.info().positions;
    let metrics = Arc::new(Metrics::default());
    let cfg = EngineConfig {
        max_batch: args.max_batch,
        queue: args.queue,
        cache_bytes: args.cache_mb.saturating_mul(1 << 20),
    };
    let grammars = grammar::Grammars::new(tok.as_ref(), vocab).map_err(Error::Internal)?;
    let engine = Engine::start(model, tok.clone(), cfg, metrics.clone())
        .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?;
    let names: Vec<&str> = states.iter().map(|(n, _)| n.as_str()).collect();
    let openapi = openapi_for(vocab, width, &names);
    let app = App(Arc::new(AppState {
        engine,
        tokenizer: tok,
        metrics,
        model: name,
        vocab,
        created: unix_now(),
        max_prompt_tokens: args.max_prompt_tokens,
        max_tokens_limit: args.max_tokens_limit,
        context,
        keys,
        width,
        grammars,
        states,
        openapi,
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
    let header_timeout = Duration::from_secs_f64(args.header_timeout);
    let server = accept(
        listener,
        router(app),
        header_timeout,
        stopped(stop_rx.clone()),
    );
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

/// Serves connections from `listener` until `stop` resolves, then waits for the open ones to
/// finish their requests. Each connection is HTTP/1.1 on hyper, with `header_timeout` for the
/// headers of each request (a time axum's own `serve` does not limit).
async fn accept(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                // A connection that failed before it was accepted is the client's business;
                // out of file descriptors, wait for some to close.
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    eprintln!("rwkv serve: accept: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(
                hyper_util::rt::TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(router.clone()),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
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

impl AppState {
    /// The longest sequence a request may make: the prompt limit, and for a Transformer its
    /// positions.
    fn max_model_len(&self) -> usize {
        match self.context {
            0 => self.max_prompt_tokens,
            c => c.min(self.max_prompt_tokens),
        }
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
    /// The most tokens a sequence may hold: a Transformer's positions (0: RWKV, unbounded).
    context: usize,
    /// Accepted API keys (none: open).
    keys: Vec<String>,
    /// The model's width (the embeddings' length).
    width: usize,
    /// The grammar compiler for the model's vocabulary.
    grammars: grammar::Grammars,
    /// The `--state-dir` states, by name.
    states: Vec<(String, Arc<rwkv_core::model::State>)>,
    /// The served OpenAPI description ([`openapi_for`]).
    openapi: String,
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
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/states", get(states))
        .route("/openapi.json", get(openapi))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/tokenize", post(tokenize_text))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), require_key))
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// Every route the server answers, as `(method, path pattern)`: the OpenAPI description
/// lists exactly these (a test holds the two together), and they label the request metrics.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/states"),
    ("GET", "/tokenizer_info"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
];

/// The OpenAPI 3.1 description of [`ROUTES`], served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The endpoint label of a path: route patterns only, so the metric's label set stays small.
fn endpoint_label(path: &str) -> &'static str {
    if path.starts_with("/v1/models/") {
        return "/v1/models/{id}";
    }
    ROUTES
        .iter()
        .find(|(_, p)| *p == path)
        .map_or("other", |(_, p)| p)
}

/// [`OPENAPI`] as served for a model: its largest token id and its embeddings' width filled
/// in, so that every request the description allows is one this server accepts.
pub fn openapi_for(vocab: usize, width: usize, states: &[&str]) -> String {
    let mut spec: serde_json::Value =
        serde_json::from_str(OPENAPI).expect("openapi.json is JSON (tests/server.rs parses it)");
    spec["components"]["schemas"]["TokenId"]["maximum"] = vocab.saturating_sub(1).into();
    spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"]["dimensions"] = serde_json::json!({
        "type": ["integer", "null"],
        "enum": [width, null],
        "description": "This model's width, the only one served."
    });
    let mut names: Vec<serde_json::Value> = states.iter().map(|&n| n.into()).collect();
    names.push(serde_json::Value::Null);
    spec["components"]["schemas"]["Sampling"]["properties"]["state"]["enum"] = names.into();
    spec.to_string()
}

async fn openapi(State(app): State<App>) -> Response {
    json_response(200, app.0.openapi.clone())
}

async fn count_requests(State(app): State<App>, req: Request, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let resp = next.run(req).await;
    app.0.metrics.request(endpoint, resp.status().as_u16());
    resp
}

/// Answers 401 (OpenAI's error) to a request without an accepted `Authorization: Bearer` key,
/// when the server has keys; `/health` stays open.
async fn require_key(State(app): State<App>, req: Request, next: Next) -> Response {
    let keys = &app.0.keys;
    if keys.is_empty() || req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Every key is compared in full, so the time taken does not tell how much of one matched.
    let ok = given.is_some_and(|g| {
        keys.iter()
            .fold(false, |hit, k| hit | same_bytes(k.as_bytes(), g.as_bytes()))
    });
    if ok {
        return next.run(req).await;
    }
    let message = if given.is_none() {
        "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
    } else {
        "Incorrect API key provided"
    };
    let mut resp = error_response(
        ApiError::new(401, "invalid_request_error", message).with_code("invalid_api_key"),
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Whether two byte strings are equal, in time that depends only on their lengths.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
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

/// Most choices one request may ask for (prompts × `n`).
pub const MAX_CHOICES: usize = 64;

async fn completions_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&headers, body).await?;
    let req = api::parse_completion(&body)?;
    let n = req.params.n;
    if req.prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::invalid(
            format!(
                "{} prompts × n = {n} make more than {MAX_CHOICES} choices",
                req.prompts.len()
            ),
            Some("n"),
        ));
    }
    let mut jobs = Vec::with_capacity(req.prompts.len());
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for (i, p) in req.prompts.into_iter().enumerate() {
        let (ids, text) = match p {
            Prompt::Text(t) => (tokenize(&app, vec![t.clone()]).await?.0, t),
            // Checked against the vocabulary with every prompt in `App::job`.
            Prompt::Tokens(ids) => {
                let text = app.detokenize(&ids);
                (ids, text)
            }
        };
        let boundaries = vec![ids.len()];
        let mut job = app.job(
            ids,
            boundaries,
            &req.params,
            DEFAULT_COMPLETION_TOKENS,
            &[],
            "prompt",
        )?;
        job.first_choice = i * n;
        job.prompt_logprobs = req.echo && req.params.logprobs.is_some();
        prompts.push(EchoPrompt {
            chars: text.chars().count(),
            text: if req.echo { text } else { String::new() },
            ids: job.prompt.clone(),
        });
        jobs.push(job);
    }
    let plan = Plan {
        kind: Kind::Completion,
        n,
        logprobs: req.params.logprobs.is_some(),
        echo: req.echo,
        prompts,
        tools: false,
    };
    respond(app, jobs, req.params, plan).await
}

async fn chat_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&headers, body).await?;
    let mut req = api::parse_chat(&body)?;
    let mut segments = api::chat_segments(&req.messages);
    let tools = match tools::grammar(&req.tools, &req.tool_choice, req.parallel_tool_calls) {
        Some(g) if !req.tools.is_empty() => {
            segments.insert(0, tools::system_text(&req.tools));
            req.params.constraint = Some(grammar::Constraint::Tools(g));
            true
        }
        _ => false,
    };
    let (prompt, ends) = tokenize(&app, segments).await?;
    // A reply ends where the model starts a new paragraph or a new turn.
    let job = app.job(
        prompt,
        ends,
        &req.params,
        app.0.max_tokens_limit,
        &["\n\n", "\nUser:"],
        "messages",
    )?;
    let plan = Plan {
        kind: Kind::Chat,
        n: req.params.n,
        logprobs: req.params.logprobs.is_some(),
        echo: false,
        prompts: Vec::new(),
        tools,
    };
    respond(app, vec![job], req.params, plan).await
}

/// `POST /v1/embeddings`: each input is read as a prompt (batched with everything else) and
/// answered with [`engine::embedding`] of the state it leaves.
async fn embeddings(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let inner = async {
        let body = read_body(&headers, body).await?;
        let req = api::parse_embeddings(&body, app.0.width)?;
        let (tx, mut rx) = unbounded_channel();
        let count = req.inputs.len();
        for (i, input) in req.inputs.into_iter().enumerate() {
            let ids = match input {
                Prompt::Text(t) => tokenize(&app, vec![t]).await?.0,
                Prompt::Tokens(ids) => ids,
            };
            let n = ids.len();
            let params = Params {
                max_tokens: Some(0),
                n: 1,
                ..Params::default()
            };
            let mut job = app.job(ids, vec![n], &params, 0, &[], "input")?;
            job.first_choice = i;
            job.embed = true;
            job.events = tx.clone();
            app.submit(job)?;
        }
        drop(tx);
        let mut vectors = vec![Vec::new(); count];
        let (mut done, mut prompt_tokens) = (0, 0);
        while done < count {
            match rx.recv().await {
                Some(Event::Embedding { choice, vector }) if choice < count => {
                    vectors[choice] = vector
                }
                Some(Event::Done { done: d, .. }) => {
                    done += 1;
                    prompt_tokens += d.prompt_tokens;
                }
                Some(Event::Error(m)) => return Err(ApiError::new(500, "server_error", m)),
                Some(_) => {}
                None => return Err(ApiError::new(503, "server_error", "the engine stopped")),
            }
        }
        let body = api::embeddings(&app.0.model, &vectors, req.base64, prompt_tokens);
        Ok(json_response(200, body))
    };
    inner.await.unwrap_or_else(error_response)
}

/// `GET /v1/states`: the `--state-dir` states a request may name in `state`.
async fn states(State(app): State<App>) -> Response {
    let data: Vec<serde_json::Value> = app
        .0
        .states
        .iter()
        .map(|(name, st)| serde_json::json!({"id": name, "object": "state", "bytes": st.bytes()}))
        .collect();
    json_response(
        200,
        serde_json::json!({"object": "list", "data": data}).to_string(),
    )
}

async fn tokenizer_info(State(app): State<App>) -> Response {
    let body = serde_json::json!({
        "model": app.0.model,
        "vocab_size": app.0.vocab,
        "max_model_len": app.0.max_model_len(),
        // The vocabularies' end-of-text token (id 0) has no text form; nothing is added to
        // a prompt when it is tokenized.
        "eos_token": null,
        "bos_token": null,
        "pad_token": null,
        "add_bos_token": false,
        "chat_template": null,
    });
    json_response(200, body.to_string())
}

/// `POST /tokenize`: `{"prompt": "…"}` (or chat `{"messages": […]}`, rendered as the chat
/// endpoint renders them) → `{"tokens": […], "count": n, "max_model_len": …}`.
async fn tokenize_text(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let inner = async {
        let body = read_body(&headers, body).await?;
        let segments = api::parse_tokenize(&body)?;
        let (ids, _) = tokenize(&app, segments).await?;
        let body = serde_json::json!({
            "tokens": ids,
            "count": ids.len(),
            "max_model_len": app.0.max_model_len(),
        });
        Ok::<_, ApiError>(json_response(200, body.to_string()))
    };
    inner.await.unwrap_or_else(error_response)
}

/// `POST /detokenize`: `{"tokens": […]}` → `{"prompt": "…"}`.
async fn detokenize(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let inner = async {
        let body = read_body(&headers, body).await?;
        let ids = api::parse_detokenize(&body)?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= app.0.vocab) {
            return Err(ApiError::invalid(
                format!(
                    "token id {bad} is outside the model's vocabulary of {}",
                    app.0.vocab
                ),
                Some("tokens"),
            ));
        }
        let body = serde_json::json!({"prompt": app.detokenize(&ids)});
        Ok(json_response(200, body.to_string()))
    };
    inner.await.unwrap_or_else(error_response)
}

/// Reads the body up to [`MAX_BODY_BYTES`]: 413 beyond, whether announced by Content-Length
/// or not; 408 when it takes longer than [`BODY_TIMEOUT`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    tokio::time::timeout(BODY_TIMEOUT, read_body_inner(headers, body))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                408,
                "invalid_request_error",
                format!(
                    "the request body took more than {} s to arrive",
                    BODY_TIMEOUT.as_secs()
                ),
            )
            .with_code("request_timeout"))
        })
}

async fn read_body_inner(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
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
        // A Transformer's learned positions bound the prompt and the completion together.
        let held = prompt.len().max(1);
        let max_tokens = match (s.context, p.max_tokens) {
            (0, _) => max_tokens,
            (c, _) if held + max_tokens <= c => max_tokens,
            (c, None) if held < c => c - held,
            (c, _) => {
                return Err(ApiError::invalid(
                    format!(
                        "this model's context is {c} tokens, but the prompt ({held} tokens) and \
                         max_tokens ({max_tokens}) ask for {}",
                        held + max_tokens
                    ),
                    Some(if held >= c {
                        prompt_param
                    } else {
                        "max_tokens"
                    }),
                )
                .with_code("context_length_exceeded"))
            }
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
        let initial = match &p.state {
            None => None,
            Some(name) => {
                let k = s
                    .states
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("there is no state '{name}' (GET /v1/states lists them)"),
                            Some("state"),
                        )
                    })?;
                Some((k as u32, s.states[k].1.clone()))
            }
        };
        let grammar = match &p.constraint {
            None => None,
            Some(c) => {
                let field = p.constraint_field();
                Some(s.grammars.matcher(c).map_err(|e| {
                    ApiError::invalid(format!("'{field}' is refused: {e}"), Some(field))
                })?)
            }
        };
        let mut stop = p.stop.clone();
        // A grammar ends a reply itself (a blank line may be part of what it allows); a tool
        // call has none, and a text reply beside it ends as any chat reply does.
        let keep = matches!(p.constraint, None | Some(grammar::Constraint::Tools(_)));
        let extra_stops = if keep { extra_stops } else { &[] };
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
            n: p.n,
            first_choice: 0,
            logprobs: p.logprobs,
            prompt_logprobs: false,
            embed: false,
            grammar,
            initial,
            events: tokio::sync::mpsc::unbounded_channel().0,
        })
    }

    /// Queues a job: 429 when the queue is full, 503 when shutting down.
    fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.0.engine.submit(job).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::new(
                429,
                "rate_limit_error",
                "the server is busy (its request queue is full); retry later",
            )
            .with_code("queue_full"),
            SubmitError::ShuttingDown => {
                ApiError::new(503, "server_error", "the server is shutting down")
            }
        })
    }

    /// A token as `logprobs` shows it: its text, or, for a token that is not whole UTF-8
    /// (part of a character), `bytes:\xNN…` as OpenAI writes those (so that two such
    /// tokens never share a key of the completions' `top_logprobs`).
    fn token_text(&self, id: u32) -> TokenText {
        let mut bytes = Vec::new();
        // An id the tokenizer cannot decode shows as empty (the engine never samples one).
        let _ = self.0.tokenizer.token_bytes_into(id, &mut bytes);
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t.to_string(),
            Err(_) => {
                let hex: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
                format!("bytes:{hex}")
            }
        };
        TokenText { text, bytes }
    }

    /// The `logprobs` entry of a token.
    fn entry(&self, lp: &TokenLogprob) -> LogprobEntry {
        LogprobEntry {
            token: self.token_text(lp.token),
            logprob: Some(lp.logprob),
            top: lp
                .top
                .iter()
                .map(|&(t, l)| (self.token_text(t), l))
                .collect(),
        }
    }

    /// The text of token ids (invalid UTF-8 replaced).
    fn detokenize(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let _ = self.0.tokenizer.token_bytes_into(id, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
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

/// A completions prompt as the response needs it.
struct EchoPrompt {
    /// Its text, with `echo` (empty without).
    text: String,
    /// Its length in characters (where the completion's `text_offset`s start without `echo`).
    chars: usize,
    /// Its tokens.
    ids: Vec<u32>,
}

/// How a request's jobs become its response.
struct Plan {
    kind: Kind,
    /// Choices per job.
    n: usize,
    /// Whether the choices carry `logprobs`.
    logprobs: bool,
    /// Whether each completion starts with its prompt.
    echo: bool,
    /// The completions' prompts, by job.
    prompts: Vec<EchoPrompt>,
    /// The request offers tools: a reply that starts with a call is held back and answered
    /// as `tool_calls`.
    tools: bool,
}

/// One choice as it is assembled.
#[derive(Default)]
struct ChoiceState {
    /// Its text so far (streaming: not yet sent).
    text: String,
    /// Its tokens' log-probabilities (streaming: not yet sent).
    lps: Vec<LogprobEntry>,
    /// The chat reply's first visible character was seen.
    started: bool,
    /// Characters sent so far (the next `text_offset`, streaming).
    offset: usize,
    finish: Option<Finish>,
    /// The reply is a tool call (its text is held until it is complete).
    call: bool,
}

/// Queues the jobs and answers: one JSON body, or a stream of server-sent events.
async fn respond(
    app: App,
    jobs: Vec<Job>,
    params: Params,
    plan: Plan,
) -> Result<Response, ApiError> {
    let (tx, rx) = unbounded_channel();
    let total = jobs.len() * plan.n;
    for mut job in jobs {
        job.events = tx.clone();
        app.submit(job)?;
    }
    drop(tx);
    let meta = app.meta(plan.kind);
    let mut choices: Vec<ChoiceState> = (0..total).map(|_| ChoiceState::default()).collect();
    for (i, c) in choices.iter_mut().enumerate() {
        match plan.prompts.get(i / plan.n) {
            // Echoed prompt text without log-probabilities goes first; with them it comes
            // with the prompt's log-probabilities.
            Some(p) if plan.echo && !plan.logprobs => c.text = p.text.clone(),
            Some(p) if !plan.echo => c.offset = p.chars,
            _ => {}
        }
    }
    let mut sse = Sse {
        app,
        rx,
        meta,
        plan,
        include_usage: params.include_usage,
        choices,
        done: 0,
        usage: Usage::new(0, 0, 0),
        frames: VecDeque::new(),
        ended: false,
    };
    if !params.stream {
        return Ok(whole(sse).await);
    }
    for i in 0..total {
        if sse.plan.kind == Kind::Chat {
            let f = api::chat_chunk(&sse.meta, ChatPiece::Role(i), sse.include_usage);
            sse.frame(f);
        } else if !sse.choices[i].text.is_empty() {
            sse.flush(i);
        }
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
    Ok(resp)
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
    app: App,
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    plan: Plan,
    include_usage: bool,
    choices: Vec<ChoiceState>,
    /// Choices finished.
    done: usize,
    usage: Usage,
    frames: VecDeque<Bytes>,
    ended: bool,
}

/// What an engine event meant for the response.
enum Step {
    /// Choice `i` has more to say (text or log-probabilities).
    More(usize),
    /// Choice `i` ended.
    Finished(usize),
    /// The request failed.
    Failed(ApiError),
}

impl Sse {
    fn frame(&mut self, json: String) {
        self.frames
            .push_back(Bytes::from(format!("data: {json}\n\n")));
    }

    /// Takes one engine event into the choices' state; `None` when it changes nothing to send.
    fn take(&mut self, ev: Option<Event>) -> Option<Step> {
        let Some(ev) = ev else {
            return Some(Step::Failed(ApiError::new(
                503,
                "server_error",
                "the engine stopped",
            )));
        };
        match ev {
            Event::Text { choice, text } => {
                let c = self.choices.get_mut(choice)?;
                let was_started = c.started;
                let t = match self.plan.kind {
                    Kind::Chat => trim_reply_start(&text, &mut c.started),
                    Kind::Completion => &text,
                };
                if self.plan.tools && !was_started && t.starts_with('<') {
                    c.call = true;
                }
                c.text.push_str(t);
                Some(Step::More(choice))
            }
            Event::Logprob { choice, lp } => {
                let e = self.app.entry(&lp);
                self.choices.get_mut(choice)?.lps.push(e);
                None
            }
            Event::Prompt {
                first_choice,
                n,
                logprobs,
            } => {
                let p = self.plan.prompts.get(first_choice / self.plan.n.max(1))?;
                let entries: Vec<LogprobEntry> = p
                    .ids
                    .iter()
                    .zip(&logprobs)
                    .map(|(&id, lp)| match lp {
                        Some(lp) => self.app.entry(lp),
                        None => LogprobEntry {
                            token: self.app.token_text(id),
                            logprob: None,
                            top: Vec::new(),
                        },
                    })
                    .collect();
                let text = p.text.clone();
                for i in first_choice..(first_choice + n).min(self.choices.len()) {
                    let c = &mut self.choices[i];
                    c.text.insert_str(0, &text);
                    c.lps.splice(0..0, entries.iter().cloned());
                }
                // Streaming sends each choice's prompt part now.
                Some(Step::More(first_choice))
            }
            Event::Done { choice, done } => {
                let c = self.choices.get_mut(choice)?;
                c.finish = Some(done.finish);
                self.done += 1;
                let u = &mut self.usage;
                // A job's prompt counts once, with its first choice.
                if choice % self.plan.n.max(1) == 0 {
                    u.prompt_tokens += done.prompt_tokens;
                    u.prompt_tokens_details.cached_tokens += done.cached_tokens;
                }
                u.completion_tokens += done.completion_tokens;
                u.total_tokens = u.prompt_tokens + u.completion_tokens;
                Some(Step::Finished(choice))
            }
            Event::Error(m) => Some(Step::Failed(ApiError::new(500, "server_error", m))),
            // Completions and chat jobs do not embed.
            Event::Embedding { .. } => None,
        }
    }

    /// The `tool_calls` of choice `i` when its reply is a complete call (with `index`es, as
    /// stream chunks carry them).
    fn tool_calls(&self, i: usize, indexed: bool) -> Option<serde_json::Value> {
        let c = &self.choices[i];
        if !c.call || c.finish != Some(Finish::Stop) {
            return None;
        }
        let calls = tools::parse_calls(&c.text)?;
        Some(
            calls
                .into_iter()
                .enumerate()
                .map(|(k, call)| {
                    let mut v = serde_json::json!({
                        "id": new_id("call"),
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    });
                    if indexed {
                        v["index"] = serde_json::json!(k);
                    }
                    v
                })
                .collect(),
        )
    }

    /// The `logprobs` object of choice `i`'s pending entries (which it takes).
    fn logprobs(&mut self, i: usize) -> Option<serde_json::Value> {
        if !self.plan.logprobs {
            return None;
        }
        let c = &mut self.choices[i];
        let lps = std::mem::take(&mut c.lps);
        Some(match self.plan.kind {
            Kind::Chat => api::chat_logprobs(&lps),
            Kind::Completion => {
                let v = api::completion_logprobs(&lps, c.offset);
                c.offset += lps
                    .iter()
                    .map(|e| e.token.text.chars().count())
                    .sum::<usize>();
                v
            }
        })
    }

    /// Sends choice `i`'s pending text and log-probabilities as one chunk (and its finish
    /// reason, once it has one).
    fn flush(&mut self, i: usize) {
        let finish = self.choices[i].finish;
        if self.choices[i].call {
            if finish.is_none() {
                return;
            }
            if let Some(calls) = self.tool_calls(i, true) {
                let logprobs = self.logprobs(i);
                let choice = Choice {
                    index: i,
                    text: "",
                    finish,
                    logprobs: logprobs.as_ref(),
                    tool_calls: Some(&calls),
                };
                let json = api::chat_chunk(&self.meta, ChatPiece::Text(choice), self.include_usage);
                self.frame(json);
                return;
            }
        }
        let pending = !self.choices[i].text.is_empty() || !self.choices[i].lps.is_empty();
        if !pending && finish.is_none() {
            return;
        }
        let logprobs = self.logprobs(i);
        let text = std::mem::take(&mut self.choices[i].text);
        let choice = Choice {
            index: i,
            text: &text,
            finish,
            logprobs: logprobs.as_ref(),
            tool_calls: None,
        };
        let json = match self.plan.kind {
            Kind::Chat => api::chat_chunk(&self.meta, ChatPiece::Text(choice), self.include_usage),
            Kind::Completion => api::completion_chunk(&self.meta, choice, self.include_usage),
        };
        self.frame(json);
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
            match self.take(ev) {
                None => {}
                Some(Step::More(i)) => {
                    // A prompt's part goes to each of its choices.
                    let n = if self.plan.echo { self.plan.n } else { 1 };
                    for j in i..(i + n).min(self.choices.len()) {
                        if self.choices[j].finish.is_none() {
                            self.flush(j);
                        }
                    }
                }
                Some(Step::Finished(i)) => {
                    self.flush(i);
                    if self.done == self.choices.len() {
                        if self.include_usage {
                            let json = match self.plan.kind {
                                Kind::Chat => {
                                    api::chat_chunk(&self.meta, ChatPiece::Usage(self.usage), true)
                                }
                                Kind::Completion => {
                                    api::completion_usage_chunk(&self.meta, self.usage)
                                }
                            };
                            self.frame(json);
                        }
                        self.end();
                    }
                }
                Some(Step::Failed(e)) => {
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

/// Waits for every choice and builds the JSON response.
async fn whole(mut s: Sse) -> Response {
    while s.done < s.choices.len() {
        let ev = s.rx.recv().await;
        if let Some(Step::Failed(e)) = s.take(ev) {
            return error_response(e);
        }
    }
    let logprobs: Vec<Option<serde_json::Value>> =
        (0..s.choices.len()).map(|i| s.logprobs(i)).collect();
    let calls: Vec<Option<serde_json::Value>> = (0..s.choices.len())
        .map(|i| s.tool_calls(i, false))
        .collect();
    let choices: Vec<Choice<'_>> = s
        .choices
        .iter()
        .zip(&logprobs)
        .zip(&calls)
        .enumerate()
        .map(|(index, ((c, lp), calls))| Choice {
            index,
            text: if calls.is_some() { "" } else { &c.text },
            finish: c.finish,
            logprobs: lp.as_ref(),
            tool_calls: calls.as_ref(),
        })
        .collect();
    let body = match s.plan.kind {
        Kind::Chat => api::chat_completion(&s.meta, &choices, s.usage),
        Kind::Completion => api::completion(&s.meta, &choices, s.usage),
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
