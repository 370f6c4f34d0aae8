#!/usr/bin/env bash
# Issue #4: a power cut under load, on real ublk. Boots the VM twice over one shared
# host directory (the "disk": backing, activity log, staging, store survive; the ring
# in guest shared memory does not):
#   1. protect a volume, ship, write with fio into a quarter of it; the host kills qemu
#      (kill -9) in the middle of the writes;
#   2. attach again over the same backing: only the activity log's extents are
#      resynced (the count is printed against the disk's extents), the shipper resumes
#      from its staging, and after draining the replica equals the backing.
# Runs on the host (needs scripts/vm.sh); prints "power-cut: ok" at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The guest sees the host's root read-only except for one shared directory, and not
# /tmp or /run at all: from a checkout under those (a CI clone in /tmp, say) the
# checkout itself is shared, with the "disk" inside it.
case "$PWD" in
  /tmp/* | /run/*) d=${UBLK_DR_POWERCUT_DIR:-$PWD/target/ublk-dr-powercut} share=$PWD ;;
  *) d=${UBLK_DR_POWERCUT_DIR:-/var/tmp/ublk-dr-powercut} share=$d ;;
esac
rm -rf "$d"
mkdir -p "$d"
VM=(scripts/vm.sh run --mem 4096 --timeout 900 --share "$share" --)
export UBLK_DR_FORCE_VM=1

echo "--- boot 1: protect, ship, write; power cut in the middle"
"${VM[@]}" tests/vm/power-cut-guest.sh write "$d" >"$d/boot1.log" 2>&1 &
vm=$!
for _ in $(seq 600); do [ -e "$d/writing" ] && break; sleep 0.5; done
[ -e "$d/writing" ] || { cat "$d/boot1.log"; echo "boot 1 never started writing" >&2; exit 1; }
sleep 4
pkill -9 -f 'qemu-system' || true
wait "$vm" 2>/dev/null || true
echo "qemu killed while fio was writing"
tail -3 "$d/boot1.log"

echo "--- boot 2: the same backing again"
"${VM[@]}" tests/vm/power-cut-guest.sh resume "$d"
rm -rf "$d"
echo "power-cut: ok"
