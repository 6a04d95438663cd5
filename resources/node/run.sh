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
# out; its console's tail then goes to stderr). If the node's own kernel
# reports a soft lockup before CMD finished, stops altogether (its init
# writes a heartbeat to the second serial port every 5 s, from its first
# lines on; 60 s without one means the node's kernel no longer runs user
# space, seen now and then with nested guests under QEMU's emulated SVM,
# with nothing on the console; so does no first beat within 60 s of QEMU's
# start, HUSK_NODE_START_TIMEOUT seconds, where a boot takes about 3 s: a
# node stuck in its own boot, seen once in CI), or
# panics (seen there too: a husk vCPU thread overflowing its kernel stack in
# the node's exception entry; an oops is made a panic, oops=panic, since a
# node that oopsed may go on with its user space stuck and its heartbeat
# beating, seen with QEMU 7.2), that boot ends at once and the node VM boots
# again, once (CMD runs again from its start: stdout then has a line
# "run.sh: HUSK-NODE-BOOTED-AGAIN" between the first boot's output and the
# second's; the second boot's kernel command line has husk_node.boot=2). Each such failure is said on
# stderr and, when HUSK_NODE_RETRIES names a file (resources/test.sh sets
# it), appended to it as one line, tab-separated: HUSK_NODE_LABEL (the
# test's name; else the command), the cause (soft lockup, panic, silent
# stop), the evidence, and what followed ("booted again", or "gave up"
# after a second failure; "left to the caller" when HUSK_NODE_BOOT_AGAIN=0
# asked for no second boot, as the soak does, which boots again itself
# with what is left to run). Defaults: 2
# vCPUs, 4096 MiB, 600 s. HUSK_NODE=direct or HUSK_NODE=vm forces either
# way; HUSK_NODE_IMAGE names an image build.sh made (skips even its cache
# lookup); HUSK_NODE_LOGLEVEL=N shows the node's whole console, kernel
# messages up to that level included; HUSK_NODE_CPU replaces QEMU's -cpu
# model (max); HUSK_NODE_TCG_THREAD=single runs every vCPU of the node on
# one host thread (QEMU's thread=single; default multi, one thread per
# vCPU: a measurement knob, docs/testing.md); HUSK_NODE_SHELL=PATH puts a root shell of the node on a unix
# socket at PATH while CMD runs (socat -,raw,echo=0 UNIX-CONNECT:PATH),
# for looking at a stuck test from inside; HUSK_NODE_APPEND adds to the
# node kernel's command line, on every boot; HUSK_NODE_CPUS is the node's
# vCPU count where --cpus does not say (2; a measurement knob).
#
# A command still running 30 s before the timeout gets the node's own
# diagnosis first: every process and its wait channel, every husk thread's
# kernel stack, then SIGTERM to husk (whose vCPUs then log their guest's
# instruction pointer), all on the console.
#
# The node VM: qemu-system-x86_64 -accel tcg -cpu max (emulated AMD SVM),
# no network, console on ttyS0 streamed live with the \r dropped. CMD and its
# arguments reach the node's init shell-quoted in /payload/.husk-node-cmd;
# init prints HUSK-NODE-START before and HUSK-NODE-EXIT <status> after it.
set -euo pipefail

usage() {
  echo "usage: $0 [--mem MIB] [--cpus N] [--timeout SECONDS] [--payload DIR] -- CMD [ARGS...]" >&2
  exit 2
}
here=$(cd "$(dirname "$0")" && pwd)
AGAIN_MARKER="run.sh: HUSK-NODE-BOOTED-AGAIN"
mem=4096 cpus=${HUSK_NODE_CPUS:-2} timeout=600 payload=""
start_timeout=${HUSK_NODE_START_TIMEOUT:-60}
while (($#)); do
  case $1 in
    --mem|--cpus|--timeout|--payload) (($# >= 2)) || usage ;;&
    --mem) mem=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --payload) payload=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
(($#)) || { echo "run.sh: no command given" >&2; usage; }
command_line="$*"
for n in "$mem" "$cpus" "$timeout"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: not a positive number: $n" >&2; exit 2; }
done
if [[ -n $payload && ! -d $payload ]]; then
  echo "run.sh: payload $payload is not a directory" >&2
  exit 2
fi

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
case $mode in
  auto|vm|direct) ;;
  *) echo "run.sh: HUSK_NODE must be auto, vm or direct, not $mode" >&2; exit 2 ;;
esac
if [[ $mode == direct || ($mode == auto && $(hardware_kvm && echo y) == y) ]]; then
  mkdir -p "$tmp/payload"
  [[ -n $payload ]] && cp -a "$payload/." "$tmp/payload/"
  cd "$tmp/payload"
  rc=0 SECONDS=0
  timeout --kill-after=5 "$timeout" "$@" || rc=$?
  if ((rc == 124 || rc == 137)) && ((SECONDS >= timeout)); then
    echo "run.sh: the command timed out after $timeout s" >&2
    exit 125
  fi
  exit "$rc"
fi

# HUSK_NODE_IMAGE names an image build.sh already made (callers that run
# many commands resolve it once).
image=${HUSK_NODE_IMAGE:-$("$here/build.sh")}
# HUSK_NODE_QEMU names the QEMU to run (resources/lib.sh's husk_node_qemu
# fetches the one the project measured best).
if [[ -z ${HUSK_NODE_QEMU:-} ]]; then
  # shellcheck source=resources/lib.sh
  source "$here/../lib.sh"
  husk_node_qemu
fi

# The payload archive: DIR under payload/, the command, and the libraries
# of every dynamically linked ELF file in DIR.
stage="$tmp/stage"
mkdir -p "$stage/payload"
if [[ -n $payload ]]; then
  # Hard links where possible (big kernels and binaries): no copying.
  if ! cp -al "$payload/." "$stage/payload/" 2>/dev/null; then
    rm -rf "$stage/payload" && mkdir "$stage/payload"
    cp -a "$payload/." "$stage/payload/"
  fi
fi
rm -f "$stage/payload/.husk-node-cmd" # may be a hard link into DIR
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
    { ldd "$f" 2>/dev/null || true; } | while read -r line; do
      case $line in
        *"=> not found"*) echo "run.sh: warning: ${f#"$stage"/} needs ${line%% *}, which this host lacks" >&2; continue ;;
      esac
      lib=$(grep -o '/[^ ]*' <<< "$line") || continue
      [[ -e $lib ]] || continue
      mkdir -p "$stage$(dirname "$lib")"
      cp -Ln "$lib" "$stage$lib" 2>/dev/null || true
    done
  fi
