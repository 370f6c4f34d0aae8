#!/usr/bin/env bash
# The main job on a kernel with ublk (natively, or inside scripts/vm.sh; scripts/demo.sh
# picks): protect a volume that already holds ext4 and files, write to it with fio
# while the initial replication runs, take an app-consistent recovery point and test a
# failover to it, fail over for real (planned: nothing lost), use the recovered volume,
# fail back with only the changed blocks, resume protection, and verify every step.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/vm/lib.sh
w=${1:-/tmp/ublk-dr-demo}
rm -rf "$w"
mkdir -p "$w/mnt"

log "a 256 MiB volume that already holds data: ext4 with files, in $w/backing"
truncate -s 256M "$w/backing"
mkfs.ext4 -q -F "$w/backing"
mount -o loop "$w/backing" "$w/mnt"
cp -r /usr/share/doc/fio "$w/mnt/doc" 2>/dev/null || cp -r /etc/default "$w/mnt/doc"
umount "$w/mnt"
"$BIN/shipper" keygen --out "$w/key"

log "protect it: /dev/ublkb0 with capture, the shipper, the recovery side following"
start_follower "$w"
SYNC_OPT= protect "$w" 256M 0
"$BIN/blkfilter" list
mount "$DEV" "$w/mnt"

log "fio writes into the file system while the initial replication copies the volume"
fio --name=demo --directory="$w/mnt" --size=32M --rw=randwrite --bs=4k --iodepth=16 \
  --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --output-format=terse >/tmp/fio-demo.out
echo "fio: wrote and verified 32 MiB of 4k random writes"
"$BIN/shipper" status --status "$w/status.json" | sed -n '1,4p'
echo "initial replication (shipper resync --watch shows its progress bar on a terminal):"
timeout 300 "$BIN/shipper" resync --ring "$w/ring" --watch

log "an app-consistent recovery point (ext4 frozen around the MARK)"
echo "state at the point" >"$w/mnt/marker.txt"
seq=$(mark_frozen "$w" "$w/mnt" "$w/source-at-point.img")
point=$(point_of_seq "$w" "$seq")
echo "appended something after the point" >>"$w/mnt/marker.txt"
sync
"$BIN/ublk-target" points --replica "$w/replica" | tail -4

log "test failover to point $point while replication goes on"
view=$("$BIN/ublk-target" failover --test --replica "$w/replica" --point "$point" --id 5 --log "$w/view.log")
cmp "$view" "$w/source-at-point.img"
e2fsck -fn "$view" >/dev/null
echo "$view equals the source as it was at point $point, and its ext4 is clean"
"$BIN/ublk-target" failover --cleanup --id 5

log "planned failover: quiesce the source, drain, apply, bring the replica up"
umount "$w/mnt"
src=$(sha256sum <"$w/backing" | cut -d' ' -f1)
finish "$w" 0
planned_failover "$w" 1
[ "$(sha256sum <"$DEV" | cut -d' ' -f1)" = "$src" ] || die "the failed-over volume differs from the source"
echo "$DEV equals the source as it was quiesced: no acknowledged write lost"
"$BIN/ublk-target" commit --replica "$w/replica"

log "the recovered volume is in use at the recovery site"
mount "$DEV" "$w/mnt"
head -c 8M /dev/urandom >"$w/mnt/written-after-failover"
umount "$w/mnt"

log "failback, minimize downtime: only blocks that differ go back while it runs"
start_failback "$w"
wait_digest_resync "$w/back"
echo "failback digest resync: $(grep -h "digest resync .*: done" /run/ublk-dr/blkfilter.log | tail -1 | sed 's/.*done; //')"
echo "failback shipped $(sed -n 's/.*"bytes_sealed": \([0-9]*\).*/\1/p' "$w/back/status.json") bytes in segments (writes since the failover plus resync), disk 268435456 bytes"
src=$(sha256sum <"$DEV" | cut -d' ' -f1)
finish_failback "$w" 1
[ "$(sha256sum <"$w/backing" | cut -d' ' -f1)" = "$src" ] || die "the original disk differs from the recovered volume"
echo "the original disk equals the recovered volume"

log "protection resumes in the original direction"
reprotect "$w" 0
wait_digest_resync "$w/again"
echo "reprotect: $(grep -h "digest resync .*: done" "$w/again/blkfilter.log" | tail -1 | sed 's/.*done; //')"
finish "$w/again" 0
same_image "$w/again"
e2fsck -fn "$w/again/replica" >/dev/null
echo "OK: protect, fio, replicate, test failover, failover, failback and reprotect all verified"
