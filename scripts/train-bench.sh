#!/usr/bin/env bash
# Reproduces the training figures in docs/benchmarks.md: the nanoGPT-budget run on tiny
# Shakespeare (4 layers, width 128, context 64, batch 12, 2000 steps, 90/10 split), its
# validation loss in windows of 64 and with the state carried through the whole text, and the
# training throughput of a 6-layer, width-256, context-256 model.
# Usage: scripts/train-bench.sh [OUTDIR]   (default /tmp/rwkv-train-bench)
#   BASE=/path/to/rwkv scripts/train-bench.sh   # also alternates another build (an earlier
#                                               # commit's) with this one in the recipe runs
#   GRAPH=/path/to/rwkv scripts/train-bench.sh  # a build of commit 4343b5f: retrains the
#                                               # built-in model through the candle graph
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/rwkv-train-bench}
mkdir -p "$out"
cargo build --release --quiet
rwkv=target/release/rwkv
data=data/tinyshakespeare.txt

run() { # name, extra flags...
  local name=$1; shift
  $rwkv train --data $data --threads 2 --out "$out/$name" "$@" 2>"$out/$name.log" | tail -1
  echo "  windows of 64:  $($rwkv eval -m "$out/$name/model.safetensors" --data $data --val-fraction 0.1 --ctx 64 --json)"
  echo "  state carried:  $($rwkv eval -m "$out/$name/model.safetensors" --data $data --val-fraction 0.1 --json)"
}

echo "== RWKV-7, 4 x 128, head size 32, ctx 64, batch 12, 2000 steps (the defaults)"
run v7-ctx64
echo "== the same with seeds 1 and 2, and the three seeds with the cosine ending at lr/10"
run v7-seed1 --seed 1
run v7-seed2 --seed 2
for seed in 1337 1 2; do run "v7-lr10-seed$seed" --seed $seed --lr-final 6e-4; done
echo "== RWKV-4, same budget"
run v4-ctx64 --arch v4
echo "== RWKV-7 trained on 256-token windows (same tokens per step: batch 3)"
run v7-ctx256 --ctx 256 --batch 3
echo "== throughput: RWKV-7, 6 layers x 256, ctx 256, batch 12 (60 steps), bf16 then f32"
for prec in bf16 f32; do
  rm -rf "$out/v7-6x256"
  $rwkv train --data $data --threads 2 --precision $prec --out "$out/v7-6x256" --layers 6 \
    --dim 256 --ctx 256 --steps 60 --warmup 10 --eval-every 1000 --save-every 1000 \
    --log-every 10 2>&1 | tail -1
done
echo "== throughput: the recipe, bf16 products and f32 alternated three times"
for i in 1 2 3; do
  for prec in ${BASE:+base} bf16 f32; do
    rm -rf "$out/ab"
    echo -n "  $prec: "
    if [ "$prec" = base ]; then
      "$BASE" train --data $data --threads 2 --out "$out/ab" 2>&1 | tail -1
    else
      $rwkv train --data $data --threads 2 --precision $prec --out "$out/ab" 2>&1 | tail -1
    fi
  done
done
echo "== the built-in model through the candle graph (its throughput; the file must be identical)"
if [ -n "${GRAPH:-}" ]; then
  rm -rf "$out/graph"
  RWKV_TRAIN_GRAPH=1 "$GRAPH" train --data $data --threads 2 --lr-final 6e-4 --out "$out/graph" \
    2>&1 | tail -1
  cmp "$out/graph/model.safetensors" assets/shakespeare-v7.safetensors && echo "  identical to assets/shakespeare-v7.safetensors"
else
  echo "  skipped: GRAPH=/path/to/rwkv built at commit 4343b5f (the graph trains only there)"
fi
echo "== one thread: the pass's matrix products and the whole pass"
cargo bench --quiet --bench train
