#!/usr/bin/env bash
# The main job: run a command in a container inside a husk microVM, from the
# bundled busybox image, and show its output. Sets up everything it needs on
# a fresh Debian 12 machine (run as root): packages, the guest kernel, the
# husk-agent initramfs, the node VM image, husk itself. Slow build products
# are cached under /var/cache/husk.
#
#   resources/demo.sh [CMD ARGS...]     (default: a greeting from the container)
#
# On hosts whose /dev/kvm cannot run a Linux guest's user space, the microVM
# runs inside the node VM (resources/node/run.sh); the image's root
# filesystem is built here and handed over in a cache directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

husk_install_packages
husk_build_images "$repo"
log "building husk and the agent"
(cd "$repo" && cargo build --release --locked -j"$(nproc)" -p husk --bin husk >&2)

payload=$(mktemp -d "${TMPDIR:-/tmp}/husk-demo.XXXXXX")
trap 'rm -rf "$payload"' EXIT
cp "$repo/target/release/husk" "$HUSK_KERNEL_DIR/vmlinux" "$payload/"
"$repo/resources/agent/build.sh" "$payload/agent.cpio" >/dev/null
"$payload/husk" image build-busybox "$payload/busybox" >/dev/null
HUSK_CACHE_DIR=$payload/cache "$payload/husk" image rootfs "$payload/busybox" >/dev/null

if (($#)); then
  printf -v cmd '%q ' "$@"
else
  # shellcheck disable=SC2016  # expands in the container
  cmd='sh -c '\''echo "Hello from a container in a husk microVM!"; echo "  kernel: $(uname -sr)"; echo "  user:   $(id)"; echo "  pid:    $$ (the container has its own pid namespace)"; echo "  root:   $(grep " / " /proc/mounts | cut -d" " -f1-3)"'\'''
fi
log "running a container in a microVM"
"$repo/resources/node/run.sh" --payload "$payload" -- sh -c \
  "HUSK_CACHE_DIR=./cache ./husk run --kernel vmlinux --agent-initrd agent.cpio --mem-mib 256 ./busybox -- $cmd"
