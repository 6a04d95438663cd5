# shellcheck shell=bash
# Shared by the top-level scripts: set-up steps every entry point needs.
# Sourced, not run.

log() { echo "husk: $* (+${SECONDS}s)" >&2; }

# Installs whichever of the given Debian packages are missing.
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}

# Debian packages the build and the tests need.
husk_install_packages() {
  # protobuf-compiler: the CRI client's gRPC code (k8s-cri) is generated at build
  # time; containerd, runc and the CNI plugins are the peers of the shim tests;
  # openssl makes the registry tests' CA, certificates and token signatures.
  ensure_packages build-essential pkg-config cpio busybox-static qemu-system-x86 kmod e2fsprogs curl umoci \
    containerd runc containernetworking-plugins protobuf-compiler shellcheck \
    skopeo apache2-utils iptables openssl
  if ! command -v cargo >/dev/null; then
    log "cargo is missing: these machines carry a Rust toolchain through rustup (~/.cargo/bin)"
    return 1
  fi
}

# Guest kernel and node image (both cached outside the repo); exports their
# locations for the tools and tests.
husk_build_images() {
  local repo=$1
  husk_dynamic_busybox
  husk_containerd17
  husk_promtool
  husk_docker_registry
  HUSK_KERNEL_DIR=$("$repo/guest-kernel-config/build.sh")
  export HUSK_KERNEL_DIR
  if [[ ${HUSK_NODE:-auto} != direct ]]; then
    HUSK_NODE_IMAGE=$("$repo/resources/node/build.sh")
    export HUSK_NODE_IMAGE
    husk_node_qemu
  fi
}

# Debian's dynamically linked busybox (the package conflicts with
# busybox-static, so it is unpacked, not installed) under
# /var/cache/husk/debian-busybox: the CRI tests build an image from it
# whose programs need the image's own dynamic loader and libc. Exports
# HUSK_DYNAMIC_BUSYBOX.
husk_dynamic_busybox() {
  local dir=${HUSK_CACHE_DIR:-/var/cache/husk}/debian-busybox tmp
  if [[ ! -x $dir/bin/busybox ]]; then
    tmp=$(mktemp -d)
    # apt downloads as its own user (_apt) where one exists.
    chown _apt "$tmp" 2>/dev/null || true
    if ! (cd "$tmp" && apt-get download -q busybox >&2); then
      apt-get update -q >&2
      (cd "$tmp" && apt-get download -q busybox >&2)
    fi
    rm -rf "$dir.new"
    mkdir -p "$dir.new"
    dpkg-deb -x "$tmp"/busybox_*.deb "$dir.new"
    rm -rf "$tmp" "$dir"
    mv "$dir.new" "$dir"
  fi
  HUSK_DYNAMIC_BUSYBOX=$dir/bin/busybox
  export HUSK_DYNAMIC_BUSYBOX
}

# A private apt index of one Debian suite (deb.debian.org, main) in DIR,
# updated: the host's sources, lists and cache stay as they are. Sets
# HUSK_APT_OPTS to the -o options that make apt-get and apt-cache use it.
husk_apt_index() {
  local suite=$1 tmp=$2
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/parts"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    > "$tmp/sources.list"
  # apt downloads as its own user (_apt) where one exists.
  chown -R _apt "$tmp" 2>/dev/null || true
  HUSK_APT_OPTS=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o "Dir::Etc::sourceparts=$tmp/parts"
    -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache"
    -o Acquire::Languages=none -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false)
  apt-get -q "${HUSK_APT_OPTS[@]}" update >&2
}

