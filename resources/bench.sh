#!/usr/bin/env bash
# Runs the benchmarks where a real KVM is (the node VM on these machines) and
# prints their JSON. Usage: resources/bench.sh [boot] [--runs N]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

runs=10
while (($#)); do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    boot) shift ;;
    *) echo "usage: $0 [boot] [--runs N]" >&2; exit 2 ;;
  esac
done

husk_install_packages
husk_build_images "$repo"
(cd "$repo" && cargo build --release --locked -j"$(nproc)" -p husk --bins >&2)

payload=$(mktemp -d "${TMPDIR:-/tmp}/husk-bench.XXXXXX")
trap 'rm -rf "$payload"' EXIT
cp "$repo/target/release/husk" "$repo/target/release/husk-bench" "$HUSK_KERNEL_DIR/vmlinux" "$payload/"
"$repo/resources/guest/build-initramfs.sh" "$payload/test.cpio" "$repo/resources/guest/test-init" >/dev/null
"$repo/resources/node/run.sh" --payload "$payload" -- \
  ./husk-bench boot --husk ./husk --kernel vmlinux --initrd test.cpio --runs "$runs"
