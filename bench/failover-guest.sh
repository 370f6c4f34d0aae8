#!/usr/bin/env bash
# Runs inside one VM boot (or natively on a kernel with ublk): how long `ublk-target
# failover --test` takes to bring up a test-failover device on real ublk, for 1 GiB and
# 8 GiB replicas with 20 retained points, at the oldest, a middle and the newest point.
# Bring-up = from starting the command until the first 1 MiB read (O_DIRECT) from the
# device returns. Baseline in the same run: `blkfilter attach --no-capture` over the
# same replica image, timed the same way (what any ublk device costs to come up here).
# Prints a markdown table. BENCH_ROUNDS bring-ups of each (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BIN=target/release
ROUNDS=${BENCH_ROUNDS:-3}
w=/tmp/failover-bench
bench_tmpfs $w 2G
$BIN/apply --prepare-views $w >/dev/null

now() { date +%s.%N; }
# bring_up CMD...: runs CMD (which prints a device path), reads the device's first MiB;
# prints the seconds it all took.
bring_up() {
  local t0 dev
  t0=$(now)
  dev=$("$@")
  dd if="$dev" of=/dev/null bs=1M count=1 iflag=direct status=none
  awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'
}
# bring_ups CLEANUP CMD...: ROUNDS bring-ups; prints "min | max".
bring_ups() {
  local cleanup=$1 i t all=()
  shift
  for ((i = 0; i < ROUNDS; i++)); do
    t=$(bring_up "$@")
    all+=("$t")
    $cleanup >/dev/null
    sleep 0.5
  done
  printf '%s\n' "${all[@]}" | sort -n | awk 'NR == 1 { min = $1 } { max = $1 } END { printf "%s | %s", min, max }'
}
view_cleanup() { $BIN/ublk-target failover --cleanup --id 10; }
plain_cleanup() { $BIN/blkfilter detach --id 11; }

echo "| replica | device | bring-up + first 1 MiB read, s (min) | (max) |"
echo "|---|---|---|---|"
for gib in 1 8; do
  r=$w/g$gib/replica.img
  echo "| $gib GiB | blkfilter --no-capture over the replica (baseline) | $(bring_ups plain_cleanup \
    $BIN/blkfilter attach --backing "$r" --no-capture --id 11 --log $w/bf.log) |"
  for point in 0 10 19; do
    echo "| $gib GiB | test failover at point $point of 0..=19 | $(bring_ups view_cleanup \
      $BIN/ublk-target failover --test --replica "$r" --point $point --id 10 --log $w/view.log) |"
  done
done
echo "$ROUNDS bring-ups each. Goal (issue #5): a test-failover device in under 2 s at any size."
