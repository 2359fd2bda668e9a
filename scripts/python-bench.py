#!/usr/bin/env python3
"""The official `rwkv` package against `rwkv_rs` through the same PIPELINE code.

    python3 scripts/python-bench.py --official PY --ours PY --model M.pth [--rounds 3]
        [--strategies "cpu fp32,cpu bf16"] [--prompt 512] [--gen 128] [--threads 2]

`--official` and `--ours` are the Python interpreters of two virtual environments (one with
`rwkv` and `torch`, one with the `rwkv_rs` wheel); `--model` is a `.pth` checkpoint both read
(the official RWKV-7 class is given its name without `.pth`, as it expects). Every measurement
is a fresh process, so the peak RSS and the import time are its own; the packages and
strategies alternate within each round, and the table gives medians and ratios.

Per process: the import time of `model` and `utils`, the load time, the prompt (`--prompt`
World tokens of tiny Shakespeare through `model.forward` in chunks of 256, as
`PIPELINE.generate` feeds a prompt) and the generation (`PIPELINE.generate` of `--gen` tokens,
greedy, default penalties), and the peak RSS.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(package, model, strategy, prompt, gen):
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    t0 = time.perf_counter()
    if package == "rwkv":
        from rwkv.model import RWKV
        from rwkv.utils import PIPELINE, PIPELINE_ARGS
        name = model[: -len(".pth")] if model.endswith(".pth") else model
    else:
        from rwkv_rs.model import RWKV
        from rwkv_rs.utils import PIPELINE, PIPELINE_ARGS
        name = model
    t1 = time.perf_counter()
    m = RWKV(model=name, strategy=strategy)
    pipeline = PIPELINE(m, "rwkv_vocab_v20230424")
    t2 = time.perf_counter()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        ids = pipeline.encode(f.read(20000))[:prompt]
    assert len(ids) == prompt, "the text is too short for the prompt"
    t3 = time.perf_counter()
    state = None
    for i in range(0, prompt, 256):
        out, state = m.forward(ids[i: i + 256], state)
    t4 = time.perf_counter()
    text = pipeline.generate("\nROMEO:", token_count=gen, args=PIPELINE_ARGS(top_p=0.0))
    t5 = time.perf_counter()
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "prompt_tps": prompt / (t4 - t3),
        "gen_tps": gen / (t5 - t4),
        "peak_rss_mb": rss,
        "text_chars": len(text),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="python of the environment with rwkv")
    ap.add_argument("--ours", required=True, help="python of the environment with rwkv_rs")
    ap.add_argument("--model", required=True, help="a .pth checkpoint")
    ap.add_argument("--strategies", default="cpu fp32,cpu bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        package, model, strategy, prompt, gen = a.child
        print(json.dumps(child(package, model, strategy, int(prompt), int(gen))))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), RAYON_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    configs = [(pkg, py, s.strip()) for s in a.strategies.split(",")
               for pkg, py in (("rwkv", a.official), ("rwkv_rs", a.ours))]
    runs = {(pkg, s): [] for pkg, _, s in configs}
    for r in range(a.rounds):
        for pkg, py, strategy in configs:
            p = subprocess.run(
                [py, os.path.abspath(__file__), "--official", "-", "--ours", "-", "--model", "-",
                 "--child", pkg, a.model, strategy, str(a.prompt), str(a.gen)],
                capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(f"{pkg} {strategy}: failed:\n{p.stderr[-2000:]}")
            m = json.loads(p.stdout.strip().splitlines()[-1])
            runs[(pkg, strategy)].append(m)
            print(f"round {r + 1} {pkg:8} {strategy:9} gen {m['gen_tps']:7.1f} tok/s  "
                  f"prompt {m['prompt_tps']:7.1f} tok/s  rss {m['peak_rss_mb']:6.0f} MB  "
                  f"import {m['import_s']:.2f} s  load {m['load_s']:.2f} s", file=sys.stderr)
    med = {k: {f: statistics.median(m[f] for m in v) for f in v[0]} for k, v in runs.items()}
    print(f"| strategy | package | generation tok/s | {a.prompt}-token prompt tok/s "
          "| peak RSS MB | import s | load s |")
    print("|---|---|---|---|---|---|---|")
    for (pkg, strategy), m in med.items():
        print(f"| {strategy} | {pkg} | {m['gen_tps']:.1f} | {m['prompt_tps']:.1f} | "
              f"{m['peak_rss_mb']:.0f} | {m['import_s']:.2f} | {m['load_s']:.2f} |")
    for s in a.strategies.split(","):
        s = s.strip()
        o, ours = med[("rwkv", s)], med[("rwkv_rs", s)]
        print(f"{s}: rwkv_rs / rwkv: generation {ours['gen_tps'] / o['gen_tps']:.2f}x, "
              f"prompt {ours['prompt_tps'] / o['prompt_tps']:.2f}x, "
              f"peak RSS {ours['peak_rss_mb'] / o['peak_rss_mb']:.2f}x, "
              f"import {ours['import_s'] / o['import_s']:.3f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{k[0]} {k[1]}": v for k, v in runs.items()}, f, indent=1)


if __name__ == "__main__":
    main()
