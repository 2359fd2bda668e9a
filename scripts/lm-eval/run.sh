#!/usr/bin/env bash
# lm-evaluation-harness against `rwkv serve`, unchanged: its `local-completions` model with the
# server's remote tokenizer scores the last-word task of make_task.py, and check.py recomputes
# every document from `rwkv logits`.
# Usage: scripts/lm-eval/run.sh [OUTDIR] [BATCH]   (needs `pip install "lm_eval[api]"`; LM_EVAL
#        names its command if it is not on PATH, e.g. LM_EVAL=/tmp/venv/bin/lm_eval; PYTHON a
#        python with numpy)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-/tmp/rwkv-lm-eval}
batch=${2:-8}
lm_eval=${LM_EVAL:-lm_eval}
python=${PYTHON:-$(dirname "$(command -v "$lm_eval")")/python}
cargo build --release --quiet
rm -rf "$out" && mkdir -p "$out"
python3 scripts/lm-eval/make_task.py "$out/task"
target/release/rwkv serve --port 0 --threads 2 2>"$out/serve.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  port=$(sed -n 's/.*http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$out/serve.log")
  [ -n "$port" ] && break
  sleep 0.1
done
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$lm_eval" run --model local-completions \
  --model_args "base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=remote,model=shakespeare-v7" \
  --batch_size "$batch" --tasks shakespeare_lastword --include_path "$out/task" \
  --output_path "$out/results" --log_samples 2>"$out/lm-eval.log" | tail -4
"$python" scripts/lm-eval/check.py "$out"/results/*/samples_*.jsonl
