#!/usr/bin/env bash
# Runs a benchmark where a real KVM is (the node VM on these machines) and
# prints its JSON.
#
#   resources/bench.sh [boot] [--runs N] [--firecracker PATH]
#                                                        boot time, setup time, VMM memory
#                                                        (and the same for a Firecracker binary
#                                                        you provide, on the same guest)
#   resources/bench.sh blk [--size-mib M] [--runtime-s S] [--depths D,D]
#                                                        virtio-blk against its backing file, at
#                                                        each queue depth (default 1,16)
#   resources/bench.sh fs [--size-mib M] [--runtime-s S] [--depths D,D]
#                                                        virtio-fs (virtiofsd) against virtio-blk
#                                                        in the same guest, at each queue depth
#   resources/bench.sh api [--runs N]                    API latency (GET /, PUT /machine-config),
#                                                        InstanceStart to the first vCPU entry
#   resources/bench.sh net [--size-mib M]                 virtio-net TCP throughput guest<->node over a tap
#   resources/bench.sh vsock [--size-mib M] [--streams N] virtio-vsock throughput, both directions
#   resources/bench.sh hotplug [--runs N]                memory hot-plug: PATCH /hotplug/memory to the
#                                                        guest having 256 MiB and 1 GiB plugged, and back
#   resources/bench.sh snapshot [--runs N] [--firecracker PATH]
#                                                        snapshot create time and file sizes, restore
#                                                        time (load request to the guest answering
#                                                        through vsock), and Firecracker's on the same guest
#   resources/bench.sh run [--runs N]                    husk run to the container's first output
#                                                        byte against runc run of the same image;
#                                                        the agent's container start and RSS in a guest
#   resources/bench.sh pod [--runs N] [--concurrent P]    pods through containerd: husk's shim against
#                                                        runc's (start latency, memory per pod, P pods
#                                                        of 128 MiB at once)
#   resources/bench.sh soak [--runs N] [--stress-every K] [--streams S] [--firecracker PATH]
#                                                        N VM creations (default 100) in as few node
#                                                        boots as the node allows: each boots a guest,
#                                                        echoes through vsock (every Kth: S streams,
#                                                        default 5 and 32) and exits; rates per 1,000
#                                                        creations of triple faults, stalls and the
#                                                        node VM's own failures (docs/testing.md);
#                                                        with --firecracker, that binary and husk
#                                                        take turns in the same node boots (N in
#                                                        all), each with its own counts; a stalled
#                                                        guest is snapshotted before it is stopped
#                                                        and its kernel text and registers examined
#   resources/bench.sh cri [--runs N]                    pod start through containerd's CRI plugin
#                                                        (RunPodSandbox to a running container),
#                                                        handler husk against runc, where each
#                                                        restored pod's start went (the shim's
#                                                        phases), and a husk pod sized 2 GiB / 2 CPUs
#   resources/bench.sh cri-image [--runs N]              a pod whose container is its image's first
#                                                        (husk's image cache emptied), images of 10 and
#                                                        200 MiB: runc, husk with rootfs = "block" and
#                                                        with rootfs = "share"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

mode=boot runs="" size_mib="" runtime_s=5 streams="" firecracker="" concurrent=20 depths=1,16 stress_every=5
while (($#)); do
  case $1 in
    boot|blk|fs|api|hotplug|net|vsock|snapshot|run|pod|cri|cri-image|soak) mode=$1; shift ;;
    --stress-every) stress_every=$2; shift 2 ;;
    --concurrent) concurrent=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --size-mib) size_mib=$2; shift 2 ;;
    --runtime-s) runtime_s=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --depths) depths=$2; shift 2 ;;
    --firecracker) firecracker=$(realpath "$2"); shift 2 ;;
    *) echo "usage: $0 [boot [--runs N] [--firecracker PATH] | blk [--size-mib M] [--runtime-s S] [--depths D,D] | fs [--size-mib M] [--runtime-s S] [--depths D,D] | api [--runs N] | hotplug [--runs N] | net [--size-mib M] | vsock [--size-mib M] [--streams N] | snapshot [--runs N] [--firecracker PATH] | run [--runs N] | pod [--runs N] [--concurrent P] | cri [--runs N] | cri-image [--runs N] | soak [--runs N] [--stress-every K] [--streams S] [--firecracker PATH]]" >&2; exit 2 ;;
  esac
