#!/usr/bin/env bash
# Builds the bundled default image: an OCI layout made from Debian's
# busybox-static by husk's own writer (one reproducible gzip layer with
# /bin/busybox, its applet symlinks, /etc/passwd and /etc/group; Cmd ["sh"]),
# ref name busybox:latest. Cached under ${HUSK_CACHE_DIR:-/var/cache/husk}/
# images/busybox-<package version>/; prints the layout's path.
#
#   resources/images/busybox.sh [OUT_DIR]   also copy the layout to OUT_DIR
#                                           (and print OUT_DIR)
#
# HUSK_BIN names the husk binary to use; otherwise it is built (debug).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

if (($# > 1)); then
  echo "usage: $0 [OUT_DIR]" >&2
  exit 2
fi
ensure_packages busybox-static
husk=${HUSK_BIN:-}
if [[ -z $husk ]]; then
  (cd "$repo" && cargo build --locked -j"$(nproc)" -p husk --bin husk >&2)
  husk=$repo/target/debug/husk
fi
layout=$("$husk" image build-busybox --busybox /bin/busybox)
if (($# == 1)); then
  mkdir -p "$1"
  cp -a "$layout/." "$1/"
  echo "$1"
else
  echo "$layout"
fi
