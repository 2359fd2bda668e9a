#!/usr/bin/env python3
"""Speed of two `rwkv` binaries side by side, alternated (A B A B …), medians and ratios.

Measures `rwkv bench` on the RWKV-7 0.1B shape (random weights made with `rwkv init`) in bf16,
int8 and q4 — generation and a 512-token prompt — and the training recipe's tokens/s
(`rwkv train --data data/tinyshakespeare.txt`, the median of its logged windows). A change
meant to keep speed (a refactor) should show ratios within the runs' spread. The environment
is passed on: `RWKV_NO_AVX512=1 scripts/compare-speed.py …` measures the AVX2 paths.

Usage: scripts/compare-speed.py OLD NEW [--rounds 3] [--threads 2] [--steps 2000] [--arch v7]
                                [--dir /tmp/rwkv-speed] [--no-train] [--no-bench]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--dir", default="/tmp/rwkv-speed")
    ap.add_argument("--arch", default="v7", help="the generation the training runs train")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    bins = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}  # (what, side) -> [values]

    def add(what, side, v):
        results.setdefault((what, side), []).append(v)

    if not a.no_bench:
        m = os.path.join(a.dir, "v7-0.1b.safetensors")
        if not os.path.exists(m):
            run([bins["old"], "init", "--arch", "v7", "--layers", "12", "--dim", "768",
                 "--vocab", "65536", "--out", m])
        models = {"bf16": m}
        for q in ("int8", "q4"):
            f = os.path.join(a.dir, f"v7-0.1b-{q}.safetensors")
            if not os.path.exists(f):
                run([bins["old"], "convert", m, f, "--quant", q])
            models[q] = f
        for r in range(a.rounds):
            for fmt, f in models.items():
                for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    out = run([bins[side], "bench", "-m", f, "--threads", str(a.threads),
                               "--prompt", "512", "--gen", "256", "--runs", "3", "--json"])
                    j = json.loads(out.stdout)
                    add(f"{fmt} generation", side, j["gen_tokens_per_s"])
                    add(f"{fmt} prompt 512", side, j["prompt_tokens_per_s"])
                    print(f"round {r + 1} {side} {fmt}: gen {j['gen_tokens_per_s']:.1f}, "
                          f"prompt {j['prompt_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    if not a.no_train:
        data = os.path.join(root, "data", "tinyshakespeare.txt")
        for r in range(a.rounds):
            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                out_dir = os.path.join(a.dir, f"train-{side}-{r}")
                run([bins[side], "train", "--data", data, "--threads", str(a.threads),
                     "--steps", str(a.steps), "--arch", a.arch, "--out", out_dir])
                with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
                    tps = [json.loads(l)["tokens_per_s"] for l in fh if l.strip()]
                v = statistics.median(tps)
                add(f"training recipe {a.arch}", side, v)
                print(f"round {r + 1} {side} training: {v:.0f} tokens/s", file=sys.stderr)
    print(f"{'measure (tokens/s)':24} {'old median':>12} {'new median':>12} {'new/old':>8}")
    whats = []
    for (w, _) in results:
        if w not in whats:
            whats.append(w)
    for w in whats:
        o = statistics.median(results[(w, "old")])
        n = statistics.median(results[(w, "new")])
        print(f"{w:24} {o:12.1f} {n:12.1f} {n / o:8.3f}")


if __name__ == "__main__":
    main()
