#!/bin/sh
# Starts Debian's containerd (12's 1.6 or 13's 1.7, whichever the payload
# holds) where the tests and benchmarks run it (in the
# node VM, from a payload directory holding containerd, ctr, husk,
# containerd-shim-husk-v2, vmlinux, agent.cpio and busybox.tar, and
# virtiofsd with virtiofsd-in-node.sh): its state on a tmpfs,
# /etc/husk/config.toml pointing at the payload's husk, kernel, agent and
# virtiofsd (pods of 128 MiB; volumes copied when the payload has no
# virtiofsd), the busybox image imported as
# busybox:latest. Run it from the payload directory with the payload first
# on PATH; containerd's log goes to ./containerd.log.
#
#   sh start-in-node.sh [--cri] [--installed] [LOG_LEVEL]
#
# --installed runs husk as its Debian package installed it (tests/deb.rs):
# ./installed holds the package's files at their installed paths, which are
# copied to /; the shim is then /usr/bin's (the payload has none), the
# package's /etc/husk/config.toml is kept with only this node's lines added
# (small pods, virtiofsd-in-node.sh), and with --cri the husk handler is
# the package's /usr/share/doc/husk/containerd-husk.toml appended to
# containerd's config, as its README.Debian says.
#
# --cri also sets up containerd's CRI plugin as a kubelet's node would have
# it: runtime handlers "husk" (io.containerd.husk.v2) and "runc", the CNI
# plugins in ./cni with a bridge network (cni0, 10.88.0.0/16, host-local
# addresses) and, when ./cni has it, the portmap plugin for host ports
# (with ./iptables, the nft flavour, its extensions in ./xtables, and the
# node's netfilter modules loaded here), and in the CRI's k8s.io namespace the sandbox image
# husk.local/pause:1 from ./pause.tar and busybox as husk.local/busybox:1
# from ./cri-busybox.tar (the CRI looks images up by their full names).
set -u
here=$PWD
cri=""
if [ "${1:-}" = --cri ]; then cri=1; shift; fi
installed=""
if [ "${1:-}" = --installed ]; then installed=1; shift; fi
if [ -n "$installed" ]; then
  cp -a "$here/installed/." /
  export PATH="$PATH:/usr/bin:/usr/sbin"
fi
mkdir -p /etc/husk /etc/containerd /var/lib/containerd /run/containerd
# Pods with a virtio-fs share have shared (memfd) guest memory: huge pages
# for it where husk asks (MADV_HUGEPAGE), as for private memory, which
# this node gives them by default (docs/devices.md).
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [ -w $thp ]; then echo advise > $thp; fi
mount -t tmpfs tmpfs /var/lib/containerd
if [ -n "$installed" ]; then
  printf '\n# This node'"'"'s own:\ndefault_memory_mib = 128\n' >> /etc/husk/config.toml
else
  printf 'kernel = "%s/vmlinux"\ninitrd = "%s/agent.cpio"\nhusk_binary = "%s/husk"\ndefault_memory_mib = 128\n' \
    "$here" "$here" "$here" > /etc/husk/config.toml
fi
if [ -x "$here/virtiofsd" ] && [ -f "$here/virtiofsd-in-node.sh" ]; then
  chmod +x "$here/virtiofsd-in-node.sh"
  printf 'virtiofsd = "%s/virtiofsd-in-node.sh"\n' "$here" >> /etc/husk/config.toml
else
  echo 'volumes = "copy"' >> /etc/husk/config.toml
fi
config=""
if [ -n "$cri" ]; then
  # containerd pins pod network namespaces under /var/run/netns, and
  # copies the node's hosts and resolv.conf into each pod. The hosts file
  # as Debian (and the kubelet, for pods) writes it: localhost is ::1 too,
  # which containerd's port-forward dials when 127.0.0.1 refuses.
  [ -e /var/run ] || { mkdir -p /var && ln -s /run /var/run; }
  [ -e /etc/hosts ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
  [ -e /etc/resolv.conf ] || : > /etc/resolv.conf
  mkdir -p /etc/cni/net.d
  portmap=""
  if [ -x "$here/cni/portmap" ]; then
    # build.sh left them unloaded (lib/modules/netfilter): only here.
    if [ -f /lib/modules/netfilter ]; then
      while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done < /lib/modules/netfilter
    fi
    # iptables-nft finds its match and target extensions here (containerd
    # passes its environment on to the CNI plugins).
    if [ -d "$here/xtables" ]; then export XTABLES_LIBDIR="$here/xtables"; fi
    portmap=',
    {"type": "portmap", "capabilities": {"portMappings": true}}'
  fi
  cat > /etc/cni/net.d/10-husk-test.conflist <<CNI
{
  "cniVersion": "0.4.0",
  "name": "husk-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.88.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }$portmap
  ]
}
CNI
  config=/etc/containerd/config.toml
  cat > $config <<TOML
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "husk.local/pause:1"
  # The node's kernel has AppArmor but no profiles loaded or parser.
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$here/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$here/runc"
        # The node's root is its initramfs, which pivot_root cannot leave.
        NoPivotRoot = true
TOML
  if [ -n "$installed" ]; then
    cat /usr/share/doc/husk/containerd-husk.toml >> $config
  else
    cat >> $config <<'TOML'
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
      runtime_type = "io.containerd.husk.v2"
      pod_annotations = ["io.husk.*"]
TOML
  fi
fi
# Which containerd this is (the payload's: Debian 12's 1.6 or 13's 1.7),
# as "CONTAINERD-VERSION 1.7.24~ds1": the tests check they ran the one
# they asked for.
v=$(containerd --version)
v=${v#* * }
echo "CONTAINERD-VERSION ${v%% *}"
containerd ${config:+--config "$config"} --log-level "${1:-warn}" > containerd.log 2>&1 &
i=0
while [ ! -S /run/containerd/containerd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
import() {
  if ! ctr "$@" > /dev/null; then
    echo "start-in-node.sh: cannot run ctr $*" >&2
    tail -n 30 containerd.log >&2
    exit 1
  fi
}
import image import busybox.tar
if [ -n "$cri" ]; then
  import -n k8s.io image import cri-busybox.tar
  import -n k8s.io image import pause.tar
  # A dynamically linked image (Debian's busybox and its libc), when the
  # payload has one.
  if [ -f cri-busybox-dynamic.tar ]; then
    import -n k8s.io image import cri-busybox-dynamic.tar
  fi
fi
