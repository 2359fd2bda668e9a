//! `rwkv serve` end to end: the real binary on a loopback port with the random-weight v7
//! fixture (its text is noise, so the tests compare token counts and exact equality between
//! runs), spoken to over plain TCP with a small HTTP/1.1 client written here.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `rwkv serve`, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts the server on a free port with the v7 fixture and waits for `/health`.
    fn start(extra: &[&str]) -> Server {
        let model = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/v7/model.safetensors"
        );
        Self::start_with(model, extra)
    }

    /// [`Server::start`] with another model.
    fn start_with(model: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rwkv"))
            .args([
                "serve",
                "--model",
                model,
                "--tokenizer",
                "bytes",
                "--port",
                "0",
            ])
            .args(["--threads", "1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rwkv serve");
        // The server prints its address on stderr; keep draining stderr afterwards so that
        // the server never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = tx.send(port.parse::<u16>().unwrap());
                }
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not print its address");
            }
        };
        let s = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.get("/health").0 != 200 {
            assert!(Instant::now() < deadline, "server never became healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn connect(&self) -> TcpStream {
        let c = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        c
    }

    /// Sends one request and returns the open response, headers read.
    fn send(&self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        self.send_with(method, path, body, "")
    }

    /// [`Server::send`] with extra header lines (each ending in `\r\n`).
    fn send_with(&self, method: &str, path: &str, body: &[u8], extra: &str) -> HttpResponse {
        let mut c = self.connect();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).unwrap();
        // A server may answer (413) before reading all of a large body and close the socket.
        let _ = c.write_all(body);
        HttpResponse::read_head(c)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = self.send("GET", path, b"");
        let body = r.body();
        (r.status, String::from_utf8_lossy(&body).into_owned())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes())
    }

    fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let mut r = self.send("POST", path, body);
        let body = r.body();
        let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(&body))
        });
        (r.status, v)
    }

    /// Streams a request to the end: the `data:` payloads (without `[DONE]`) and whether
    /// `[DONE]` came last.
    fn stream(&self, path: &str, body: &Value) -> (Vec<Value>, bool) {
        let mut r = self.send("POST", path, body.to_string().as_bytes());
        assert_eq!(r.status, 200, "{path} {body}");
        assert!(r.header("content-type").starts_with("text/event-stream"));
        let mut events = Vec::new();
        let mut done = false;
        while let Some(data) = r.next_event() {
            assert!(!done, "data after [DONE]");
            if data == "[DONE]" {
                done = true;
            } else {
                events.push(serde_json::from_str(&data).unwrap());
            }
        }
        (events, done)
    }

    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Polls a metric until `ok` holds (at most 10 s).
    fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(name);
            if ok(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} stuck at {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response being read: status and headers parsed, the body read on demand (Content-Length
/// or chunked).
struct HttpResponse {
    r: BufReader<TcpStream>,
    status: u16,
    headers: Vec<(String, String)>,
    chunked: bool,
    /// Body bytes received but not yet consumed.
    buf: Vec<u8>,
    eof: bool,
}

impl HttpResponse {
    fn read_head(c: TcpStream) -> HttpResponse {
        let mut r = BufReader::new(c);
        let mut line = String::new();
        r.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut resp = HttpResponse {
            r,
            status,
            headers,
            chunked: false,
            buf: Vec::new(),
            eof: false,
        };
        resp.chunked = resp.header("transfer-encoding") == "chunked";
        resp
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v)
    }

    /// Reads more body bytes into `buf`; false at the end of the body.
    fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        if !self.chunked {
            let n: usize = self.header("content-length").parse().unwrap_or(0);
            let mut body = vec![0; n];
            self.r.read_exact(&mut body).unwrap();
            self.buf.extend(body);
            self.eof = true;
            return n > 0;
        }
        let mut line = String::new();
        if self.r.read_line(&mut line).unwrap_or(0) == 0 {
            self.eof = true;
            return false;
        }
        let n = usize::from_str_radix(line.trim(), 16).expect("chunk size");
        let mut data = vec![0; n + 2];
        self.r.read_exact(&mut data).unwrap();
        data.truncate(n);
        if n == 0 {
            self.eof = true;
            return false;
        }
        self.buf.extend(data);
        true
    }

    fn body(&mut self) -> Vec<u8> {
        while self.fill() {}
        std::mem::take(&mut self.buf)
    }

    /// The next server-sent event's `data:` payload, or `None` at the end of the stream.
    fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..i + 2).collect();
                let ev = String::from_utf8(ev).expect("UTF-8 event");
                let data = ev
                    .trim_end()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {ev:?}"));
                return Some(data.to_string());
            }
            if !self.fill() {
                assert!(self.buf.is_empty(), "trailing bytes {:?}", self.buf);
                return None;
            }
        }
    }
}

fn chat(msgs: &[(&str, &str)], extra: Value) -> Value {
    let messages: Vec<Value> = msgs
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect();
    let mut body = json!({"model": "model", "messages": messages});
    merge(&mut body, extra);
    body
}

fn completion(prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "model", "prompt": prompt});
    merge(&mut body, extra);
    body
}

fn merge(body: &mut Value, extra: Value) {
    if let Value::Object(m) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
}

