#!/bin/sh
# Faults against the running docker-compose cluster (scripts/cluster-up), each with a
# continuous client on node1 that counts failed requests through the VIP and failed or
# stale DNS answers, and prints, per fault: requests sent, failed, time to converge.
#   1. docker kill of node3: its backends leave every VIP within the detection time;
#   2. node3 partitioned (docker network disconnect) for PARTITION_S (30) seconds with task
#      changes on both sides, then healed: all nodes converge (target <= 5 s), nothing lost;
#   3. a rolling restart of every agent, one at a time: target 0 failed requests and 0 DNS
#      failures for cluster names, and 0 failed requests through node1's edge (its own
#      process: restarting the agent beside it must not disturb it);
#   4. a whole-cluster stop and start: the same VIP address, overlay subnets and tasks after;
#   5. node3 partitioned for longer than the dead-node grace (GRACE_S, 8 s here, set for the
#      test) so each side forgets the other, with writes on both sides, then healed; then
#      node3's agent stopped, its data dir wiped and started: nothing lost, no overlay address
#      duplicated or moved, the VIP's address unchanged.
# FAULTS_ONLY=kill|partition|roll|restart|grace runs one of them.
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
task_ids() { ex "$1" curl -sf http://127.0.0.1:62080/v1/tasks | grep -o '"id":"[^"]*"' | sort; }
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
# A second client, on this host, through node1's edge (HAPROXY_0_PORT=3141).
rm -f "$TMP/edge.stop"
(
    while [ ! -e "$TMP/edge.stop" ]; do
        if [ "$(curl -s --max-time 2 http://127.0.0.1:3141/)" = 3.1415926536 ]; then
            echo OK
        else
            echo "FAILED $(date +%T.%N | cut -c1-12)"
        fi
        sleep 0.1
    done
) >"$TMP/edge-roll.log" 2>&1 &
edge_client=$!
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
touch "$TMP/edge.stop"
wait "$edge_client" || true
EDGE_SENT=$(grep -c . "$TMP/edge-roll.log" || true)
EDGE_FAILED=$(grep -c '^FAILED' "$TMP/edge-roll.log" || true)
report "rolling restart (3 agents)" "$converged"
say "through node1's edge during the rolling restart: sent $EDGE_SENT, failed $EDGE_FAILED"
[ "$EDGE_FAILED" = 0 ] || { grep '^FAILED' "$TMP/edge-roll.log" >&2; fail "$EDGE_FAILED failed requests through the edge during the rolling restart"; }
[ "$EDGE_SENT" -gt 0 ] || fail "no request went through the edge during the rolling restart"
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

if [ -z "${FAULTS_ONLY:-}" ] || [ "$FAULTS_ONLY" = grace ]; then
# --- 5. partition longer than the grace period; node3 rejoining with a wiped data dir --
GRACE_S=${GRACE_S:-8}
say "fault 5: dead-node grace ${GRACE_S}s; node3 partitioned until each side has forgotten the other"
# Every agent restarted with the short grace (read by the supervisor at each start).
set_grace() { # seconds, or '' for the default
    for n in $NODES; do
        if [ -n "$1" ]; then
            ex "$n" sh -c "mkdir -p /run/skein && echo 'export SKEIN_DEAD_NODE_GRACE_S=$1' > /run/skein/agent.env"
        else
            ex "$n" rm -f /run/skein/agent.env
        fi
        ex "$n" skein-restart-agent >/dev/null || fail "restarting $n's agent"
        wait_until "$n's agent back with the cluster" "$TIMEOUT" all_alive
    done
    wait_until "all instances after the restarts" "$TIMEOUT" all_instances
}
# Each agent's overlay addresses as node1 sees them ("node subnet vtep" lines), checked for
# duplicates; and the named VIP's address.
overlay_leases() {
    ex "${1:-node1}" curl -sf http://127.0.0.1:62080/overlay-master/state | python3 -c '
import json, sys
agents = json.load(sys.stdin)["agents"]
rows = sorted((a["node_id"], o["subnet"], o["backend"]["vxlan"]["vtep_ip"]) for a in agents for o in a["overlays"])
subnets = [r[1] for r in rows]; vteps = [r[2] for r in rows]
for r in rows: print(*r)
if len(set(subnets)) != len(subnets) or len(set(vteps)) != len(vteps): sys.exit("duplicate overlay address")'
}
vip_address() { ex node1 curl -sf http://127.0.0.1:62080/v1/vips | grep -o '"address":"[^"]*"' | sort -u; }
forgot() { # node other: node no longer holds any task of other
    ! task_ids "$1" | grep -q "httpi-$2-"
}
set_grace "$GRACE_S"
overlay_leases >"$TMP/leases-before" || fail "duplicate overlay addresses before fault 5"
VIP_BEFORE=$(vip_address)
CID=$($DC ps -q node3)
NET=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$CID")
client_start grace
t0=$(now_ms)
docker network disconnect "$NET" "$CID"
api node1 PUT /v1/tasks/beyond-grace-a \
    '{"app":"/grace-a","ip":"172.31.250.11","ports":[{"name":"http","port":7003,"protocol":"tcp"}]}' >/dev/null
api node3 PUT /v1/tasks/beyond-grace-b \
    '{"app":"/grace-b","ip":"172.31.250.13","ports":[{"name":"http","port":7004,"protocol":"tcp"}]}' >/dev/null
wait_until "node1 forgetting node3 (grace ${GRACE_S}s)" $((GRACE_S * 4 + 10)) forgot node1 node3
wait_until "node3 forgetting node1" $((GRACE_S * 4 + 10)) forgot node3 node1
partitioned=$(secs_since "$t0")
t0=$(now_ms)
docker network connect --ip 172.31.250.13 "$NET" "$CID"
wait_until "all nodes converged after the heal" 60 sh -c '
    a=$('"$DC"' exec -T node1 curl -sf http://127.0.0.1:62080/v1/tasks | grep -o "\"id\":\"[^\"]*\"" | sort)
    for n in node2 node3; do
        b=$('"$DC"' exec -T $n curl -sf http://127.0.0.1:62080/v1/tasks | grep -o "\"id\":\"[^\"]*\"" | sort)
        [ "$a" = "$b" ] || exit 1
    done
    printf "%s" "$a" | grep -q beyond-grace-a && printf "%s" "$a" | grep -q beyond-grace-b && printf "%s" "$a" | grep -q httpi-node3-'
converged=$(secs_since "$t0")
wait_until "3 alive after the heal" 30 all_alive
wait_until "$INSTANCES instances after the heal" "$TIMEOUT" all_instances
client_stop grace
report "partition ${partitioned}s > grace ${GRACE_S}s" "$converged"
overlay_leases >"$TMP/leases-healed" || fail "duplicate overlay addresses after the heal"
diff "$TMP/leases-before" "$TMP/leases-healed" >&2 || fail "overlay addresses changed across the long partition"
[ "$(vip_address)" = "$VIP_BEFORE" ] || fail "the VIP address changed across the long partition"
say "no overlay address changed or duplicated: $(tr '\n' ';' <"$TMP/leases-healed")"

# node3's agent stopped, its data dir wiped (tasks, leases, replica, CNI state), started.
say "node3 rejoining with a wiped data dir"
# node3's own tasks as registered (their bodies), to register them again after the wipe.
ex node3 curl -sf http://127.0.0.1:62080/v1/tasks | python3 -c '
import json, sys
for t in json.load(sys.stdin)["tasks"]:
    if t["node_id"] == "node3":
        tid = t.pop("id")
        for k in ("node_id", "node_status", "healthy"): t.pop(k, None)
        print(tid, json.dumps(t, separators=(",", ":")))' >"$TMP/node3-tasks"
[ -s "$TMP/node3-tasks" ] || fail "no tasks of node3 before the wipe"
t0=$(now_ms)
ex node3 sh -c 'mkdir -p /run/skein && touch /run/skein/hold && kill -TERM "$(cat /run/skein-agent.pid)"'
wait_until "node3's agent stopped" 30 sh -c "! $DC exec -T node3 skein version"
ex node3 sh -c 'rm -rf /var/lib/skein/* && rm /run/skein/hold'
wait_until "node3 back with a new generation" "$TIMEOUT" all_alive
rejoined=$(secs_since "$t0")
# Its own registrations went with its data dir: their framework registers them again, as
# Marathon does when an agent comes back without its state.
while read -r id body; do
    api node3 PUT "/v1/tasks/$id" "$body" </dev/null >/dev/null || fail "re-registering $id"
done <"$TMP/node3-tasks"
wait_until "$INSTANCES instances after the wipe" "$TIMEOUT" all_instances
for n in $NODES; do
    overlay_leases "$n" >"$TMP/leases-wiped-$n" || fail "duplicate overlay addresses on $n after the wipe"
done
diff "$TMP/leases-wiped-node1" "$TMP/leases-wiped-node2" >&2 && diff "$TMP/leases-wiped-node1" "$TMP/leases-wiped-node3" >&2 \
    || fail "nodes disagree on overlay addresses after the wipe"
grep -v '^node3 ' "$TMP/leases-before" >"$TMP/others-before"
grep -v '^node3 ' "$TMP/leases-wiped-node1" >"$TMP/others-after"
diff "$TMP/others-before" "$TMP/others-after" >&2 || fail "another node's overlay addresses changed when node3 came back wiped"
[ "$(vip_address)" = "$VIP_BEFORE" ] || fail "the VIP address changed when node3 came back wiped"
# What other nodes wrote (during the partition too) is all there, on every node.
for n in $NODES; do
    task_ids "$n" | grep -q beyond-grace-a || fail "node1's beyond-grace-a lost on $n"
done
SENT=- FAILED=- DNSFAIL=- STALE=-
report "node3 wiped data dir" "$rejoined"
if diff -q "$TMP/leases-before" "$TMP/leases-wiped-node1" >/dev/null; then
    say "node3 kept its overlay addresses: $(grep '^node3 ' "$TMP/leases-wiped-node1")"
else
    say "node3's overlay addresses: $(grep '^node3 ' "$TMP/leases-before") -> $(grep '^node3 ' "$TMP/leases-wiped-node1")"
fi
api node1 DELETE /v1/tasks/beyond-grace-a >/dev/null
api node1 DELETE /v1/tasks/beyond-grace-b >/dev/null 2>&1 || api node3 DELETE /v1/tasks/beyond-grace-b >/dev/null
set_grace ""
fi

echo
cat "$REPORT"
say "PASS"
