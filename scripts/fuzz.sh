#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets/*.rs, cargo fuzz with libFuzzer and AddressSanitizer
# on the nightly toolchain) and prints one line per target: executions, seconds, coverage,
# corpus size and the outcome.
#
#   scripts/fuzz.sh [--time SECONDS | --runs N] [--jobs J] [TARGET ...]
#
# Each target runs for SECONDS (default 60) or N executions, J targets at a time (default 1),
# from its committed seed corpus (fuzz/corpus/TARGET, read only) and a working corpus
# (fuzz/work/TARGET, kept between runs, not committed). A crash, a hang (10 s per input) or an
# allocation over 2 GB is written to fuzz/artifacts/TARGET/ and fails the run: fix it, then add
# the input to fuzz/corpus/TARGET so that `cargo test --test fuzz_corpus` replays it for good.
set -euo pipefail
cd "$(dirname "$0")/.."

limit=(-max_total_time=60)
jobs=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "cargo fuzz on the nightly toolchain is needed: rustup toolchain install nightly; cargo install cargo-fuzz" >&2
  exit 2
fi

# Inputs up to the size of the largest seed (the tiny checkpoints and a state file).
max_len() {
  case "$1" in
    pth|safetensors|state) echo 80000 ;;
    tokenizer_json) echo 16384 ;;
    *) echo 4096 ;;
  esac
}

cargo +nightly fuzz build >&2
mkdir -p fuzz/logs
run_one() {
  local t=$1
  mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
  local log="fuzz/logs/$t.log" status=ok
  if ! cargo +nightly fuzz run "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
      "${limit[@]}" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
      -malloc_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    status="FAILED (fuzz/artifacts/$t, $log)"
  fi
  local runs secs cov
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
  printf '%-16s %12s execs %6s s  cov %6s  corpus %5s  %s\n' "$t" "$runs" "$secs" "$cov" \
    "$(find "fuzz/work/$t" -type f | wc -l)" "$status"
  [ "$status" = ok ]
}

failed=0
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  run_one "$t" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
exit $failed
