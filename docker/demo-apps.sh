#!/bin/sh
# The seed article's demo app on this node, registered with the local agent as Marathon
# would have: `httpi` (answers pi to ten decimals) behind the named VIP /httpi:3141, and
# with the seed article's Marathon-LB labels (HAPROXY_GROUP=external, HAPROXY_0_MODE=http,
# HAPROXY_0_PORT=3141) and a virtual host, httpi.example.com, for the edge on node1,
#   - in host mode on the node's own address, port 9896 (every node), and
#   - in container mode on the `dcos` overlay (SKEIN_DEMO_OVERLAY=1): a network namespace
#     attached with the skein-cni plugin exactly as a container runtime calls it.
# Idempotent: a node restart re-creates the instances under the same task ids.
set -u
API=${SKEIN_API:-http://127.0.0.1:62080}
NODE_ID=${SKEIN_NODE_ID:?}
IP=${SKEIN_ADVERTISE:?}
TOKEN=$(cat "${SKEIN_API_TOKEN_FILE:-/etc/skein/api-token}")
DATA=${SKEIN_DATA_DIR:-/var/lib/skein}

log() { echo "demo-apps: $*" >&2; }

wait_for() { # what, seconds, command...
    what=$1; secs=$2; shift 2
    deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { log "gave up waiting for $what"; return 1; }
        sleep 0.5
    done
}

put_task() { # id ip
    body=$(printf '{"app":"/httpi","framework":"marathon","ip":"%s","ports":[{"name":"http","port":9896,"protocol":"tcp","labels":{"VIP_0":"/httpi:3141"}}],"labels":{"HAPROXY_GROUP":"external","HAPROXY_0_MODE":"http","HAPROXY_0_PORT":"3141","HAPROXY_0_VHOST":"httpi.example.com"}}' "$2")
    wait_for "registering $1" 60 curl -sf -X PUT -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d "$body" "$API/v1/tasks/$1" \
        && log "registered $1 at $2:9896"
}

wait_for "the agent's API" 60 curl -sf "$API/v1/version" || exit 1

skein httpi --listen "$IP:9896" --name "$NODE_ID-host" &
put_task "httpi-$NODE_ID-host" "$IP"

[ "${SKEIN_DEMO_OVERLAY:-0}" = 1 ] || { wait; exit 0; }
CONF=$DATA/cni/dcos.conf
# The network file survives in the data volume; the bridge does not survive the node:
# wait until this agent has realized its overlay again.
overlay_ok() { curl -sf "$API/overlay-agent/overlay" | grep -q '"status":"STATUS_OK"'; }
wait_for "this node's overlay (STATUS_OK)" 90 overlay_ok || exit 1
wait_for "the overlay's CNI network file" 60 test -s "$CONF" || exit 1
NS=httpi
ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS" || { log "cannot create a network namespace (is the node privileged?)"; exit 1; }
cni() { # command
    CNI_COMMAND=$1 CNI_CONTAINERID="httpi-$NODE_ID" CNI_NETNS=/var/run/netns/$NS \
        CNI_IFNAME=eth0 CNI_PATH=/usr/local/bin skein-cni <"$CONF"
}
cni DEL >/dev/null 2>&1 || true
result=$(cni ADD) || { log "CNI ADD failed: $result"; exit 1; }
CIP=$(printf '%s' "$result" | sed -n 's/.*"address":"\([0-9.]*\)\/.*/\1/p')
[ -n "$CIP" ] || { log "no address in $result"; exit 1; }
ip netns exec "$NS" skein httpi --listen "$CIP:9896" --name "$NODE_ID-overlay" &
put_task "httpi-$NODE_ID-overlay" "$CIP"
wait
