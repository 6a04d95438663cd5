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
# <key> hashes the kernel package's name and version, the versions of busybox
# and glibc, build.sh and init. Which kernel package the metapackage means is
# remembered in node/kernel-package.<hash of the apt lists' stat>, so a cached
# run needs no apt-cache (~0.7 s) and takes a few tens of milliseconds.
# HUSK_NODE_KERNEL_SUITE=SUITE (for example bookworm-backports, whose
# cloud kernel is 6.12) takes the kernel from that Debian suite instead,
# through a private apt index (husk_apt_index: the host's apt is left as
# it is), remembered for the ISO week in node/kernel-package.SUITE.WEEK.
# The last line on stdout is that directory; all else goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${HUSK_CACHE_DIR:-/var/cache/husk}
# shellcheck source=resources/lib.sh
source "$here/../lib.sh"
log() { echo "node-image: $*" >&2; }
ensure_packages qemu-system-x86 busybox-static cpio kmod

# The cloud kernel metapackage names the versioned image package it pulls in.
# apt-cache takes ~0.7 s here (no pkgcache.bin on these machines), so the
# answer is remembered for as long as the package lists stay the same.
lists_id() {
  stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* 2>/dev/null | sha256sum | cut -c1-16
}
kernel_pkg() {
  apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1
}
resolve_kernel_pkg() {
  local memo
  memo="$cache_root/node/kernel-package.$(lists_id)"
  pkg=""
  [[ -s $memo ]] && read -r pkg pkg_version < "$memo"
  [[ -n $pkg ]] && return 0
  read -r pkg pkg_version <<< "$(kernel_pkg)" || true
  [[ -n $pkg ]] || return 1
  mkdir -p "$cache_root/node"
  rm -f "$cache_root"/node/kernel-package.*
  echo "$pkg $pkg_version" > "$memo.$$" && mv "$memo.$$" "$memo"
}
suite=${HUSK_NODE_KERNEL_SUITE:-}
apt_dir=""
apt_opts=()
private_index() {
  if [[ -z $apt_dir ]]; then
    apt_dir=$(mktemp -d "${TMPDIR:-/tmp}/husk-node-apt.XXXXXX")
    trap 'rm -rf "$apt_dir"' EXIT
    husk_apt_index "$suite" "$apt_dir" || { log "cannot read $suite's package index"; return 1; }
    apt_opts=("${HUSK_APT_OPTS[@]}")
  fi
}
if [[ -n $suite ]]; then
  memo="$cache_root/node/kernel-package.$suite.$(date +%G-%V)"
  pkg=""
  [[ -s $memo ]] && read -r pkg pkg_version < "$memo"
  if [[ -z $pkg ]]; then
    private_index || exit 1
    read -r pkg pkg_version <<< "$(apt-cache "${apt_opts[@]}" show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
      sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1)" || true
    [[ -n $pkg ]] || { log "$suite has no cloud kernel package"; exit 1; }
    mkdir -p "$cache_root/node"
    rm -f "$cache_root/node/kernel-package.$suite".*
    echo "$pkg $pkg_version" > "$memo.$$" && mv "$memo.$$" "$memo"
  fi
elif ! resolve_kernel_pkg; then
  apt-get update -q >&2
  resolve_kernel_pkg || { log "cannot find Debian's cloud kernel package"; exit 1; }
fi
# busybox and the glibc libraries are copied into the image: their versions
# are part of the key.
host_versions=$(dpkg-query -W -f='${Package} ${Version}\n' busybox-static libc6 libgcc-s1)

key=$( { echo "$pkg $pkg_version"; echo "$host_versions"; cat "$here/build.sh" "$here/init"; } | sha256sum | cut -c1-16)
out="$cache_root/node/$key"
if [[ -f $out/vmlinuz && -f $out/node.cpio ]]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/husk-node.XXXXXX")
trap 'rm -rf "$work" ${apt_dir:+"$apt_dir"}' EXIT
log "building from $pkg $pkg_version${suite:+ ($suite)}"
# (As root: the _apt sandbox user cannot write into the private work dir.)
download() {
  if [[ -n $suite ]]; then private_index || return 1; fi
  (cd "$work" && apt-get download -q "${apt_opts[@]}" -o APT::Sandbox::User=root "$pkg${suite:+=$pkg_version}" >&2)
}
if [[ -n $suite ]]; then
  download || { log "$suite has no $pkg $pkg_version"; exit 1; }
