#!/bin/sh
# Smoke test of the docker-compose cluster: bring it up (scripts/cluster-up), check that every
# node sees 3 alive nodes, register a task on node1 through its HTTP API (with the bearer
# token) and wait until node3 lists it. The cluster is always torn down, pass or fail.
#
#   SKEIN_BIN=path / SKEIN_SKIP_BUILD=1   passed through to scripts/cluster-up
#   SMOKE_TIMEOUT=secs                    per-wait deadline (default 60)
#   SMOKE_KEEP=1                          leave the cluster running at the end
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if docker compose version >/dev/null 2>&1; then DC="docker compose"; else DC="docker-compose"; fi
TIMEOUT=${SMOKE_TIMEOUT:-60}
API1=http://127.0.0.1:62081
API3=http://127.0.0.1:62083

say()  { printf '[smoke] %s\n' "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
    rc=$?
    trap - EXIT INT TERM
    if [ "$rc" != 0 ]; then
        say "collecting logs after failure"
        $DC ps || true
        $DC logs --tail=60 || true
    fi
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then
        say "SMOKE_KEEP=1: leaving the cluster running (scripts/cluster-down to stop)"
    else
        say "tearing down"
        "$ROOT/scripts/cluster-down" >/dev/null 2>&1 || $DC down -v --remove-orphans || true
    fi
    if [ "$rc" = 0 ]; then say "PASS"; else say "FAILED (rc=$rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start from a clean slate so the test is repeatable.
"$ROOT/scripts/cluster-down" >/dev/null 2>&1 || true

t0=$(date +%s)
say "cluster-up"
"$ROOT/scripts/cluster-up" >/dev/null || fail "cluster-up failed"
say "cluster up in $(( $(date +%s) - t0 ))s"

for n in node1 node2 node3; do
    out=$($DC exec -T "$n" skein nodes) || fail "skein nodes on $n failed"
    c=$(printf '%s\n' "$out" | grep -cw alive || true)
    [ "$c" -ge 3 ] || { printf '%s\n' "$out" >&2; fail "$n sees $c alive nodes, want 3"; }
    say "ok: $n sees $c alive nodes"
done

TOKEN=$($DC exec -T node1 cat /etc/skein/api-token) || fail "cannot read the API token"
[ -n "$TOKEN" ] || fail "empty API token"

BODY='{"app":"/httpi","ip":"172.31.250.11","ports":[{"name":"http","port":9896,"protocol":"tcp","labels":{"VIP_0":"/httpi:3141"}}]}'

code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/json' \
    --max-time 10 --data "$BODY" "$API1/v1/tasks/t1" || true)
case "$code" in
    401|403) say "ok: PUT without token rejected ($code)" ;;
    *) fail "PUT /v1/tasks/t1 without token returned $code, want 401/403" ;;
esac

resp=$(curl -s -w '\n%{http_code}' -X PUT -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' --max-time 10 --data "$BODY" "$API1/v1/tasks/t1" || true)
code=$(printf '%s\n' "$resp" | tail -n1)
case "$code" in
    2??) say "ok: PUT /v1/tasks/t1 on node1 -> $code" ;;
    *) printf '%s\n' "$resp" >&2; fail "PUT /v1/tasks/t1 on node1 returned $code" ;;
esac

t1=$(date +%s)
deadline=$(( t1 + TIMEOUT ))
while :; do
    tasks=$(curl -s --max-time 5 "$API3/v1/tasks" || true)
    if printf '%s' "$tasks" | grep -q '"t1"' && printf '%s' "$tasks" | grep -q '/httpi'; then
        break
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { printf '%s\n' "$tasks" >&2; fail "node3 did not list t1 within ${TIMEOUT}s"; }
    sleep 0.2
done
say "ok: node3 lists t1 after $(( $(date +%s) - t1 ))s"
