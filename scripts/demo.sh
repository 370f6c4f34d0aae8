#!/usr/bin/env bash
# The main job, end to end, on the embedded default store (a local directory): protect
# a volume through ublk, write to it with fio, replicate, verify the replica equals the
# source. Runs natively where the kernel has ublk, otherwise inside a VM
# (scripts/vm.sh, which installs qemu and a Debian kernel with ublk_drv the first time).
# Usage: scripts/demo.sh [--host]   (--host: the capture path on the host, no ublk)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_rust
ensure_debs fio
step "building (release)"
cargo build --release --bins --quiet

if [ "${1:-}" = "--host" ]; then
  exec scripts/demo-host.sh
fi
step "running the main job on real ublk"
scripts/vm.sh run -- scripts/demo-ublk.sh
