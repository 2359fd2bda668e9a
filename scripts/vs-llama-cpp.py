#!/usr/bin/env python3
"""`rwkv` against llama.cpp on the same GGUF files, side by side, alternated, medians and ratios.

For each file: generation and prompt tokens/s of `rwkv bench` and of llama.cpp's `llama-bench`
(`-t THREADS -p PROMPT -n GEN -r 1`), run in turns (ours, theirs, ours, …) for `--rounds`
rounds; and, for ours, the time to load the file and produce one token (`rwkv generate
--max-tokens 1`) with its peak resident memory. Nothing of llama.cpp is built here: pass the
path of a `llama-bench` you built. `RWKV_NO_AVX512=1` in the environment measures our AVX2
paths (build llama.cpp with AVX-512 off for its).

Usage: scripts/vs-llama-cpp.py --llama-bench PATH [--rwkv target/release/rwkv] [--rounds 3]
                               [--threads 2] [--prompt 512] [--gen 128] [--json OUT] FILE.gguf…
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def ours(a, path):
    out = run([a.rwkv, "bench", "--model", path, "--threads", str(a.threads), "--prompt",
               str(a.prompt), "--gen", str(a.gen), "--runs", "1", "--json"])
    j = json.loads(out.strip().splitlines()[-1])
    return j["gen_tokens_per_s"], j["prompt_tokens_per_s"]


def theirs(a, path):
    out = run([a.llama_bench, "-m", path, "-t", str(a.threads), "-p", str(a.prompt), "-n",
               str(a.gen), "-r", "1", "-o", "json"])
    rows = json.loads(out)
    gen = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    prompt = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    return gen, prompt


def load(a, path):
    """Seconds to load `path` and produce one token, and the peak RSS in MiB."""
    t0 = time.perf_counter()
    p = subprocess.Popen([a.rwkv, "generate", "--model", path, "--prompt", "A", "--max-tokens",
                          "1", "--threads", str(a.threads)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        sys.exit(f"rwkv generate failed on {path}")
    return time.perf_counter() - t0, ru.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--rwkv", default="target/release/rwkv")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    res = {}
    for f in a.files:
        r = {"ours_gen": [], "ours_prompt": [], "llama_gen": [], "llama_prompt": [],
             "load_s": [], "rss_mib": []}
        for i in range(a.rounds):
            for side in ("ours", "llama") if i % 2 == 0 else ("llama", "ours"):
                g, p = ours(a, f) if side == "ours" else theirs(a, f)
                r[f"{side}_gen"].append(g)
                r[f"{side}_prompt"].append(p)
            s, m = load(a, f)
            r["load_s"].append(s)
            r["rss_mib"].append(m)
            print(f"{os.path.basename(f)} round {i + 1}: ours {r['ours_gen'][-1]:.1f}/"
                  f"{r['ours_prompt'][-1]:.0f}, llama.cpp {r['llama_gen'][-1]:.1f}/"
                  f"{r['llama_prompt'][-1]:.0f} tokens/s (gen/prompt)", file=sys.stderr)
        res[f] = {k: statistics.median(v) for k, v in r.items()}
        res[f]["size_mib"] = os.path.getsize(f) / 2**20
    print(f"| file | MiB | load + 1 token (s) | peak RSS (MiB) | generation: ours / llama.cpp | "
          f"{a.prompt}-token prompt: ours / llama.cpp |")
    print("|---|---|---|---|---|---|")
    for f, m in res.items():
        print(f"| {os.path.basename(f)} | {m['size_mib']:.0f} | {m['load_s']:.2f} | "
              f"{m['rss_mib']:.0f} | {m['ours_gen']:.1f} / {m['llama_gen']:.1f} "
              f"({m['ours_gen'] / m['llama_gen']:.2f}x) | {m['ours_prompt']:.0f} / "
              f"{m['llama_prompt']:.0f} ({m['ours_prompt'] / m['llama_prompt']:.2f}x) |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
