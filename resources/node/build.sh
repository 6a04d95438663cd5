#!/usr/bin/env bash
# Builds the node VM image: Debian's cloud kernel plus a small initramfs with
# busybox, the kvm/kvm-amd modules (and a few others later tests need), the
# host's glibc loader and base libraries, and resources/node/init as /init.
#
# Inside that VM (QEMU TCG, -cpu max, emulated AMD SVM) /dev/kvm is a real
# KVM, which is what husk's guests need on hosts whose own /dev/kvm cannot run
# a Linux guest (see ENVIRONMENT.md in the project's shared notes).
#
# Cached outside the repo, keyed by the kernel package, busybox and this
# directory's scripts:
#   ${HUSK_CACHE_DIR:-/var/cache/husk}/node/<key>/{vmlinuz,node.cpio}
# The last line on stdout is that directory; all else goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${HUSK_CACHE_DIR:-/var/cache/husk}
log() { echo "node-image: $*" >&2; }

ensure_pkgs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}
ensure_pkgs qemu-system-x86 busybox-static cpio kmod

# The cloud kernel metapackage names the versioned image package it pulls in.
kernel_pkg() {
  apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1
}
read -r pkg pkg_version <<< "$(kernel_pkg)" || true
if [[ -z ${pkg:-} ]]; then
  apt-get update -q >&2
  read -r pkg pkg_version <<< "$(kernel_pkg)" || true
fi
[[ -n ${pkg:-} ]] || { log "cannot find Debian's cloud kernel package"; exit 1; }
bb_version=$(dpkg-query -W -f='${Version}' busybox-static)

key=$( { echo "$pkg $pkg_version $bb_version"; cat "$here/build.sh" "$here/init"; } | sha256sum | cut -c1-16)
out="$cache_root/node/$key"
if [[ -f $out/vmlinuz && -f $out/node.cpio ]]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/husk-node.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building from $pkg $pkg_version"
(cd "$work" && apt-get download "$pkg" >&2)
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/k"
kver=${pkg#linux-image-}
moddir="$work/k/lib/modules/$kver"
[[ -d $moddir ]] || { log "no modules for $kver in $pkg"; exit 1; }
# The package leaves modules.dep to depmod at install time.
depmod -b "$work/k" "$kver"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,payload,lib/modules,lib64,lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
done

# Modules, dependencies first, in load order. Required ones must exist;
# optional ones (for networking and container tests) are skipped if absent.
declare -A added=()
add_module() {
  local name=$1 line path deps
  [[ -n ${added[$name]:-} ]] && return 0
  line=$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1) || return 1
  path=${line%%:*}
  deps=${line#*:}
  for dep in $deps; do
    dep=$(basename "$dep"); dep=${dep%%.ko*}
    add_module "$dep" || return 1
  done
  case $path in
    *.ko) cp "$moddir/$path" "$root/lib/modules/$name.ko" ;;
    *.ko.xz) xz -dc "$moddir/$path" > "$root/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$moddir/$path" > "$root/lib/modules/$name.ko" ;;
    *) log "unknown module format: $path"; return 1 ;;
  esac
  added[$name]=1
  echo "$name" >> "$root/lib/modules/order"
}
for m in irqbypass kvm kvm-amd; do
  add_module "$m" || { log "required module $m missing"; exit 1; }
done
for m in tun overlay veth bridge sch_ingress act_mirred cls_matchall; do
  add_module "$m" || log "optional module $m not available"
done

# The host's dynamic loader and base libraries, so dynamically linked host
# binaries in a payload run here (run.sh adds anything else they need).
for lib in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2 librt.so.1; do
  src=/lib/x86_64-linux-gnu/$lib
  [[ -e $src ]] && cp -L "$src" "$root/lib/x86_64-linux-gnu/$lib"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"

install -m 0755 "$here/init" "$root/init"

mkdir -p "$out.tmp"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --quiet) > "$out.tmp/node.cpio"
cp "$work/k/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
echo "$pkg $pkg_version" > "$out.tmp/kernel-package"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built $out"
echo "$out"
