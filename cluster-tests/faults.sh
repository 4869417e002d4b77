#!/bin/sh
# Faults against the running docker-compose cluster (scripts/cluster-up), each with a
# continuous client on node1 that counts failed requests through the VIP and failed or
# stale DNS answers, and prints, per fault: requests sent, failed, time to converge.
#   1. docker kill of node3: its backends leave every VIP within the detection time;
#   2. node3 partitioned (docker network disconnect) for PARTITION_S (30) seconds with task
#      changes on both sides, then healed: all nodes converge (target <= 5 s), nothing lost;
#   3. a rolling restart of every agent, one at a time: target 0 failed requests and 0 DNS
#      failures for cluster names;
#   4. a whole-cluster stop and start: the same VIP address, overlay subnets and tasks after.
# FAULTS_ONLY=kill|partition|roll|restart runs one of them.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if docker compose version >/dev/null 2>&1; then DC="docker compose"; else DC="docker-compose"; fi
TIMEOUT=${FAULTS_TIMEOUT:-90}
PARTITION_S=${PARTITION_S:-30}
NODES="node1 node2 node3"
INSTANCES=5
VIP=httpi.marathon.l4lb.thisdcos.directory
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say()  { printf '[faults] %s\n' "$*"; }
fail() { printf '[faults] FAIL: %s\n' "$*" >&2; exit 1; }
ex()   { _node=$1; shift; $DC exec -T "$_node" "$@"; }
now_ms() { date +%s%3N; }
secs_since() { echo "$1" | awk -v now="$(now_ms)" '{printf "%.2f", (now - $1) / 1000}'; }
wait_until() { # what, seconds, command...: polls until the command succeeds
    what=$1; secs=$2; shift 2
    deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "$what (after ${secs}s)"
        sleep 0.2
    done
}
token() { ex "${1:-node1}" cat /etc/skein/api-token; }
api() { # node method path [body]: via the node's own loopback API with its own token
    _node=$1; m=$2; p=$3; b=${4:-}
    ex "$_node" curl -sf -X "$m" -H "Authorization: Bearer $(token "$_node")" -H 'Content-Type: application/json' \
        ${b:+-d "$b"} "http://127.0.0.1:62080$p"
}

# --- the continuous client (on node1) -------------------------------------------------
# Every round: one HTTP request through the named VIP (resolved by the node's resolver:
# its own agent, then the others) and one lookup of httpi.marathon.mesos; an answer that
# contains an address listed in /tmp/client.dead (tasks known gone) is stale.
client_start() { # label
    ex node1 sh -c 'rm -f /tmp/client.stop; : > /tmp/client.dead'
    $DC exec -T node1 sh -c '
        while [ ! -e /tmp/client.stop ]; do
            rc=0
            out=$(curl -s --max-time 2 -o /dev/null -w "%{http_code} %{remote_ip} dns=%{time_namelookup}s" "http://'"$VIP"':3141/") || rc=$?
            case "$out" in
                "200 "*) echo OK ;;
                *) echo "FAIL $(date +%T.%N | cut -c1-12) curl-exit=$rc $out" ;;
            esac
            ips=$(getent ahostsv4 httpi.marathon.mesos | awk "{print \$1}" | sort -u)
            if [ -z "$ips" ]; then echo DNSFAIL
            else
                for ip in $ips; do
                    grep -qx "$ip" /tmp/client.dead && echo "STALE $ip"
                done
            fi
            sleep 0.05
        done' >"$TMP/client-$1.log" 2>&1 &
    CLIENT=$!
    # Running once it has answered.
    wait_until "the client's first request" 20 grep -q . "$TMP/client-$1.log"
}
client_stop() { # label -> sets SENT FAILED DNSFAIL STALE
    ex node1 touch /tmp/client.stop
    wait "$CLIENT" || true
    log=$TMP/client-$1.log
    SENT=$(grep -Ec '^(OK|FAIL)' "$log" || true)
    FAILED=$(grep -c '^FAIL' "$log" || true)
    DNSFAIL=$(grep -c '^DNSFAIL' "$log" || true)
    STALE=$(grep -c '^STALE' "$log" || true)
}

in_use_on() { # node_id: number of in-use VIP backends on that node, as node1 and node2 see it
    for n in node1 node2; do
        ex "$n" curl -sf http://127.0.0.1:62080/v1/vips
    done | tr '{' '\n' | grep "\"node_id\":\"$1\"" | grep -c '"in_use":true' || true
}
no_backends_on() { [ "$(in_use_on "$1")" = 0 ]; }
all_alive() { for n in $NODES; do [ "$(ex "$n" skein nodes | grep -cw alive)" -ge 3 ] || return 1; done; }
all_instances() {
    for n in $NODES; do
        [ "$(ex "$n" dig +short httpi.marathon.mesos | grep -c .)" -eq "$INSTANCES" ] || return 1
    done
    [ "$(ex node1 curl -sf http://127.0.0.1:62080/v1/vips | grep -o '"in_use":true' | wc -l)" -eq "$INSTANCES" ]
}

say "waiting for a settled cluster (3 alive, $INSTANCES instances everywhere)"
wait_until "3 alive on every node" "$TIMEOUT" all_alive
wait_until "$INSTANCES instances in DNS and the VIP" "$TIMEOUT" all_instances
REPORT=$TMP/report
: >"$REPORT"
report() { printf '%-28s sent %5s  failed %3s  dns-failed %3s  stale-dns %3s  converged in %ss\n' \
    "$1" "$SENT" "$FAILED" "$DNSFAIL" "$STALE" "$2" | tee -a "$REPORT"; }

