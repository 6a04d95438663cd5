#!/usr/bin/env bash
# Builds a plain (uncompressed, newc) cpio initramfs for a husk guest:
# busybox-static at /bin/busybox with a symlink per applet in /bin, the usual
# mount points (/dev /proc /sys /tmp /run /etc /root), INIT as /init (0755),
# and any extra SRC:DEST files (DEST absolute; a DEST ending in / is a
# directory to copy SRC into; a dynamically linked SRC brings the host's
# loader and the libraries ldd names). Uncompressed, so the guest kernel skips
# inflating it. Nothing is cached: it takes a fraction of a second. The
# archive is reproducible: sorted names, owner root, mtime 0, renumbered
# inodes, so the same inputs give the same bytes.
#
#   build-initramfs.sh OUT.cpio INIT [SRC:DEST ...]
#
# Prints OUT.cpio on stdout; messages go to stderr.
set -euo pipefail

log() { echo "guest-initramfs: $*" >&2; }
(($# >= 2)) || { echo "usage: $0 OUT.cpio INIT [SRC:DEST ...]" >&2; exit 2; }
out=$1 init=$2
shift 2
[[ -f $init ]] || { log "no such init script: $init"; exit 2; }

# shellcheck source=resources/lib.sh
source "$(dirname "$0")/../lib.sh"
ensure_packages busybox-static cpio

root=$(mktemp -d "${TMPDIR:-/tmp}/husk-initramfs.XXXXXX")
trap 'rm -rf "$root" "$out.tmp.$$"' EXIT
chmod 0755 "$root" # the guest's /
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,root}
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
cp /bin/busybox "$root/bin/busybox"
# One symlink per applet, made by one process (perl is Essential in Debian)
# rather than ~400 forks of ln.
/bin/busybox --list | perl -e '
  my $d = shift;
  while (<STDIN>) { chomp; next if $_ eq "busybox"; symlink("busybox", "$d/$_") or die "$_: $!\n" }
' "$root/bin"
install -m 0755 "$init" "$root/init"
for spec in "$@"; do
  [[ $spec == *:* ]] || { log "not SRC:DEST: $spec"; exit 2; }
  src=${spec%%:*} dest=${spec#*:}
  [[ -e $src ]] || { log "no such file: $src"; exit 2; }
  [[ $dest == /* ]] || dest=/$dest
  [[ $dest == */ ]] && dest=$dest$(basename "$src")
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
  # A dynamically linked program brings the host's loader and libraries.
  if head -c4 "$src" | grep -q ELF; then
    { ldd "$src" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
      [[ -e $lib && ! -e $root$lib ]] || continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  fi
done
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
  cpio -o -0 -H newc -R 0:0 --reproducible --quiet) > "$out.tmp.$$"
mv "$out.tmp.$$" "$out"
echo "$out"
