#!/usr/bin/env bash
# Runs a command where a real KVM is, with a directory of files beside it.
#
#   resources/node/run.sh [--mem MIB] [--cpus N] [--timeout S] [--payload DIR] -- CMD [ARGS...]
#
# On a host whose /dev/kvm is hardware-backed (vmx/svm in /proc/cpuinfo, no
# kvm_pvm module) CMD runs directly, in a copy of DIR. Elsewhere it runs in
# the node VM (see build.sh): DIR becomes /payload inside it (packed as a
# second cpio after the node image, with the shared libraries its ELF files
# need), CMD runs there as root, its output streams to stdout, and run.sh
# exits with CMD's exit status (125 if the node VM itself failed or timed
# out). HUSK_NODE=direct or HUSK_NODE=vm forces either way; HUSK_NODE_IMAGE
# skips the (cached) image lookup; HUSK_NODE_LOGLEVEL shows node kernel logs.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mem=4096 cpus=2 timeout=600 payload=""
while (($#)); do
  case $1 in
    --mem) mem=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --payload) payload=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--mem MIB] [--cpus N] [--timeout S] [--payload DIR] -- CMD [ARGS...]" >&2; exit 2 ;;
  esac
done
(($#)) || { echo "run.sh: no command given" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/husk-run.XXXXXX")
qpid=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  [[ -n $qpid ]] && kill "$qpid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

hardware_kvm() {
  [[ -c /dev/kvm && ! -d /sys/module/kvm_pvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo
}
mode=${HUSK_NODE:-auto}
if [[ $mode == direct || ($mode == auto && $(hardware_kvm && echo y) == y) ]]; then
  mkdir -p "$tmp/payload"
  [[ -n $payload ]] && cp -a "$payload/." "$tmp/payload/"
  cd "$tmp/payload"
  set +e
  timeout "$timeout" "$@"
  exit $?
fi

# HUSK_NODE_IMAGE names an image build.sh already made (callers that run
# many commands resolve it once).
image=${HUSK_NODE_IMAGE:-$("$here/build.sh")}

# The payload archive: DIR under payload/, the command, and the libraries
# of every dynamically linked ELF file in DIR.
stage="$tmp/stage"
mkdir -p "$stage/payload"
if [[ -n $payload ]]; then
  cp -al "$payload/." "$stage/payload/" 2>/dev/null || cp -a "$payload/." "$stage/payload/"
fi
{
  printf 'exec'
  for arg in "$@"; do
    printf " '%s'" "${arg//\'/\'\\\'\'}"
  done
  printf '\n'
} > "$stage/payload/.husk-node-cmd"
while IFS= read -r -d '' f; do
  if head -c4 "$f" 2>/dev/null | grep -q 'ELF'; then
    # Static binaries and kernels make ldd fail: nothing to add for them.
    { ldd "$f" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
      [[ -e $lib ]] || continue
      mkdir -p "$stage$(dirname "$lib")"
      cp -Ln "$lib" "$stage$lib" 2>/dev/null || true
    done
  fi
done < <(find "$stage/payload" -type f -perm -u+x -print0)
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --quiet) > "$tmp/payload.cpio"
cat "$image/node.cpio" "$tmp/payload.cpio" > "$tmp/initrd.cpio"
rm -rf "$stage" "$tmp/payload.cpio"

: > "$tmp/console" # exists before tail opens it, whenever qemu starts
# timeout(1) rather than a watchdog shell: nothing may outlive this script
# holding its stdout open.
timeout --kill-after=5 "$timeout" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem" \
  -nodefaults -no-reboot -display none -serial stdio \
  -kernel "$image/vmlinuz" -initrd "$tmp/initrd.cpio" \
  -append "console=ttyS0 panic=-1 quiet loglevel=${HUSK_NODE_LOGLEVEL:-1}" \
  < /dev/null > "$tmp/console" 2>&1 &
qpid=$!

# Show the payload's output (what comes after the start marker) live, and
# keep the exit status line for ourselves.
tail -n +1 -f --pid="$qpid" "$tmp/console" | tr -d '\r' | awk -v status_file="$tmp/status" '
  /^HUSK-NODE-START$/ { started = 1; next }
  /^HUSK-NODE-EXIT [0-9]+$/ { print $2 > status_file; close(status_file); started = 0; next }
  started { print; fflush() }
'
qrc=0
wait "$qpid" 2>/dev/null || qrc=$?
qpid=""

if [[ -s $tmp/status ]]; then
  exit "$(cat "$tmp/status")"
fi
if ((qrc == 124)); then
  echo "run.sh: the node VM timed out after $timeout s; its console:" >&2
else
  echo "run.sh: the node VM ended without reporting an exit status (qemu: $qrc); its console:" >&2
fi
tr -d '\r' < "$tmp/console" | tail -n 40 >&2
exit 125
