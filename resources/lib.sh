# shellcheck shell=bash
# Shared by the top-level scripts: set-up steps every entry point needs.
# Sourced, not run.

log() { echo "husk: $*" >&2; }

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
  # time; containerd, runc and the CNI plugins are the peers of the shim tests.
  ensure_packages build-essential pkg-config cpio busybox-static qemu-system-x86 kmod e2fsprogs curl umoci \
    containerd runc containernetworking-plugins protobuf-compiler shellcheck
  if ! command -v cargo >/dev/null; then
    log "cargo is missing: these machines carry a Rust toolchain through rustup (~/.cargo/bin)"
    return 1
  fi
}

# Guest kernel and node image (both cached outside the repo); exports their
# locations for the tools and tests.
husk_build_images() {
  local repo=$1
  HUSK_KERNEL_DIR=$("$repo/guest-kernel-config/build.sh")
  export HUSK_KERNEL_DIR
  if [[ ${HUSK_NODE:-auto} != direct ]]; then
    HUSK_NODE_IMAGE=$("$repo/resources/node/build.sh")
    export HUSK_NODE_IMAGE
  fi
}

# Every shell script of the project through shellcheck: the entry points
# and helpers (bash), and the inits that run in guests and in the node VM
# (each names its dialect in a directive).
husk_shellcheck() {
  local repo=$1
  (cd "$repo" && shellcheck -x resources/*.sh resources/*/*.sh guest-kernel-config/build.sh .ci/run \
    resources/guest/test-init resources/guest/demo-init resources/node/init)
}
