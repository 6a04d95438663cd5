#!/usr/bin/env bash
# Builds husk's Debian package with cargo deb and prints its path (the last
# line on stdout; all else goes to stderr):
#
#   resources/deb.sh [--profile release|dev] [--out DIR] [--deb-revision N] [--fast]
#
# cargo deb packages what `[package.metadata.deb]` in src/husk/Cargo.toml
# lists; this script first makes what cargo deb cannot build itself and
# stages it all in target/husk-deb/release/, where those `target/release/`
# asset paths point (cargo deb runs with CARGO_TARGET_DIR=target/husk-deb
# and --no-build; the staged files are the chosen profile's builds, cargo
# deb only packs them):
#   husk                     statically linked (the shim's jail has no
#                            libraries), built for the explicit target so
#                            the flag stays off the build's proc-macros
#   husk-jailer, containerd-shim-husk-v2
#   vmlinux                  guest-kernel-config/build.sh (cached)
#   husk-agent.cpio          resources/agent/build.sh (always release)
#
# --profile release (the default) is what an operator installs: the
# workspace's release profile (fat LTO, one codegen unit) is slow on two
# cores (7 min 15 s from a cold target directory with the kernel cached,
# measured on the project's machines). cargo deb alone would build only
# that profile (it calls a dev one deprecated, hence --no-build here).
# --profile dev packs the debug builds the test suite has already made
# (the same static husk as tests/support's static_husk), for tests/deb.rs.
# --fast compresses faster (and larger). The package is
# husk_<version>-<revision>_amd64.deb in --out (default target/debian).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

usage() { echo "usage: $0 [--profile release|dev] [--out DIR] [--deb-revision N] [--fast]" >&2; exit 2; }
profile=release out=$repo/target/debian revision=1 fast=()
while (($#)); do
  case $1 in
    --profile|--out|--deb-revision) (($# >= 2)) || usage ;;&
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --deb-revision) revision=$2; shift 2 ;;
    --fast) fast=(--fast); shift ;;
    *) usage ;;
  esac
done
case $profile in
  release) dir=release ;;
  dev) dir=debug ;;
  *) usage ;;
esac
[[ $revision =~ ^[0-9]+$ ]] || usage

husk_cargo_deb
ensure_packages file
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$repo/target}
jobs=$(nproc)
cd "$repo"
start=$SECONDS
log "building husk (static), husk-jailer and containerd-shim-husk-v2 ($profile)"
if [[ $profile == dev ]]; then
  # Exactly the tests' static husk build (tests/support, static_husk) and
  # resources/test.sh's build of the workspace's binaries: nothing new to
  # build in the suite.
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_DEV_DEBUG=0 \
    cargo build --quiet -p husk --bin husk --target "$target" >&2
  cargo build --locked -j"$jobs" --workspace --bins >&2
else
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked -j"$jobs" --release -p husk --bin husk --target "$target" >&2
  cargo build --locked -j"$jobs" --release -p husk-jailer -p containerd-shim-husk-v2 >&2
fi
if ! file "$target_dir/$target/$dir/husk" | grep -q 'static'; then
  log "husk is not statically linked: $(file "$target_dir/$target/$dir/husk")"
  exit 1
fi
kernel_dir=$("$repo/guest-kernel-config/build.sh")

stage=$target_dir/husk-deb/release
rm -rf "$stage"
mkdir -p "$stage"
cp "$target_dir/$target/$dir/husk" "$target_dir/$dir/husk-jailer" "$target_dir/$dir/containerd-shim-husk-v2" \
  "$kernel_dir/vmlinux" "$stage/"
"$repo/resources/agent/build.sh" "$stage/husk-agent.cpio" >/dev/null
log "built and staged in $((SECONDS - start)) s"

mkdir -p "$out"
packaged=$SECONDS
deb=$(CARGO_TARGET_DIR=$target_dir/husk-deb "$HUSK_CARGO_DEB" deb --no-build --locked -p husk \
  --strip "${fast[@]}" --deb-revision "$revision" --output "$out" | tail -n1)
[[ -f $deb ]] || { log "cargo deb made no package"; exit 1; }
log "packaged in $((SECONDS - packaged)) s: $deb"
echo "$deb"
