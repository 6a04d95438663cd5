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
trap 'rm -f "$results"' EXIT
cargo test --locked -j"$jobs" --workspace -- --test-threads="${HUSK_TEST_THREADS:-2}" 2>&1 | tee "$results"
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

# One closing line for the whole suite: every cargo test binary's counts.
awk '/^test result:/ {
  for (i = 2; i <= NF; i++) {
    if ($i ~ /^passed;?$/) p += $(i - 1)
    if ($i ~ /^failed;?$/) f += $(i - 1)
  }
} END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
