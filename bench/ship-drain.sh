#!/usr/bin/env bash
# Shipper drain profile: builds the project, runs bench/ship-drain-guest.sh in one VM
# boot (or natively where the kernel has ublk), and appends its output to
# bench/RESULTS.md with date, machine and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust
ensure_debs libclang-dev fio
cargo build --release --bins --quiet
out=$(mktemp)
scripts/vm.sh run --mem 8192 --env BENCH_ROUNDS --env BENCH_RUNTIME -- bench/ship-drain-guest.sh | tee "$out"
{
  echo
  echo "## ship-drain: the shipper emptying a ring that fio filled"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB; $( [ -e /dev/ublk-control ] && echo "native kernel $(uname -r)" || echo "VM: $(qemu-system-x86_64 --version | sed -nE '1s/^QEMU emulator version ([^ ]+).*/qemu \1/p') TCG -cpu ${UBLK_DR_VM_CPU:-max,-erms,-fsrm}, 2 vCPUs, 8 GiB, Debian 6.12 kernel" ); ring, staging and store on tmpfs"
  echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '-dirty')"
  echo
  grep -E '^\||^round' "$out"
} >> bench/RESULTS.md
rm -f "$out"
