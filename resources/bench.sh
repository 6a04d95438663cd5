#!/usr/bin/env bash
# Runs a benchmark where a real KVM is (the node VM on these machines) and
# prints its JSON.
#
#   resources/bench.sh [boot] [--runs N] [--firecracker PATH]
#                                                        boot time, setup time, VMM memory
#                                                        (and the same for a Firecracker binary
#                                                        you provide, on the same guest)
#   resources/bench.sh blk [--size-mib M] [--runtime-s S] virtio-blk against its backing file
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

mode=boot runs=10 size_mib=128 runtime_s=5 firecracker=""
while (($#)); do
  case $1 in
    boot|blk) mode=$1; shift ;;
    --runs) runs=$2; shift 2 ;;
    --size-mib) size_mib=$2; shift 2 ;;
    --runtime-s) runtime_s=$2; shift 2 ;;
    --firecracker) firecracker=$(realpath "$2"); shift 2 ;;
    *) echo "usage: $0 [boot [--runs N] [--firecracker PATH] | blk [--size-mib M] [--runtime-s S]]" >&2; exit 2 ;;
  esac
done

husk_install_packages
husk_build_images "$repo"
(cd "$repo" && cargo build --release --locked -j"$(nproc)" -p husk --bins >&2)

payload=$(mktemp -d "${TMPDIR:-/tmp}/husk-bench.XXXXXX")
trap 'rm -rf "$payload"' EXIT
cp "$repo/target/release/husk" "$repo/target/release/husk-bench" "$HUSK_KERNEL_DIR/vmlinux" "$payload/"

case $mode in
  boot)
    "$repo/resources/guest/build-initramfs.sh" "$payload/test.cpio" "$repo/resources/guest/test-init" >/dev/null
    if [[ -z $firecracker ]]; then
      "$repo/resources/node/run.sh" --payload "$payload" -- \
        ./husk-bench boot --husk ./husk --kernel vmlinux --initrd test.cpio --runs "$runs"
    else
      # Both VMMs in one node VM, alternating nothing but the binary.
      cp "$firecracker" "$payload/firecracker"
      "$repo/resources/node/run.sh" --payload "$payload" -- sh -c \
        "./husk-bench boot --husk ./husk --kernel vmlinux --initrd test.cpio --runs $runs &&
         ./husk-bench boot --vmm firecracker --firecracker ./firecracker --kernel vmlinux --initrd test.cpio --runs $runs"
    fi
    ;;
  blk)
    # The guest runs a static husk-bench (no libraries in the guest).
    target=x86_64-unknown-linux-gnu
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -j"$(nproc)" -p husk --bin husk-bench --target "$target" >&2)
    script="$payload/io.sh"
    # shellcheck disable=SC2016  # $(...) expands in the guest, not here
    printf '#!/bin/sh\necho "HUSK-IO-JSON $(/bin/husk-bench io --path /dev/vda --size-mib %s --runtime-s %s)"\n' \
      "$size_mib" "$runtime_s" > "$script"
    chmod +x "$script"
    "$repo/resources/guest/build-initramfs.sh" "$payload/blk.cpio" "$repo/resources/guest/test-init" \
      "$repo/target/$target/release/husk-bench:/bin/husk-bench" "$script:/husk-test.sh" >/dev/null
    rm "$script"
    "$repo/resources/node/run.sh" --payload "$payload" -- \
      ./husk-bench blk --husk ./husk --kernel vmlinux --initrd blk.cpio \
      --size-mib "$size_mib" --runtime-s "$runtime_s"
    ;;
esac