/// The text of a non-streaming response.
fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"]
        .as_str()
        .or(c["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

/// The concatenated text of a stream's chunks.
fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            let c = e["choices"].get(0)?;
            c["text"].as_str().or(c["delta"]["content"].as_str())
        })
        .collect()
}

fn usage(v: &Value) -> (u64, u64, u64) {
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn completions_and_chat_answer_in_openai_shape() {
    let s = Server::start(&[]);
    let (st, v) = s.get("/v1/models");
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(
        (v["object"].as_str(), v["data"][0]["id"].as_str()),
        (Some("list"), Some("model"))
    );

    let (st, v) = s.post(
        "/v1/completions",
        &completion("Hello", json!({"max_tokens": 12, "temperature": 0})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let (p, c, t) = usage(&v);
    assert_eq!((p, t), (5, p + c));
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        finish == "length" && c == 12 || finish == "stop" && c <= 12,
        "{v}"
    );

    let (st, v) = s.post(
        "/v1/chat/completions",
        &chat(
            &[("system", "Be brief."), ("user", "Hi")],
            json!({"max_tokens": 10, "temperature": 0}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // "System: Be brief.\n\nUser: Hi\n\nAssistant:" in bytes.
    let (p, c, _) = usage(&v);
    assert_eq!(p, 39);
    assert!((1..=10).contains(&c));
}

#[test]
fn streams_carry_the_same_text_as_whole_responses() {
    let s = Server::start(&[]);
    for (path, body) in [
        (
            "/v1/completions",
            completion(
                "Once upon a time",
                json!({"max_tokens": 20, "temperature": 0}),
            ),
        ),
        (
            "/v1/chat/completions",
            chat(
                &[("user", "Tell me a story")],
                json!({"max_tokens": 20, "temperature": 0}),
            ),
        ),
        (
            "/v1/completions",
            completion(
                "Seeded",
                json!({"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 7,
                       "presence_penalty": 0.5, "frequency_penalty": 0.5}),
            ),
        ),
    ] {
        let (st, whole) = s.post(path, &body);
        assert_eq!(st, 200);
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        sb["stream_options"] = json!({"include_usage": true});
        let (events, done) = s.stream(path, &sb);
        assert!(done, "no [DONE]");
        assert_eq!(streamed_text(&events), text_of(&whole), "{path}");
        let chat = path.contains("chat");
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let id = events[0]["id"].as_str().unwrap();
        for e in &events {
            assert_eq!(
                (e["object"].as_str(), e["id"].as_str()),
                (Some(object), Some(id))
            );
        }
        if chat {
            assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        }
        // The finish chunk, then the usage chunk (no choices).
        let n = events.len();
        let finish = &events[n - 2]["choices"][0];
        assert_eq!(
            finish["finish_reason"],
            whole["choices"][0]["finish_reason"]
        );
        assert!(events[..n - 2]
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null()));
        assert_eq!(events[n - 1]["choices"].as_array().unwrap().len(), 0);
        assert_eq!(usage(&events[n - 1]), usage(&whole));
    }
    // Without stream_options there is no usage chunk and no usage field.
    let (events, done) = s.stream(
        "/v1/chat/completions",
        &chat(&[("user", "x")], json!({"max_tokens": 3, "stream": true})),
    );
    assert!(done);
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    assert!(!events.last().unwrap()["choices"][0]["finish_reason"].is_null());
}

#[test]
fn the_prefix_cache_does_not_change_results() {
    let system = "You are a helpful assistant who answers every question at length. ".repeat(8);
    let first = [("system", system.as_str()), ("user", "What is RWKV?")];
    let second = [
        ("system", system.as_str()),
        ("user", "And what is a state?"),
    ];
    let cold = Server::start(&["--cache-mb", "0"]);
    let warm = Server::start(&[]);
    for params in [
        json!({"max_tokens": 24, "temperature": 0}),
        json!({"max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "seed": 42}),
    ] {
        let (_, want) = cold.post("/v1/chat/completions", &chat(&second, params.clone()));
        let (_, a) = warm.post("/v1/chat/completions", &chat(&first, params.clone()));
        let hits = warm.metric("rwkv_cache_hits_total");
        // Shares the system message with the first request: starts from its cached state.
        let (_, b) = warm.post("/v1/chat/completions", &chat(&second, params.clone()));
        assert!(warm.metric("rwkv_cache_hits_total") > hits);
        let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached as usize > system.len(), "cached {cached}");
        assert_eq!(text_of(&b), text_of(&want), "{params}");
        assert_eq!(usage(&b), usage(&want));
        // The same prompt again: all of it (and its last logits) come from the cache.
        let (_, c) = warm.post("/v1/chat/completions", &chat(&second, params.clone()));
        assert_eq!(
            c["usage"]["prompt_tokens_details"]["cached_tokens"],
            c["usage"]["prompt_tokens"]
        );
        assert_eq!(text_of(&c), text_of(&want), "{params}");
        assert!(!text_of(&a).is_empty() || usage(&a).1 > 0);
    }
    assert_eq!(cold.metric("rwkv_cache_entries"), 0.0);
    assert!(warm.metric("rwkv_cache_entries") > 0.0);
    assert!(warm.metric("rwkv_cache_bytes") > 0.0);
}

#[test]
fn concurrent_requests_give_the_sequential_results() {
    let s = Server::start(&[]);
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            let prompt = format!("Request {i}: {}", "words ".repeat(i * 7));
            completion(&prompt, json!({"max_tokens": 32, "temperature": 0}))
        })
        .collect();
    let steps0 = s.metric("rwkv_engine_steps_total");
    let sequential: Vec<Value> = bodies
        .iter()
        .map(|b| s.post("/v1/completions", b).1)
        .collect();
    let steps1 = s.metric("rwkv_engine_steps_total");
    let concurrent: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| sc.spawn(|| s.post("/v1/completions", b).1))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let steps2 = s.metric("rwkv_engine_steps_total");
    for (a, b) in sequential.iter().zip(&concurrent) {
        assert_eq!(text_of(a), text_of(b));
        assert_eq!(usage(a).1, usage(b).1);
    }
    // The concurrent requests shared forward passes.
    assert!(
        steps2 - steps1 < steps1 - steps0,
        "sequential {} steps, concurrent {}",
        steps1 - steps0,
        steps2 - steps1
    );
}

#[test]
fn a_transformers_context_bounds_prompt_and_completion() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gpt/model.safetensors"
    );
    let s = Server::start_with(model, &[]);
    let c = "/v1/completions";
    // 16 positions: 3 prompt tokens leave room for 13.
    let (st, v) = s.post(c, &json!({"prompt": [1, 2, 3], "max_tokens": 13}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(usage(&v).1, 13);
    let (st, v) = s.post(c, &json!({"prompt": [1, 2, 3], "max_tokens": 14}));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
    // Without max_tokens the completion ends where the context does.
    let (st, v) = s.post(c, &json!({"prompt": [1, 2, 3]}));
    assert_eq!(st, 200, "{v}");
    assert!(usage(&v).1 <= 13, "{v}");
    let (st, v) = s.post(c, &json!({"prompt": vec![1; 16], "max_tokens": 1}));
    assert_eq!((st, &v["error"]["param"]), (400, &json!("prompt")), "{v}");
    let (_, info) = s.get("/tokenizer_info");
    assert!(info.contains("\"max_model_len\":16"), "{info}");
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = Server::start(&["--max-prompt-tokens", "64", "--max-tokens-limit", "100"]);
    let check = |(status, v): (u16, Value), want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert_eq!(e["param"].as_str(), param, "{v}");
        assert!(e.get("code").is_some(), "{v}");
    };
    let c = "/v1/completions";
    let ch = "/v1/chat/completions";
    check(s.post_raw(c, b"{\"prompt\": "), 400, None);
    check(s.post_raw(ch, b"not json"), 400, None);
    check(s.post(c, &json!(["a list"])), 400, None);
    check(s.post(c, &json!({"max_tokens": 3})), 400, Some("prompt"));
    check(
        s.post(c, &completion("x", json!({"temperature": "hot"}))),
        400,
        Some("temperature"),
    );
    check(
        s.post(c, &completion("x", json!({"temperature": 3}))),
        400,
        Some("temperature"),
    );
    check(
        s.post(c, &completion("x", json!({"max_tokens": -1}))),
        400,
        Some("max_tokens"),
    );
    check(
        s.post(c, &completion("x", json!({"n": 17}))),
        400,
        Some("n"),
    );
    check(s.post(c, &completion("x", json!({"n": 0}))), 400, Some("n"));
    check(
        s.post(c, &json!({"prompt": vec!["a"; 33], "n": 2})),
        400,
        Some("n"),
    );
    check(
        s.post(c, &completion("x", json!({"logprobs": 21}))),
        400,
        Some("logprobs"),
    );
    check(
        s.post(c, &completion("x", json!({"n": 2, "best_of": 3}))),
        400,
        Some("best_of"),
    );
    check(
        s.post(ch, &chat(&[("user", "x")], json!({"top_logprobs": 2}))),
        400,
        Some("top_logprobs"),
    );
    check(
        s.post(
            ch,
            &chat(
                &[("user", "x")],
                json!({"logprobs": true, "top_logprobs": 21}),
            ),
        ),
        400,
        Some("top_logprobs"),
    );
    check(
        s.post("/tokenize", &json!({"text": "x"})),
        400,
        Some("prompt"),
    );
    check(
        s.post("/detokenize", &json!({"tokens": [1, 300]})),
        400,
        Some("tokens"),
    );
    check(
        s.post("/detokenize", &json!({"tokens": "ab"})),
        400,
        Some("tokens"),
    );
    check(
        s.post(c, &completion("x", json!({"stop": [1, 2]}))),
        400,
        Some("stop"),
    );
    check(
        s.post(c, &completion("x", json!({"stream": "yes"}))),
        400,
        Some("stream"),
    );
    check(
        s.post(c, &json!({"prompt": [1, 2, 300]})),
        400,
        Some("prompt"),
    );
    check(
        s.post(c, &completion("x", json!({"logit_bias": {"300": 1}}))),
        400,
        Some("logit_bias"),
    );
    check(
        s.post(c, &completion("x", json!({"max_tokens": 101}))),
        400,
        Some("max_tokens"),
    );
    check(
        s.post(c, &completion(&"y".repeat(65), json!({}))),
        400,
        Some("prompt"),
    );
    check(s.post(ch, &json!({"messages": []})), 400, Some("messages"));
    check(
        s.post(ch, &json!({"messages": "hi"})),
        400,
        Some("messages"),
    );
    check(
        s.post(ch, &chat(&[("wizard", "x")], json!({}))),
        400,
        Some("messages[0].role"),
    );
    check(
        s.post(ch, &chat(&[("user", &"z".repeat(80))], json!({}))),
        400,
        Some("messages"),
    );
    check(
        s.post(ch, &chat(&[("user", "x")], json!({"n": 30}))),
        400,
        Some("n"),
    );
    // Over the 4 MiB body limit.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    check(s.post_raw(c, big.as_bytes()), 413, None);
    let mut r = s.send("GET", "/v1/nothing", b"");
    let v: Value = serde_json::from_slice(&r.body()).unwrap();
    check((r.status, v), 404, None);
    let mut r = s.send("GET", c, b"");
    let v: Value = serde_json::from_slice(&r.body()).unwrap();
    check((r.status, v), 405, None);
    // Limits at the boundary are fine; the server is still healthy after all this.
    let (st, v) = s.post(c, &completion(&"y".repeat(64), json!({"max_tokens": 1})));
    assert_eq!(st, 200, "{v}");
    let (st, _) = s.get("/metrics");
    assert_eq!(st, 200);
    assert!(s.metric("rwkv_requests_total{endpoint=\"/v1/completions\",status=\"400\"}") >= 10.0);
}

/// A long-running streaming completion (the limit is raised so that it cannot finish during
/// the test), its head read.
fn long_stream(s: &Server) -> HttpResponse {
    // Token 0 (end of text) is banned, so nothing but the client or the server can end it.
    let body = completion(
        "Go on",
        json!({"max_tokens": 1_000_000, "temperature": 0, "stream": true,
               "logit_bias": {"0": -100}}),
    );
    let mut r = s.send("POST", "/v1/completions", body.to_string().as_bytes());
    assert_eq!(r.status, 200);
    assert!(r.next_event().is_some());
    r
}

#[test]
fn a_full_queue_answers_429_and_slots_free_up() {
    let s = Server::start(&[
        "--queue",
        "1",
        "--max-batch",
        "1",
        "--max-tokens-limit",
        "1000000",
    ]);
    let running = long_stream(&s);
    s.wait_metric("rwkv_batch_size", |v| v == 1.0);
    // Waits in the queue: its headers come back at once.
    let queued = s.send(
        "POST",
        "/v1/completions",
        completion("wait", json!({"max_tokens": 2, "stream": true}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(queued.status, 200);
    s.wait_metric("rwkv_queue_length", |v| v == 1.0);
    let (st, v) = s.post(
        "/v1/completions",
        &completion("no room", json!({"max_tokens": 2})),
    );
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // The running stream's client leaves: the queued request runs and finishes.
    drop(running);
    let mut queued = queued;
    let mut last = None;
    while let Some(e) = queued.next_event() {
        last = Some(e);
    }
    assert_eq!(last.as_deref(), Some("[DONE]"));
    s.wait_metric("rwkv_batch_size", |v| v == 0.0);
    let (st, _) = s.post(
        "/v1/completions",
        &completion("room again", json!({"max_tokens": 2})),
    );
    assert_eq!(st, 200);
}

#[test]
fn a_disconnect_stops_generation_and_frees_the_slot() {
    let s = Server::start(&["--max-batch", "1", "--max-tokens-limit", "1000000"]);
    let r = long_stream(&s);
    s.wait_metric("rwkv_batch_size", |v| v == 1.0);
    drop(r);
    s.wait_metric("rwkv_batch_size", |v| v == 0.0);
    assert!(s.metric("rwkv_cancelled_total") >= 1.0);
    let generated = s.metric("rwkv_completion_tokens_total");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        s.metric("rwkv_completion_tokens_total"),
        generated,
        "still generating"
    );
    let (st, v) = s.post(
        "/v1/completions",
        &completion("next", json!({"max_tokens": 4})),
    );
    assert_eq!(st, 200, "{v}");
}

#[test]
fn sigterm_ends_streams_cleanly_and_exits_zero() {
    let mut s = Server::start(&["--max-tokens-limit", "1000000", "--shutdown-grace", "0.3"]);
    let mut r = long_stream(&s);
    s.terminate();
    let mut events = Vec::new();
    while let Some(e) = r.next_event() {
        events.push(e);
    }
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        "length",
        "{:?}",
        &events[events.len().saturating_sub(3)..]
    );
    let st = s.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
    assert!(TcpStream::connect(("127.0.0.1", s.port)).is_err());
}

#[test]
fn the_official_openai_client_works() {
    let have = Command::new("python3")
        .args(["-c", "import openai"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but the `openai` Python package is missing (.ci/run installs it)"
        );
        eprintln!("SKIPPED the_official_openai_client_works: `python3 -c 'import openai'` failed (pip install openai)");
        return;
    }
    let s = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(s.port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tests/openai_client.py timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tests/openai_client.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The model's log-softmax of every position of `tokens` (one fresh state), from the logits
/// `rwkv logits` prints, over the 256 tokens the byte tokenizer can produce (the fixture's
/// head has 300 rows).
fn reference_logprobs(tokens: &[u32]) -> Vec<Vec<f64>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/v7/model.safetensors"
    );
    let model = rwkv::model::Model::load(std::path::Path::new(path)).unwrap();
    let mut st = model.new_state();
    let all = model
        .forward(tokens, &mut st, rwkv::model::Logits::All)
        .unwrap();
    all.chunks_exact(model.vocab_size())
        .map(|row| {
            let row = &row[..256];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row.iter().map(|&l| l as f64 - lse).collect()
        })
        .collect()
}

#[test]
fn echo_and_logprobs_are_the_models_log_probabilities() {
    let s = Server::start(&[]);
    let prompt = "ROMEO: But soft";
    let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let want = reference_logprobs(&ids);
    // lm-evaluation-harness's log-likelihood request: echo, one logprob, one token.
    for (max_tokens, p) in [(1, json!(prompt)), (0, json!(ids)), (1, json!([ids]))] {
        let body = json!({"prompt": p, "echo": true, "logprobs": 3, "max_tokens": max_tokens,
                          "temperature": 0});
        let (st, v) = s.post("/v1/completions", &body);
        assert_eq!(st, 200, "{v}");
        let c = &v["choices"][0];
        let text = c["text"].as_str().unwrap();
        assert!(text.starts_with(prompt), "{v}");
        let lp = &c["logprobs"];
        let toks = lp["tokens"].as_array().unwrap();
        assert_eq!(toks.len(), ids.len() + max_tokens, "{v}");
        assert_eq!(toks[0], "R");
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        for (i, &id) in ids.iter().enumerate().skip(1) {
            let got = lp["token_logprobs"][i].as_f64().unwrap();
            let exact = want[i - 1][id as usize];
            assert!((got - exact).abs() < 1e-4, "token {i}: {got} vs {exact}");
            let top = lp["top_logprobs"][i].as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 3, "{v}");
            let best = want[i - 1]
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            let top_best = top
                .values()
                .map(|x| x.as_f64().unwrap())
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                (top_best - best).abs() < 1e-4,
                "token {i}: {top_best} vs {best}"
            );
        }
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(offsets[..3], [0, 1, 2]);
        if max_tokens == 1 {
            // The greedy token is the most likely one after the whole prompt.
            let last = want.last().unwrap();
            let argmax = (0..256)
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .unwrap();
            let got = lp["token_logprobs"][ids.len()].as_f64().unwrap();
            assert!(
                (got - last[argmax]).abs() < 1e-4,
                "{got} vs {}",
                last[argmax]
            );
        } else {
            assert_eq!(text, prompt);
            assert_eq!(usage(&v).1, 0);
        }
    }
    // Without echo, the logprobs are the generated tokens' only; streamed, the same values.
    let body = completion(
        prompt,
        json!({"logprobs": 2, "max_tokens": 6, "temperature": 0}),
    );
    let (_, whole) = s.post("/v1/completions", &body);
    let lp = &whole["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6, "{whole}");
    assert_eq!(lp["text_offset"][0], prompt.len());
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let (events, done) = s.stream("/v1/completions", &stream_body);
    assert!(done);
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| {
            e["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .cloned()
        })
        .flatten()
        .collect();
    assert_eq!(&streamed, lp["token_logprobs"].as_array().unwrap());
    assert_eq!(streamed_text(&events), text_of(&whole));
}

#[test]
fn chat_logprobs_come_in_openai_shape() {
    let s = Server::start(&[]);
    let body = chat(
        &[("user", "Hi")],
        json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 5, "temperature": 0}),
    );
    let (st, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, usage(&v).1, "{v}");
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        // Greedy: the chosen token is the most likely.
        assert_eq!(e["logprob"], top[0]["logprob"], "{e}");
        assert_eq!(e["token"], top[0]["token"], "{e}");
        assert!(e["bytes"].is_array());
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
    }
    let (st, v) = s.post("/v1/chat/completions", &chat(&[("user", "Hi")], json!({})));
    assert_eq!(st, 200);
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
}

