#!/usr/bin/env bash
# Builds the guest initramfs husk boots pods with: husk-agent, a static
# binary, as /init, and nothing else but the directories it mounts on (no
# shell, no libraries: containers bring their own root filesystems). Plain
# newc cpio, uncompressed (the kernel skips inflating it) and reproducible.
#
#   resources/agent/build.sh OUT.cpio       prints OUT.cpio
#
# The agent is built with cargo (release, static glibc, symbols stripped);
# cargo's own cache makes a second run take a second.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"
(($# == 1)) || { echo "usage: $0 OUT.cpio" >&2; exit 2; }
out=$1
ensure_packages cpio file

target=x86_64-unknown-linux-gnu
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build --release --locked -j"$(nproc)" -p husk-agent --target "$target" >&2)
agent=${CARGO_TARGET_DIR:-$repo/target}/$target/release/husk-agent
if ! file "$agent" | grep -q 'static'; then
  log "husk-agent is not statically linked: $(file "$agent")"
  exit 1
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/husk-agent-initramfs.XXXXXX")
trap 'rm -rf "$root" "$out.tmp.$$"' EXIT
chmod 0755 "$root"
mkdir -p "$root"/{dev,proc,sys,run,tmp,etc,mnt}
chmod 1777 "$root/tmp"
install -m 0755 "$agent" "$root/init"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
  cpio -o -0 -H newc -R 0:0 --reproducible --quiet) > "$out.tmp.$$"
mv "$out.tmp.$$" "$out"
echo "$out"
