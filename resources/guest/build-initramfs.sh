#!/usr/bin/env bash
# Builds a plain (uncompressed, newc) cpio initramfs for a husk guest:
# busybox-static with its applets in /bin, the usual mount points, INIT as
# /init, and any extra SRC:DEST files. Uncompressed, so the guest kernel
# skips inflating it.
#
#   build-initramfs.sh OUT.cpio INIT [SRC:DEST ...]
set -euo pipefail

(($# >= 2)) || { echo "usage: $0 OUT.cpio INIT [SRC:DEST ...]" >&2; exit 2; }
out=$1 init=$2
shift 2
missing=()
for p in busybox-static cpio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/husk-initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,root}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$init" "$root/init"
for spec in "$@"; do
  src=${spec%%:*} dest=${spec#*:}
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
done
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