#[test]
fn n_choices_share_one_prompt() {
    let s = Server::start(&[]);
    let c = "/v1/completions";
    // Greedy choices are all the one greedy completion.
    let (_, one) = s.post(
        c,
        &completion("JULIET:", json!({"max_tokens": 8, "temperature": 0})),
    );
    let (st, v) = s.post(
        c,
        &completion(
            "JULIET:",
            json!({"max_tokens": 8, "temperature": 0, "n": 3}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
        assert_eq!(ch["text"], one["choices"][0]["text"]);
    }
    // The prompt counts once, the completions add up.
    assert_eq!(usage(&v).0, usage(&one).0);
    assert_eq!(usage(&v).1, 3 * usage(&one).1);
    // Sampled choices differ, and a seed makes them reproducible.
    let body = completion(
        "JULIET:",
        json!({"max_tokens": 12, "temperature": 1.0, "n": 4, "seed": 9}),
    );
    let (_, a) = s.post(c, &body);
    let (_, b) = s.post(c, &body);
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b));
    let mut distinct = texts(&a);
    distinct.dedup();
    assert!(distinct.len() > 1, "{:?}", texts(&a));
    // Streamed: every choice's chunks carry its index and add up to the same texts.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (events, done) = s.stream(c, &sb);
    assert!(done);
    let mut streamed = vec![String::new(); 4];
    for e in &events {
        for ch in e["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            streamed[i].push_str(ch["text"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(streamed, texts(&a));
    // Chat too.
    let body = chat(
        &[("user", "Hi")],
        json!({"max_tokens": 6, "n": 2, "seed": 3}),
    );
    let (st, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
}

#[test]
fn several_prompts_answer_in_order() {
    let s = Server::start(&[]);
    let c = "/v1/completions";
    let greedy = |p: &str| {
        let (_, v) = s.post(
            c,
            &completion(p, json!({"max_tokens": 5, "temperature": 0})),
        );
        text_of(&v)
    };
    let (a, b) = (greedy("ROMEO:"), greedy("To be"));
    let (st, v) = s.post(
        c,
        &json!({"prompt": ["ROMEO:", "To be"], "max_tokens": 5, "temperature": 0, "n": 2}),
    );
    assert_eq!(st, 200, "{v}");
    let got: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(got, [a.as_str(), a.as_str(), b.as_str(), b.as_str()]);
}

#[test]
fn tokenizer_endpoints_round_trip() {
    let s = Server::start(&[]);
    let (st, info) = s.get("/tokenizer_info");
    assert_eq!(st, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["vocab_size"], 300);
    let (st, v) = s.post(
        "/tokenize",
        &json!({"prompt": "héllo", "add_special_tokens": false}),
    );
    assert_eq!(st, 200, "{v}");
    let ids = v["tokens"].clone();
    assert_eq!(ids, json!("héllo".bytes().collect::<Vec<u8>>()));
    assert_eq!(v["count"], 6);
    let (st, v) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["prompt"], "héllo");
    // Chat messages tokenize as the chat endpoint renders them.
    let (_, v) = s.post(
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    let text: String = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8 as char)
        .collect();
    assert_eq!(text, "User: Hi\n\nAssistant:");
}

#[test]
fn api_keys_guard_every_endpoint_but_health() {
    let dir = std::env::temp_dir().join(format!("rwkv-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.txt");
    std::fs::write(&file, "# team keys\nsk-second\n\n  sk-third  \n").unwrap();
    let s = Server::start(&[
        "--api-key",
        "sk-first",
        "--api-key-file",
        file.to_str().unwrap(),
    ]);
    let body = completion("x", json!({"max_tokens": 1})).to_string();
    let call = |auth: &str| {
        let mut r = s.send_with("POST", "/v1/completions", body.as_bytes(), auth);
        let v: Value = serde_json::from_slice(&r.body()).unwrap();
        (r.status, v)
    };
    for auth in [
        "",
        "Authorization: Bearer sk-wrong\r\n",
        "Authorization: sk-first\r\n",
    ] {
        let (st, v) = call(auth);
        assert_eq!(st, 401, "{auth}: {v}");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    for key in ["sk-first", "sk-second", "sk-third"] {
        let (st, v) = call(&format!("Authorization: Bearer {key}\r\n"));
        assert_eq!(st, 200, "{key}: {v}");
    }
    for path in ["/v1/models", "/metrics", "/tokenizer_info"] {
        assert_eq!(s.get(path).0, 401, "{path}");
    }
    assert_eq!(s.get("/health").0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn embeddings_are_the_unit_last_channel_mix_input() {
    let s = Server::start(&[]);
    let texts = ["To be, or not to be", "ROMEO:"];
    let (st, v) = s.post("/v1/embeddings", &json!({"model": "model", "input": texts}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "list");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/v7/model.safetensors"
    );
    let model = rwkv::model::Model::load(std::path::Path::new(path)).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let d = &v["data"][i];
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        let got: Vec<f64> = d["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let ids: Vec<u32> = t.bytes().map(u32::from).collect();
        let mut st = model.new_state();
        model
            .forward(&ids, &mut st, rwkv::model::Logits::None)
            .unwrap();
        let want = st.get(st.n_layer() - 1, rwkv::model::Slot::FfnShift);
        let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - (w / norm) as f64).abs() < 1e-5, "{g} vs {}", w / norm);
        }
    }
    let total = texts.iter().map(|t| t.len()).sum::<usize>();
    assert_eq!(v["usage"]["prompt_tokens"], total);
    // base64: the same floats, little-endian.
    let (_, b) = s.post(
        "/v1/embeddings",
        &json!({"input": texts[1], "encoding_format": "base64"}),
    );
    let (_, f) = s.post("/v1/embeddings", &json!({"input": [texts[1]]}));
    let b64 = b["data"][0]["embedding"].as_str().unwrap();
    let bytes = decode_base64(b64);
    let floats: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    let want: Vec<f64> = f["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(floats.len(), want.len());
    for (a, b) in floats.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6);
    }
    for (body, param) in [
        (json!({}), "input"),
        (json!({"input": {"a": 1}}), "input"),
        (
            json!({"input": "x", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"input": "x", "dimensions": 3}), "dimensions"),
    ] {
        let (st, v) = s.post("/v1/embeddings", &body);
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{v}"
        );
    }
}

/// Standard base64 (with padding) to bytes.
fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let digits: Vec<u8> = chunk
            .iter()
            .filter(|&&c| c != b'=')
            .map(|&c| val(c))
            .collect();
        let n = digits.iter().fold(0u32, |a, &d| a << 6 | d as u32) << (6 * (4 - digits.len()));
        out.extend_from_slice(&n.to_be_bytes()[1..digits.len()]);
    }
    out
}

