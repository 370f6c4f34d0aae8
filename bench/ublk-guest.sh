#!/usr/bin/env bash
# Runs inside one VM boot (or natively on a kernel with ublk): the same fio jobs against
# a kernel loop device, blkfilter --no-capture, blkfilter with capture and the shipper,
# dm-log-writes over a loop device, and rublk's loop target (its default callback path
# and its async path, -a); all backed by a file on tmpfs. The shipper runs as the unit
# runs it (nice 10, cpu_priority yield) and, to compare, at normal priority; for both,
# the backlog fio left and a "sustained" figure that counts the shipper's catch-up are
# printed too. Prints a markdown table and the ratios.
#
# Order: BENCH_ROUNDS rounds (default 3); in each, job by job, every configuration runs
# that job back to back (in the opposite order in the next round). The guest's speed
# under TCG drifts 2-3x within one boot, so a ratio is taken between the two runs of
# one round, which are minutes apart at most, and the table shows the median of those
# per-round ratios; the value columns show each configuration's best run.
#
# Placement: fio runs on CPU 0 and every ublk server (blkfilter, rublk) on CPU 1.
# libublk otherwise pins a server's queue thread to a CPU it picks at random on each
# attach, so two servers doing the same work per request could land differently
# (same CPU as fio or the other one) and differ by that alone. The shipper is not
# pinned.
# Usage: ublk-guest.sh RUBLK_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BIN=target/release
RUBLK=${1:-}
RUNTIME=${BENCH_RUNTIME:-6}
SIZE=1G   # what random_backing makes
w=/tmp/ublk-bench
# Larger than the default half of RAM: logs and stores grow with writes.
bench_tmpfs $w 7G
random_backing $w/backing

JOBS=("randwrite 4k 32" "randread 4k 32" "write 1M 8")
ROUNDS=${BENCH_ROUNDS:-3}
FIO_CPU=0 SERVER_CPU=1
if [ "$(nproc)" -lt 2 ]; then SERVER_CPU=0; fi

# pin_server NAME: every thread of the ublk server process(es) NAME onto SERVER_CPU.
pin_server() {
  local pids pid
  pids=$(pgrep -x "$1") || { echo "no $1 process to pin" >&2; return 1; }
  for pid in $pids; do taskset -a -p -c $SERVER_CPU "$pid" >/dev/null; done
}
# RESULT[config/job]: the best run; RUN[config/job/round]: each run.
declare -A RESULT RUN BACKLOG

# run_jobs CONFIG DEV: the jobs of THIS_ROUND_JOBS, result in IOPS (4k) or MiB/s (1M).
run_jobs() {
  local config=$1 dev=$2 job rw bs qd out
  for job in "${THIS_ROUND_JOBS[@]}"; do
    read -r rw bs qd <<<"$job"
    [ -n "${BEFORE_JOB:-}" ] && $BEFORE_JOB
    out=$(fio --name=b --filename="$dev" --cpus_allowed=$FIO_CPU --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --runtime="$RUNTIME" --time_based --size=$SIZE --output-format=terse \
      --terse-version=3 2>/dev/null)
    # terse v3: field 8 read IOPS, field 7 read KiB/s, 49 write IOPS, 48 write KiB/s
    local value
    value=$(echo "$out" | awk -F';' -v rw="$rw" -v bs="$bs" '{
      if (rw ~ /read/) { iops = $8; kib = $7 } else { iops = $49; kib = $48 }
      if (bs == "4k") printf "%d", iops; else printf "%.0f", kib / 1024 }')
    echo "  round $ROUND: $config $rw $bs QD$qd: $value" >&2
    RUN["$config/$job/$ROUND"]=$value
    # Best of the rounds: TCG noise only ever slows a run down.
    if [ "$value" -gt "${RESULT["$config/$job"]:-0}" ]; then RESULT["$config/$job"]=$value; fi
    if [ -n "${AFTER_JOB:-}" ]; then $AFTER_JOB "$config/$job" "$value"; fi
  done
}

bench_loop_and_dm_log_writes() {
  echo "loop (direct-io), then dm-log-writes over it" >&2
  local loopdev logdev
  loopdev=$(losetup -f --show --direct-io=on $w/backing)
  run_jobs loop "$loopdev"
  truncate -s 4G $w/log
  logdev=$(losetup -f --show $w/log)
  dmsetup create bench-lw --table "0 $(blockdev --getsz "$loopdev") log-writes $loopdev $logdev"
  # The log keeps every write; empty it between jobs so tmpfs does not fill.
  reset_log() {
    dmsetup remove bench-lw; fallocate -p -o 0 -l 4G $w/log 2>/dev/null || true
    dmsetup create bench-lw --table "0 $(blockdev --getsz "$loopdev") log-writes $loopdev $logdev"
  }
  BEFORE_JOB=reset_log run_jobs dm-log-writes /dev/mapper/bench-lw
  dmsetup remove bench-lw; losetup -d "$logdev" "$loopdev"; rm -f $w/log
}