done < <(find "$stage/payload" -type f -perm -u+x -print0)
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --quiet) > "$tmp/payload.cpio"
cat "$image/node.cpio" "$tmp/payload.cpio" > "$tmp/initrd.cpio"
rm -rf "$stage" "$tmp/payload.cpio"

# Boot $1 (1 or 2) of the node VM running the command; sets qrc. A soft
# lockup of the node's own kernel (its watchdog reports it; seen now and
# then under QEMU's multi-threaded emulation, with both CPUs stuck in kernel
# code before the payload did anything of note) ends the boot at once and
# leaves $tmp/lockup behind.
boot_node() {
  rm -f "$tmp/status" "$tmp/lockup"
  : > "$tmp/console" # exists before tail opens it, whenever qemu starts
  rm -f "$tmp/heartbeat" "$tmp/hung"
  # ttyS1: the heartbeat; ttyS2: the optional shell.
  local extra=(-chardev "file,id=beat,path=$tmp/heartbeat" -serial chardev:beat) append=" husk_node.boot=$1"
  if ((timeout > 60)); then append+=" husk_node.deadline=$((timeout - 30))"; fi
  if [[ -n ${HUSK_NODE_KVM_AMD:-} ]]; then append+=" husk_node.kvm_amd=$HUSK_NODE_KVM_AMD"; fi
  if [[ -n ${HUSK_NODE_SHELL:-} ]]; then
    extra+=(-chardev "socket,id=shell,path=$HUSK_NODE_SHELL,server=on,wait=off" -serial chardev:shell)
    append+=" husk_node.shell=1"
  fi
  # Last: what follows a "--" in it is init's (arguments, not parameters).
  if [[ -n ${HUSK_NODE_APPEND:-} ]]; then append+=" $HUSK_NODE_APPEND"; fi
  # timeout(1) rather than a watchdog shell: nothing may outlive this script
  # holding its stdout open.
  timeout --kill-after=5 "$timeout" "$HUSK_NODE_QEMU" \
    -accel "tcg,thread=${HUSK_NODE_TCG_THREAD:-multi}" -cpu "${HUSK_NODE_CPU:-max}" -smp "$cpus" -m "$mem" \
    -nodefaults -no-reboot -display none -serial stdio \
    "${extra[@]}" -kernel "$image/vmlinuz" -initrd "$tmp/initrd.cpio" \
    -append "console=ttyS0 panic=-1 oops=panic quiet loglevel=${HUSK_NODE_LOGLEVEL:-1}$append" \
    < /dev/null > "$tmp/console" 2>&1 &
  qpid=$!
  # The heartbeat's watcher: 60 s without a beat, or no first one in the
  # start timeout, ends the boot (the node's kernel is stuck, or never got
  # to its init; nothing else would notice before the timeout).
  (
    last=0 quiet=0
    while kill -0 "$qpid" 2>/dev/null; do
      sleep 5
      size=$(stat -c %s "$tmp/heartbeat" 2>/dev/null || echo 0)
      if ((size > last)); then last=$size quiet=0; else quiet=$((quiet + 5)); fi
      if ((last > 0 && quiet >= 60)); then
        echo "no heartbeat for $quiet s" > "$tmp/hung"
      elif ((last == 0 && quiet >= start_timeout)); then
        echo "no heartbeat in the $quiet s since it started" > "$tmp/hung"
      else
        continue
      fi
      kill "$qpid" 2>/dev/null
      break
    done
  ) > /dev/null 2>&1 &
  local watcher=$!

  # Show the payload's output (what comes after the start marker) live, and
  # keep the exit status line for ourselves.
  # (The status line may follow output that did not end in a newline.) Nothing
  # in this pipeline may buffer: no tr for the \r, and mawk (Debian's awk)
  # needs -W interactive to pass lines on as they come.
  local awk_opts=()
  if awk -W version 2>&1 | grep -q mawk; then awk_opts=(-W interactive); fi
  tail -s 0.2 -n +1 -f --pid="$qpid" "$tmp/console" |
    awk "${awk_opts[@]}" -v status_file="$tmp/status" -v lockup_file="$tmp/lockup" \
      -v qpid="$qpid" -v started="${HUSK_NODE_LOGLEVEL:+1}" '
    { gsub(/\r/, "") }
    # Not anchored: the kernel prints its report wherever the console is,
    # after a payload line that did not end in a newline too.
    /\[ *[0-9]+\.[0-9]+\] watchdog: BUG: soft lockup/ && !locked {
      locked = 1
      print $0 > lockup_file; close(lockup_file)
      system("kill " qpid " 2>/dev/null")
    }
    /^HUSK-NODE-START$/ { started = 1; next }
    started && /HUSK-NODE-EXIT [0-9]+$/ {
      i = index($0, "HUSK-NODE-EXIT ")
      if (i > 1) print substr($0, 1, i - 1)
      print substr($0, i + 15) > status_file; close(status_file); started = 0; fflush(); next
    }
    started { print; fflush() }
  '
  qrc=0
  wait "$qpid" 2>/dev/null || qrc=$?
  qpid=""
  kill "$watcher" 2>/dev/null || true
  wait "$watcher" 2>/dev/null || true
}