/// A schema whose every value is bounded, so that even a random model finishes it.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "poet": {"type": "boolean"}
        },
        "required": ["name", "age", "poet"],
        "additionalProperties": false
    })
}

#[test]
fn structured_output_always_parses() {
    let s = Server::start(&[]);
    let rf = json!({"type": "json_schema",
                    "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    for seed in 0..4 {
        let body = chat(
            &[("user", "Who?")],
            json!({"response_format": rf, "max_tokens": 200, "seed": seed, "n": 2}),
        );
        let (st, v) = s.post("/v1/chat/completions", &body);
        assert_eq!(st, 200, "{v}");
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "stop", "{v}");
            let text = c["message"]["content"].as_str().unwrap();
            let p: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let o = p.as_object().unwrap();
            assert_eq!(o.len(), 3, "{text}");
            assert!(o["name"].as_str().unwrap().chars().count() <= 8, "{text}");
            assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text}");
            assert!(o["poet"].is_boolean(), "{text}");
        }
    }
    // Streamed, the same text.
    let body = completion(
        "Data:",
        json!({"response_format": rf, "max_tokens": 200, "seed": 5}),
    );
    let (_, whole) = s.post("/v1/completions", &body);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (events, done) = s.stream("/v1/completions", &sb);
    assert!(done);
    assert_eq!(streamed_text(&events), text_of(&whole));
    serde_json::from_str::<Value>(&text_of(&whole)).unwrap();
    // A regular expression and a Lark grammar.
    let (_, v) = s.post(
        "/v1/completions",
        &completion(
            "x",
            json!({"grammar": {"type": "regex", "regex": "[ab]{3}-[0-9]{2}"},
                                "max_tokens": 50, "seed": 1}),
        ),
    );
    let t = text_of(&v);
    assert!(
        t.len() == 6 && t[..3].chars().all(|c| "ab".contains(c)) && &t[3..4] == "-",
        "{t}"
    );
    let lark = "start: \"yes\" | \"no\"";
    let (_, v) = s.post(
        "/v1/completions",
        &completion("x", json!({"grammar": lark, "max_tokens": 50})),
    );
    assert!(["yes", "no"].contains(&text_of(&v).as_str()), "{v}");
    // Refused grammars name the field.
    for (extra, param) in [
        (json!({"grammar": "start: ("}), "grammar"),
        (json!({"grammar": {"type": "ebnf", "ebnf": "x"}}), "grammar"),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"schema": {"type": "frobnicate"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "grammar": "start: \"a\""}),
            "grammar",
        ),
    ] {
        let (st, v) = s.post("/v1/completions", &completion("x", extra.clone()));
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{extra}: {v}"
        );
    }
    // json_object: whatever the model writes is an object.
    let (_, v) = s.post(
        "/v1/chat/completions",
        &chat(
            &[("user", "Hi")],
            json!({"response_format": {"type": "json_object"},
                                        "max_tokens": 300, "seed": 2}),
        ),
    );
    let c = &v["choices"][0];
    let text = c["message"]["content"].as_str().unwrap();
    assert!(text.starts_with('{'), "{v}");
    if c["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    }
}

