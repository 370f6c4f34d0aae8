#!/usr/bin/env bash
# ublk benchmark: builds the project and the reference target rublk (from crates.io,
# installed under .cache/, not a project dependency), runs bench/ublk-guest.sh in one
# VM boot (or natively where the kernel has ublk), and appends the table to
# bench/RESULTS.md with date, machine and commit.
#
# With UBLK_DR_VM_ICOUNT=N (qemu -icount shift=N,sleep=off) the guest's clock counts
# instructions instead of host time: a run repeats within 1-2 % whatever the host is
# doing, and the figures measure CPU work per I/O. The vCPUs then take turns on one
# host thread, so work on the second vCPU (the shipper's) is not free: it comes out of
# fio's figure as it would on a machine with no idle core. One round of 3 s jobs is
# then the default (BENCH_ROUNDS, BENCH_RUNTIME), as rounds only fight drift.
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
if [ -n "${UBLK_DR_VM_ICOUNT:-}" ]; then
  export BENCH_ROUNDS=${BENCH_ROUNDS:-1} BENCH_RUNTIME=${BENCH_RUNTIME:-3}
fi
out=$(mktemp)
scripts/vm.sh run --mem 8192 --env BENCH_ROUNDS --env BENCH_RUNTIME -- bench/ublk-guest.sh "$rublk" | tee "$out"
{
  results_section "ublk: fio on loop, blkfilter, dm-log-writes, rublk" "backing on tmpfs"
  grep -E '^\||^Values:|^Sustained|^Ring overflowed' "$out"
} >> bench/RESULTS.md
rm -f "$out"
