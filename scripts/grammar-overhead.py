#!/usr/bin/env python3
"""The per-token cost of structured output on a running `rwkv serve` (standard library only;
loopback only): one client, requests of at most `--tokens` tokens alternated between a plain
completion and one constrained to a JSON schema with one string field, `--rounds` times; the
median time per generated token of each (the request's time after its first token over the
tokens after the first, as its usage counts them), and the server's own measure of the time
each constrained token spends in the grammar (`rwkv_grammar_microseconds_total` over
`rwkv_grammar_tokens_total`: computing the mask, masking the logits, advancing the matcher).

Usage: scripts/grammar-overhead.py --port 8000 [--tokens 64] [--rounds 7]
"""
import argparse
import http.client
import json
import statistics
import time

import serve_metrics  # scripts/serve_metrics.py

ap = argparse.ArgumentParser()
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--rounds", type=int, default=7)
a = ap.parse_args()
assert a.host in ("127.0.0.1", "localhost", "::1"), "loopback only"
schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


def per_token(extra):
    body = dict(prompt="Once upon a time", max_tokens=a.tokens, stream=True, seed=1,
                logit_bias={"0": -100}, stream_options={"include_usage": True}, **extra)
    c = http.client.HTTPConnection(a.host, a.port, timeout=300)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    first, end, n = None, None, 0
    for line in r:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            v = json.loads(line[6:])
            if v["choices"] and v["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if v.get("usage"):
                n = v["usage"]["completion_tokens"]
                end = time.perf_counter()
    assert n > 1, "too few tokens to time"
    return (end - first) / (n - 1)


res = {"plain": [], "json_schema": []}
for r in range(a.rounds):
    for kind in (["plain", "json_schema"] if r % 2 == 0 else ["json_schema", "plain"]):
        extra = {} if kind == "plain" else {
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
        res[kind].append(per_token(extra))
def metric(name):
    return serve_metrics.metric(a.host, a.port, name)


p, g = statistics.median(res["plain"]), statistics.median(res["json_schema"])
grammar_us = metric("rwkv_grammar_microseconds_total") / max(1, metric("rwkv_grammar_tokens_total"))
print(f"{a.tokens} tokens per request, medians of {a.rounds} alternated rounds:")
print(f"  plain        {p * 1000:7.2f} ms/token")
print(f"  json_schema  {g * 1000:7.2f} ms/token  ({g / p:.2f}x)")
print(f"  the server's own count: {grammar_us:.0f} us per constrained token in the grammar "
      f"(mask, masking the logits, advancing it)")
