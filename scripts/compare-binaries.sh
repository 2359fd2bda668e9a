#!/usr/bin/env bash
# Runs the same commands with two `rwkv` binaries and compares every output file byte for byte:
# logits and final states of every fixture (both modes, every weight format), `init` of every
# generation, `convert`, seeded generation, `eval`, tokenisation, and 200-step training runs
# (RWKV-7 in both precisions, RWKV-4). A change that is meant to keep behaviour, file formats and
# numbers (a refactor) must leave every line "same".
#
# Usage: scripts/compare-binaries.sh OLD_BINARY NEW_BINARY [OUTDIR]   (default /tmp/rwkv-compare)
set -euo pipefail
cd "$(dirname "$0")/.."
old=$(realpath "$1")
new=$(realpath "$2")
out=${3:-/tmp/rwkv-compare}
rm -rf "$out"
mkdir -p "$out/old" "$out/new"
data=data/tinyshakespeare.txt
head -c 200000 "$data" >"$out/small.txt"

run() { # run SIDE BIN: every command writes into $out/SIDE
  local side=$1 bin=$2 d="$out/$1"
  for fx in v4 v5_2 v6_0 v7; do
    for f in tests/fixtures/$fx/model*.safetensors tests/fixtures/$fx/model*.pth; do
      local b
      b=$(basename "$f")
      for mode in parallel recurrent; do
        for q in stored f32 f16 bf16 int8 q4; do
          local qa=()
          [ "$q" = stored ] || qa=(--quant "$q")
          "$bin" logits -m "$f" --tokens 0,1,5,9,42,200,3,77,12,255,41,7,7,7,128 \
            --mode $mode "${qa[@]}" --out "$d/logits-$fx-$b-$mode-$q.safetensors"
        done
      done
    done
    "$bin" logits -m tests/fixtures/$fx/model.safetensors --tokens 3,4,5 \
      --state-in "$d/logits-$fx-model.safetensors-parallel-stored.safetensors" \
      --out "$d/logits-$fx-continued.safetensors"
    "$bin" convert tests/fixtures/$fx/model.safetensors "$d/convert-$fx.pth"
    "$bin" convert tests/fixtures/$fx/model.pth "$d/convert-$fx-f32.safetensors" --dtype f32
    "$bin" convert tests/fixtures/$fx/model.safetensors "$d/convert-$fx-int8.safetensors" --quant int8
    "$bin" convert tests/fixtures/$fx/model.safetensors "$d/convert-$fx-q4.safetensors" --quant q4
  done
  for arch in v4 v5 v6 v7; do
    "$bin" init --arch $arch --layers 3 --dim 128 --vocab 300 --head-size 32 --seed 7 \
      --out "$d/init-$arch.safetensors" 2>/dev/null
    "$bin" init --arch $arch --layers 2 --dim 64 --vocab 100 --head-size 16 --dtype f32 \
      --out "$d/init-$arch.pth" 2>/dev/null
  done
  "$bin" info tests/fixtures/v7/model.pth --json >"$d/info-v7.json"
  "$bin" generate --prompt "ROMEO:" --max-tokens 200 --seed 3 --temperature 0.9 >"$d/generate.txt"
  "$bin" generate --prompt "JULIET:" --max-tokens 100 --temperature 0 --quant int8 >"$d/generate-int8.txt"
  "$bin" eval --data "$out/small.txt" --ctx 64 --val-fraction 0.5 --json >"$d/eval.json"
  "$bin" tokenize --tokenizer world <README.md >"$d/tokens.json"
  for run in "v7 bf16" "v7 f32" "v4 f32"; do
    set -- $run
    "$bin" train --data "$out/small.txt" --arch "$1" --precision "$2" --steps 200 \
      --eval-every 100 --save-every 100 --out "$d/train-$1-$2" >/dev/null 2>&1
  done
}

run old "$old"
run new "$new"
fail=0
while IFS= read -r f; do
  rel=${f#"$out/old/"}
  case "$rel" in */metrics.jsonl | */loss.svg | */config.toml | */state.safetensors) continue ;; esac
  if cmp -s "$f" "$out/new/$rel"; then
    echo "same     $rel"
  else
    echo "DIFFERS  $rel"
    fail=1
  fi
done < <(find "$out/old" -type f | sort)
exit $fail