done
if [[ $mode == soak ]]; then runs=${runs:-100} streams=${streams:-32}; else runs=${runs:-10} streams=${streams:-8}; fi

husk_install_packages
husk_build_images "$repo"
(cd "$repo" && cargo build --release --locked -j"$(nproc)" -p husk -p husk-bench -p husk-jailer -p containerd-shim-husk-v2 --bins >&2)

payload=$(mktemp -d "${TMPDIR:-/tmp}/husk-bench.XXXXXX")
trap 'rm -rf "$payload"' EXIT
cp "$repo/target/release/husk" "$repo/target/release/husk-bench" "$HUSK_KERNEL_DIR/vmlinux" "$payload/"

# The shim starts husk through the jailer beside it, and a jailed husk
# has no libraries: a static husk (for the explicit target, so the flag
# stays off the build's proc-macros) replaces the payload's.
jailed_husk() {
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
    -j"$(nproc)" -p husk --bin husk --target x86_64-unknown-linux-gnu >&2)
  cp "$repo/target/x86_64-unknown-linux-gnu/release/husk" "$payload/husk"
  cp "$repo/target/release/husk-jailer" "$payload/"
}

# $payload/vsock.cpio: a guest that serves vsock test streams with a
# static husk-bench on port 5201 (the node's husk-bench connects through
# husk's unix socket); its reset follows the server's quit.
vsock_guest() {
  local target=x86_64-unknown-linux-gnu script="$payload/serve.sh"
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -j"$(nproc)" -p husk-bench --bin husk-bench --target "$target" >&2)
  printf '#!/bin/sh\n/bin/husk-bench vsock-serve --listen vsock:5201\n' > "$script"
  chmod +x "$script"
  "$repo/resources/guest/build-initramfs.sh" "$payload/vsock.cpio" "$repo/resources/guest/test-init" \
    "$repo/target/$target/release/husk-bench:/bin/husk-bench" "$script:/husk-test.sh" >/dev/null
  rm "$script"
}

# N creations by VMM $1 (husk or firecracker), then their report.
soak_vmm() {
  local vmm=$1 soak_dir record left boots idle out ran node
  # Node boots until N creations ran: a node that failed gets a fresh
  # run.sh for what is left (run.sh's own second boot is off: it would
  # start all N again); three boots in a row without a creation end it.
  soak_dir=$(mktemp -d "${TMPDIR:-/tmp}/husk-soak.XXXXXX")
  record="$soak_dir/node-failures"
  : > "$record"
  left=$runs boots=0 idle=0
  while ((left > 0 && idle < 3)); do
    boots=$((boots + 1))
    out="$soak_dir/boot-$boots"
    HUSK_NODE_RETRIES=$record HUSK_NODE_LABEL="soak ($vmm), node boot $boots" HUSK_NODE_BOOT_AGAIN=0 \
      "$repo/resources/node/run.sh" --timeout $((300 + left * 40)) --payload "$payload" -- \
      ./husk-bench soak --vmm "$vmm" --husk ./husk --firecracker ./firecracker \
      --kernel vmlinux --initrd vsock.cpio --runs "$left" \
      --stress-every "$stress_every" --streams "$streams" > "$out" || true
    ran=$(grep -c '^SOAK-RUN ' "$out" || true)
    if ((ran == 0)); then idle=$((idle + 1)); else idle=0; fi
    left=$((left - ran))
  done
  node="${HUSK_NODE_QEMU:+$("$HUSK_NODE_QEMU" --version | head -n1), }tcg thread=${HUSK_NODE_TCG_THREAD:-multi}, node image ${HUSK_NODE_IMAGE:+$(basename "$HUSK_NODE_IMAGE") ($(cat "$HUSK_NODE_IMAGE/kernel-package" 2>/dev/null))}"
  "$repo/target/release/husk-bench" soak-report --runs "$soak_dir"/boot-* \
    --node-record "$record" --node "$node"
  rm -rf "$soak_dir"
}

