#!/usr/bin/env bash
# Runs a benchmark and appends its table to bench/RESULTS.md with date, machine and
# commit. Usage: bench/run.sh seal-pipeline [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. bench/lib.sh
ensure_rust
name=${1:?usage: bench/run.sh BENCH [ARGS...]}; shift
# The digest-resync bench compares against rsync.
[ "$name" != digest-resync ] || command -v rsync >/dev/null || ensure_debs rsync
# The store-put bench makes its TLS receiver's certificate with openssl.
[ "$name" != store-put ] || command -v openssl >/dev/null || ensure_debs openssl
cargo build --release -p bench --bin "$name" --quiet
out=$(target/release/"$name" "$@")
echo "$out"
{
  results_section "$name $*"
  echo "$out"
} >> bench/RESULTS.md
