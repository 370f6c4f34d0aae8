#!/usr/bin/env bash
# Sets up and runs every test: format and lint checks, unit, property and end-to-end
# tests on the host, and the loom model checks of the ring.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_rust
export CARGO_TERM_COLOR=never RUST_BACKTRACE=1

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "build binaries (the end-to-end tests run them)"
cargo build --workspace --bins --quiet

step "unit, property and end-to-end tests"
cargo test --workspace

step "loom: the ring's position protocol under every interleaving"
cargo test -p blkfilter --features loom --test loom --release
