#!/bin/sh
# virtiofsd as the shim starts it in the node VM (the shim's `virtiofsd`
# setting names this script; the real virtiofsd is beside it). The node's
# root is its initramfs, which virtiofsd's namespace sandbox cannot
# pivot_root away from, so virtiofsd runs chrooted into a bind of the root
# in a mount namespace of its own. The namespace is a slave of the node's:
# the volumes the shim binds into a pod's share after virtiofsd started
# reach it, as they reach virtiofsd's own namespace on a real node.
# shellcheck disable=SC2016 # $0 and $@ are the inner shell's
exec unshare -m --propagation slave sh -c \
  'mkdir -p /tmp/virtiofsd-root && mount --rbind / /tmp/virtiofsd-root &&
   exec chroot /tmp/virtiofsd-root "$0" "$@"' \
  "$(dirname "$(readlink -f "$0")")/virtiofsd" "$@"
