#!/usr/bin/env bash
# Builds rwkv for aarch64 and runs its tests under qemu user-mode emulation, so that the NEON
# kernels (crates/core/src/kernels/neon.rs) are compiled with warnings as errors and held to the portable
# kernels and the fixtures on an x86 machine. Emulation says nothing about speed.
#
# Usage: scripts/test-aarch64.sh [cargo test arguments]
#   scripts/test-aarch64.sh                       # every test that runs in-process
#   scripts/test-aarch64.sh --lib                 # the library's unit tests only
#   QEMU_CPU=cortex-a53 scripts/test-aarch64.sh   # a CPU without SDOT (the widening path)
#
# Installs qemu-user and the aarch64 cross linker with apt-get when they are missing (as root),
# and the Rust target with rustup. Tests that start the `rwkv` binary (tests/cli.rs,
# tests/server.rs, tests/train_cli.rs) run too when the kernel hands aarch64 binaries to qemu
# (binfmt_misc); otherwise they are left out and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
rustup target add aarch64-unknown-linux-gnu >/dev/null

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# For binaries the tests start themselves (through binfmt_misc, without the runner).
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
export RUSTFLAGS="-D warnings"
# Its own directory: different RUSTFLAGS would otherwise rebuild the host's artifacts.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/aarch64}

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    args=()
  else
    echo "note: no binfmt_misc entry for aarch64: tests that start the rwkv binary are left out"
    args=(--lib)
    for t in tests/*.rs; do
      name=$(basename "$t" .rs)
      case $name in cli | server | train_cli) ;; *) args+=(--test "$name") ;; esac
    done
  fi
fi
cargo test --target aarch64-unknown-linux-gnu "${args[@]}"
