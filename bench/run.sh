#!/usr/bin/env bash
# Runs a benchmark and appends its table to bench/RESULTS.md with date, machine and
# commit. Usage: bench/run.sh seal-pipeline [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_rust
name=${1:?usage: bench/run.sh BENCH [ARGS...]}; shift
# The digest-resync bench compares against rsync.
[ "$name" != digest-resync ] || command -v rsync >/dev/null || ensure_debs rsync
cargo build --release -p bench --bin "$name" --quiet
out=$(target/release/"$name" "$@")
echo "$out"
{
  echo
  echo "## $name $*"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
  echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '-dirty')"
  echo
  echo "$out"
} >> bench/RESULTS.md
