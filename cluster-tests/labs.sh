#!/bin/sh
# The seed documents' labs against the docker-compose cluster, as a newcomer would type them
# (`docker-compose exec nodeN dig ...`, `curl ...`), checked:
#   Lab 6a: dig httpi.marathon.mesos (A) and _httpi._tcp.marathon.mesos (SRV) on every node,
#           and the Mesos-DNS API (/v1/version, /v1/config, /v1/enumerate, /v1/hosts/...,
#           /v1/services/...);
#   Lab 6c: curl httpi.marathon.l4lb.thisdcos.directory:3141 from every node answers
#           3.1415926536, spread over every instance;
#   Lab 6d: curl a container's overlay address from another node; /overlay-master/state.
#   Lab 6b: the edge on node1 (Marathon-LB's labels on httpi), from the host: the bind port
#           3141, the virtual host httpi.example.com on the HTTP port, the stats page and its
#           CSV, Marathon-LB's endpoints, /v1/edge on the agent and `skein edge status`.
#
#   cluster-tests/labs.sh               against a running cluster (scripts/cluster-up)
#   LABS_UP=1 cluster-tests/labs.sh     bring the cluster up first and tear it down after
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if docker compose version >/dev/null 2>&1; then DC="docker compose"; else DC="docker-compose"; fi
TIMEOUT=${LABS_TIMEOUT:-90}
NODES="node1 node2 node3"
INSTANCES=5   # host mode on node1-3, container mode on node2-3 (docker-compose.yml)

