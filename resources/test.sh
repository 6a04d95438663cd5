#!/usr/bin/env bash
# Sets up everything and runs the whole test suite: formatting, clippy, unit
# tests, the integration tests that boot real guests (inside the node VM on
# hosts without hardware KVM), and a bounded fuzzing run of every fuzz target. Run as root on a fresh Debian 12 machine;
# slow build products are cached under /var/cache/husk.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"
cd "$repo"

husk_install_packages
husk_build_images "$repo"
husk_virtiofsd
# The Debian package test (tests/deb.rs): cargo-deb and a pristine Debian 12.
husk_cargo_deb
husk_debian_chroot
jobs=$(nproc)

log "cargo fmt --check"
cargo fmt --all -- --check
log "shellcheck"
husk_shellcheck "$repo"
log "cargo clippy"
cargo clippy --locked -j"$jobs" --workspace --all-targets -- -D warnings
log "building"
cargo build --locked -j"$jobs" --workspace --bins
log "tests"
results=$(mktemp)
# run.sh appends every failure of the node VM here (a soft lockup, a panic
# or a silent stop of its kernel, and whether it booted the node again);
# the closing line counts them, so a rising count is seen even in a pass.
HUSK_NODE_RETRIES=$(mktemp)
export HUSK_NODE_RETRIES
# The closing lines end the output whatever fails from here on.
trap 'husk_test_summary "$results" "$HUSK_NODE_RETRIES"; rm -f "$results" "$HUSK_NODE_RETRIES"' EXIT
# Tests that need what a plain user lacks (root) are #[ignore]d with the
# reason; as root this runs them too. Every test binary runs, even after
# a failure, so the counts are the whole suite's.
include_ignored=()
if ((EUID == 0)); then
  include_ignored=(--include-ignored)
else
  log "not root: the tests that need root stay ignored (the closing line counts them)"
fi
test_status=0
cargo test --locked -j"$jobs" --workspace --no-fail-fast -- \
  --test-threads="${HUSK_TEST_THREADS:-2}" "${include_ignored[@]}" 2>&1 | tee "$results" || test_status=$?
# The REST API fuzzed from its OpenAPI document (schemathesis); no 5xx, no
# crash. HUSK_API_FUZZ_SECONDS=0 skips it.
if [[ ${HUSK_API_FUZZ_SECONDS:-120} != 0 ]]; then
  "$repo/resources/api-fuzz.sh" "$repo/target/debug/husk"
fi
# What a guest controls (virtio queues, virtio-mmio registers), fuzzed for a
# bounded time; HUSK_FUZZ_SECONDS=0 skips it.
if [[ ${HUSK_FUZZ_SECONDS:-30} != 0 ]]; then
  "$repo/resources/fuzz.sh" "${HUSK_FUZZ_SECONDS:-30}"
fi
exit "$test_status"
