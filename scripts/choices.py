#!/usr/bin/env python3
"""`n` choices against `n` separate requests, on a running `rwkv serve` (standard library
only; loopback only).

One completions request with `n` choices reads its prompt once and forks the state; `n`
separate requests (sent at once, so that they are batched together) read it `n` times unless
the prefix cache already holds it. This sends both shapes alternately, `--rounds` times, each
with a fresh random prompt of about `--prompt-chars` characters (so no round finds it in the
cache), and reports the medians of the wall time and the prompt tokens the server read (its
`/metrics` counters).

Usage: scripts/choices.py --port 8000 [--n 4] [--prompt-chars 2000] [--max-tokens 32]
                          [--rounds 5]
"""
import argparse
import http.client
import json
import random
import statistics
import threading
import time

import serve_metrics  # scripts/serve_metrics.py

ap = argparse.ArgumentParser()
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--n", type=int, default=4)
ap.add_argument("--prompt-chars", type=int, default=2000)
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--rounds", type=int, default=5)
a = ap.parse_args()
assert a.host in ("127.0.0.1", "localhost", "::1"), "loopback only"


def post(body):
    c = http.client.HTTPConnection(a.host, a.port, timeout=300)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    v = json.loads(r.read())
    assert r.status == 200, v
    return v


def metric(name):
    return serve_metrics.metric(a.host, a.port, name)


def read_tokens():
    return metric("rwkv_prompt_tokens_total") - metric("rwkv_cached_prompt_tokens_total")


words = "the of and to in my you that is not with his be your for have he me so this".split()
rng = random.Random(7)
results = {"n choices": [], "separate requests": []}
for r in range(a.rounds):
    shapes = ["n choices", "separate requests"]
    if r % 2:
        shapes.reverse()
    for shape in shapes:
        prompt = ""
        while len(prompt) < a.prompt_chars:
            prompt += rng.choice(words) + " "
        body = {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 1.0, "seed": r}
        before = read_tokens()
        t = time.perf_counter()
        if shape == "n choices":
            v = post(dict(body, n=a.n))
            assert len(v["choices"]) == a.n
        else:
            threads = [threading.Thread(target=post, args=(body,)) for _ in range(a.n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        results[shape].append((time.perf_counter() - t, read_tokens() - before))
print(f"n = {a.n}, prompt of {a.prompt_chars} characters, {a.max_tokens} tokens per choice, "
      f"medians of {a.rounds} rounds alternated:")
for shape, rs in results.items():
    print(f"  {shape:18} {statistics.median(x[0] for x in rs):7.2f} s, "
          f"{statistics.median(x[1] for x in rs):7.0f} prompt tokens read")
t1 = statistics.median(x[0] for x in results["n choices"])
t2 = statistics.median(x[0] for x in results["separate requests"])
print(f"  separate / n choices: {t2 / t1:.2f}x the time")
