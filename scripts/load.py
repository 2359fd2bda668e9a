#!/usr/bin/env python3
"""Load test for `rwkv serve` (standard library only; loopback only; bounded in time and count).

Start a server first, e.g.

    cargo run --release -- serve --model M --port 8000 &
    python3 scripts/load.py --port 8000                # the full run (about 2.5 minutes)
    python3 scripts/load.py --port 8000 --duration 10  # a quick check

It measures, one phase after the other:

1. `--clients` concurrent streaming clients (default 32) for `--duration` seconds (default 60):
   errors, aggregate generated tokens/s, p50/p99 time to first token, p50/p99 per-token
   latency (the gap between successive streamed chunks; a chunk is one token, except where a
   character spans several tokens);
2. aggregate tokens/s with 1 and with 8 concurrent clients (`--compare-duration` seconds each),
   and their ratio;
3. a ~2,000-token shared system prompt (`--system-tokens`): time to first token when its state
   is in the server's prefix cache (same system prompt, new user message) and when it is not
   (a unique system prompt), `--cache-rounds` times each.

Every request has a socket timeout, every phase a deadline, and the whole run a request cap,
so the script always stops by itself. Only loopback addresses are accepted.
"""

import argparse
import http.client
import ipaddress
import json
import random
import statistics
import sys
import threading
import time

REQUEST_CAP = 20000  # most requests in one run, whatever the durations


def loopback_only(host):
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    sys.exit(f"refusing to send load to {host!r}: loopback addresses only")


