#!/bin/sh
# Starts Debian's containerd where the tests and benchmarks run it (in the
# node VM, from a payload directory holding containerd, ctr, husk,
# containerd-shim-husk-v2, vmlinux, agent.cpio and busybox.tar): its state
# on a tmpfs, /etc/husk/config.toml pointing at the payload's husk, kernel
# and agent (pods of 128 MiB), the busybox image imported as
# busybox:latest. Run it from the payload directory with the payload first
# on PATH; containerd's log goes to ./containerd.log.
#
#   sh start-in-node.sh [LOG_LEVEL]
set -u
here=$PWD
mkdir -p /etc/husk /var/lib/containerd /run/containerd
mount -t tmpfs tmpfs /var/lib/containerd
printf 'kernel = "%s/vmlinux"\ninitrd = "%s/agent.cpio"\nhusk_binary = "%s/husk"\ndefault_memory_mib = 128\n' \
  "$here" "$here" "$here" > /etc/husk/config.toml
containerd --log-level "${1:-warn}" > containerd.log 2>&1 &
i=0
while [ ! -S /run/containerd/containerd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if ! ctr image import busybox.tar > /dev/null; then
  echo "start-in-node.sh: cannot import busybox.tar" >&2
  tail -n 30 containerd.log >&2
  exit 1
fi
