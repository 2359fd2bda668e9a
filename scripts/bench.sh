#!/usr/bin/env bash
# Reproduces the figures in docs/benchmarks.md on this machine.
# Usage: scripts/bench.sh [OUTDIR]   (default /tmp/rwkv-bench; needs ~1 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/rwkv-bench}
mkdir -p "$out"
cargo build --release --quiet --examples
rwkv=target/release/rwkv
m="$out/v7-0.1b.safetensors"
# RWKV-7 with the 0.1B World model's shape (12 layers, width 768, vocab 65536), bf16.
[ -f "$m" ] || $rwkv init --arch v7 --layers 12 --dim 768 --vocab 65536 --out "$m"
[ -f "$out/v7-0.1b-int8.safetensors" ] || $rwkv convert "$m" "$out/v7-0.1b-int8.safetensors" --quant int8
[ -f "$out/v7-0.1b-q4.safetensors" ] || $rwkv convert "$m" "$out/v7-0.1b-q4.safetensors" --quant q4

echo "== fixture v7 model (2 layers, width 128): generation"
$rwkv bench -m tests/fixtures/v7/model.safetensors --prompt 24 --gen 2000 --runs 5
echo "== weight formats, RWKV-7 0.1B shape, 2 threads"
for q in f32 f16 bf16 int8 q4; do
  $rwkv bench -m "$m" --threads 2 --prompt 512 --gen 256 --runs 3 --quant $q --json
done
echo "== stored quantized files (memory-mapped, no load-time quantization)"
for f in int8 q4; do
  $rwkv bench -m "$out/v7-0.1b-$f.safetensors" --threads 2 --prompt 512 --gen 256 --runs 3 --json
done
echo "== batched vs one at a time, 8 sequences"
target/release/examples/batch tests/fixtures/v7/model.safetensors 8 256
target/release/examples/batch "$m" 8 32
target/release/examples/batch "$out/v7-0.1b-int8.safetensors" 8 32
echo "== 20,000 tokens: time per token and RSS (q4)"
$rwkv bench -m "$out/v7-0.1b-q4.safetensors" --threads 2 --prompt 0 --gen 20000 --runs 1