def pct(values, p):
    """The p-th percentile (nearest rank) of values, or None."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def ms(x):
    return "n/a" if x is None else f"{x * 1000:.1f} ms"


class Client:
    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self.model = None

    def get_json(self, path):
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path}: {r.status} {body[:200]!r}")
            return json.loads(body)
        finally:
            c.close()

    def stream(self, path, body):
        """POSTs a streaming request. Returns a dict: ok, error, ttft, gaps, tokens, end."""
        body = dict(body, model=self.model, stream=True, stream_options={"include_usage": True})
        data = json.dumps(body).encode()
        out = {"ok": False, "error": None, "ttft": None, "gaps": [], "tokens": 0, "prompt": 0}
        t0 = time.monotonic()
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
                return out
            last = None
            done = False
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                ev = json.loads(payload)
                if "error" in ev:
                    out["error"] = f"stream error: {ev['error'].get('message')}"
                    return out
                if ev.get("usage"):
                    out["tokens"] = ev["usage"]["completion_tokens"]
                    out["prompt"] = ev["usage"]["prompt_tokens"]
                for ch in ev.get("choices", []):
                    text = ch.get("text")
                    if text is None:
                        delta = ch.get("delta") or {}
                        # A tool call arrives whole, in one delta.
                        text = delta.get("content") or delta.get("tool_calls")
                    if text:
                        now = time.monotonic()
                        if last is None:
                            out["ttft"] = now - t0
                        else:
                            out["gaps"].append(now - last)
                        last = now
            out["ok"] = done
            if not done:
                out["error"] = "stream ended without [DONE]"
        except (OSError, http.client.HTTPException, ValueError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            c.close()
            out["end"] = time.monotonic()
        return out


class Budget:
    """The run-wide request cap, shared by all threads."""

    def __init__(self, n):
        self.n, self.lock = n, threading.Lock()

    def take(self):
        with self.lock:
            if self.n <= 0:
                return False
            self.n -= 1
            return True


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                          "lines": {"type": "array", "items": {"type": "string"},
                                                    "maxItems": 4}},
          "required": ["name", "lines"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "search", "description": "Search the plays.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40}},
                   "required": ["query"], "additionalProperties": False}}}]


def mixed_request(k, text, max_tokens):
    """The k-th request of a mixed client: plain completion, JSON-schema chat, a required tool
    call, chat with log-probabilities, in turn."""
    chat = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 1.0, "top_p": 0.9}
    kind = k % 4
    if kind == 0:
        return "/v1/completions", {"prompt": text, "max_tokens": max_tokens, "temperature": 1.0,
                                   "top_p": 0.9}
    if kind == 1:
        return "/v1/chat/completions", dict(chat, response_format={
            "type": "json_schema", "json_schema": {"name": "speech", "schema": SCHEMA}})
    if kind == 2:
        return "/v1/chat/completions", dict(chat, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False)
    return "/v1/chat/completions", dict(chat, logprobs=True, top_logprobs=5)


def closed_loop(client, budget, tag, clients, seconds, max_tokens, prompt_words, mix=False):
    """`clients` threads, each sending streaming completions back to back for `seconds`
    (with `mix`, the four kinds of `mixed_request` in turn).

    Prompts are random and tagged with the phase and client, so that no phase finds another's
    prompts in the prefix cache."""
    results, lock = [], threading.Lock()
    deadline = time.monotonic() + seconds
    words = "the state of a recurrent network carries everything it has read so far".split()

    def worker(i):
        rnd = random.Random(f"{tag}-{i}")
        k = i
        while time.monotonic() < deadline and budget.take():
            prompt = " ".join(rnd.choice(words) for _ in range(prompt_words))
            text = f"[{tag} {i}] {prompt}"
            if mix:
                path, body = mixed_request(k, text, max_tokens)
                k += 1
            else:
                path, body = "/v1/completions", {"prompt": text, "max_tokens": max_tokens,
                                                 "temperature": 1.0, "top_p": 0.9}
            r = client.stream(path, body)
            with lock:
                results.append(r)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(results),
        "errors": len(errors),
        "first_errors": errors[:3],
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50": pct(ttfts, 50),
        "ttft_p99": pct(ttfts, 99),
        "token_latency_p50": pct(gaps, 50),
        "token_latency_p99": pct(gaps, 99),
    }


def report_loop(name, r):
    print(f"{name}: {r['clients']} clients, {r['seconds']} s, {r['requests']} requests, "
          f"{r['errors']} errors, {r['tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s")
    print(f"  time to first token p50 {ms(r['ttft_p50'])}, p99 {ms(r['ttft_p99'])}; "
          f"per-token latency p50 {ms(r['token_latency_p50'])}, p99 {ms(r['token_latency_p99'])}")
    for e in r["first_errors"]:
        print(f"  error: {e}")


def system_prompt(client, budget, target_tokens, nonce):
    """A system prompt of about `target_tokens` tokens (calibrated once with the server)."""
    words = ("a recurrent model reads a long document once and keeps only its state which "
             "the server caches so that the next question about the same text starts at once").split()

    def text(n):
        return f"Session {nonce}. " + " ".join(words[i % len(words)] for i in range(n))

    n = target_tokens
    if budget.take():
        probe = client.stream("/v1/chat/completions", {
            "messages": [{"role": "system", "content": text(n)}, {"role": "user", "content": "hi"}],
            "max_tokens": 1})
        if probe["ok"] and probe["prompt"] > 0:
            n = max(1, int(n * target_tokens / probe["prompt"]))
    return text(n)


def cache_phase(client, budget, target_tokens, rounds, seed):
    rnd = random.Random(seed)
    shared = system_prompt(client, budget, target_tokens, f"shared-{rnd.getrandbits(64):x}")

    def ask(system, q):
        if not budget.take():
            return None
        return client.stream("/v1/chat/completions", {
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"Question {q}: what comes next?"}],
            "max_tokens": 4, "temperature": 0})

    warm = ask(shared, "warm-up")  # puts the shared system prompt's state in the cache
    hits, misses, prompt_tokens, errors = [], [], 0, 0
    for k in range(rounds):
        h = ask(shared, k)
        # A new nonce at the very start: no cached prefix can match.
        m = ask(shared.replace("Session shared-", f"Session miss-{rnd.getrandbits(64):x}-", 1), k)
        for r, into in ((h, hits), (m, misses)):
            if r is None:
                continue
            if r["ok"] and r["ttft"] is not None:
                into.append(r["ttft"])
                prompt_tokens = r["prompt"]
            else:
                errors += 1
    return {
        "prompt_tokens": prompt_tokens,
        "rounds": rounds,
        "errors": errors + (0 if warm and warm["ok"] else 1),
        "ttft_hit_p50": pct(hits, 50),
        "ttft_miss_p50": pct(misses, 50),
        "ttft_hit_min": min(hits) if hits else None,
        "ttft_miss_min": min(misses) if misses else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of phase 1")
    ap.add_argument("--compare-duration", type=float, default=None,
                    help="seconds of each run of phase 2 (default: duration / 3)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--cache-rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=120.0, help="socket timeout per request")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: load,compare,cache,mix")
    ap.add_argument("--mix", action="store_true",
                    help="after phase 1, the same load mixing plain, JSON-schema, tool and logprobs requests")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    host = loopback_only(a.host)
    if not (1 <= a.clients <= 256 and 0 < a.duration <= 3600):
        sys.exit("--clients must be 1..256 and --duration 0..3600 s")
    skip = set(filter(None, a.skip.split(",")))
    client = Client(host, a.port, a.timeout)
    client.model = client.get_json("/v1/models")["data"][0]["id"]
    budget = Budget(REQUEST_CAP)
    out = {"model": client.model}
    print(f"server http://{host}:{a.port}, model {client.model}")

    if "load" not in skip:
        out["load"] = closed_loop(client, budget, "load", a.clients, a.duration, a.max_tokens, a.prompt_words)
        report_loop("load", out["load"])
    if a.mix and "mix" not in skip:
        out["mix"] = closed_loop(client, budget, "mix", a.clients, a.duration, a.max_tokens,
                                 a.prompt_words, mix=True)
        report_loop("mixed load (plain, json_schema, tools, logprobs)", out["mix"])
    if "compare" not in skip:
        d = a.compare_duration or max(1.0, a.duration / 3)
        one = closed_loop(client, budget, "one", 1, d, a.max_tokens, a.prompt_words)
        eight = closed_loop(client, budget, "eight", 8, d, a.max_tokens, a.prompt_words)
        ratio = eight["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else float("nan")
        out["compare"] = {"one": one, "eight": eight, "ratio": ratio}
        report_loop("1 client", one)
        report_loop("8 clients", eight)
        print(f"  throughput 8 clients / 1 client: {ratio:.2f}x")
    if "cache" not in skip:
        c = cache_phase(client, budget, a.system_tokens, a.cache_rounds, seed=1)
        out["cache"] = c
        print(f"cache: {c['prompt_tokens']}-token prompt, {c['rounds']} rounds, {c['errors']} errors: "
              f"time to first token hit p50 {ms(c['ttft_hit_p50'])} (min {ms(c['ttft_hit_min'])}), "
              f"miss p50 {ms(c['ttft_miss_p50'])} (min {ms(c['ttft_miss_min'])})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    errors = sum(p.get("errors", 0) for p in (out.get("load", {}), out.get("mix", {}),
                                                out.get("cache", {})))
    errors += sum(out["compare"][k]["errors"] for k in ("one", "eight")) if "compare" in out else 0
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
