#!/usr/bin/env bash
# End-to-end tests on real ublk devices: fio with verification, ext4, kill -9 of
# blkfilter and of the shipper, ring overflow, a full source disk, initial replication
# of a used volume,
# recovery points with test failover (on XFS, where undo journals share the replica's
# blocks), failover and failback, bad command lines. Needs /dev/ublk-control: run it
# through scripts/vm.sh (scripts/test.sh does). Prints "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/../.."
. tests/vm/lib.sh
[ -e /dev/ublk-control ] || { modprobe ublk_drv 2>/dev/null; [ -e /dev/ublk-control ] || die "no /dev/ublk-control"; }

PASSED=0 FAILED=0
run_test() {
  local name=$1
  log "test $name"
  # Not in an `if` condition: bash ignores `set -e` inside one, and a failing step in
  # the middle of a test would go unnoticed.
  ( set -e; "$name" )
  local rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok: $name"; PASSED=$((PASSED + 1))
  else
    echo "FAILED: $name"; FAILED=$((FAILED + 1))
    tail -n 5 /tmp/t-*/*.log 2>/dev/null
  fi
  # Whatever the test left behind must not leak into the next one.
  for id in $("$BIN/blkfilter" list 2>/dev/null | awk 'NR > 1 { print $1 }'); do
    "$BIN/blkfilter" detach --id "$id" >/dev/null 2>&1
  done
  # Test-failover views (cleanup refuses any other device).
  for c in /sys/class/ublk-char/ublkc*; do
    [ -e "$c" ] && "$BIN/ublk-target" failover --cleanup --id "${c##*ublkc}" >/dev/null 2>&1
  done
  pkill -f "$BIN/shipper run" 2>/dev/null; pkill -f "$BIN/ublk-target apply" 2>/dev/null; sleep 0.2
  # Guest /tmp is RAM: each test's images go when it ends.
  umount /tmp/t-*/mnt 2>/dev/null; umount /tmp/t-* 2>/dev/null; rm -rf /tmp/t-*
}

fio_randwrite_and_seqwrite() {
  local w=/tmp/t-fio
  protect $w 256M
  fio_job rand "$DEV" --rw=randwrite --bs=4k --iodepth=32 --size=64M --offset=0
  fio_job seq "$DEV" --rw=write --bs=1M --iodepth=8 --size=96M --offset=128M
  finish $w
  same_image $w
}

ext4_files() {
  local w=/tmp/t-ext4
  protect $w 256M
  mkfs.ext4 -q -F "$DEV"
  mkdir -p $w/mnt
  mount "$DEV" $w/mnt
  mkdir -p $w/mnt/a/b/c
  for i in $(seq 50); do head -c $((i * 3000)) /dev/urandom >$w/mnt/a/b/c/f$i; done
  cp -r /usr/share/doc/fio $w/mnt/doc 2>/dev/null || cp -r /etc/default $w/mnt/doc
  (cd $w/mnt && find . -type f -exec sha256sum {} + | sort -k2) >$w/files.sha
  sync
  umount $w/mnt
  finish $w
  same_image $w
  e2fsck -fn $w/replica
  mount -o ro,loop $w/replica $w/mnt
  (cd $w/mnt && sha256sum -c --quiet $w/files.sha)
  umount $w/mnt
}

kill9_blkfilter_mid_fio() {
  local w=/tmp/t-kill-blkfilter
  protect $w 128M
  fio_job killed "$DEV" --rw=randwrite --bs=4k --iodepth=16 --size=96M \
    --verify_backlog=1024 &
  local fio_pid=$!
  sleep 2
  local pid
  pid=$(blkfilter_pid 0)
  [ -n "$pid" ]
  kill -9 "$pid"
  wait_state 0 QUIESCED
  "$BIN/blkfilter" recover --id 0 --log $w/blkfilter.log
  wait_state 0 LIVE
  [ "$(blkfilter_pid 0)" != "$pid" ]
  wait $fio_pid   # the write job finishes and verifies
  finish $w
  same_image $w
}

