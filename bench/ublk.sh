#!/usr/bin/env bash
# ublk benchmark: builds the project and the reference target rublk (from crates.io,
# installed under .cache/, not a project dependency), runs bench/ublk-guest.sh in one
# VM boot (or natively where the kernel has ublk), and appends the table to
# bench/RESULTS.md with date, machine and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust
ensure_debs libclang-dev fio dmsetup
cargo build --release --bins --quiet
rublk=$PWD/.cache/rublk/bin/rublk
if [ ! -x "$rublk" ]; then
  step "installing rublk (reference ublk loop target) into .cache/rublk"
  cargo install rublk --no-default-features --locked --root "$PWD/.cache/rublk" --quiet
fi
out=$(mktemp)
scripts/vm.sh run --mem 8192 --env BENCH_ROUNDS --env BENCH_RUNTIME -- bench/ublk-guest.sh "$rublk" | tee "$out"
{
  echo
  echo "## ublk: fio on loop, blkfilter, dm-log-writes, rublk"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB; $( [ -e /dev/ublk-control ] && echo "native kernel $(uname -r)" || echo "VM: $(qemu-system-x86_64 --version | sed -nE '1s/^QEMU emulator version ([^ ]+).*/qemu \1/p') TCG -cpu ${UBLK_DR_VM_CPU:-max,-erms,-fsrm}, 2 vCPUs, 8 GiB, Debian 6.12 kernel" ); backing on tmpfs"
  echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '-dirty')"
  echo
  grep -E '^\||^Best of|^Sustained' "$out"
} >> bench/RESULTS.md
rm -f "$out"