elif ! download; then
  # Stale package lists name a version the mirror no longer has.
  log "download failed; refreshing the package lists"
  apt-get update -q >&2
  download
fi
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/k"
kver=${pkg#linux-image-}
moddir="$work/k/lib/modules/$kver"
[[ -d $moddir ]] || { log "no modules for $kver in $pkg"; exit 1; }
# The package leaves modules.dep to depmod at install time.
depmod -b "$work/k" "$kver"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,payload,lib/modules,lib64,lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/busybox"
# One symlink per applet (perl is Essential in Debian; one process, not 400).
/bin/busybox --list | perl -e 'my $d = shift; while (<STDIN>) { chomp; next if $_ eq "busybox"; symlink("busybox", "$d/$_") or die "$_: $!\n" }' "$root/bin"

# Debian 12's 6.1 modules are plain .ko files; later kernels compress them.
if compgen -G "$moddir/kernel/arch/x86/kvm/kvm.ko.zst" >/dev/null; then ensure_packages zstd; fi
if compgen -G "$moddir/kernel/arch/x86/kvm/kvm.ko.xz" >/dev/null; then ensure_packages xz-utils; fi

# Modules, dependencies first, in load order. Required ones must exist;
# optional ones (for networking and container tests) are skipped if absent.
# Those in lib/modules/order load at boot; those in another list file (the
# second argument) are left for the payload to load when it needs them.
declare -A added=()
add_module() {
  local name=$1 list=${2:-order} line path deps
  [[ -n ${added[$name]:-} ]] && return 0
  line=$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1) || return 1
  path=${line%%:*}
  deps=${line#*:}
  for dep in $deps; do
    dep=$(basename "$dep"); dep=${dep%%.ko*}
    add_module "$dep" "$list" || return 1
  done
  case $path in
    *.ko) cp "$moddir/$path" "$root/lib/modules/$name.ko" ;;
    # busybox insmod cannot decompress: store them plain.
    *.ko.xz) xz -dc "$moddir/$path" > "$root/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$moddir/$path" > "$root/lib/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$moddir/$path" > "$root/lib/modules/$name.ko" ;;
    *) log "unknown module format: $path"; return 1 ;;
  esac
  added[$name]=1
  echo "$name" >> "$root/lib/modules/$list"
}
for m in irqbypass kvm kvm-amd; do
  add_module "$m" || { log "required module $m missing"; exit 1; }
done
for m in tun overlay veth bridge sch_ingress act_mirred cls_matchall virtio_pci virtio_blk loop; do
  add_module "$m" || log "optional module $m not available"
done
# Netfilter for iptables-nft's NAT, which the CNI portmap plugin drives
# (host ports in the CRI tests): loaded by start-in-node.sh --cri only, so
# no other boot pays for them.
for m in nf_tables nft_compat nft_chain_nat nft_nat nft_masq nft_ct nf_conntrack_netlink \
  xt_comment xt_multiport xt_mark xt_addrtype xt_conntrack xt_nat xt_MASQUERADE xt_tcpudp; do
  add_module "$m" netfilter || log "optional module $m not available"
done

# The host's dynamic loader and base libraries, so dynamically linked host
# binaries in a payload run here (run.sh adds anything else they need).
for lib in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2 librt.so.1; do
  src=/lib/x86_64-linux-gnu/$lib
  [[ -e $src ]] && cp -L "$src" "$root/lib/x86_64-linux-gnu/$lib"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"

install -m 0755 "$here/init" "$root/init"

chmod 1777 "$root/tmp"

# Assembled beside its final place and renamed into it, so a concurrent run
# never sees half an image (whichever finishes first wins).
mkdir -p "$cache_root/node"
tmp_out=$(mktemp -d "$out.tmp.XXXXXX")
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --reproducible --quiet) > "$tmp_out/node.cpio"
cp "$work/k/boot/vmlinuz-$kver" "$tmp_out/vmlinuz"
echo "$pkg $pkg_version" > "$tmp_out/kernel-package"
chmod 0755 "$tmp_out"
if [[ -f $out/vmlinuz && -f $out/node.cpio ]]; then
  rm -rf "$tmp_out"
else
  rm -rf "$out"
  mv -T "$tmp_out" "$out"
fi
log "built $out"
echo "$out"
