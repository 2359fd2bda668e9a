#!/usr/bin/env python3
"""Recomputes an lm-eval log-likelihood run from `rwkv logits` and compares: for every
document of the samples file lm-eval wrote (`--log_samples`), the log-likelihood of the target
given the context and whether it was greedy, from the logits `rwkv logits` writes for the
context and target's bytes; then the task's `acc` and `perplexity`.

Usage: scripts/lm-eval/check.py SAMPLES.jsonl [--model assets/shakespeare-v7.safetensors]
                                [--rwkv target/release/rwkv]
Exits 1 when a log-likelihood differs by more than 1e-3 or a greedy flag differs.
(Byte-level models only: the tokens are the text's UTF-8 bytes.)
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("samples")
ap.add_argument("--model", default="assets/shakespeare-v7.safetensors")
ap.add_argument("--rwkv", default="target/release/rwkv")
a = ap.parse_args()


def read_logits(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header["logits"]
    assert meta["dtype"] == "F32", meta
    lo, hi = meta["data_offsets"]
    return np.frombuffer(data[lo:hi], dtype="<f4").reshape(meta["shape"]).astype(np.float64)


worst, flips, lls, greedy = 0.0, 0, [], []
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "logits.safetensors")
    samples = [json.loads(l) for l in open(a.samples, encoding="utf-8")]
    for s in samples:
        ctx, tgt = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
        ids = list((ctx + tgt).encode())
        n = len(ctx.encode())
        subprocess.run([a.rwkv, "logits", "--model", a.model, "--tokens",
                        ",".join(map(str, ids)), "--out", out, "--threads", "1"],
                       check=True, capture_output=True)
        rows = read_logits(out).reshape(len(ids), -1)
        m = rows.max(axis=1, keepdims=True)
        logp = rows - (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))
        ll = sum(logp[i - 1, ids[i]] for i in range(n, len(ids)))
        is_greedy = all(int(rows[i - 1].argmax()) == ids[i] for i in range(n, len(ids)))
        got_ll, got_greedy = float(s["resps"][0][0][0]), s["resps"][0][0][1] == "True"
        worst = max(worst, abs(ll - got_ll))
        flips += is_greedy != got_greedy
        lls.append(ll)
        greedy.append(is_greedy)
acc = sum(greedy) / len(greedy)
ppl = math.exp(-sum(lls) / len(lls))
lm_acc = sum(s["acc"] for s in samples) / len(samples)
lm_ppl = math.exp(-sum(s["perplexity"] for s in samples) / len(samples))
print(f"{len(samples)} documents: largest log-likelihood difference {worst:.2e}, "
      f"greedy flags differing {flips}")
print(f"acc: lm-eval {lm_acc:.4f}, rwkv logits {acc:.4f}; "
      f"perplexity: lm-eval {lm_ppl:.3f}, rwkv logits {ppl:.3f}")
sys.exit(0 if worst < 1e-3 and flips == 0 else 1)
