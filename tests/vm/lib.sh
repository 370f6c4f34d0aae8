# Helpers for scripts that run on a kernel with ublk (natively or inside scripts/vm.sh):
# protecting a volume, running the shipper, draining, applying and comparing.
# shellcheck shell=bash

BIN=${BIN:-target/release}

log() { printf '\n--- %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# on_xfs DIR SIZE: DIR becomes a fresh XFS (reflink on) on a loop device over a sparse
# image beside it, so replicas and undo journals made in it share blocks. run_test
# unmounts it.
on_xfs() {
  modprobe xfs 2>/dev/null || true
  mkdir -p "$1"
  truncate -s "$2" "$1.xfs"
  mkfs.xfs -q -f -m reflink=1 "$1.xfs"
  mount -o loop "$1.xfs" "$1"
}

# shared_journals DIR: how many of DIR's undo journals share the replica's blocks
# (format version 2), of how many.
shared_journals() {
  local f v2=0 all=0
  for f in "$1"/*.undo; do
    all=$((all + 1))
    [ "$(od -An -tu2 -j8 -N2 "$f" | tr -d ' ')" = 2 ] && v2=$((v2 + 1))
  done
  echo "$v2 $all"
}

# protect DIR SIZE [ID]: backing file, key, ring, /dev/ublkbID with capture, and a
# shipper in the background. Sets DEV and SHIPPER_PID. The ring (RING_MIB, default 256)
# should hold everything a test writes: under TCG the shipper can fall behind fio, and
# writes lost to an overflow reach the replica only through a resync.
protect() {
  local dir=$1 size=$2 id=${3:-0}
  mkdir -p "$dir"
  truncate -s "$size" "$dir/backing"
  [ -f "$dir/key" ] || "$BIN/shipper" keygen --out "$dir/key" >/dev/null
  # shellcheck disable=SC2086
  DEV=$("$BIN/blkfilter" attach --backing "$dir/backing" --ring "$dir/ring" --id "$id" \
        --ring-mib "${RING_MIB:-256}" --log "$dir/blkfilter.log" ${ATTACH_OPTS:-}) || die "attach failed: $(tail -5 "$dir/blkfilter.log")"
  start_shipper "$dir"
}

# SYNC_OPT: the shipper's initial-sync choice. Tests whose backing and replica both start
# as zeroes skip the digest pass; the initial-replication test sets it empty.
start_shipper() {
  local dir=$1
  # shellcheck disable=SC2086
  RUST_LOG=${RUST_LOG:-warn} "$BIN/shipper" run --volume vol0 --ring "$dir/ring" \
    --staging "$dir/staging" --store "$dir/store" --key "$dir/key" ${SYNC_OPT---no-initial-sync} \
    --status "$dir/status.json" --max-segment-age-ms 200 --retry-unit-ms 10 ${SHIPPER_OPTS:-} \
    >>"$dir/shipper.log" 2>&1 &
  SHIPPER_PID=$!
}

stop_shipper() {
  [ -n "${SHIPPER_PID:-}" ] || return 0
  kill -TERM "$SHIPPER_PID" 2>/dev/null || true
  wait "$SHIPPER_PID" 2>/dev/null || true
  SHIPPER_PID=
}

# start_follower DIR: the recovery side as a service, `ublk-target apply --follow`
# (applies segments as they arrive and answers digest-resync requests). Sets
# FOLLOWER_PID; `finish` stops it before its final apply.
start_follower() {
  local dir=$1
  [ -f "$dir/replica" ] || truncate -s "$(stat -L -c %s "$dir/backing")" "$dir/replica"
  mkdir -p "$dir/store"
  RUST_LOG=${RUST_LOG:-info} "$BIN/ublk-target" apply --follow --poll-ms 100 --store "$dir/store" \
    --volume vol0 --replica "$dir/replica" --key "$dir/key" >>"$dir/target.log" 2>&1 &
  FOLLOWER_PID=$!
}

stop_follower() {
  [ -n "${FOLLOWER_PID:-}" ] || return 0
  kill -TERM "$FOLLOWER_PID" 2>/dev/null || true
  wait "$FOLLOWER_PID" 2>/dev/null || true
  FOLLOWER_PID=
}

# wait_digest_resync DIR: until the shipper's status shows no digest resync (300 s).
wait_digest_resync() {
  local i
  for i in $(seq 1200); do
    grep -q '"resync": null' "$1/status.json" 2>/dev/null && return 0
    sleep 0.25
  done
  die "the digest resync did not finish: $(cat "$1/status.json")"
}

# planned_failover DIR ID: the source is already detached and drained (`finish`): fail
# over to the latest point and bring the replica up as /dev/ublkbID with capture into
# DIR/ring-back. Sets DEV.
planned_failover() {
  DEV=$("$BIN/ublk-target" failover --replica "$1/replica" --ring "$1/ring-back" --id "$2") ||
    die "failover failed"
}

# start_failback DIR: protect the recovered volume (ring DIR/ring-back) toward the
# original disk DIR/backing: a shipper into DIR/back/store and `apply --follow` with the
# original disk as its replica. The new epoch starts with a digest resync, so only
# differing blocks travel (minimize downtime).
start_failback() {
  local dir=$1
  mkdir -p "$dir/back/store"
  cp "$dir/key" "$dir/back/key"
  RUST_LOG=${RUST_LOG:-info} "$BIN/ublk-target" apply --follow --poll-ms 100 --store "$dir/back/store" \
    --volume vol0 --replica "$dir/backing" --state "$dir/back/original.state" \
    --journal "$dir/back/original.journal" --key "$dir/key" >>"$dir/back/target.log" 2>&1 &
  FOLLOWER_PID=$!
  RUST_LOG=warn "$BIN/shipper" run --volume vol0 --ring "$dir/ring-back" --staging "$dir/back/staging" \
    --store "$dir/back/store" --key "$dir/key" --status "$dir/back/status.json" \
    --max-segment-age-ms 200 >>"$dir/back/shipper.log" 2>&1 &
  SHIPPER_PID=$!
}

# finish_failback DIR ID: the final delta: detach the recovered volume /dev/ublkbID,
# drain its ring, apply everything to the original disk.
finish_failback() {
  local dir=$1 id=$2 i
  "$BIN/blkfilter" detach --id "$id" >/dev/null
  for i in $(seq 100); do [ -z "$(device_state "$id")" ] && break; sleep 0.1; done
  stop_shipper
  RUST_LOG=warn "$BIN/shipper" run --volume vol0 --ring "$dir/ring-back" --staging "$dir/back/staging" \
    --store "$dir/back/store" --key "$dir/key" --drain >>"$dir/back/shipper.log" 2>&1 ||
    die "draining the failback shipper failed"
  stop_follower
  "$BIN/ublk-target" apply --store "$dir/back/store" --volume vol0 --replica "$dir/backing" \
    --state "$dir/back/original.state" --journal "$dir/back/original.journal" --key "$dir/key" | tail -1
}

# reprotect DIR ID: protection in the original direction again: /dev/ublkbID over the
# original disk with a new ring and epoch, toward the old replica (moved to
# DIR/again/replica with a fresh applied state), starting with a digest resync. The
# next `finish DIR/again` ends it. Sets DEV.
reprotect() {
  local dir=$1 id=$2
  mkdir -p "$dir/again"
  cp "$dir/key" "$dir/again/key"
  mv "$dir/replica" "$dir/again/replica"
  ln -sf "$dir/backing" "$dir/again/backing"
  DEV=$("$BIN/blkfilter" attach --backing "$dir/backing" --ring "$dir/again/ring" --id "$id" \
        --ring-mib "${RING_MIB:-256}" --log "$dir/again/blkfilter.log") || die "attach failed"
  start_follower "$dir/again"
  SYNC_OPT= start_shipper "$dir/again"
}

# point_of_seq DIR SEQ: waits (60 s) until the follower applied the segment that ends
# with record SEQ (a MARK) and prints that recovery point's number.
point_of_seq() {
  local i p
  for i in $(seq 240); do
    p=$("$BIN/ublk-target" points --replica "$1/replica" --json 2>/dev/null |
      awk -v seq="$2" '/"index":/ { gsub(",", "", $2); idx = $2 }
                       /"last_seq":/ { gsub(",", "", $2); if ($2 == seq) { print idx; exit } }')
    [ -n "$p" ] && { echo "$p"; return 0; }
    sleep 0.25
  done
  die "no recovery point ends with seq $2"
}

# mark_frozen DIR MNT REF: freezes MNT, records an app-consistent MARK, copies the
# source (the backing, still while frozen) to REF, thaws. Prints the MARK's seq.
mark_frozen() {
  local out
  fsfreeze -f "$2"
  out=$("$BIN/shipper" mark --ring "$1/ring" --app-consistent --pre true) || { fsfreeze -u "$2"; die "mark: $out"; }
  cp --sparse=always "$1/backing" "$3"
  fsfreeze -u "$2"
  echo "$out" | sed -n 's/.*with seq \([0-9]*\).*/\1/p'
}

# blkfilter_pid ID: the pid of the server of /dev/ublkbID.
blkfilter_pid() {
  "$BIN/blkfilter" list | awk -v id="$1" '$1 == id { print $4 }'
}

device_state() {
  "$BIN/blkfilter" list | awk -v id="$1" '$1 == id { print $2 }'
}

# wait_state ID STATE: up to 10 s.
wait_state() {
  local i
  for i in $(seq 100); do
    [ "$(device_state "$1")" = "$2" ] && return 0
    sleep 0.1
  done
  die "device $1 did not reach $2 (is $(device_state "$1"))"
}

# finish DIR ID: detach the device (every write is then in the ring), stop the
# shipper, drain the ring into the store, apply everything to DIR/replica.
finish() {
  local dir=$1 id=${2:-0}
  sync
  "$BIN/blkfilter" detach --id "$id" >/dev/null
  # The server exits once the device is gone; its last records are in the ring.
  local i
  for i in $(seq 100); do [ -z "$(device_state "$id")" ] && break; sleep 0.1; done
  stop_shipper
  # --no-initial-sync: the drain only empties the ring. Without it, a drain whose
  # shippers were all killed before staging a segment would begin a new protection's
  # initial digest resync, which no drain can finish (it then exits 1, as it should).
  RUST_LOG=warn "$BIN/shipper" run --volume vol0 --ring "$dir/ring" --staging "$dir/staging" \
    --store "$dir/store" --key "$dir/key" --no-initial-sync --status "$dir/status.json" --drain \
    >>"$dir/shipper.log" 2>&1 ||
    die "draining shipper failed: $(tail -5 "$dir/shipper.log")
ring and resync state: $(cat "$dir/status.json" 2>/dev/null)
blkfilter log: $(tail -20 "$dir/blkfilter.log")"
  stop_follower
  truncate -s "$(stat -L -c %s "$dir/backing")" "$dir/replica"
  "$BIN/ublk-target" apply --store "$dir/store" --volume vol0 --replica "$dir/replica" \
    --key "$dir/key" 2>&1 | tail -1
}

# latest_point_is_a_crash_point DIR: the replica's latest recovery point (its last
# applied segment) is crash-consistent.
latest_point_is_a_crash_point() {
  "$BIN/ublk-target" points --replica "$1/replica" --json |
    grep -B3 '"latest": true' | grep -q '"crash_consistent": true' ||
    die "the latest point of $1/replica is not a crash point: $("$BIN/ublk-target" points --replica "$1/replica")"
}

# same_image DIR: the replica equals the backing byte for byte.
same_image() {
  local a b
  a=$(sha256sum <"$1/backing" | cut -d' ' -f1)
  b=$(sha256sum <"$1/replica" | cut -d' ' -f1)
  echo "backing sha256 $a"
  echo "replica sha256 $b"
  if grep -q '"ring_overflow": true' "$1/status.json" 2>/dev/null; then
    echo "note: the ring overflowed; overflowed writes reach the replica only by a resync"
  fi
  [ "$a" = "$b" ]
}

# fio_job NAME DEV ARGS...: fio with crc32c verification, io_uring, direct I/O.
fio_job() {
  local name=$1 dev=$2
  shift 2
  # From /tmp: fio leaves its verify state (local-NAME-0-verify.state) in the working
  # directory, which would otherwise be the checkout.
  (cd /tmp && fio --name="$name" --filename="$dev" --ioengine=io_uring --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting \
    --output-format=terse --terse-version=3 "$@") >"/tmp/fio-$name.out" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || tail -20 "/tmp/fio-$name.out" >&2
  return $rc
}

# wait_resynced DIR: until the shipper's status shows no overflow and no resync (300 s).
wait_resynced() {
  # Bounded by the clock, not by rounds: under TCG each round's processes cost more
  # than its sleep.
  local deadline=$((SECONDS + 300))
  while [ $SECONDS -lt $deadline ]; do
    if grep -q '"ring_overflow": false' "$1/status.json" 2>/dev/null &&
       grep -q '"ring_resync": false' "$1/status.json" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  ps -eo pid,stat,pcpu,etime,args | grep -E 'blkfilter|shipper|ublk-target' | grep -v grep >&2 || true
  die "the ring did not resync in 300 s: $(cat "$1/status.json")"
}

# digest_passes LOG: prints blkfilter's finished digest passes ("X of Y bytes differed").
digest_passes() {
  grep -o 'digest resync [0-9]*: done; [0-9]* of [0-9]* bytes differed' "$1" || true
}