reattach_takes_back_a_dead_servers_device() {
  local w=/tmp/t-reattach
  protect $w 64M
  fio_job reattach "$DEV" --rw=randwrite --bs=8k --iodepth=8 --size=48M --verify_backlog=512 &
  local fio_pid=$! pid
  sleep 2
  pid=$(blkfilter_pid 0)
  kill -9 "$pid"
  wait_state 0 QUIESCED
  # What a restarted systemd unit does: the same attach command line.
  "$BIN/blkfilter" attach --backing $w/backing --ring $w/ring --id 0 --ring-mib 256 --log $w/blkfilter.log
  wait_state 0 LIVE
  wait $fio_pid
  finish $w
  same_image $w
}

kill9_shipper_under_load() {
  local w=/tmp/t-kill-shipper
  protect $w 128M
  fio_job load "$DEV" --rw=randwrite --bs=16k --iodepth=16 --size=96M &
  local fio_pid=$! i
  for i in 1 2 3; do
    sleep 1
    kill -9 "$SHIPPER_PID"; wait "$SHIPPER_PID" 2>/dev/null || true
    start_shipper $w
  done
  wait $fio_pid
  finish $w
  same_image $w
}

# The regions lost to the overflow are compared with the follower's replica (digest
# passes restricted to them) rather than re-sent whole.
overflow_then_resync_converges() {
  local w=/tmp/t-resync
  RING_MIB=1 protect $w 128M
  start_follower $w
  fio_job overflow "$DEV" --rw=randwrite --bs=64k --iodepth=16 --size=96M
  grep -q '"ring_overflow": true\|"ring_resync": true' $w/status.json ||
    echo "note: the ring did not overflow in this run"
  wait_resynced $w
  echo "digest passes over the regions lost to the overflow:"
  digest_passes $w/blkfilter.log | tail -5
  # fio writes fresh random data, so every block a lost write hit differs; a pass that
  # gave up waiting for the follower's digests would say so here.
  echo "passes that gave up waiting for digests: $(grep -c 'no replica digests' $w/blkfilter.log || true)"
  finish $w
  same_image $w
  # The last segment is a crash point again: consistency was regained (asked of the
  # replica's points: apply deleted the applied segments from the store).
  latest_point_is_a_crash_point $w
}

# Issue #4: protecting a volume that already holds ext4 and files, while fio writes
# into that file system; the digest resync copies what the replica lacks.
initial_replication_of_used_ext4_under_fio() {
  local w=/tmp/t-initial fio_pid
  mkdir -p $w/mnt
  truncate -s 1G $w/backing
  mkfs.ext4 -q -F $w/backing
  mount -o loop $w/backing $w/mnt
  mkdir -p $w/mnt/data
  for i in $(seq 100); do head -c $((i * 8192)) /dev/urandom >$w/mnt/data/f$i; done
  cp -r /usr/share/doc/fio $w/mnt/doc 2>/dev/null || cp -r /etc/default $w/mnt/doc
  umount $w/mnt
  "$BIN/shipper" keygen --out $w/key >/dev/null
  start_follower $w
  SYNC_OPT= protect $w 1G
  mount "$DEV" $w/mnt
  # From /tmp, like fio_job: its verify state file stays out of the checkout.
  (cd /tmp && fio --name=live --directory=$w/mnt/data --size=32M --rw=randwrite --bs=4k \
    --iodepth=8 --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1) >/tmp/fio-live.out 2>&1 &
  fio_pid=$!
  sleep 1
  grep -q '"resync": {' $w/status.json   # status shows the initial replication
  "$BIN/shipper" status --status $w/status.json | grep state
  wait $fio_pid
  # The progress of the initial replication, until it is done.
  timeout 300 "$BIN/shipper" resync --ring $w/ring --watch
  (cd $w/mnt && find . -type f -exec sha256sum {} + | sort -k2) >$w/files.sha
  umount $w/mnt
  finish $w
  same_image $w
  latest_point_is_a_crash_point $w
  e2fsck -fn $w/replica
  mount -o ro,loop $w/replica $w/mnt
  (cd $w/mnt && sha256sum -c --quiet $w/files.sha)
  umount $w/mnt
}

