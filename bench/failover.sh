#!/usr/bin/env bash
# Test-failover bring-up on real ublk: builds the project, runs bench/failover-guest.sh
# in one VM boot (or natively where the kernel has ublk), and appends its table to
# bench/RESULTS.md with date, machine and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. bench/lib.sh
ensure_rust
cargo build --release --bins --quiet
out=$(mktemp)
scripts/vm.sh run --mem 8192 --env BENCH_ROUNDS -- bench/failover-guest.sh | tee "$out"
{
  results_section "failover: test-failover bring-up on real ublk" "replicas on tmpfs"
  grep -E '^\||bring-ups each' "$out"
} >> bench/RESULTS.md
rm -f "$out"