if [ -z "${FAULTS_ONLY:-}" ] || [ "$FAULTS_ONLY" = kill ]; then
# --- 1. docker kill -------------------------------------------------------------------
say "fault 1: docker kill node3"
NODE3_IPS=$(ex node1 skein tasks | awk '$1 ~ /^httpi-node3/' | grep -o '[0-9]*\.[0-9]*\.[0-9]*\.[0-9]*' | sort -u)
client_start kill
t0=$(now_ms)
$DC kill node3 >/dev/null 2>&1
wait_until "node3's backends out of every VIP" 30 no_backends_on node3
converged=$(secs_since "$t0")
for ip in $NODE3_IPS; do ex node1 sh -c "echo $ip >> /tmp/client.dead"; done
# Once gone from the VIPs, gone from DNS too: keep the client going to catch stale answers.
wait_until "node3's tasks out of DNS" 10 sh -c "! $DC exec -T node1 dig +short httpi.marathon.mesos | grep -q '^172.31.250.13$'"
sleep 2
client_stop kill
report "docker kill node3" "$converged"
$DC start node3 >/dev/null 2>&1
wait_until "node3 back" "$TIMEOUT" all_alive
wait_until "node3's instances back" "$TIMEOUT" all_instances

fi
if [ -z "${FAULTS_ONLY:-}" ] || [ "$FAULTS_ONLY" = partition ]; then
# --- 2. partition ---------------------------------------------------------------------
say "fault 2: node3 partitioned for ${PARTITION_S}s, writes on both sides"
CID=$($DC ps -q node3)
NET=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$CID")
client_start partition
docker network disconnect "$NET" "$CID"
api node1 PUT /v1/tasks/during-partition-a \
    '{"app":"/side-a","ip":"172.31.250.11","ports":[{"name":"http","port":7001,"protocol":"tcp"}]}' >/dev/null
api node3 PUT /v1/tasks/during-partition-b \
    '{"app":"/side-b","ip":"172.31.250.13","ports":[{"name":"http","port":7002,"protocol":"tcp"}]}' >/dev/null
sleep "$PARTITION_S"
t0=$(now_ms)
docker network connect --ip 172.31.250.13 "$NET" "$CID"
task_ids() { ex "$1" curl -sf http://127.0.0.1:62080/v1/tasks | grep -o '"id":"[^"]*"' | sort; }
converged_tasks() {
    a=$(task_ids node1); b=$(task_ids node2); c=$(task_ids node3)
    [ "$a" = "$b" ] && [ "$b" = "$c" ] \
        && printf '%s' "$a" | grep -q during-partition-a && printf '%s' "$a" | grep -q during-partition-b
}
wait_until "all nodes converged after the heal" 60 converged_tasks
converged=$(secs_since "$t0")
wait_until "3 alive after the heal" 30 all_alive
client_stop partition
report "partition ${PARTITION_S}s + heal" "$converged"
awk -v c="$converged" 'BEGIN { exit !(c <= 5) }' || say "WARNING: convergence after heal took ${converged}s (target <= 5 s)"
api node1 DELETE /v1/tasks/during-partition-a >/dev/null
api node3 DELETE /v1/tasks/during-partition-b >/dev/null
wait_until "$INSTANCES instances after the partition" "$TIMEOUT" all_instances

fi
if [ -z "${FAULTS_ONLY:-}" ] || [ "$FAULTS_ONLY" = roll ]; then
# --- 3. rolling restart ---------------------------------------------------------------
say "fault 3: rolling restart of every agent"
client_start roll
t0=$(now_ms)
for node in $NODES; do
    say "  restarting $node's agent at $(date +%T.%N | cut -c1-12)"
    ex "$node" skein-restart-agent >/dev/null || fail "restarting $node's agent"
    wait_until "$node's agent back with the cluster" "$TIMEOUT" all_alive
    wait_until "all instances in use after $node's restart" "$TIMEOUT" all_instances
    say "  $node restarted"
done
converged=$(secs_since "$t0")
client_stop roll
report "rolling restart (3 agents)" "$converged"
[ "$FAILED" = 0 ] || { grep -v '^OK' "$TMP/client-roll.log" >&2; fail "$FAILED failed requests during the rolling restart"; }
[ "$DNSFAIL" = 0 ] || fail "$DNSFAIL DNS failures during the rolling restart"

fi
if [ -z "${FAULTS_ONLY:-}" ] || [ "$FAULTS_ONLY" = restart ]; then
# --- 4. whole-cluster stop and start --------------------------------------------------
say "fault 4: whole-cluster stop and start"
snapshot() {
    ex node1 curl -sf http://127.0.0.1:62080/v1/vips | grep -o '"address":"[^"]*"' | sort -u
    ex node1 curl -sf http://127.0.0.1:62080/overlay-master/state | grep -o '"node_id":"[^"]*"\|"subnet":"9[^"]*"'
    task_ids node1
}
snapshot >"$TMP/before"
$DC stop >/dev/null 2>&1
t0=$(now_ms)
$DC start >/dev/null 2>&1
wait_until "3 alive after the restart" "$TIMEOUT" all_alive
wait_until "$INSTANCES instances after the restart" "$TIMEOUT" all_instances
converged=$(secs_since "$t0")
snapshot >"$TMP/after"
diff "$TMP/before" "$TMP/after" >&2 || fail "VIP addresses, overlay subnets or tasks changed across the restart"
SENT=- FAILED=- DNSFAIL=- STALE=-
report "whole-cluster stop/start" "$converged"
say "same VIP address, overlay subnets and tasks after: $(tr '\n' ' ' <"$TMP/after" | cut -c1-200)"
fi

echo
cat "$REPORT"
say "PASS"