# Issue #5: five app-consistent points taken under a fio + file workload; the test
# failover device at each equals a copy of the source taken at that point and holds a
# clean ext4; the view stays put while applying goes on; test writes vanish.
points_and_test_failover() {
  local w=/tmp/t-points i seq dev points=() out shared
  # On XFS: the undo journals share the replica's blocks rather than copying them.
  on_xfs $w 3G
  protect $w 256M
  start_follower $w
  mkfs.ext4 -q -F "$DEV"
  mkdir -p $w/mnt
  mount "$DEV" $w/mnt
  for i in 1 2 3 4 5; do
    mkdir -p $w/mnt/d$i
    for f in $(seq 10); do head -c $((f * 7000)) /dev/urandom >$w/mnt/d$i/f$f; done
    fio --name=p$i --directory=$w/mnt --filename=load --size=16M --rw=randwrite --bs=4k \
      --iodepth=8 --ioengine=io_uring --direct=1 --io_size=4M >/dev/null
    seq=$(mark_frozen $w $w/mnt $w/ref$i)
    points+=("$(point_of_seq $w "$seq")")
  done
  "$BIN/ublk-target" points --replica $w/replica
  read -r -a shared <<<"$(shared_journals $w/replica.journal)"
  echo "${shared[0]} of ${shared[1]} undo journals share the replica's blocks"
  [ "${shared[0]}" -gt 0 ]
  for i in 1 2 3 4 5; do
    dev=$("$BIN/ublk-target" failover --test --replica $w/replica --point "${points[$((i - 1))]}" --id 10 --log $w/view.log)
    echo "point ${points[$((i - 1))]} is $dev"
    cmp "$dev" $w/ref$i
    e2fsck -fn "$dev" >/dev/null
    "$BIN/ublk-target" failover --cleanup --id 10
  done
  # Writes go on and are applied while a test device shows point 2.
  dev=$("$BIN/ublk-target" failover --test --replica $w/replica --point "${points[1]}" --id 10 --log $w/view.log)
  fio --name=more --directory=$w/mnt --filename=load --size=16M --rw=randwrite --bs=4k \
    --iodepth=8 --ioengine=io_uring --direct=1 --io_size=8M >/dev/null
  seq=$(mark_frozen $w $w/mnt $w/ref6)
  point_of_seq $w "$seq" >/dev/null
  cmp "$dev" $w/ref2
  # Test writes read back through the device, and go nowhere else.
  head -c 1M /dev/urandom >$w/testdata
  dd if=$w/testdata of="$dev" bs=1M seek=100 oflag=direct conv=notrunc status=none
  dd if="$dev" of=$w/readback bs=1M skip=100 count=1 iflag=direct status=none
  cmp $w/testdata $w/readback
  "$BIN/ublk-target" failover --cleanup --id 10
  out=$("$BIN/ublk-target" failover --cleanup --id 10 2>&1) && return 1
  echo "$out" | grep -q "does not exist" || { echo "$out"; return 1; }
  out=$("$BIN/ublk-target" failover --test --replica $w/replica --point 99999 --id 11 --log $w/view.log 2>&1) && return 1
  echo "$out" | grep -q "not available" || { echo "$out"; return 1; }
  [ -z "$(device_state 11)" ]
  out=$("$BIN/ublk-target" failover --test --replica $w/nonexistent --id 11 2>&1) && return 1
  echo "$out" | grep -q "does not exist" || { echo "$out"; return 1; }
  umount $w/mnt
  finish $w
  same_image $w   # none of the test writes reached the replica
  # No --point: the latest, which after the drain is the source as it stands.
  dev=$("$BIN/ublk-target" failover --test --replica $w/replica --id 10 --log $w/view.log)
  cmp "$dev" $w/backing
  "$BIN/ublk-target" failover --cleanup --id 10
  # Unplanned failover to an older point: the replica rolls back for real and comes up
  # as a protected volume equal to the source at that point.
  dev=$("$BIN/ublk-target" failover --replica $w/replica --point "${points[2]}" --ring $w/ring-fo --id 12)
  cmp "$dev" $w/ref3
  e2fsck -fn "$dev" >/dev/null
  echo "failover to point ${points[2]}: $dev equals the source at that point"
  "$BIN/blkfilter" detach --id 12 >/dev/null
}

