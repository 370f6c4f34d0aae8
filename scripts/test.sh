#!/usr/bin/env bash
# Sets up and runs every test: format and lint checks; unit, property and end-to-end
# tests on the host (the object-storage ones against azurite and moto, the recovery
# points a second time on XFS with reflink); the loom model checks
# of the ring; a fuzz run of the segment reader; and the end-to-end tests on real ublk
# devices (natively where the kernel has ublk, otherwise in a VM booted by
# scripts/vm.sh). Installs what is missing.
# Set UBLK_DR_SKIP_VM=1 to leave out the ublk tests (e.g. while iterating).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_rust
# fio and e2fsprogs drive the ublk tests; openssl makes the TLS tests' certificates;
# systemd-analyze checks the systemd units, which run modprobe (kmod): it wants every
# command they name to exist.
ensure_debs fio e2fsprogs openssl systemd kmod
# The object-storage tests run against real emulators: azurite (Azure Blob) and moto (S3).
ensure_azurite
ensure_moto
export CARGO_TERM_COLOR=never RUST_BACKTRACE=1

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "build binaries (the end-to-end tests run them)"
cargo build --workspace --bins --quiet

step "unit, property and end-to-end tests"
cargo test --workspace

step "recovery points again on XFS, where undo journals share the replica's blocks (reflink)"
ensure_reflink_dir
TMPDIR=$UBLK_DR_REFLINK_DIR cargo test -p e2e --test points

step "loom: the ring's position protocol under every interleaving"
cargo test -p blkfilter --features loom --test loom --release

step "fuzz: the segment reader on arbitrary input (60 s)"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
(cd changelog/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run open_segment -- -max_total_time=60 2>&1 | tail -n 3)

if [ "${UBLK_DR_SKIP_VM:-0}" != 1 ]; then
  step "ublk end-to-end tests (fio, ext4, kill -9, initial sync, points, failover, failback, bad command lines)"
  cargo build --release --bins --quiet
  scripts/vm.sh run --mem 6144 -- tests/vm/ublk.sh
  step "power cut under load: qemu killed, rebooted over the same disk"
  tests/vm/power-cut.sh
fi
