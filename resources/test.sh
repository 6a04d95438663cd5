#!/usr/bin/env bash
# Sets up everything and runs the whole test suite: formatting, clippy, unit
# tests, and the integration tests that boot real guests (inside the node VM
# on hosts without hardware KVM). Run as root on a fresh Debian 12 machine;
# slow build products are cached under /var/cache/husk.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"
cd "$repo"

husk_install_packages
husk_build_images "$repo"
jobs=$(nproc)

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --locked -j"$jobs" --workspace --all-targets -- -D warnings
log "building"
cargo build --locked -j"$jobs" --workspace --bins
log "tests"
cargo test --locked -j"$jobs" --workspace -- --test-threads="${HUSK_TEST_THREADS:-2}"