# Issue #5: planned failover loses nothing; writes on the recovered volume; failback
# with digest compare ships only what differs; protection resumes toward the replica.
failover_failback_round_trip() {
  local w=/tmp/t-roundtrip src out fio_pid
  protect $w 256M
  start_follower $w
  fio_job before "$DEV" --rw=randwrite --bs=4k --iodepth=16 --size=64M --io_size=24M
  fio_job before2 "$DEV" --rw=write --bs=1M --iodepth=4 --offset=128M --size=32M
  src=$(sha256sum <"$DEV" | cut -d' ' -f1)
  # Planned failover: quiesce (detach), drain, apply everything, fail over.
  finish $w
  planned_failover $w 1
  [ "$(sha256sum <"$DEV" | cut -d' ' -f1)" = "$src" ] || die "planned failover lost writes"
  echo "planned failover: $DEV equals the source as quiesced"
  "$BIN/ublk-target" commit --replica $w/replica
  out=$("$BIN/ublk-target" apply --store $w/store --volume vol0 --replica $w/replica --key $w/key 2>&1) && return 1
  echo "$out" | grep -q "rolled back" || { echo "$out"; return 1; }
  # The recovered volume is used, then failed back while it keeps running.
  fio_job after "$DEV" --rw=randwrite --bs=4k --iodepth=16 --size=32M --offset=64M
  start_failback $w
  fio_job during "$DEV" --rw=randwrite --bs=64k --iodepth=4 --size=16M --offset=200M &
  fio_pid=$!
  wait_digest_resync $w/back
  wait $fio_pid
  echo "failback digest resync: $(grep -h "digest resync .*: done" /run/ublk-dr/blkfilter.log | tail -1 | sed 's/.*done; //')"
  echo "failback shipped $(sed -n 's/.*"bytes_sealed": \([0-9]*\).*/\1/p' $w/back/status.json) bytes in segments, disk 268435456 bytes"
  src=$(sha256sum <"$DEV" | cut -d' ' -f1)
  finish_failback $w 1
  [ "$(sha256sum <$w/backing | cut -d' ' -f1)" = "$src" ] || die "the original disk differs from the recovered volume"
  echo "failback: the original disk equals the recovered volume"
  reprotect $w 0
  fio_job resumed "$DEV" --rw=randwrite --bs=4k --iodepth=16 --size=16M
  wait_digest_resync $w/again
  echo "reprotect: $(grep -h "digest resync .*: done" $w/again/blkfilter.log | tail -1 | sed 's/.*done; //')"
  finish $w/again 0
  same_image $w/again
  echo "protection resumed: the replica equals the original disk again"
}

bad_command_lines() {
  local w=/tmp/t-bad out
  mkdir -p $w
  truncate -s 64M $w/backing
  out=$("$BIN/blkfilter" attach --backing $w/missing --ring $w/ring 2>&1) && return 1
  echo "$out" | grep -q "missing" || { echo "$out"; return 1; }
  out=$("$BIN/blkfilter" attach --backing $w/backing --ring /proc/no/such/ring 2>&1) && return 1
  echo "$out" | grep -qi "ring" || { echo "$out"; return 1; }
  # A good attach says nothing on stderr, nor its daemon in its log, about the id
  # (libublk, asked to open an id that does not exist yet, prints "device reload json
  # failed").
  "$BIN/blkfilter" attach --backing $w/backing --ring $w/ring --id 3 --log $w/attach.log \
    2>$w/attach.err >/dev/null
  [ ! -s $w/attach.err ] || { cat $w/attach.err; return 1; }
  if grep -q json $w/attach.log; then cat $w/attach.log; return 1; fi
  out=$("$BIN/blkfilter" attach --backing $w/backing --ring $w/ring2 --id 3 2>&1) && return 1
  echo "$out" | grep -q "already in use" || { echo "$out"; return 1; }
  out=$("$BIN/blkfilter" recover --id 3 2>&1) && return 1
  echo "$out" | grep -q "LIVE" || { echo "$out"; return 1; }
  out=$("$BIN/blkfilter" attach 2>&1) && return 1
  # Exactly one device is left (the good one), and it is live.
  [ "$("$BIN/blkfilter" list | awk 'NR > 1' | wc -l)" -eq 1 ]
  [ "$(device_state 3)" = LIVE ]
  "$BIN/blkfilter" detach --id 3 >/dev/null
  out=$("$BIN/blkfilter" detach --id 3 2>&1) && return 1
  echo "$out" | grep -q "does not exist" || { echo "$out"; return 1; }
  if echo "$out" | grep -q "json"; then echo "$out"; return 1; fi
}

