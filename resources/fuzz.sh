#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time, starting from the seed
# corpus in the repo (<crate>/fuzz/corpus/<target>, copied: the run's finds
# stay out of the tree). Targets live in src/vmm/fuzz (virtio devices and
# transport), src/protocol/fuzz (the agent protocol decoder) and
# src/husk/fuzz (the API's HTTP parser and router). A crash
# fails the run and leaves its input under <crate>/fuzz/artifacts/.
# Installs cargo-fuzz from crates.io if missing; builds with the machine's
# nightly toolchain (sanitizers need it).
#
#   resources/fuzz.sh [SECONDS_PER_TARGET]     (default 30)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"
seconds=${1:-30}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  log "no nightly toolchain: fuzzing needs one (rustup run nightly)"
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked -j"$(nproc)" >&2
fi

export CARGO_BUILD_JOBS
CARGO_BUILD_JOBS=$(nproc)
for crate in src/vmm src/protocol src/husk; do
  cd "$repo/$crate"
  rustup run nightly cargo fuzz build -O >&2
  # -timeout: an input that runs 20 s is a hang (a device loop spinning on a
  # broken ring was one), reported with its input, not after libFuzzer's
  # default 20 minutes.
  for target in $(rustup run nightly cargo fuzz list); do
    work=$(mktemp -d "${TMPDIR:-/tmp}/husk-fuzz-$target.XXXXXX")
    cp -r "fuzz/corpus/$target/." "$work/" 2>/dev/null || true
    log "fuzzing $target for $seconds s"
    if ! rustup run nightly cargo fuzz run -O "$target" "$work" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        2> "$work.log"; then
      tail -n 60 "$work.log" >&2
      log "fuzz target $target failed; the crashing input is in $crate/fuzz/artifacts/$target/"
      rm -rf "$work" "$work.log"
      exit 1
    fi
    grep -E '^stat::number_of_executed_units' "$work.log" | sed "s/^/$target: /" >&2 || true
    rm -rf "$work" "$work.log"
  done
done
log "fuzzing passed"
