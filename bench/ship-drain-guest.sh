#!/usr/bin/env bash
# Runs inside one VM boot (or natively on a kernel with ublk): how fast the shipper
# empties a full backlog and where its CPU goes. fio writes 4k random blocks to a
# protected volume for BENCH_RUNTIME s (default 6) with no shipper running, so the ring
# fills; then the shipper (normal priority, staging and store on the ring's tmpfs) is
# started alone and timed until the ring is empty and every segment uploaded. Prints
# MB/s and each shipper thread's CPU ticks and page faults (minor + major) per MB shipped (from /proc/PID/task/*/stat,
# which unlike perf's samples is accurate under TCG). BENCH_ROUNDS rounds (default 2).
# Usage: ship-drain-guest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BIN=target/release
RUNTIME=${BENCH_RUNTIME:-6}
w=/tmp/ship-drain
bench_tmpfs $w 6G
random_backing $w/backing
$BIN/shipper keygen --out $w/key >/dev/null
hz=$(getconf CLK_TCK)
for round in $(seq "${BENCH_ROUNDS:-2}"); do
  rm -rf $w/ring $w/staging $w/store $w/status.json
  dev=$($BIN/blkfilter attach --backing $w/backing --ring $w/ring --ring-mib 1024 --id 0 --log $w/bf.log)
  fio --name=b --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --runtime="$RUNTIME" --time_based --size=1G >/dev/null 2>&1
  start=$(date +%s.%N)
  RUST_LOG=warn $BIN/shipper run --volume vol0 --ring $w/ring --staging $w/staging --store $w/store \
    --key $w/key --no-initial-sync --status $w/status.json --cpu-priority normal >$w/shipper.log 2>&1 &
  shipper=$!
  for ((i = 0; i < 3000; i++)); do
    sleep 0.1
    [ -f $w/status.json ] && grep -q '"ring_used_bytes": 0,' $w/status.json &&
      grep -q '"segments_pending_upload": 0,' $w/status.json && break
  done
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  bytes=$(sed -nE 's/.*"bytes_plain": ([0-9]+),.*/\1/p' $w/status.json)
  sealed=$(sed -nE 's/.*"bytes_sealed": ([0-9]+),.*/\1/p' $w/status.json)
  echo "round $round: $((bytes >> 20)) MiB of fio's 4k writes shipped in $secs s:" \
    "$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.0f", b / s / 1e6 }') MB/s," \
    "sealed to $(awk -v a="$sealed" -v b="$bytes" 'BEGIN { printf "%.3f", a / b }') of the plain size"
  echo "| thread | threads | CPU ticks per MB shipped (user + sys; $hz per s) | page faults per MB |"
  echo "|---|---|---|---|"
  for t in /proc/$shipper/task/*; do cat "$t/stat"; done |
    awk -v mb="$((bytes / 1000000))" '{
      name = $2; gsub(/[()]/, "", name); sub(/-[0-9]+$/, "", name)
      n[name]++; ticks[name] += $14 + $15; faults[name] += $10 + $12 }
      END { for (k in n) if (ticks[k] > 0) printf "| %s | %d | %.2f | %.1f |\n", k, n[k], ticks[k] / mb, faults[k] / mb }' | sort
  kill $shipper; wait $shipper 2>/dev/null || true
  $BIN/blkfilter detach --id 0 >/dev/null; sleep 1
done
