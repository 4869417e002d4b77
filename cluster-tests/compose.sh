#!/bin/sh
# The docker-compose cluster end to end, as scripts/test runs it: bring it up from scratch
# (scripts/cluster-up: builds the image locally, nothing pulled), run the seed documents'
# labs (cluster-tests/labs.sh) and the faults (cluster-tests/faults.sh) against it, and tear
# it down afterwards, pass or fail.
#
#   SKEIN_SKIP_BUILD=1 / SKEIN_BIN=path   passed through to scripts/cluster-up
#   COMPOSE_KEEP=1                        leave the cluster running at the end
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if docker compose version >/dev/null 2>&1; then DC="docker compose"; else DC="docker-compose"; fi

say() { printf '[compose] %s\n' "$*"; }
cleanup() {
    rc=$?
    trap - EXIT INT TERM
    if [ "$rc" != 0 ]; then
        say "collecting logs after failure"
        $DC ps || true
        $DC logs --no-color --tail=80 || true
    fi
    if [ "${COMPOSE_KEEP:-0}" = 1 ]; then
        say "COMPOSE_KEEP=1: leaving the cluster running (scripts/cluster-down to stop)"
    else
        say "tearing down"
        "$ROOT/scripts/cluster-down" >/dev/null 2>&1 || $DC down -v --remove-orphans || true
    fi
    if [ "$rc" = 0 ]; then say "PASS"; else say "FAILED (rc=$rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$ROOT/scripts/cluster-down" >/dev/null 2>&1 || true
t0=$(date +%s)
"$ROOT/scripts/cluster-up" >/dev/null
say "cluster up in $(( $(date +%s) - t0 ))s"
"$ROOT/cluster-tests/labs.sh"
"$ROOT/cluster-tests/faults.sh"