# Debian packages from a suite this host's apt does not follow, fetched
# through a sources list, index and download cache of their own (in a
# temporary directory: the host's apt configuration, lists and installed
# packages are left as they are) and unpacked with dpkg-deb -x into a
# directory that appears whole or not at all.
#   husk_fetch_debs SUITE DIR PACKAGE[=VERSION]...
# DIR/.husk-debs lists each package unpacked, with its version.
husk_fetch_debs() {
  local suite=$1 dest=$2 tmp deb
  shift 2
  tmp=$(mktemp -d)
  if ! husk_apt_index "$suite" "$tmp"; then
    rm -rf "$tmp"
    log "cannot read $suite's package index from deb.debian.org"
    return 1
  fi
  mkdir -p "$tmp/deb"
  chown _apt "$tmp/deb" 2>/dev/null || true
  if ! (cd "$tmp/deb" && apt-get -q "${HUSK_APT_OPTS[@]}" download "$@" >&2); then
    rm -rf "$tmp"
    log "$suite has no $*"
    return 1
  fi
  rm -rf "$dest.new"
  mkdir -p "$dest.new"
  for deb in "$tmp"/deb/*.deb; do
    dpkg-deb -x "$deb" "$dest.new"
    # shellcheck disable=SC2016 # dpkg-deb's own ${...} fields
    dpkg-deb --show --showformat='${Package} ${Version}\n' "$deb" >> "$dest.new/.husk-debs"
  done
  rm -rf "$tmp" "$dest"
  mv "$dest.new" "$dest"
}

# Debian 13 (trixie)'s containerd 1.7, for the tests that run the shim and
# the CRI scenario under it as well as under the host's containerd 1.6,
# fetched with husk_fetch_debs into
# ${HUSK_CACHE_DIR:-/var/cache/husk}/containerd-1.7/<version>, and that
# directory (usr/bin/containerd, ctr, containerd-shim-runc-v2) exported as
# HUSK_CONTAINERD17_DIR. The version is pinned (HUSK_CONTAINERD17_VERSION
# changes it) so that a second run costs nothing; when trixie no longer
# has it (a point release replaced it), the current one is taken, with a
# warning to update the pin.
husk_containerd17() {
  local version=${HUSK_CONTAINERD17_VERSION:-1.7.24~ds1-6+deb13u1}
  local base=${HUSK_CACHE_DIR:-/var/cache/husk}/containerd-1.7
  local dir=$base/$version got
  if [[ ! -x $dir/usr/bin/containerd ]]; then
    log "fetching Debian trixie's containerd $version"
    if ! husk_fetch_debs trixie "$dir" "containerd=$version"; then
      log "taking trixie's current containerd (update HUSK_CONTAINERD17_VERSION's default in resources/lib.sh)"
      husk_fetch_debs trixie "$base/current" containerd || return 1
      got=$(awk '$1 == "containerd" {print $2}' "$base/current/.husk-debs")
      dir=$base/$got
      rm -rf "$dir"
      mv "$base/current" "$dir"
    fi
  fi
  HUSK_CONTAINERD17_DIR=$dir
  export HUSK_CONTAINERD17_DIR
}

# The node VM's QEMU: Debian 12's backports build of QEMU 10.0 (Debian
# 12 itself has 7.2), chosen by measurement (docs/testing.md, "The node
# VM's QEMU"). Fetched with husk_fetch_debs into
# ${HUSK_CACHE_DIR:-/var/cache/husk}/qemu/<version>, not installed: its
# libraries are Debian 12's, the ones qemu-system-x86 7.2 (installed by
# husk_install_packages, with SeaBIOS) brought. Exports HUSK_NODE_QEMU, a
# script that runs it with its own firmware and modules, which
# resources/node/run.sh starts (qemu-system-x86_64 when it is unset).
# HUSK_NODE_QEMU_VERSION changes the version; "system" keeps Debian 12's.
husk_node_qemu() {
  local version=${HUSK_NODE_QEMU_VERSION:-1:10.0.2+ds-2+deb13u1~bpo12+1} dir missing
  if [[ $version == system ]]; then
    HUSK_NODE_QEMU=qemu-system-x86_64
    export HUSK_NODE_QEMU
    return 0
  fi
  dir=${HUSK_CACHE_DIR:-/var/cache/husk}/qemu/${version#*:}
  if [[ ! -x $dir/qemu ]]; then
    log "fetching QEMU $version from Debian 12's backports"
    husk_fetch_debs bookworm-backports "$dir.fetch" "qemu-system-x86=$version" \
      "qemu-system-common=$version" "qemu-system-data=$version" || return 1
    missing=$(ldd "$dir.fetch/usr/bin/qemu-system-x86_64" | grep "not found" || true)
    if [[ -n $missing ]]; then
      rm -rf "$dir.fetch"
      log "QEMU $version needs libraries this host lacks: $missing"
      return 1
    fi
    cat > "$dir.fetch/qemu" <<WRAPPER
#!/bin/sh
# QEMU $version unpacked here: its own firmware first, then SeaBIOS's.
QEMU_MODULE_DIR=$dir/usr/lib/x86_64-linux-gnu/qemu exec $dir/usr/bin/qemu-system-x86_64 \\
  -L $dir/usr/share/qemu -L /usr/share/seabios "\$@"
WRAPPER
    chmod +x "$dir.fetch/qemu"
    rm -rf "$dir"
    mv "$dir.fetch" "$dir"
  fi
  HUSK_NODE_QEMU=$dir/qemu
  export HUSK_NODE_QEMU
}

# Prometheus' promtool from Debian's prometheus package, unpacked (not
# installed: the package would bring a Prometheus server, its service
# and its web assets) under /var/cache/husk/prometheus: the metrics test
# checks what `husk metrics` serves with `promtool check metrics`.
# Exports HUSK_PROMTOOL.
husk_promtool() {
  local dir=${HUSK_CACHE_DIR:-/var/cache/husk}/prometheus tmp
  if [[ ! -x $dir/usr/bin/promtool ]]; then
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true
    if ! (cd "$tmp" && apt-get download -q prometheus >&2); then
      apt-get update -q >&2
      (cd "$tmp" && apt-get download -q prometheus >&2)
    fi
    rm -rf "$dir.new"
    mkdir -p "$dir.new/usr/bin"
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$dir.new" ./usr/bin/promtool
    rm -rf "$tmp" "$dir"
    mv "$dir.new" "$dir"
  fi
  HUSK_PROMTOOL=$dir/usr/bin/promtool
  export HUSK_PROMTOOL
}

# Debian's docker-registry (the CNCF distribution registry, 2.8), unpacked
# (not installed: the package adds a user and an init script that would
# start a registry on port 5000) under /var/cache/husk/docker-registry:
# tests/registry.rs runs it on 127.0.0.1 with a configuration of its own,
# fills it with `skopeo copy` and pulls from it. Exports
# HUSK_DOCKER_REGISTRY.
husk_docker_registry() {
  local dir=${HUSK_CACHE_DIR:-/var/cache/husk}/docker-registry tmp
  if [[ ! -x $dir/usr/bin/docker-registry ]]; then
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true
    if ! (cd "$tmp" && apt-get download -q docker-registry >&2); then
      apt-get update -q >&2
      (cd "$tmp" && apt-get download -q docker-registry >&2)
    fi
    rm -rf "$dir.new"
    mkdir -p "$dir.new/usr/bin"
    dpkg-deb --fsys-tarfile "$tmp"/docker-registry_*.deb | tar -x -C "$dir.new" ./usr/bin/docker-registry
    rm -rf "$tmp" "$dir"
    mv "$dir.new" "$dir"
  fi
  HUSK_DOCKER_REGISTRY=$dir/usr/bin/docker-registry
  export HUSK_DOCKER_REGISTRY
}

# `cargo install --locked` of crate $1 at version $2 into
# ${HUSK_CACHE_DIR:-/var/cache/husk}/$1/$2 (its binaries in bin/), once:
# built beside it and renamed into place, so a failed build leaves nothing.
# $3 says how long it takes, for the log.
husk_cargo_install() {
  local crate=$1 version=$2 takes=$3
  local dir=${HUSK_CACHE_DIR:-/var/cache/husk}/$crate/$version
  [[ -x $dir/bin/$crate ]] && return 0
  log "building $crate $version (cargo install, $takes, once)"
  rm -rf "$dir.new"
  if ! cargo install --locked --quiet -j"$(nproc)" --root "$dir.new" "$crate@$version" >&2; then
    rm -rf "$dir.new"
    log "cannot build $crate $version"
    return 1
  fi
  rm -rf "$dir"
  mv "$dir.new" "$dir"
}

# virtiofsd, the virtio-fs project's vhost-user file server (the backend of
# husk's virtio-fs device), built with `cargo install --locked` at a pinned
# version into ${HUSK_CACHE_DIR:-/var/cache/husk}/virtiofsd/<version> and
# exported as HUSK_VIRTIOFSD. Debian 12 has no virtiofsd package, and
# Debian 13's is linked against glibc 2.41, which Debian 12 (2.36) and the
# node VM (the host's libraries) cannot load; built here it links against
# this host's libseccomp and libcap-ng, which the node's payloads carry.
husk_virtiofsd() {
  local version=${HUSK_VIRTIOFSD_VERSION:-1.14.0}
  ensure_packages libseccomp-dev libcap-ng-dev
  husk_cargo_install virtiofsd "$version" "a few minutes" || return 1
  local dir=${HUSK_CACHE_DIR:-/var/cache/husk}/virtiofsd/$version
  HUSK_VIRTIOFSD=$dir/bin/virtiofsd
  export HUSK_VIRTIOFSD
}

# cargo-deb, which makes husk's Debian package (resources/deb.sh), built
# with `cargo install --locked` at a pinned version into
# ${HUSK_CACHE_DIR:-/var/cache/husk}/cargo-deb/<version> and exported as
# HUSK_CARGO_DEB (run it as `"$HUSK_CARGO_DEB" deb ...`). About a minute
# and a half, once.
husk_cargo_deb() {
  local version=${HUSK_CARGO_DEB_VERSION:-3.8.0}
  husk_cargo_install cargo-deb "$version" "about a minute and a half" || return 1
  local dir=${HUSK_CACHE_DIR:-/var/cache/husk}/cargo-deb/$version
  HUSK_CARGO_DEB=$dir/bin/cargo-deb
  export HUSK_CARGO_DEB
}

# A pristine Debian 12 (bookworm) root file system, as `debootstrap
# --variant=minbase` makes it, with apt's package lists, for the test that
# installs husk's package with apt (tests/deb.rs): a tarball cached under
# ${HUSK_CACHE_DIR:-/var/cache/husk}/debian-chroot/, keyed by the suite,
# debootstrap's version and the ISO week (so its lists are at most a week
# old; the test refreshes them anyway). About a minute and a half to make.
# Exports HUSK_DEBIAN_CHROOT, the tarball.
husk_debian_chroot() {
  local suite=bookworm dir key tarball tmp
  ensure_packages debootstrap
  dir=${HUSK_CACHE_DIR:-/var/cache/husk}/debian-chroot
  key=$suite-$(dpkg-query -W -f='${Version}' debootstrap)-$(date -u +%G-W%V)
  tarball=$dir/$key.tar
  if [[ ! -s $tarball ]]; then
    log "making a pristine Debian $suite root file system (debootstrap, once a week)"
    mkdir -p "$dir"
    tmp=$(mktemp -d "$dir/new.XXXXXX")
    if ! debootstrap --variant=minbase "$suite" "$tmp/root" http://deb.debian.org/debian >&2 ||
      ! cp /etc/resolv.conf "$tmp/root/etc/resolv.conf" ||
      ! chroot "$tmp/root" apt-get update -q >&2; then
      rm -rf "$tmp"
      log "debootstrap of $suite failed"
      return 1
    fi
    tar -C "$tmp/root" -cf "$tmp/root.tar" .
    rm -f "$dir"/*.tar
    mv "$tmp/root.tar" "$tarball"
    rm -rf "$tmp"
  fi
  HUSK_DEBIAN_CHROOT=$tarball
  export HUSK_DEBIAN_CHROOT
}

# Every shell script of the project through shellcheck: the entry points
# and helpers (bash), and the inits that run in guests and in the node VM
# (each names its dialect in a directive).
husk_shellcheck() {
  local repo=$1
  (cd "$repo" && shellcheck -x resources/*.sh resources/*/*.sh guest-kernel-config/build.sh .ci/run \
    resources/guest/test-init resources/guest/demo-init resources/node/init \
    resources/deb/maintainer-scripts/postrm)
}