#[test]
fn the_openapi_description_is_what_the_server_serves() {
    let s = Server::start(&[]);
    let (st, text) = s.get("/openapi.json");
    assert_eq!(st, 200);
    let spec: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    let mut described: Vec<(String, String)> = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            described.push((method.to_uppercase(), path.clone()));
            // Every example request is one the server accepts.
            if let Some(ex) = op["requestBody"]["content"]["application/json"].get("example") {
                let (st, v) = s.post(path, ex);
                assert_eq!(st, 200, "{method} {path} {ex}: {v}");
            }
        }
    }
    let mut served: Vec<(String, String)> = rwkv::server::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    described.sort();
    served.sort();
    assert_eq!(described, served, "the description and the routes differ");
    // And every route answers (a GET of a POST route would be 405, an unknown one 404).
    for (method, path) in &served {
        let path = path.replace("{id}", "model");
        let r = s.send(method, &path, b"{}");
        // (The fixture is served as "model", its file's name.)
        assert!(
            ![404, 405].contains(&r.status),
            "{method} {path}: {}",
            r.status
        );
    }
}

#[test]
fn a_named_state_is_the_prompt_it_was_made_from() {
    let dir = std::env::temp_dir().join(format!("rwkv-states-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/v7/model.safetensors"
    );
    // A persona: the state after reading `persona`, saved by `rwkv logits`.
    let persona = "System: You speak in verse.\n\n";
    let ids: Vec<String> = persona.bytes().map(|b| b.to_string()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args(["logits", "--model", model, "--tokens", &ids.join(",")])
        .arg("--out")
        .arg(dir.join("poet.safetensors"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Server::start(&["--state-dir", dir.to_str().unwrap()]);
    let (st, v) = s.get("/v1/states");
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["data"][0]["id"], "poet", "{v}");
    // Reading "User: Hi" from the state is reading the persona and then it.
    let greedy = json!({"max_tokens": 12, "temperature": 0});
    let mut with_state = greedy.clone();
    with_state["state"] = json!("poet");
    let (st, a) = s.post(
        "/v1/completions",
        &completion("User: Hi", with_state.clone()),
    );
    assert_eq!(st, 200, "{a}");
    let (_, b) = s.post(
        "/v1/completions",
        &completion(&format!("{persona}User: Hi"), greedy.clone()),
    );
    assert_eq!(text_of(&a), text_of(&b));
    // The cache keeps prompts read from the state apart from the same prompt without it: after
    // the plain prompt, the prompt from the state still hits its own entry.
    let (_, plain) = s.post("/v1/completions", &completion("User: Hi", greedy));
    assert_eq!(
        plain["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{plain}"
    );
    let (_, again) = s.post("/v1/completions", &completion("User: Hi", with_state));
    assert_eq!(text_of(&again), text_of(&a));
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"],
        "User: Hi".len()
    );
    let (st, v) = s.post(
        "/v1/chat/completions",
        &chat(&[("user", "x")], json!({"state": "nobody"})),
    );
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("state")),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 10},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": false}}})
}

#[test]
fn tools_are_called_with_arguments_that_follow_their_schemas() {
    let s = Server::start(&[]);
    let clock = json!({"type": "function", "function": {"name": "now", "parameters":
        {"type": "object", "properties": {}, "additionalProperties": false}}});
    let tools = json!([weather_tool(), clock]);
    let ch = "/v1/chat/completions";
    for (choice, want) in [
        (json!("required"), None),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            Some("get_weather"),
        ),
        (
            json!({"type": "function", "function": {"name": "now"}}),
            Some("now"),
        ),
    ] {
        for seed in 0..3 {
            let body = chat(
                &[("user", "Weather in Paris?")],
                json!({"tools": tools, "tool_choice": choice, "max_tokens": 200, "seed": seed,
                       "parallel_tool_calls": seed == 0}),
            );
            let (st, v) = s.post(ch, &body);
            assert_eq!(st, 200, "{v}");
            let c = &v["choices"][0];
            assert_eq!(c["finish_reason"], "tool_calls", "{v}");
            assert!(c["message"]["content"].is_null(), "{v}");
            for call in c["message"]["tool_calls"].as_array().unwrap() {
                assert_eq!(call["type"], "function");
                assert!(call["id"].as_str().unwrap().starts_with("call-"), "{call}");
                let name = call["function"]["name"].as_str().unwrap();
                if let Some(w) = want {
                    assert_eq!(name, w);
                }
                let args: Value =
                    serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
                match name {
                    "get_weather" => {
                        assert!(
                            args["city"].as_str().unwrap().chars().count() <= 10,
                            "{args}"
                        );
                        assert!((1..=7).contains(&args["days"].as_i64().unwrap()), "{args}");
                    }
                    "now" => assert_eq!(args, json!({})),
                    other => panic!("called {other}"),
                }
            }
        }
    }
    // Streamed: one chunk carries the whole calls, then the finish reason.
    let body = chat(
        &[("user", "Weather?")],
        json!({"tools": tools, "tool_choice": "required", "max_tokens": 200, "seed": 1,
               "stream": true, "parallel_tool_calls": false}),
    );
    let (events, done) = s.stream(ch, &body);
    assert!(done);
    let calls: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(calls.len(), 1, "{events:?}");
    assert_eq!(calls[0][0]["index"], 0);
    let last = events
        .iter()
        .rev()
        .find(|e| !e["choices"][0].is_null())
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    // A conversation with a call and its result; `none` answers in text; auto either way.
    let body = json!({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call-1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"}],
        "tools": tools, "tool_choice": "none", "max_tokens": 20, "seed": 3});
    let (st, v) = s.post(ch, &body);
    assert_eq!(st, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    let (st, v) = s.post(
        ch,
        &chat(&[("user", "Hi")], json!({"tools": tools, "max_tokens": 30})),
    );
    assert_eq!(st, 200, "{v}");
    let m = &v["choices"][0]["message"];
    assert!(
        m["content"].is_string() != m.get("tool_calls").is_some(),
        "{v}"
    );
    // Refused: a name that is not offered, a malformed tool, tools with a grammar.
    for (extra, param) in [
        (
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "fly"}}}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0]",
        ),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0]"),
        (
            json!({"tools": tools, "response_format": {"type": "json_object"}}),
            "tools",
        ),
    ] {
        let (st, v) = s.post(ch, &chat(&[("user", "x")], extra.clone()));
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{extra}: {v}"
        );
    }
}

/// A client that sends its request headers too slowly loses its connection after
/// `--header-timeout` seconds; the server goes on serving everyone else.
#[test]
fn a_client_trickling_headers_is_cut_off() {
    let s = Server::start(&["--header-timeout", "1"]);
    let mut slow = s.connect();
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    // A header byte every 200 ms: the limit is on the whole head, not on the gaps.
    let closed_after = loop {
        let gone = slow.write_all(b"X").is_err()
            || match slow.read(&mut buf) {
                Ok(_) => true, // end of stream (0) or an error response before the close
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
        if gone {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the connection stayed open for 10 s"
        );
    };
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed after {closed_after:?}"
    );
    assert_eq!(s.get("/health").0, 200);
}
