#!/usr/bin/env bash
# The main job: boot a microVM with husk from the bundled guest (the husk
# guest kernel and a busybox initramfs) and show what it prints. Sets up
# everything it needs on a fresh Debian 12 machine (run as root); slow build
# products are cached under /var/cache/husk.
#
# On hosts whose /dev/kvm cannot run a Linux guest's user space, the microVM
# runs inside the node VM (resources/node/run.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

husk_install_packages
husk_build_images "$repo"
log "building husk"
(cd "$repo" && cargo build --release --locked -j"$(nproc)" -p husk --bin husk >&2)

payload=$(mktemp -d "${TMPDIR:-/tmp}/husk-demo.XXXXXX")
trap 'rm -rf "$payload"' EXIT
cp "$repo/target/release/husk" "$HUSK_KERNEL_DIR/vmlinux" "$payload/"
"$repo/resources/guest/build-initramfs.sh" "$payload/demo.cpio" "$repo/resources/guest/demo-init" >/dev/null

log "booting a microVM"
"$repo/resources/node/run.sh" --payload "$payload" -- \
  ./husk boot --kernel vmlinux --initrd demo.cpio --vcpus 2 --mem-mib 256 \
  --cmdline "console=ttyS0 reboot=k panic=1 pci=off quiet"
