#!/usr/bin/env bash
# Builds the husk guest kernel (uncompressed vmlinux and a bzImage) from
# Debian's linux-source-6.1 and microvm.config, installing what it needs.
#
# The result is cached outside the repo, keyed by the source version and the
# contents of this directory, so a second run is instant:
#   ${HUSK_CACHE_DIR:-/var/cache/husk}/kernel/<key>/{vmlinux,bzImage,config}
# On success the last line on stdout is that directory.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${HUSK_CACHE_DIR:-/var/cache/husk}
jobs=${HUSK_JOBS:-$(nproc)}
log() { echo "guest-kernel: $*" >&2; }

need_pkgs=()
for p in linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q "${need_pkgs[@]}" >&2
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$src_version"; cat "$here/microvm.config" "$here/build.sh"; } | sha256sum | cut -c1-16)
out="$cache_root/kernel/$key"
if [[ -f $out/vmlinux && -f $out/bzImage ]]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/husk-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "unpacking linux-source $src_version"
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
cd "$work"/linux-source-6.1

start=$(date +%s)
make -s tinyconfig >&2
./scripts/kconfig/merge_config.sh -m .config "$here/microvm.config" >&2
make -s olddefconfig >&2

# merge_config.sh -m only warns; fail here if an option we asked for was
# dropped (missing dependency or renamed symbol), so the guest never silently
# lacks a feature.
missing=0
while IFS= read -r line; do
  [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]] || continue
  sym=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
  if [[ $want == n ]]; then
    grep -q "^$sym=" .config && { log "option $sym should be off but is on"; missing=1; }
  else
    grep -qx "$sym=$want" .config || { log "option $sym=$want did not survive olddefconfig"; missing=1; }
  fi
done < "$here/microvm.config"
((missing == 0)) || { log "config check failed"; exit 1; }

log "building vmlinux and bzImage with -j$jobs"
make -s -j"$jobs" vmlinux bzImage >&2
log "built in $(( $(date +%s) - start )) s"

mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
