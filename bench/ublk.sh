#!/usr/bin/env bash
# ublk benchmark: builds the project and the reference target rublk (from crates.io,
# installed under .cache/, not a project dependency), runs bench/ublk-guest.sh in one
# VM boot (or natively where the kernel has ublk), and appends the table to
# bench/RESULTS.md with date, machine and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. bench/lib.sh
ensure_rust
ensure_debs fio dmsetup
cargo build --release --bins --quiet
rublk=$PWD/.cache/rublk/bin/rublk
if [ ! -x "$rublk" ]; then
  step "installing rublk (reference ublk loop target) into .cache/rublk"
  cargo install rublk --no-default-features --locked --root "$PWD/.cache/rublk" --quiet
fi
out=$(mktemp)
scripts/vm.sh run --mem 8192 --env BENCH_ROUNDS --env BENCH_RUNTIME -- bench/ublk-guest.sh "$rublk" | tee "$out"
{
  results_section "ublk: fio on loop, blkfilter, dm-log-writes, rublk" "backing on tmpfs"
  grep -E '^\||^Values:|^Sustained|^Ring overflowed' "$out"
} >> bench/RESULTS.md
rm -f "$out"
