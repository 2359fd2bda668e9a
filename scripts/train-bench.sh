#!/usr/bin/env bash
# Reproduces the training figures in docs/benchmarks.md: the nanoGPT-budget run on tiny
# Shakespeare (4 layers, width 128, context 64, batch 12, 2000 steps, 90/10 split), its
# validation loss in windows of 64 and with the state carried through the whole text, and the
# training throughput of a 6-layer, width-256, context-256 model.
# Usage: scripts/train-bench.sh [OUTDIR]   (default /tmp/rwkv-train-bench)
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
  for prec in bf16 f32; do
    rm -rf "$out/ab"
    echo -n "  $prec: "
    $rwkv train --data $data --threads 2 --precision $prec --out "$out/ab" 2>&1 | tail -1
  done
done
echo "== throughput: the recipe through the candle graph (200 steps)"
rm -rf "$out/ab"
RWKV_TRAIN_GRAPH=1 $rwkv train --data $data --steps 200 --val-fraction 0.001 \
  --eval-every 1000 --save-every 1000 --threads 2 --out "$out/ab" 2>&1 | tail -1
echo "== one thread: the pass's matrix products and the whole pass"
cargo bench --quiet --bench train