bench_no_capture() {
  echo "blkfilter --no-capture" >&2
  local dev
  dev=$($BIN/blkfilter attach --backing $w/backing --no-capture --id 0 --log $w/bf.log)
  pin_server blkfilter
  run_jobs no-capture "$dev"
  $BIN/blkfilter detach --id 0 >/dev/null; sleep 1
}

bench_capture_only() {
  echo "blkfilter with capture, shipper not running (capture cost alone)" >&2
  local dev
  dev=$($BIN/blkfilter attach --backing $w/backing --ring $w/ring0 --ring-mib 2048 --id 0 --log $w/bf.log)
  pin_server blkfilter
  run_jobs capture-only "$dev"
  $BIN/blkfilter detach --id 0 >/dev/null; sleep 1; rm -f $w/ring0
}

# protected CONFIG [SCHED...]: blkfilter with capture and the shipper, started with the
# scheduling command SCHED and the extra shipper flags SHIP_ARGS.
protected() {
  local config=$1 dev shipper
  shift
  echo "blkfilter with capture + shipper ($config: $*)" >&2
  rm -rf $w/ring $w/staging $w/store $w/status.json
  [ -f $w/key ] || $BIN/shipper keygen --out $w/key >/dev/null
  dev=$($BIN/blkfilter attach --backing $w/backing --ring $w/ring --ring-mib 1024 --id 0 --log $w/bf.log)
  pin_server blkfilter
  RUST_LOG=warn "$@" $BIN/shipper run --volume vol0 --ring $w/ring --staging $w/staging --store $w/store \
    --key $w/key --no-initial-sync --status $w/status.json ${SHIP_ARGS:-} >$w/shipper.log 2>&1 &
  shipper=$!
  # After each job its writes are shipped before the next starts, so one job's backlog
  # does not load the next; then the store is cleared so tmpfs does not fill.
  drain_and_clear_store() {
    local i
    for ((i = 0; i < 1500; i++)); do
      if [ -f $w/status.json ] && grep -q '"ring_used_bytes": 0,' $w/status.json &&
        grep -q '"segments_pending_upload": 0,' $w/status.json; then
        break
      fi
      sleep 0.2
    done
    rm -f $w/store/vol0/*.seg
  }
  # What the shipper left behind when fio stopped, and how long it took to catch up:
  # the figure fio saw, spread over the job plus that catch-up ("sustained"), is what
  # the volume could take if the shipper had to keep up all the time.
  measure_backlog() {
    local key=$1 value=$2 used start drain sustained
    used=$(sed -nE 's/.*"ring_used_bytes": ([0-9]+),.*/\1/p' $w/status.json 2>/dev/null | head -1)
    start=$(date +%s.%N)
    drain_and_clear_store
    drain=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    sustained=$(awk -v v="$value" -v t="$RUNTIME" -v d="$drain" 'BEGIN { printf "%d", v * t / (t + d) }')
    echo "    ring backlog when fio stopped: $((${used:-0} >> 20)) MiB, caught up in $drain s: sustained $sustained" >&2
    RUN["$config-sustained/${key#*/}/$ROUND"]=$sustained
    if [ "$sustained" -gt "${RESULT["$config-sustained/${key#*/}"]:-0}" ]; then
      RESULT["$config-sustained/${key#*/}"]=$sustained
    fi
    if [ "$((${used:-0} >> 20))" -gt "${BACKLOG[$config]:-0}" ]; then BACKLOG[$config]=$((${used:-0} >> 20)); fi
  }
  AFTER_JOB=measure_backlog run_jobs "$config" "$dev"
  if grep -q '"ring_overflow": true' $w/status.json; then OVERFLOW="yes ($config, round $ROUND)"; fi
  kill $shipper; wait $shipper 2>/dev/null || true
  $BIN/blkfilter detach --id 0 >/dev/null; sleep 1
}

# As the systemd unit runs it: nice 10, cpu_priority yield (the default: shipping
# threads under SCHED_IDLE until the ring is half full or the RPO half its threshold).
bench_protected() { protected protected nice -n 10; }

# The shipper always at normal priority (nice 10): what yielding buys on a 2-vCPU guest.
bench_protected_normal() { SHIP_ARGS="--cpu-priority normal" protected protected-normal nice -n 10; }

bench_rublk() {
  [ -n "$RUBLK" ] && [ -x "$RUBLK" ] || return 0
  echo "rublk loop" >&2
  "$RUBLK" add loop -n 1 -f $w/backing >/dev/null
  sleep 1
  pin_server "$(basename "$RUBLK")"
  run_jobs rublk /dev/ublkb1
  "$RUBLK" del -n 1 >/dev/null 2>&1 || true
}

# rublk's async/await path (-a): a smol task per tag, as blkfilter serves its queue, so
# the gap between rublk and rublk -a is what that model costs.
bench_rublk_async() {
  [ -n "$RUBLK" ] && [ -x "$RUBLK" ] || return 0
  echo "rublk loop -a (async/await)" >&2
  "$RUBLK" add loop -a -n 2 -f $w/backing >/dev/null
  sleep 1
  pin_server "$(basename "$RUBLK")"
  run_jobs rublk-a /dev/ublkb2
  "$RUBLK" del -n 2 >/dev/null 2>&1 || true
}

OVERFLOW=no
order=(bench_loop_and_dm_log_writes bench_no_capture bench_capture_only bench_protected bench_protected_normal bench_rublk bench_rublk_async)
for ROUND in $(seq "$ROUNDS"); do
  for job in "${JOBS[@]}"; do
    THIS_ROUND_JOBS=("$job")
    for b in "${order[@]}"; do $b; done
  done
  # The next round runs in the opposite order, so drift within the boot evens out.
  for ((i = 0, j = ${#order[@]} - 1; i < j; i++, j--)); do
    t=${order[i]}; order[i]=${order[j]}; order[j]=$t
  done
done

# ratio A B: the median over the rounds of A's run / B's run in the same round.
ratio() {
  local r a b
  for r in $(seq "$ROUNDS"); do
    a=${RUN["$1/$job/$r"]:-} b=${RUN["$2/$job/$r"]:-}
    if [ -n "$a" ] && [ -n "$b" ] && [ "$b" -gt 0 ]; then awk -v a="$a" -v b="$b" 'BEGIN { print a / b }'; fi
  done | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { printf "-"; exit }
    printf "%.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

configs=(loop no-capture capture-only protected protected-sustained protected-normal protected-normal-sustained dm-log-writes rublk rublk-a)
printf '| job |'; for c in "${configs[@]}"; do printf ' %s |' "$c"; done
printf ' no-capture / rublk | rublk -a / rublk | capture-only / no-capture | protected / no-capture | protected sustained / no-capture | protected-normal / no-capture | dm-log-writes / loop |\n'
printf '|---|'; for _ in "${configs[@]}"; do printf -- '---|'; done; printf -- '---|---|---|---|---|---|---|\n'
for job in "${JOBS[@]}"; do
  read -r rw bs qd <<<"$job"
  unit=$([ "$bs" = 4k ] && echo IOPS || echo MiB/s)
  printf '| %s %s QD%s (%s) |' "$rw" "$bs" "$qd" "$unit"
  for c in "${configs[@]}"; do printf ' %s |' "${RESULT["$c/$job"]:--}"; done
  printf ' %s | %s | %s | %s | %s | %s | %s |\n' "$(ratio no-capture rublk)" "$(ratio rublk-a rublk)" "$(ratio capture-only no-capture)" "$(ratio protected no-capture)" "$(ratio protected-sustained no-capture)" "$(ratio protected-normal no-capture)" "$(ratio dm-log-writes loop)"
done
echo
echo "Sustained: the protected figure times ${RUNTIME} s / (${RUNTIME} s + the time the shipper then took to empty the ring and upload). Largest ring backlog when fio stopped: protected ${BACKLOG[protected]:-0} MiB, protected-normal ${BACKLOG[protected-normal]:-0} MiB (ring 1024 MiB)."
drift=$(for r in $(seq "$ROUNDS"); do printf '%s ' "${RUN["loop/randwrite 4k 32/$r"]:--}"; done)
echo "Values: the best of $ROUNDS rounds; ratios: the median of the per-round ratios (runs of one job in one round are back to back). The drift they correct for, loop randwrite 4k by round: ${drift% }."
echo "Ring overflowed during the protected runs: $OVERFLOW (under TCG the shipper can fall behind; writes that overflow go to the dirty bitmap, which is cheaper than recording)."
