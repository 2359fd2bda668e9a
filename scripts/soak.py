#!/usr/bin/env python3
"""Soak test of `rwkv serve` (standard library only; loopback only; bounded in time).

    python3 scripts/soak.py [--rwkv target/release/rwkv] [--model M] [--duration 600]
        [--clients 64] [--port 8131] [--json OUT.json]

Starts the server itself (the built-in model unless `--model`), warms it up, then runs
`--clients` concurrent clients for `--duration` seconds, each drawing its next request from a
mix: plain and streaming chat completions, completions with `logprobs` and `echo`, streams the
client drops after a random number of chunks, malformed bodies (garbage bytes, broken JSON,
wrong types, unknown roles), bodies over the server's 4 MiB limit, and slow clients that
trickle a body or the headers one byte a second (at most 4 at a time), which the server must
cut off (a body with a 408, headers by closing the connection). The server's RSS is sampled every 2 s.

Checks: no response with a 5xx status, no panic in the server's log, no stream left hanging
(every stream the client does not drop ends with `data: [DONE]` within 60 s), every malformed
or oversized body answered with a 4xx, every trickling client cut off by the server, and the
RSS at the end within 10 % of the RSS after the warm-up. Prints the counts, the p50/p99
latency of plain requests and the RSS series' summary; exit status 0 when every check holds.
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.plain_latency = []
        self.failures = []

    def add(self, key, latency=None, failure=None):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if latency is not None:
                self.plain_latency.append(latency)
            if failure and len(self.failures) < 50:
                self.failures.append(failure)


def chat_body(stream, max_tokens):
    return {"model": "rwkv", "stream": stream, "max_tokens": max_tokens,
            "temperature": 1.0, "top_p": 0.9,
            "messages": [{"role": "user", "content": random.choice(
                ["Who art thou?", "Speak.", "What news?", "Tell me of Rome."])}]}


def post(port, path, body, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, data, {"Content-Type": "application/json"})
    return c, c.getresponse()


def plain(port, t):
    start = time.monotonic()
    c, r = post(port, "/v1/chat/completions", chat_body(False, 24))
    r.read()
    c.close()
    if r.status >= 500:
        t.add("5xx", failure=f"plain: {r.status}")
    t.add("plain", latency=time.monotonic() - start)


def completion_logprobs(port, t):
    c, r = post(port, "/v1/completions", {"model": "rwkv", "prompt": "ROMEO:", "max_tokens": 8,
                                          "logprobs": 3, "echo": True})
    body = r.read()
    c.close()
    if r.status >= 500:
        t.add("5xx", failure=f"logprobs: {r.status}")
    elif r.status == 200 and "logprobs" not in json.loads(body)["choices"][0]:
        t.add("bad_reply", failure="logprobs missing")
    t.add("logprobs")


def stream(port, t, drop):
    c, r = post(port, "/v1/chat/completions", chat_body(True, 48))
    if r.status >= 500:
        t.add("5xx", failure=f"stream: {r.status}")
    if r.status != 200:
        r.read()
        c.close()
        return
    stop_after = random.randint(0, 10) if drop else None
    chunks = 0
    try:
        while True:
            line = r.fp.readline()
            if not line:
                t.add("hanging", failure="stream closed without [DONE]")
                break
            if line.startswith(b"data: "):
                if line.strip() == b"data: [DONE]":
                    break
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    break
    except socket.timeout:
        t.add("hanging", failure="stream silent for 60 s")
    finally:
        c.close()
    t.add("dropped_stream" if drop else "stream")


MALFORMED = [
    b"", b"{", b"null", b"[]", b'{"messages": 5}', b'{"messages": [{"role": "wizard"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
    b'{"prompt": {"a": 1}}', b"\xff\xfe\x00garbage",
]


def malformed(port, t):
    body = random.choice(MALFORMED) if random.random() < 0.7 else os.urandom(random.randint(1, 300))
    path = random.choice(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
    c, r = post(port, path, body)
    r.read()
    c.close()
    if not 400 <= r.status < 500:
        t.add("malformed_not_4xx", failure=f"malformed {body[:40]!r} on {path}: {r.status}")
    t.add("malformed")


def oversized(port, t):
    body = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    try:
        c, r = post(port, "/v1/completions", body)
        r.read()
        c.close()
        status = r.status
    except (BrokenPipeError, ConnectionResetError):
        status = 413  # the server answered and closed before the whole body was sent
    if not 400 <= status < 500:
        t.add("oversized_not_4xx", failure=f"oversized: {status}")
    t.add("oversized")


TRICKLING = threading.Semaphore(4)


def trickle(port, t):
    if not TRICKLING.acquire(blocking=False):
        return plain(port, t)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=70)
        body = json.dumps(chat_body(False, 4)).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        start = time.monotonic()
        s.setblocking(False)
        reply = b""
        for i in range(len(body)):
            try:
                s.send(body[i:i + 1])
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                break
            try:
                reply += s.recv(4096)
                if reply:
                    break
            except BlockingIOError:
                pass
            time.sleep(1.0)
            if time.monotonic() - start > 60:
                break
        s.setblocking(True)
        s.settimeout(10)
        try:
            reply += s.recv(4096)
        except (socket.timeout, ConnectionResetError):
            pass
        s.close()
        status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.1 ") else b"none"
        if status != b"408":
            t.add("trickle_not_cut", failure=f"trickling client got {status!r}")
        t.add("trickle")
    finally:
        TRICKLING.release()


def trickle_headers(port, t):
    """A client that sends its request headers a byte a second: the server must close the
    connection once its header time limit (30 s by default) has passed."""
    if not TRICKLING.acquire(blocking=False):
        return plain(port, t)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1.0)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 45:
            try:
                s.sendall(b"X")
                if s.recv(4096) is not None:
                    closed = True  # end of stream (b"") or a response before the close
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        s.close()
        if not closed:
            t.add("header_trickle_not_cut", failure="a client trickling headers held on for 45 s")
        t.add("header_trickle")
    finally:
        TRICKLING.release()


MIX = [(plain, 38), (lambda p, t: stream(p, t, False), 28), (lambda p, t: stream(p, t, True), 12),
       (completion_logprobs, 6), (malformed, 10), (oversized, 2), (trickle, 2),
       (trickle_headers, 2)]


def client(port, deadline, t):
    actions, weights = zip(*MIX)
    while time.monotonic() < deadline:
        action = random.choices(actions, weights)[0]
        try:
            action(port, t)
        except (socket.timeout, TimeoutError) as e:
            t.add("timeout", failure=f"{getattr(action, '__name__', 'stream')}: {e}")
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            t.add("connection_error", failure=f"{getattr(action, '__name__', 'stream')}: {e!r}")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rwkv", default=os.path.join(ROOT, "target", "release", "rwkv"))
    ap.add_argument("--model", help="default: the built-in model")
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--warmup", type=float, default=20)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--port", type=int, default=8131)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()

    log_path = f"/tmp/rwkv-soak-{a.port}.log"
    cmd = [a.rwkv, "serve", "--port", str(a.port), "--queue", "256"] + (
        ["--model", a.model] if a.model else [])
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("the server did not come up")

        t = Tally()
        rss = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                rss.append((time.monotonic(), rss_kb(server.pid)))
                stop.wait(2)

        threading.Thread(target=sample, daemon=True).start()
        warm = Tally()
        ws = [threading.Thread(target=client, args=(a.port, time.monotonic() + a.warmup, warm))
              for _ in range(a.clients)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
        rss_warm = rss_kb(server.pid)
        start = time.monotonic()
        cs = [threading.Thread(target=client, args=(a.port, start + a.duration, t))
              for _ in range(a.clients)]
        for c in cs:
            c.start()
        for c in cs:
            c.join(a.duration + 120)
        hung_clients = sum(c.is_alive() for c in cs)
        time.sleep(3)
        rss_end = rss_kb(server.pid)
        stop.set()
        alive = server.poll() is None
    finally:
        server.send_signal(2)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    panics = sum("panicked" in line for line in open(log_path, errors="replace"))
    lat = sorted(t.plain_latency)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    figures = {
        "duration_s": a.duration, "clients": a.clients, "counts": t.counts,
        "plain_p50_s": p(0.50), "plain_p99_s": p(0.99),
        "rss_after_warmup_mb": rss_warm / 1024, "rss_end_mb": rss_end / 1024,
        "rss_max_mb": max(r for _, r in rss) / 1024, "rss_growth": growth,
        "server_panics": panics, "server_alive_at_end": alive, "hung_clients": hung_clients,
        "failures": t.failures,
    }
    bad = {k: v for k, v in t.counts.items()
           if k in ("5xx", "hanging", "malformed_not_4xx", "oversized_not_4xx",
                    "trickle_not_cut", "header_trickle_not_cut", "bad_reply", "timeout",
                    "connection_error")}
    ok = not bad and panics == 0 and alive and hung_clients == 0 and abs(growth) <= 0.10
    print(json.dumps({k: v for k, v in figures.items() if k != "failures"}, indent=1))
    for f in t.failures[:20]:
        print("failure:", f)
    print("PASS" if ok else f"FAIL: {bad or ''} panics={panics} alive={alive} "
          f"hung={hung_clients} rss_growth={growth:+.1%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