say()  { printf '[labs] %s\n' "$*"; }
fail() { printf '[labs] FAIL: %s\n' "$*" >&2; exit 1; }
ex()   { n=$1; shift; $DC exec -T "$n" "$@"; }
show() { # node, command...: print it as typed, then its output
    n=$1; shift
    printf '\n$ %s exec %s %s\n' "$DC" "$n" "$*"
    ex "$n" "$@"
}
# Retry a check until it passes (the cluster may still be settling), then print it.
until_ok() { # what, command...
    what=$1; shift
    deadline=$(( $(date +%s) + TIMEOUT ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { "$@" || true; fail "$what (after ${TIMEOUT}s)"; }
        sleep 1
    done
    say "ok: $what"
}

if [ "${LABS_UP:-0}" = 1 ]; then
    cleanup() {
        rc=$?
        trap - EXIT INT TERM
        [ "$rc" = 0 ] || { $DC ps || true; $DC logs --tail=40 || true; }
        "$ROOT/scripts/cluster-down" >/dev/null 2>&1 || true
        exit "$rc"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    "$ROOT/scripts/cluster-down" >/dev/null 2>&1 || true
    "$ROOT/scripts/cluster-up" >/dev/null || fail "cluster-up failed"
fi

a_count() { [ "$(ex "$1" dig +short httpi.marathon.mesos | grep -c .)" -eq "$INSTANCES" ]; }
srv_count() { [ "$(ex "$1" dig +short _httpi._tcp.marathon.mesos SRV | grep -c ' 9896 ')" -eq "$INSTANCES" ]; }

say "Lab 6a: Mesos-DNS names on every node"
for n in $NODES; do
    until_ok "$n: $INSTANCES A records for httpi.marathon.mesos" a_count "$n"
    until_ok "$n: $INSTANCES SRV records for _httpi._tcp.marathon.mesos" srv_count "$n"
done
show node1 dig +short httpi.marathon.mesos
show node3 dig +short _httpi._tcp.marathon.mesos SRV
for path in /v1/version /v1/config /v1/enumerate /v1/hosts/httpi.marathon.mesos \
            /v1/services/_httpi._tcp.marathon.mesos; do
    out=$(ex node2 curl -sf "http://127.0.0.1:62080$path") || fail "GET $path"
    printf '\n$ %s exec node2 curl -s http://127.0.0.1:62080%s\n%s\n' "$DC" "$path" \
        "$(printf '%s' "$out" | cut -c1-300)"
done
hosts=$(ex node2 curl -sf http://127.0.0.1:62080/v1/hosts/httpi.marathon.mesos | grep -o '"ip"' | wc -l)
[ "$hosts" -eq "$INSTANCES" ] || fail "/v1/hosts lists $hosts addresses, want $INSTANCES"
services=$(ex node2 curl -sf http://127.0.0.1:62080/v1/services/_httpi._tcp.marathon.mesos | grep -o '"port"' | wc -l)
[ "$services" -eq "$INSTANCES" ] || fail "/v1/services lists $services, want $INSTANCES"
say "ok: the Mesos-DNS API lists $INSTANCES hosts and services"

say "Lab 6c: the named VIP from every node"
VIP=httpi.marathon.l4lb.thisdcos.directory
vip_ok() { [ "$(ex "$1" curl -s --max-time 3 "http://$VIP:3141/")" = 3.1415926536 ]; }
for n in $NODES; do until_ok "$n: curl $VIP:3141 answers pi" vip_ok "$n"; done
show node1 curl -s "http://$VIP:3141/"
show node1 dig +short "$VIP"
for n in $NODES; do
    seen=$(ex "$n" sh -c "for i in \$(seq 60); do curl -si --max-time 3 http://$VIP:3141/ | grep -i '^x-instance'; done" \
        | tr -d '\r' | awk '{print $2}' | sort | uniq -c)
    distinct=$(printf '%s\n' "$seen" | grep -c .)
    say "$n: 60 requests spread over $distinct instances: $(printf '%s' "$seen" | tr '\n' ' ')"
    [ "$distinct" -eq "$INSTANCES" ] || fail "$n reached $distinct of $INSTANCES instances"
done
show node2 skein vips

say "Lab 6d: a container's own address on the overlay, from another node"
overlay_ok() {
    [ "$(ex node1 skein overlay | grep -c 'STATUS_OK$')" -eq 3 ]
}
until_ok "3 agents STATUS_OK in /overlay-master/state" overlay_ok
show node1 skein overlay
CIP=$(ex node1 skein tasks | awk '$1 == "httpi-node3-overlay" {print $0}' | grep -o '9\.[0-9.]*' | head -1)
[ -n "$CIP" ] || fail "no overlay address for httpi-node3-overlay in skein tasks"
container_ok() { [ "$(ex node1 curl -s --max-time 3 "http://$CIP:9896/")" = 3.1415926536 ]; }
until_ok "node1 → node3's container at $CIP over VXLAN" container_ok
show node1 curl -s "http://$CIP:9896/"
show node2 curl -s http://127.0.0.1:62080/overlay-master/state
echo

say "Lab 6b: the edge on node1 (Marathon-LB's labels), from this host"
hshow() { printf '\n$ %s\n' "$*"; "$@"; }
edge_port_ok() { [ "$(curl -s --max-time 3 http://127.0.0.1:3141/)" = 3.1415926536 ]; }
until_ok "curl 127.0.0.1:3141 (HAPROXY_0_PORT through node1's edge) answers pi" edge_port_ok
edge_vhost_ok() {
    [ "$(curl -s --max-time 3 -H 'Host: httpi.example.com' http://127.0.0.1:10080/)" = 3.1415926536 ]
}
until_ok "the virtual host httpi.example.com on the edge's HTTP port answers pi" edge_vhost_ok
hshow curl -s http://127.0.0.1:3141/
hshow curl -s -H 'Host: httpi.example.com' http://127.0.0.1:10080/
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: nobody.example.com' http://127.0.0.1:10080/)
[ "$code" = 503 ] || fail "an unknown host got HTTP $code, want 503"
say "ok: an unknown host gets 503"
seen=$(for i in $(seq 40); do curl -si --max-time 3 http://127.0.0.1:3141/ | grep -i '^x-instance'; done \
    | tr -d '\r' | awk '{print $2}' | sort | uniq -c)
distinct=$(printf '%s\n' "$seen" | grep -c .)
say "40 requests through the edge spread over $distinct instances: $(printf '%s' "$seen" | tr '\n' ' ')"
[ "$distinct" -eq "$INSTANCES" ] || fail "the edge reached $distinct of $INSTANCES instances"
csv_up() {
    [ "$(curl -s --max-time 3 'http://127.0.0.1:9090/haproxy?stats;csv' | grep -c '^httpi_3141,node[^,]*,.*,UP,')" -eq "$INSTANCES" ]
}
until_ok "the stats CSV lists httpi_3141 with $INSTANCES servers UP" csv_up
printf '\n$ curl -s "http://127.0.0.1:9090/haproxy?stats;csv" | cut -d, -f1-2,18 | grep httpi\n'
curl -s 'http://127.0.0.1:9090/haproxy?stats;csv' | cut -d, -f1-2,18 | grep httpi
curl -sf 'http://127.0.0.1:9090/haproxy?stats' | grep -q httpi_3141 || fail "the stats page lacks httpi_3141"
say "ok: the stats page lists httpi_3141"
for path in /_haproxy_health_check /_haproxy_getvhostmap /_haproxy_getappmap /_haproxy_getpids \
            /_haproxy_getconfig /metrics; do
    curl -sf "http://127.0.0.1:9090$path" >/dev/null || fail "GET :9090$path"
done
curl -sf http://127.0.0.1:9090/_haproxy_getvhostmap | grep -q '^httpi.example.com httpi_3141' \
    || fail "the vhost map lacks httpi.example.com"
say "ok: Marathon-LB's endpoints answer on :9090"
hshow curl -s http://127.0.0.1:9090/_haproxy_getvhostmap
ex node1 curl -sf 'http://127.0.0.1:62080/v1/edge?groups=external' | grep -q '"httpi_3141"' \
    || fail "/v1/edge lacks httpi_3141"
show node1 skein edge status

say "The entry point (Admin Router) on node1, from this host: http://127.0.0.1:10088"
tok=$(ex node1 cat /etc/skein/api-token)
entry_up() { curl -sf --max-time 3 http://127.0.0.1:10088/dcos-metadata/dcos-version.json | grep -q '"version"'; }
until_ok "the entry point's version file (open to all)" entry_up
code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:10088/net/v1/nodes)
[ "$code" = 401 ] || fail "the entry point answered HTTP $code without a token, want 401"
say "ok: without the token, 401"
entry_nodes() {
    [ "$(curl -s --max-time 3 -H "Authorization: token=$tok" http://127.0.0.1:10088/net/v1/nodes \
        | grep -o '"node_id"' | wc -l)" -eq 3 ]
}
until_ok "the entry point lists the 3 nodes with the token" entry_nodes
entry_service() {
    [ "$(curl -s --max-time 3 -H "Authorization: Bearer $tok" http://127.0.0.1:10088/service/httpi/)" = 3.1415926536 ]
}
until_ok "/service/httpi/ through the entry point answers pi" entry_service
hshow curl -s -H 'Authorization: Bearer <node1 token>' http://127.0.0.1:10088/service/httpi/
curl -s -H "Authorization: Bearer $tok" http://127.0.0.1:10088/service/httpi/

say "Read-backs: the kernel's VIP table reads back as written (no false drift)"
metric() { # node, name: the nftables realizer's value
    ex "$1" curl -sf http://127.0.0.1:62080/metrics | awk -v m="$2" '$1 == m "{realizer=\"nftables\"}" {print $2}'
}
resynced() { [ "$(metric "$1" skein_realizer_observes_total)" -ge 2 ]; }
for n in $NODES; do until_ok "$n read its VIP table back at least once since it wrote it" resynced "$n"; done
for n in $NODES; do
    drift=$(metric "$n" skein_realizer_drift_repaired_total)
    observes=$(metric "$n" skein_realizer_observes_total)
    say "$n: nftables read back $observes times, drift repaired ${drift:-?} times"
    [ "${drift:-1}" = 0 ] || fail "$n repaired drift nobody caused (its read-back differs from what it wrote)"
done

say "Secrets: each node holds its own key and API token, no other node's"
for n in $NODES; do
    for m in $NODES; do
        [ "$n" = "$m" ] && continue
        if ex "$n" sh -c "ls /certs/$m/node-key.pem /certs/$m/api-token" >/dev/null 2>&1; then
            fail "$n can read $m's key or token"
        fi
    done
    ex "$n" test -s "/certs/$n/node-key.pem" || fail "$n has no key of its own"
done
t1=$(ex node1 cat /etc/skein/api-token); t2=$(ex node2 cat /etc/skein/api-token)
[ -n "$t1" ] && [ "$t1" != "$t2" ] || fail "node1 and node2 share one API token"
code=$(ex node2 curl -s -o /dev/null -w '%{http_code}' -X DELETE \
    -H "Authorization: Bearer $t1" http://127.0.0.1:62080/v1/tasks/nothing.1)
[ "$code" = 401 ] || fail "node1's token accepted by node2 (HTTP $code)"
say "PASS"
