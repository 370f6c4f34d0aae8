#!/usr/bin/env bash
# Shipper drain profile: builds the project, runs bench/ship-drain-guest.sh in one VM
# boot (or natively where the kernel has ublk), and appends its output to
# bench/RESULTS.md with date, machine and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. bench/lib.sh
ensure_rust
ensure_debs fio
cargo build --release --bins --quiet
out=$(mktemp)
scripts/vm.sh run --mem 8192 --env BENCH_ROUNDS --env BENCH_RUNTIME -- bench/ship-drain-guest.sh | tee "$out"
{
  results_section "ship-drain: the shipper emptying a ring that fio filled" "ring, staging and store on tmpfs"
  grep -E '^\||^round' "$out"
} >> bench/RESULTS.md
rm -f "$out"
