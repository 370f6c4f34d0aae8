#!/usr/bin/env bash
# The guest half of tests/vm/power-cut.sh: `write DIR` (boot 1) or `resume DIR` (boot 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/vm/lib.sh
[ -e /dev/ublk-control ] || modprobe ublk_drv
phase=$1 d=$2
ring=/dev/shm/ublk-dr/pc.ring   # guest memory: lost in the power cut

attach() {
  DEV=$("$BIN/blkfilter" attach --backing "$d/backing" --ring "$ring" --id 0 --ring-mib 256 \
        --activity-log "$d/backing.al" --resync-compare-wait 600 --log "$d/blkfilter-$phase.log") || die "attach: $(tail -3 "$d/blkfilter-$phase.log")"
}
# At normal priority: what is tested is that only the hot extents are compared and
# only their changed blocks re-sent. A yielding shipper (the default) under this
# CPU-bound fio on TCG defers shipping by up to half the RPO threshold, and fio
# rewrites most of the hot extents meanwhile, so most blocks differ (seen: 32 and 52
# of 64 MiB re-sent, against 5-14 MiB at normal priority).
SHIP=("$BIN/shipper" run --volume vol0 --ring "$ring" --staging "$d/staging" --store "$d/store"
      --key "$d/key" --status "$d/status.json" --max-segment-age-ms 200 --no-initial-sync
      --cpu-priority normal)

case $phase in
write)
  truncate -s 256M "$d/backing"
  "$BIN/shipper" keygen --out "$d/key" >/dev/null
  attach
  RUST_LOG=warn "${SHIP[@]}" >>"$d/shipper-$phase.log" 2>&1 &
  # Writes into the second quarter of the disk only, until the power goes.
  fio --name=pc --filename="$DEV" --rw=randwrite --bs=16k --iodepth=16 --offset=64M --size=64M \
    --ioengine=io_uring --direct=1 --time_based --runtime=900 >/dev/null 2>&1 &
  sleep 3
  touch "$d/writing"
  wait
  ;;
resume)
  [ ! -e "$ring" ] || die "the ring survived: this was no power cut"
  attach
  line=$(grep -h "unclean stop; resyncing" "$d/blkfilter-resume.log" || true)
  [ -n "$line" ] || die "the activity log reported no unclean stop"
  echo "activity log: ${line#*resyncing }"
  hot=$(echo "$line" | sed 's/.*resyncing \([0-9]*\) of \([0-9]*\) extents.*/\1/')
  total=$(echo "$line" | sed 's/.*resyncing \([0-9]*\) of \([0-9]*\) extents.*/\2/')
  [ "$total" -eq 64 ] && [ "$hot" -ge 1 ] && [ "$hot" -le 17 ] ||
    die "expected 1..17 hot extents of 64 (fio wrote 16 of them), got $hot of $total"
  rm -f "$d/status.json"   # boot 1's
  # The recovery side applies what boot 1 shipped and answers the digest pass over the
  # hot extents: only their blocks that differ from the replica are re-sent.
  start_follower "$d"
  RUST_LOG=warn "${SHIP[@]}" >>"$d/shipper-$phase.log" 2>&1 &
  SHIPPER_PID=$!
  for _ in $(seq 100); do [ -e "$d/status.json" ] && break; sleep 0.1; done
  wait_resynced "$d"
  pass=$(digest_passes "$d/blkfilter-resume.log" | tail -1)
  [ -n "$pass" ] || die "no digest pass compared the hot extents"
  sent=$(echo "$pass" | sed 's/.*done; \([0-9]*\) of \([0-9]*\) bytes.*/\1/')
  compared=$(echo "$pass" | sed 's/.*done; \([0-9]*\) of \([0-9]*\) bytes.*/\2/')
  echo "hot extents compared with the replica: re-sent $sent of $compared bytes"
  [ "$compared" -eq $((hot * 4 << 20)) ] || die "the pass compared $compared bytes, not the $hot hot extents"
  [ "$sent" -lt $((compared / 2)) ] || die "most of the hot extents were re-sent: no comparison"
  "$BIN/blkfilter" detach --id 0 >/dev/null
  for _ in $(seq 100); do [ -z "$(device_state 0)" ] && break; sleep 0.1; done
  stop_shipper
  RUST_LOG=warn "${SHIP[@]}" --drain >>"$d/shipper-$phase.log" 2>&1
  stop_follower
  "$BIN/ublk-target" apply --store "$d/store" --volume vol0 --replica "$d/replica" --key "$d/key" | tail -1
  a=$(sha256sum <"$d/backing" | cut -d' ' -f1)
  b=$(sha256sum <"$d/replica" | cut -d' ' -f1)
  echo "backing sha256 $a"
  echo "replica sha256 $b"
  [ "$a" = "$b" ] || die "the replica did not converge after the power cut"
  ;;
*) die "usage: $0 write|resume DIR" ;;
esac
