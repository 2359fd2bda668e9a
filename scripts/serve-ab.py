#!/usr/bin/env python3
"""Plain-request throughput of two `rwkv serve` binaries, alternated (stdlib only; loopback).

    python3 scripts/serve-ab.py OLD_RWKV NEW_RWKV [--rounds 3] [--seconds 20] [--clients 32]

Each round starts each binary's server in turn (the built-in model), runs `--clients` clients
sending 24-token chat completions for `--seconds`, and stops it; prints requests/s and the
median latency per run, then the medians and the ratio new / old.
"""
import argparse
import http.client
import json
import statistics
import subprocess
import threading
import time


def run(binary, port, secs=20, clients=32):
    srv = subprocess.Popen([binary, "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2); c.request("GET", "/health")
            if c.getresponse().status == 200: break
        except OSError: time.sleep(0.1)
    body = json.dumps({"messages":[{"role":"user","content":"Speak."}],"max_tokens":24,"temperature":0}).encode()
    n = [0]; lat = []; lock = threading.Lock(); end = time.monotonic() + secs
    def w():
        while time.monotonic() < end:
            t = time.monotonic()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            c.getresponse().read(); c.close()
            with lock: n[0] += 1; lat.append(time.monotonic() - t)
    ts = [threading.Thread(target=w) for _ in range(clients)]
    [t.start() for t in ts]; [t.join() for t in ts]
    srv.terminate(); srv.wait()
    return n[0] / secs, statistics.median(lat)
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("old")
ap.add_argument("new")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--seconds", type=float, default=20)
ap.add_argument("--clients", type=int, default=32)
ap.add_argument("--port", type=int, default=8150)
a = ap.parse_args()
res = {"old": [], "new": []}
for r in range(a.rounds):
    for name, b in (("old", a.old), ("new", a.new)):
        rps, med = run(b, a.port + r, a.seconds, a.clients)
        res[name].append(rps); print(name, f"{rps:.1f} req/s, median {med*1000:.0f} ms", flush=True)
print({k: statistics.median(v) for k, v in res.items()}, statistics.median(res["new"]) / statistics.median(res["old"]))