# The test command's closing lines, from cargo test's output ($1) and the
# node VM's failures run.sh recorded ($2, see its HUSK_NODE_RETRIES): each
# failure of the node (which test, the cause, the evidence), then
#   tests: N passed, M failed, I ignored; node VM booted again K times (soft lockup: a, panic: b, silent stop: c)
# K counts run.sh's second boots; a node that failed on its second boot
# too is counted after it ("gave up"), and its test then failed unless it
# ran the command once more itself. A test binary that ended without its
# result line (it crashed) counts as one failed test.
husk_test_summary() {
  local results=$1 failures=$2
  if [[ -s $failures ]]; then
    awk -F'\t' '{
      what = ($4 == "gave up") ? "failed on its second boot too, run.sh gave up" : "booted again"
      printf "node VM %s (%s) in %s: %s\n", what, $2, $1, $3
    }' "$failures"
  fi
  # The counts of each test binary are on the last "test result:" line of
  # its part of the output: one before it may be a second run's, shown in
  # a failing test's output.
  awk '
    function close_section() {
      if (!open) return
      if (result == "") { f += 1; printf "test binary ended without a result: %s\n", section }
      else {
        n = split(result, w, " ")
        for (i = 2; i <= n; i++) {
          if (w[i] ~ /^passed;?$/) p += w[i - 1]
          if (w[i] ~ /^failed;?$/) f += w[i - 1]
          if (w[i] ~ /^ignored;?$/) ig += w[i - 1]
        }
      }
      open = 0; result = ""
    }
    /^ *(Running|Doc-tests) / { close_section(); open = 1; section = $0; sub(/^ +/, "", section); next }
    open && /^test result:/ { result = $0 }
    END {
      close_section()
      printf "tests: %d passed, %d failed, %d ignored", p, f, ig
    }' "$results"
  awk -F'\t' '
    $4 == "gave up" { gave_up++; next }
    { again++; by[$2]++ }
    END {
      printf "; node VM booted again %d time%s (soft lockup: %d, panic: %d, silent stop: %d)", \
        again, again == 1 ? "" : "s", by["soft lockup"], by["panic"], by["silent stop"]
      if (gave_up) printf ", failed on its second boot too %d time%s", gave_up, gave_up == 1 ? "" : "s"
    }' "${failures:-/dev/null}"
  # husk's timers count and log a virtio queue whose notification was
  # lost (tests/support prints each such warning it sees).
  awk '/^husk-tests: .*: lost queue notification: / { n++ }
    END { printf "; queue notifications lost (found by husk'"'"'s timer): %d\n", n }' "$results"
}
