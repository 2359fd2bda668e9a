#!/usr/bin/env python3
"""Crash-safe training: kills `rwkv train` with SIGKILL at random moments, resumes it each
time, and requires the final weights to equal an uninterrupted run's, byte for byte; then fills
the disk under a run and requires the previous checkpoint to stay loadable.

    python3 scripts/crash-train.py [--rwkv target/release/rwkv] [--kills 20] [--seed 1]
        [--work /tmp/crash-train] [--no-full-disk]

Half of the kills land at a random moment of the remaining run, half the moment a checkpoint's
temporary file appears (during the write, before the rename). Every run trains the same small
RWKV-7 on tiny Shakespeare with a checkpoint every 5 steps. The full-disk part (root only: it
mounts a small tmpfs) gives the run a disk with room for one checkpoint but not for the next.
Exit status 0 when every check holds.
"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TRAIN = ["--data", os.path.join(ROOT, "data", "tinyshakespeare.txt"), "--layers", "2",
         "--dim", "64", "--head-size", "32", "--ctx", "32", "--batch", "4", "--steps", "150",
         "--save-every", "5", "--eval-every", "1000", "--log-every", "10", "--seed", "7"]


def train(rwkv, out, resume, **kw):
    args = [rwkv, "train", *TRAIN, "--out", out] + (["--resume"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def temp_files(out):
    """The temporary files of checkpoint writes (weights or training state) in `out`."""
    return glob.glob(os.path.join(out, ".*.safetensors.tmp*"))


def safetensors_parts(path, run_dir):
    """A safetensors file's metadata (the run directory's name taken out) and tensor bytes."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = {k: v.replace(run_dir, "RUN") for k, v in header.pop("__metadata__", {}).items()}
    body = data[8 + n:]
    tensors = {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
               for k, v in header.items()}
    return meta, tensors


def killed_runs(rwkv, out, kills, rng, duration):
    """Runs with `kills` SIGKILLs, then to the end; returns one line per kill."""
    report = []
    for k in range(kills):
        resume = os.path.exists(os.path.join(out, "state.safetensors"))
        before = set(temp_files(out))
        p = train(rwkv, out, resume)
        during_write = k % 2 == 1
        start = time.monotonic()
        if during_write:
            # The moment a new temporary file appears: the checkpoint is being written.
            while p.poll() is None and not (set(temp_files(out)) - before):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.05, duration * 0.5))
        if p.poll() is not None:
            err = p.stderr.read().decode(errors="replace").strip()
            sys.exit(f"kill {k + 1}: the run ended before the kill (status {p.returncode}): {err}")
        in_write = bool(set(temp_files(out)) - before)
        p.send_signal(signal.SIGKILL)
        p.wait()
        report.append(f"kill {k + 1:2}: after {time.monotonic() - start:5.2f} s, "
                      f"{'during a checkpoint write' if in_write else 'during steps':27}"
                      f"(resumed: {resume})")
    p = train(rwkv, out, True)
    _, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"the final resume failed: {err.decode(errors='replace')}")
    return report


def full_disk(rwkv, work):
    """A disk with room for one checkpoint only: the run must fail with a one-line error and
    leave the previous checkpoint loadable."""
    mnt = os.path.join(work, "small-disk")
    os.makedirs(mnt, exist_ok=True)
    probe = os.path.join(work, "probe")
    p = train(rwkv, probe, False)
    p.wait()
    need = sum(os.path.getsize(os.path.join(probe, f))
               for f in ("state.safetensors", "model.safetensors"))
    size_kb = int(need * 1.5 / 1024)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt], check=True)
    try:
        out = os.path.join(mnt, "run")
        p = train(rwkv, out, False)
        _, err = p.communicate()
        err = err.decode(errors="replace").strip().splitlines()
        lines = [ln for ln in err if not ln.startswith("step") and "\r" not in ln]
        ok = p.returncode == 2 and lines and "No space left" in lines[-1]
        info = subprocess.run([rwkv, "info", os.path.join(out, "model.safetensors")],
                              capture_output=True, text=True)
        leftovers = temp_files(out)
        # The checkpoint left behind, resumed on a disk with room, runs to the end.
        moved = os.path.join(work, "after-full-disk")
        shutil.copytree(out, moved)
        resumed = subprocess.run([rwkv, "train", *TRAIN, "--out", moved, "--resume"],
                                 capture_output=True, text=True)
        print(f"full disk ({size_kb} kB tmpfs): exit {p.returncode}, "
              f"message: {lines[-1] if lines else '(none)'}")
        print(f"  the checkpoint left: `rwkv info` exit {info.returncode}; resumed elsewhere, "
              f"exit {resumed.returncode}; temporary files left: {len(leftovers)}")
        ok &= resumed.returncode == 0
        return ok and info.returncode == 0 and not leftovers
    finally:
        subprocess.run(["umount", mnt], check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rwkv", default=os.path.join(ROOT, "target", "release", "rwkv"))
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default="/tmp/crash-train")
    ap.add_argument("--no-full-disk", action="store_true")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    rng = random.Random(a.seed)

    ref = os.path.join(a.work, "uninterrupted")
    t0 = time.monotonic()
    p = train(a.rwkv, ref, False)
    _, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"the uninterrupted run failed: {err.decode(errors='replace')}")
    duration = time.monotonic() - t0
    print(f"uninterrupted run: {duration:.1f} s")

    out = os.path.join(a.work, "interrupted")
    for line in killed_runs(a.rwkv, out, a.kills, rng, duration):
        print(line)
    with open(os.path.join(ref, "model.safetensors"), "rb") as x, \
            open(os.path.join(out, "model.safetensors"), "rb") as y:
        same = x.read() == y.read()
    print(f"model.safetensors: {'byte-identical' if same else 'DIFFERENT'} to the uninterrupted run's")
    # The training state records its run's directory in its config: all else must be equal.
    a_state, b_state = (safetensors_parts(os.path.join(d, "state.safetensors"), d)
                        for d in (ref, out))
    eq = a_state == b_state
    print(f"state.safetensors: {'identical' if eq else 'DIFFERENT'} tensors (weights, AdamW "
          f"moments) and metadata (step, data order), but for the run directory's name")
    same &= eq
    leftovers = temp_files(out)
    print(f"temporary files of killed writes left after the last resume: {len(leftovers)}")
    ok = same and not leftovers
    if not a.no_full_disk:
        if os.geteuid() != 0:
            print("full disk: skipped (mounting a tmpfs needs root)")
        else:
            ok &= full_disk(a.rwkv, a.work)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
