#!/usr/bin/env bash
# The apply bench on XFS with reflink, on a loop device over tmpfs (so the disk is not
# what is measured): the undo journal shares the replica's blocks there, and the
# Applier with copied before-images runs beside it on the same filesystem. Appends to
# bench/RESULTS.md like bench/run.sh. Needs root (loop mount).
# Usage: bench/apply-reflink.sh [MiB of 64 KiB writes, default 512]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
[ "$(id -u)" -eq 0 ] || die "needs root to loop-mount an XFS image"
command -v mkfs.xfs >/dev/null 2>&1 || ensure_debs xfsprogs
mib=${1:-512}
img=/dev/shm/ublk-dr-apply-bench.xfs
mnt=/run/ublk-dr/apply-bench
cleanup() {
  umount "$mnt" 2>/dev/null || true
  rm -f "$img"
}
trap cleanup EXIT
mkdir -p "$mnt"
rm -f "$img"
# Allocated up front: first touches of tmpfs memory are slow here and would land on
# whichever run happened to reach new blocks first.
fallocate -l 6G "$img"
mkfs.xfs -q -m reflink=1 "$img"
mount -o loop "$img" "$mnt"
bench/run.sh apply "$mib" "$mnt"
