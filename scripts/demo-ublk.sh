#!/usr/bin/env bash
# The main job on a kernel with ublk (natively, or inside scripts/vm.sh; scripts/demo.sh
# picks): protect a volume with blkfilter, write to it with fio and as ext4, replicate
# with the shipper, apply on the recovery side, verify the replica.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/vm/lib.sh
w=${1:-/tmp/ublk-dr-demo}
rm -rf "$w"

log "protecting a 256 MiB volume: /dev/ublkb0 in front of $w/backing, capture ring $w/ring"
protect "$w" 256M 0
"$BIN/blkfilter" list

log "fio: 4k random writes (QD32) and 1M sequential writes, verified with crc32c"
fio_job demo-rand "$DEV" --rw=randwrite --bs=4k --iodepth=32 --size=96M --offset=0
fio_job demo-seq "$DEV" --rw=write --bs=1M --iodepth=8 --size=96M --offset=128M
echo "fio: both jobs wrote and verified their data"

log "shipper status while replicating"
sleep 1
"$BIN/shipper" status --status "$w/status.json"

log "detach, drain the ring, apply every segment on the recovery side"
finish "$w" 0
echo "segments in the store: $(ls "$w/store/vol0" | wc -l)"

log "verify"
same_image "$w"
echo "OK: the replica equals the protected volume"