# Why a boot ended without the command's status, when the node's own kernel
# is to blame (then one more boot is worth it): a soft lockup, a stop, or a
# panic (QEMU exits at once: -no-reboot; a panic of a nested guest's kernel
# would not end the node, so the status would be there). Sets cause (as
# counted in the test command's summary) and why (with the evidence).
node_failure() {
  cause="" why=""
  [[ -s $tmp/status ]] && return 1
  local panic
  if [[ -s $tmp/lockup ]]; then
    cause="soft lockup" why="the node VM's kernel locked up ($(cat "$tmp/lockup"))"
  elif [[ -s $tmp/hung ]]; then
    cause="silent stop" why="the node VM's kernel stopped ($(cat "$tmp/hung"))"
  elif ((qrc != 124)) &&
    panic=$(tail -n 100 "$tmp/console" | tr -d '\r' | grep -m1 -o "Kernel panic - not syncing.*"); then
    cause="panic" why="the node VM's kernel panicked ($panic)"
  else
    return 1
  fi
}

# Appends the failure node_failure found to $HUSK_NODE_RETRIES, if set:
# label, cause, evidence, and $1 (what follows).
record_failure() {
  [[ -n ${HUSK_NODE_RETRIES:-} ]] || return 0
  local label=${HUSK_NODE_LABEL:-${command_line:0:200}} evidence=$why
  label=${label//[$'\t\n']/ } evidence=${evidence//[$'\t\n']/ }
  printf '%s\t%s\t%s\t%s\n' "$label" "$cause" "$evidence" "$1" >> "$HUSK_NODE_RETRIES"
}

boot_node 1
if [[ ${HUSK_NODE_BOOT_AGAIN:-1} == 0 ]] && node_failure; then
  # The caller boots again itself, knowing what is left to run.
  record_failure "left to the caller"
  echo "run.sh: $why; not booting it again (HUSK_NODE_BOOT_AGAIN=0); its console:" >&2
  tr -d '\r' < "$tmp/console" | tail -n 40 >&2
  exit 125
elif node_failure; then
  # Not the payload's doing: its command had not finished. One more boot.
  record_failure "booted again"
  echo "run.sh: $why; booting it again (the console's tail below)" >&2
  tr -d '\r' < "$tmp/console" | tail -n 5 >&2
  # The command runs again from its start; whoever reads stdout whole
  # keeps what follows this line (tests/support/lib.rs does).
  echo "$AGAIN_MARKER"
  boot_node 2
fi

if [[ -s $tmp/status ]]; then
  exit "$(cat "$tmp/status")"
fi
if node_failure; then
  record_failure "gave up"
  echo "run.sh: again, $why; its console:" >&2
elif ((qrc == 124)); then
  echo "run.sh: the node VM timed out after $timeout s; its console:" >&2
else
  echo "run.sh: the node VM ended without reporting an exit status (qemu: $qrc); its console:" >&2
fi
tr -d '\r' < "$tmp/console" | tail -n 40 >&2
exit 125