case $mode in
  soak)
    vsock_guest
    if [[ -n $firecracker ]]; then
      cp "$firecracker" "$payload/firecracker"
      soak_vmm husk,firecracker
    else
      soak_vmm husk
    fi
    ;;
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
  api)
    "$repo/resources/guest/build-initramfs.sh" "$payload/test.cpio" "$repo/resources/guest/test-init" >/dev/null
    "$repo/resources/node/run.sh" --payload "$payload" -- \
      ./husk-bench api --husk ./husk --kernel vmlinux --initrd test.cpio --runs "$runs"
    ;;
  hotplug)
    "$repo/resources/guest/build-initramfs.sh" "$payload/test.cpio" "$repo/resources/guest/test-init" >/dev/null
    "$repo/resources/node/run.sh" --payload "$payload" -- \
      ./husk-bench hotplug --husk ./husk --kernel vmlinux --initrd test.cpio --runs "$runs"
    ;;
  blk)
    # The guest runs a static husk-bench (no libraries in the guest).
    target=x86_64-unknown-linux-gnu
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -j"$(nproc)" -p husk-bench --bin husk-bench --target "$target" >&2)
    script="$payload/io.sh"
    # One husk-bench io per depth husk-bench blk puts on the kernel command line.
    # shellcheck disable=SC2016  # expands in the guest, not here
    printf '%s\n' '#!/bin/sh' \
      'depths=$(sed -n "s/.*husk.io_depths=\([0-9,]*\).*/\1/p" /proc/cmdline)' \
      'for d in $(echo "$depths" | tr , " "); do' \
      "  echo \"HUSK-IO-JSON \$(/bin/husk-bench io --path /dev/vda --size-mib ${size_mib:=128} --runtime-s $runtime_s --depth \$d)\"" \
      'done' > "$script"
    chmod +x "$script"
    "$repo/resources/guest/build-initramfs.sh" "$payload/blk.cpio" "$repo/resources/guest/test-init" \
      "$repo/target/$target/release/husk-bench:/bin/husk-bench" "$script:/husk-test.sh" >/dev/null
    rm "$script"
    "$repo/resources/node/run.sh" --payload "$payload" -- \
      ./husk-bench blk --husk ./husk --kernel vmlinux --initrd blk.cpio \
      --size-mib "$size_mib" --runtime-s "$runtime_s" --depths "$depths"
    ;;
  fs)
    # One guest, both devices: husk-bench io on /dev/vda and on a file of
    # the virtio-fs share, per depth (static husk-bench: no libraries in
    # the guest).
    husk_virtiofsd
    cp "$HUSK_VIRTIOFSD" "$payload/virtiofsd"
    target=x86_64-unknown-linux-gnu
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -j"$(nproc)" -p husk-bench --bin husk-bench --target "$target" >&2)
    script="$payload/io.sh"
    # shellcheck disable=SC2016  # expands in the guest, not here
    printf '%s\n' '#!/bin/sh' \
      'depths=$(sed -n "s/.*husk.io_depths=\([0-9,]*\).*/\1/p" /proc/cmdline)' \
      'mkdir -p /mnt && mount -t virtiofs bench /mnt || exit 1' \
      'for d in $(echo "$depths" | tr , " "); do' \
      "  echo \"HUSK-IO-JSON \$(/bin/husk-bench io --path /dev/vda --size-mib ${size_mib:=128} --runtime-s $runtime_s --depth \$d)\"" \
      "  echo \"HUSK-FS-IO-JSON \$(/bin/husk-bench io --path /mnt/bench.bin --size-mib $size_mib --runtime-s $runtime_s --depth \$d)\"" \
      'done' \
      'mkdir -p /m && mount -t ext4 /dev/vdb /m || exit 2' \
      'echo "HUSK-META-JSON $(/bin/husk-bench meta --dir /m --files 1000 --tree /m/tree)"' \
      'echo "HUSK-FS-META-JSON $(/bin/husk-bench meta --dir /mnt --files 1000 --tree /mnt/tree)"' \
      'umount /m' 'umount /mnt' > "$script"
    chmod +x "$script"
    # The metadata runs' tree: a busybox root (the binary, a link per
    # applet, /etc's few files), on an ext4 image for the drive and as
    # files for the share (the node has no e2fsprogs: made here).
    meta="$payload/meta-root"
    mkdir -p "$meta/tree/bin" "$meta/tree/etc"
    cp /bin/busybox "$meta/tree/bin/busybox"
    for applet in $(/bin/busybox --list); do
      [[ $applet == busybox ]] || ln -sf busybox "$meta/tree/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$meta/tree/etc/passwd"
    printf 'root:x:0:\n' > "$meta/tree/etc/group"
    mke2fs -q -t ext4 -d "$meta" "$payload/meta.img" 64M >&2
    "$repo/resources/guest/build-initramfs.sh" "$payload/fs.cpio" "$repo/resources/guest/test-init" \
      "$repo/target/$target/release/husk-bench:/bin/husk-bench" "$script:/husk-test.sh" >/dev/null
    rm "$script"
    # Shared guest memory on huge pages, as the shim's pods have it
    # (resources/containerd/start-in-node.sh): on the node's default 4 KiB
    # shmem pages this guest triple-faulted in one of three runs.
    # Then the same with the device relaying (guest memory private): one
    # JSON document each, in one node run. (The relay's copies no longer
    # take `rep movsb`, which TCG runs 5-7 times slower than a vector
    # loop; husk-bench fs --husk-glibc-tunables is there to check that
    # nothing else of husk's does.)
    "$repo/resources/node/run.sh" --payload "$payload" -- sh -c \
      'echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled && "$@" && "$@" --relay' sh \
      ./husk-bench fs --husk ./husk --virtiofsd ./virtiofsd --kernel vmlinux --initrd fs.cpio \
      --size-mib "$size_mib" --runtime-s "$runtime_s" --depths "$depths" \
      --meta-root meta-root --meta-image meta.img
    ;;
  net)
    # The guest sends husk.net_bytes zeros to the node, then reads as many.
    script="$payload/net.sh"
    # shellcheck disable=SC2016  # expands in the guest, not here
    printf '%s\n' '#!/bin/sh' \
      'n=$(sed -n "s/.*husk.net_bytes=\([0-9]*\).*/\1/p" /proc/cmdline)' \
      'ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up || exit 1' \
      'head -c "$n" /dev/zero | nc 172.16.0.1 5000 || exit 2' \
      'nc 172.16.0.1 5001 < /dev/null > /dev/null || exit 3' > "$script"
    chmod +x "$script"
    "$repo/resources/guest/build-initramfs.sh" "$payload/net.cpio" "$repo/resources/guest/test-init" \
      "$script:/husk-test.sh" >/dev/null
    rm "$script"
    "$repo/resources/node/run.sh" --payload "$payload" -- \
      ./husk-bench net --husk ./husk --kernel vmlinux --initrd net.cpio --size-mib "${size_mib:-100}"
    ;;
  snapshot)
    # The guest serves vsock echoes with a static husk-bench; each restored
    # VM is timed until one comes back through the VMM's socket.
    vsock_guest
    fc_args=()
    if [[ -n $firecracker ]]; then
      cp "$firecracker" "$payload/firecracker"
      fc_args=(--firecracker ./firecracker)
    fi
    "$repo/resources/node/run.sh" --payload "$payload" -- \
      ./husk-bench snapshot --husk ./husk --kernel vmlinux --initrd vsock.cpio \
      --port 5201 --runs "$runs" "${fc_args[@]}"
    ;;
  vsock)
    vsock_guest
    "$repo/resources/node/run.sh" --payload "$payload" -- \
      ./husk-bench vsock --husk ./husk --kernel vmlinux --initrd vsock.cpio \
      --port 5201 --size-mib "${size_mib:-128}" --streams "$streams"
    ;;
  run)
    # husk run and runc run of the same busybox image, both in the node VM;
    # its root filesystem is built here (the node has no e2fsprogs). The
    # node's / is an initramfs, which pivot_root cannot leave: runc gets
    # --no-pivot (a move and a chroot instead).
    ensure_packages runc
    "$repo/resources/agent/build.sh" "$payload/agent.cpio" >&2
    "$repo/target/release/husk" image build-busybox "$payload/busybox" >&2
    HUSK_CACHE_DIR="$payload/cache" "$repo/target/release/husk" image rootfs "$payload/busybox" >&2
    cp "$(find "$payload/cache/rootfs" -name '*.ext4' | head -n1)" "$payload/rootfs.ext4"
    # The layout names its manifest "busybox:latest": that is the tag.
    umoci unpack --image "$payload/busybox:busybox:latest" "$payload/bundle" >&2
    cp "$(command -v runc)" "$payload/runc"
    "$repo/resources/node/run.sh" --payload "$payload" -- sh -c \
      "HUSK_CACHE_DIR=./cache ./husk-bench run --husk ./husk --kernel vmlinux \
         --agent-initrd agent.cpio --image ./busybox --rootfs rootfs.ext4 \
         --runc ./runc --runc-no-pivot --bundle bundle --runs $runs"
    ;;
  pod)
    # Debian's containerd (and runc for the yardstick) in the node VM, the
    # bundled busybox image imported; the shim finds husk, the kernel and
    # the agent through /etc/husk/config.toml.
    ensure_packages runc containerd
    jailed_husk
    husk_virtiofsd
    cp "$HUSK_VIRTIOFSD" "$payload/virtiofsd"
    "$repo/resources/agent/build.sh" "$payload/agent.cpio" >&2
    layout=$(mktemp -d "${TMPDIR:-/tmp}/husk-bench-layout.XXXXXX")
    "$repo/target/release/husk" image build-busybox "$layout/busybox" >&2
    tar -C "$layout/busybox" -cf "$payload/busybox.tar" .
    rm -rf "$layout"
    cp "$repo/target/release/containerd-shim-husk-v2" "$(command -v containerd)" "$(command -v ctr)" \
      "$(command -v containerd-shim-runc-v2)" "$(command -v runc)" /usr/sbin/mke2fs \
      "$repo/resources/containerd/start-in-node.sh" \
      "$repo/resources/containerd/virtiofsd-in-node.sh" "$payload/"
    "$repo/resources/node/run.sh" --mem 6144 --timeout 1800 --payload "$payload" -- sh -c "
      export PATH=\$PWD:\$PATH
      sh start-in-node.sh error || exit 1
      ./husk-bench pod --runs $runs --concurrent $concurrent --mem-mib 128 --runc-no-pivot ||
        { tail -n 30 containerd.log; exit 1; }
      # From a template, the share not relayed: guest memory shared with
      # virtiofsd.
      echo 'share_relay = false' >> /etc/husk/config.toml
      echo 'BENCH-CONFIG share_relay=false'
      ./husk-bench pod --runs $runs --concurrent $concurrent --mem-mib 128 --runc-no-pivot ||
        { tail -n 30 containerd.log; exit 1; }
      # The same pods booted instead of restored from a template.
      sed -i '/^share_relay/d' /etc/husk/config.toml
      echo 'template = false' >> /etc/husk/config.toml
      echo 'BENCH-CONFIG template=false'
      ./husk-bench pod --runs $runs --concurrent $concurrent --mem-mib 128 --runc-no-pivot ||
        { tail -n 30 containerd.log; exit 1; }"
    ;;
  cri|cri-image)
    # containerd's CRI plugin in the node VM as tests/cri.rs sets it up
    # (start-in-node.sh --cri), driven by husk-cri: runc first, then husk.
    ensure_packages runc containerd containernetworking-plugins protobuf-compiler
    (cd "$repo" && cargo build --release --locked -j"$(nproc)" -p husk-tests --bin husk-cri >&2)
    jailed_husk
    husk_virtiofsd
    cp "$HUSK_VIRTIOFSD" "$payload/virtiofsd"
    "$repo/resources/agent/build.sh" "$payload/agent.cpio" >&2
    for image in busybox.tar:busybox:latest:sh cri-busybox.tar:husk.local/busybox:1:sh \
      "pause.tar:husk.local/pause:1:sleep 2147483647"; do
      IFS=: read -r tar name tag cmd <<< "$image"
      layout=$(mktemp -d "${TMPDIR:-/tmp}/husk-bench-layout.XXXXXX")
      # shellcheck disable=SC2086 # the command's words
      "$repo/target/release/husk" image build-busybox "$layout/img" --ref "$name:$tag" -- $cmd >&2
      tar -C "$layout/img" -cf "$payload/$tar" .
      rm -rf "$layout"
    done
    mkdir -p "$payload/cni"
    cp /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback "$payload/cni/"
    cp "$repo/target/release/containerd-shim-husk-v2" "$repo/target/release/husk-cri" \
      "$(command -v containerd)" "$(command -v ctr)" "$(command -v containerd-shim-runc-v2)" \
      "$(command -v runc)" /usr/sbin/mke2fs /usr/sbin/ip /usr/sbin/tc \
      "$repo/resources/containerd/start-in-node.sh" \
      "$repo/resources/containerd/virtiofsd-in-node.sh" "$payload/"
    if [[ $mode == cri-image ]]; then
      # Images of 10 and 200 MiB (random bytes: nothing compresses or
      # dedups them) beside busybox; each run's container is its image's
      # first: husk's image cache is emptied before it.
      for mib in 10 200; do
        head -c $((mib << 20)) /dev/urandom > "$payload/blob"
        layout=$(mktemp -d "${TMPDIR:-/tmp}/husk-bench-layout.XXXXXX")
        "$repo/target/release/husk" image build-busybox "$layout/img" --ref "husk.local/big:$mib" \
          --add "$payload/blob" -- sh >&2
        tar -C "$layout/img" -cf "$payload/big-$mib.tar" .
        rm -rf "$layout" "$payload/blob"
      done
      "$repo/resources/node/run.sh" --mem 6144 --timeout 3600 --payload "$payload" -- sh -c "
        export PATH=\$PWD:\$PATH
        sh start-in-node.sh --cri error || exit 1
        for mib in 10 200; do ctr -n k8s.io image import big-\$mib.tar > /dev/null || exit 1; done
        cp /etc/husk/config.toml /etc/husk/config.toml.default
        for mib in 10 200; do
          ./husk-cri bench --handler runc --image husk.local/big:\$mib --runs $runs || exit 1
          for rootfs in block share; do
            cp /etc/husk/config.toml.default /etc/husk/config.toml
            echo \"rootfs = \\\"\$rootfs\\\"\" >> /etc/husk/config.toml
            echo \"BENCH-CONFIG rootfs=\$rootfs\"
            ./husk-cri bench --handler husk --image husk.local/big:\$mib --runs $runs \\
              --fresh-cache /var/lib/husk/images || { tail -n 30 containerd.log; exit 1; }
          done
        done"
      exit 0
    fi
    "$repo/resources/node/run.sh" --timeout 1800 --payload "$payload" -- sh -c "
      export PATH=\$PWD:\$PATH
      sh start-in-node.sh --cri error || exit 1
      # The shim's info lines say where each restored pod's start went.
      echo 'log_level = \"info\"' >> /etc/husk/config.toml
      for handler in runc husk; do
        ./husk-cri bench --handler \$handler --image husk.local/busybox:1 --runs $runs ||
          { tail -n 30 containerd.log; exit 1; }
      done
      grep -o 'restored from its template.*' containerd.log | awk '{
        line = \"{\\\"benchmark\\\":\\\"cri_pod_restore_phases\\\"\"
        for (i = 1; i <= NF; i++) if (\$i ~ /ms=[0-9]+\$/) {
          split(\$i, kv, \"=\"); line = line \",\\\"\" kv[1] \"\\\":\" kv[2]
        }
        print line \"}\" }'
      # The same husk pods with their root filesystems through the pod's
      # share too; with the share not relayed (guest memory shared with
      # virtiofsd, so a restore fills the pod's own copy of the
      # template's memory); then with their bind mounts (CRI's hosts,
      # hostname and resolv.conf) copied onto a disk instead of shared (no
      # share at all).
      cp /etc/husk/config.toml /etc/husk/config.toml.default
      echo 'rootfs = \"share\"' >> /etc/husk/config.toml
      echo 'BENCH-CONFIG rootfs=share'
      ./husk-cri bench --handler husk --image husk.local/busybox:1 --runs $runs ||
        { tail -n 30 containerd.log; exit 1; }
      cp /etc/husk/config.toml.default /etc/husk/config.toml
      echo 'share_relay = false' >> /etc/husk/config.toml
      echo 'BENCH-CONFIG share_relay=false'
      ./husk-cri bench --handler husk --image husk.local/busybox:1 --runs $runs ||
        { tail -n 30 containerd.log; exit 1; }
      cp /etc/husk/config.toml.default /etc/husk/config.toml
      echo 'volumes = \"copy\"' >> /etc/husk/config.toml
      echo 'BENCH-CONFIG volumes=copy'
      ./husk-cri bench --handler husk --image husk.local/busybox:1 --runs $runs ||
        { tail -n 30 containerd.log; exit 1; }
      # The default pods booted instead of restored from a template (the
      # rows above: the first husk run made the template).
      cp /etc/husk/config.toml.default /etc/husk/config.toml
      echo 'template = false' >> /etc/husk/config.toml
      echo 'BENCH-CONFIG template=false'
      ./husk-cri bench --handler husk --image husk.local/busybox:1 --runs $runs ||
        { tail -n 30 containerd.log; exit 1; }
      cp /etc/husk/config.toml.default /etc/husk/config.toml
      # A pod the kubelet sized at 2 GiB and 2 CPUs against the default.
      ./husk-cri bench --handler husk --image husk.local/busybox:1 --runs $runs \
        --pod-mib 2048 --pod-cpus 2 || { tail -n 30 containerd.log; exit 1; }"
    ;;
esac
