#!/usr/bin/env bash
# Schema-driven fuzzing of the REST API: schemathesis (from PyPI, cached in a
# venv under /var/cache/husk) generates requests from docs/api.yaml, valid and
# invalid, and sends them to a real `husk --api-sock` through a TCP-to-unix
# bridge (socat). It fails on any 5xx, on responses that break the schema,
# and if husk dies. husk runs as nobody in an empty directory, so paths the
# fuzzer invents (log and metrics files) cannot land anywhere that matters.
#
#   resources/api-fuzz.sh [HUSK_BINARY]
#   HUSK_API_FUZZ_EXAMPLES (default 40 per operation), HUSK_API_FUZZ_SECONDS
#   (default 120), HUSK_API_FUZZ_SEED (default fixed, for reproducible CI).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=resources/lib.sh
source "$repo/resources/lib.sh"

husk=${1:-$repo/target/debug/husk}
[[ -x $husk ]] || { log "no husk binary at $husk (cargo build first)"; exit 1; }
ensure_packages python3-venv socat

version=4.32.5
venv=/var/cache/husk/schemathesis/$version
# A venv's scripts name its directory, so it is built in place; the marker
# says the install finished.
if [[ ! -e $venv/.complete ]]; then
  log "installing schemathesis $version into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version"
  touch "$venv/.complete"
fi

work=$(mktemp -d /tmp/husk-api-fuzz.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
chown nobody:nogroup "$work"
cp "$husk" "$work/husk"
sock=$work/api.sock
(cd "$work" && exec setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \
  ./husk --api-sock "$sock" --log-level warn 2> "$work/husk.stderr") &
husk_pid=$!
pids+=("$husk_pid")
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done
[[ -S $sock ]] || { log "husk did not create its socket"; cat "$work/husk.stderr"; exit 1; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$sock" &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done

log "schemathesis against husk (examples ${HUSK_API_FUZZ_EXAMPLES:-40}, at most ${HUSK_API_FUZZ_SECONDS:-120} s)"
status=0
# From the scratch directory: schemathesis keeps its cache in the current one.
(cd "$work" && "$venv/bin/st" run "$repo/docs/api.yaml" \
  --url "http://127.0.0.1:$port" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance,response_headers_conformance \
  --max-examples "${HUSK_API_FUZZ_EXAMPLES:-40}" \
  --max-time "${HUSK_API_FUZZ_SECONDS:-120}" \
  --seed "${HUSK_API_FUZZ_SEED:-20261123}" \
  --workers 1 \
  --request-timeout 10 \
  --suppress-health-check all \
  --no-color) || status=$?

if ! kill -0 "$husk_pid" 2>/dev/null; then
  log "husk died during the fuzz run"
  cat "$work/husk.stderr"
  exit 1
fi
if ! curl -sf --unix-socket "$sock" http://localhost/ >/dev/null; then
  log "husk no longer answers GET /"
  exit 1
fi
((status == 0)) || { log "schemathesis found problems (status $status)"; exit "$status"; }
log "API fuzzing: no server errors, husk alive"
