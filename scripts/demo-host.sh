#!/usr/bin/env bash
# The main job without ublk: drives the capture path on the host (`blkfilter exercise`,
# the same recording code the ublk server runs), ships, applies and verifies.
# Called by `scripts/demo.sh --host` after the build. Usage: scripts/demo-host.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

bin=target/release

work=${1:-$(mktemp -d /var/tmp/ublk-dr-demo.XXXXXX)}
mkdir -p "$work"
shipper_pid=
cleanup() { [ -n "$shipper_pid" ] && kill "$shipper_pid" 2>/dev/null || true; }
trap cleanup EXIT

step "protecting a 256 MiB volume in $work"
rm -rf "$work"/{store,staging,replica*,key,backing} "$work"/vol0.ring
truncate -s 256M "$work/backing"
$bin/shipper keygen --out "$work/key"
# The ring is created by the producer; start it empty so the shipper can attach.
$bin/blkfilter exercise --backing "$work/backing" --ring "$work/vol0.ring" --ops 0 >/dev/null

step "shipper running as a service; writing 3000 requests through the capture path"
RUST_LOG=warn $bin/shipper run --volume vol0 --ring "$work/vol0.ring" --staging "$work/staging" \
  --store "$work/store" --key "$work/key" --status "$work/status.json" --no-initial-sync &
shipper_pid=$!
$bin/blkfilter exercise --backing "$work/backing" --ring "$work/vol0.ring" --ops 3000 --seed 42
sleep 1.5
$bin/shipper status --status "$work/status.json"

step "stopping the shipper (SIGTERM) and draining what is left"
kill -TERM "$shipper_pid"; wait "$shipper_pid"; shipper_pid=
RUST_LOG=warn $bin/shipper run --volume vol0 --ring "$work/vol0.ring" --staging "$work/staging" \
  --store "$work/store" --key "$work/key" --drain

step "recovery side: verify and apply every segment to the replica"
echo "segments in store: $(ls "$work/store/vol0" | wc -l)"
$bin/ublk-target inspect "$work/store/vol0/0000000000000000.seg" --key "$work/key" | head -14
truncate -s 256M "$work/replica"
$bin/ublk-target apply --store "$work/store" --volume vol0 --replica "$work/replica" --key "$work/key"
echo "segments left in store after apply (applied ones are deleted): $(ls "$work/store/vol0" | wc -l)"
$bin/ublk-target points --replica "$work/replica" | tail -3

step "verify"
src=$(sha256sum < "$work/backing" | cut -d' ' -f1)
dst=$(sha256sum < "$work/replica" | cut -d' ' -f1)
echo "source  sha256 $src"
echo "replica sha256 $dst"
[ "$src" = "$dst" ] || die "replica differs from the source"
echo "OK: the replica equals the protected volume"