# The source's disk fills up under fio (backing on a 31.25 MiB tmpfs, so one write is cut short): the writes that
# fail, some half-done, are not recorded but their ranges are resynced, so the replica
# still equals the backing.
full_backing_is_resynced() {
  local w=/tmp/t-full
  # At mnt, which run_test unmounts whatever happens.
  mkdir -p $w/mnt
  mount -t tmpfs -o size=32000k tmpfs $w/mnt
  ln -s $w/mnt/backing $w/backing
  protect $w 128M
  # 64 MiB into 31.25: fio sees errors (continue_on_error), blkfilter stays up. The
  # kernel logs each failed write; that stays off the console.
  local level
  level=$(cut -f1 /proc/sys/kernel/printk)
  dmesg -n 1
  fio --name=fill --filename="$DEV" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
    --iodepth=8 --size=64M --continue_on_error=all >/tmp/fio-fill.out 2>&1 || true
  dmesg -n "$level"
  grep -q "the range is resynced" $w/blkfilter.log
  echo "backing writes that failed: $(grep -c 'the range is resynced' $w/blkfilter.log)"
  [ "$(device_state 0)" = LIVE ]
  wait_resynced $w
  finish $w
  same_image $w
}

# Two devices in one consistency group: cuts made while fio writes to both (and one
# server is killed and recovered) reach the recovery side as points of both volumes;
# the last cut, made once fio is done, brings each volume up equal to its source.
consistency_group_on_two_devices() {
  local w=/tmp/t-group a b dev out cut shipper_a
  a=$w/a b=$w/b
  mkdir -p $w
  ATTACH_OPTS="--group-clock $w/db.clock" protect $a 64M 0
  shipper_a=$SHIPPER_PID
  # One of the group's shippers cuts every 300 ms.
  ATTACH_OPTS="--group-clock $w/db.clock" \
    SHIPPER_OPTS="--group-clock $w/db.clock --group-cut-every-ms 300" protect $b 64M 1
  "$BIN/blkfilter" list | grep "(group clock $w/db.clock)" >/dev/null
  fio_job ga /dev/ublkb0 --rw=randwrite --bs=4k --iodepth=16 --size=64M --io_size=16M &
  local fio_a=$!
  fio_job gb /dev/ublkb1 --rw=randwrite --bs=4k --iodepth=16 --size=64M --io_size=16M &
  local fio_b=$!
  # a's server dies under fio and is recovered: it keeps its place in the group.
  sleep 1
  kill -9 "$(blkfilter_pid 0)"
  wait_state 0 QUIESCED
  "$BIN/blkfilter" recover --id 0 --log $a/blkfilter.log
  wait_state 0 LIVE
  "$BIN/blkfilter" list | awk '$1 == 0' | grep "(group clock $w/db.clock)" >/dev/null
  wait $fio_a
  wait $fio_b
  # fio is done (the pre hook stands for quiescing an application): an app-consistent
  # cut, returning once both volumes recorded it.
  out=$("$BIN/shipper" group-cut $w/db.clock --ring $a/ring --ring $b/ring --app-consistent --pre true)
  cut=$(echo "$out" | sed -n 's/.*group cut \([0-9]*\) .*/\1/p')
  [ -n "$cut" ] || { echo "$out"; return 1; }
  SHIPPER_PID=$shipper_a finish $a 0
  finish $b 1
  out=$("$BIN/ublk-target" group-points --replica $a/replica --replica $b/replica)
  echo "$out" | tail -3
  # Rows are cuts, or runs of cuts with the same points ("7..=9"); fio's run gave several.
  [ "$(echo "$out" | awk 'NR > 1' | wc -l)" -ge 2 ]
  echo "$out" | awk -v cut="$cut" 'NR > 1 { n = split($1, r, /\.\.=/); if (cut + 0 >= r[1] + 0 && cut + 0 <= r[n] + 0) found = 1 }
                                   END { exit !found }'
  for v in a b; do
    # The app-consistent point holds the cut (alone, or with a scheduled one made just
    # after it: "group cuts 8..=9").
    "$BIN/ublk-target" points --replica $w/$v/replica | awk -v cut="$cut" '
      /crash, app, group cut/ && match($0, /cuts? [0-9]+(\.\.=[0-9]+)?/) {
        m = substr($0, RSTART, RLENGTH); sub(/^cuts? /, "", m); n = split(m, r, /\.\.=/)
        if (cut + 0 >= r[1] + 0 && cut + 0 <= r[n] + 0) found = 1
      }
      END { exit !found }'
    dev=$("$BIN/ublk-target" failover --test --replica $w/$v/replica --group-cut "$cut" --id 10 --log $w/view.log)
    cmp "$dev" $w/$v/backing
    "$BIN/ublk-target" failover --cleanup --id 10 >/dev/null
  done
  echo "group cut $cut: both volumes come up equal to their sources"

  # A recovery plan over both: a first, then b, with hooks that see the devices.
  cat >$w/target.toml <<EOF
key = "$a/key"
store = "$a/store"
[[volume]]
id = "a"
replica = "$a/replica"
failover_ring = "$w/a-failover.ring"
[[volume]]
id = "b"
replica = "$b/replica"
failover_ring = "$w/b-failover.ring"
[[plan]]
name = "db"
[[plan.step]]
volumes = ["a"]
post = 'test -e $w/go && echo "post \$UBLK_DR_STEP \$UBLK_DR_TEST \$UBLK_DR_DEVICES" >> $w/hooks'
[[plan.step]]
volumes = ["b"]
pre = 'test -b "\$UBLK_DR_DEVICE_A" && echo "pre \$UBLK_DR_STEP \$UBLK_DR_DEVICES" >> $w/hooks'
EOF
  "$BIN/ublk-target" plan show db --config $w/target.toml
  # Step 1's post hook fails until $w/go exists: the plan stops there with a up, and
  # --from-step 1 takes a's device as it is and goes on.
  out=$("$BIN/ublk-target" plan failover db --test --config $w/target.toml --log $w/view.log 2>&1) && return 1
  echo "$out" | grep "stopped at step 1: post hook" >/dev/null
  touch $w/go
  out=$("$BIN/ublk-target" plan failover db --test --from-step 1 --config $w/target.toml --log $w/view.log)
  echo "$out"
  echo "$out" | grep "step 1: a at point [0-9]* is up already" >/dev/null
  # The latest cut both volumes have came after fio: each view equals its source.
  echo "$out" | grep "at group cut" >/dev/null
  local dev_a dev_b
  dev_a=$(echo "$out" | sed -n 's/^step 1: a at point [0-9]* is up already as //p')
  dev_b=$(echo "$out" | sed -n 's/^step 2: b at point [0-9]* is //p')
  cmp "$dev_a" $a/backing
  cmp "$dev_b" $b/backing
  printf 'post 1 1 a=%s\npre 2 a=%s\n' "$dev_a" "$dev_a" | diff - $w/hooks
  "$BIN/ublk-target" plan cleanup db --config $w/target.toml
  [ ! -e "$dev_a" ] && [ ! -e "$dev_b" ]
  out=$("$BIN/ublk-target" plan cleanup db --config $w/target.toml 2>&1) && return 1
  echo "$out" | grep "has no test failover up" >/dev/null
  # The real thing, at the app-consistent cut: both rolled back and protected again.
  rm $w/hooks
  out=$("$BIN/ublk-target" plan failover db --point "cut:$cut" --config $w/target.toml)
  echo "$out"
  dev_a=$(echo "$out" | sed -n 's/^step 1: a at point [0-9]* is //p')
  dev_b=$(echo "$out" | sed -n 's/^step 2: b at point [0-9]* is //p')
  cmp "$dev_a" $a/backing
  cmp "$dev_b" $b/backing
  printf 'post 1 0 a=%s\npre 2 a=%s\n' "$dev_a" "$dev_a" | diff - $w/hooks
  "$BIN/blkfilter" list | grep "$w/a-failover.ring" >/dev/null
  "$BIN/ublk-target" plan commit db --config $w/target.toml
  [ -e $a/replica.committed ] && [ -e $b/replica.committed ]
  "$BIN/blkfilter" detach --id "${dev_a#/dev/ublkb}" >/dev/null
  "$BIN/blkfilter" detach --id "${dev_b#/dev/ublkb}" >/dev/null
  echo "plan db: test failover and failover at group cut $cut, in two steps with hooks"
}

tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(fio_randwrite_and_seqwrite ext4_files kill9_blkfilter_mid_fio reattach_takes_back_a_dead_servers_device
  kill9_shipper_under_load overflow_then_resync_converges initial_replication_of_used_ext4_under_fio
  full_backing_is_resynced points_and_test_failover failover_failback_round_trip bad_command_lines
  consistency_group_on_two_devices)
for t in "${tests[@]}"; do run_test "$t"; done
echo
echo "ublk: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
