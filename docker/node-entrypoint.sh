#!/bin/sh
# Entrypoint of the compose nodes: copy this node's TLS material and API token from its own
# read-only certs volume (written by the one-shot `certs` service; no node sees another's), point the node's
# resolver at the agents' DNS, start the demo app (skein-demo-apps) and run the agent under
# a small supervisor: `skein-restart-agent` restarts the agent process alone, as restarting
# the service on a real host would, while the kernel state and the apps keep running.
# The CA private key is never in the certs volume.
set -eu

NODE_ID=${SKEIN_NODE_ID:?SKEIN_NODE_ID must be set}
CERTS=${SKEIN_CERTS_SRC:-/certs}
TLS_DIR=${SKEIN_TLS_DIR:=/etc/skein/tls}
TOKEN_FILE=${SKEIN_API_TOKEN_FILE:=/etc/skein/api-token}
export SKEIN_TLS_DIR SKEIN_API_TOKEN_FILE

for f in ca.pem node.pem node-key.pem; do
    [ -s "$CERTS/$NODE_ID/$f" ] || { echo "node-entrypoint: missing $CERTS/$NODE_ID/$f" >&2; exit 1; }
done
[ -s "$CERTS/$NODE_ID/api-token" ] || { echo "node-entrypoint: missing $CERTS/$NODE_ID/api-token" >&2; exit 1; }

umask 077
mkdir -p "$TLS_DIR" "$(dirname "$TOKEN_FILE")" "${SKEIN_DATA_DIR:-/var/lib/skein}"
cp "$CERTS/$NODE_ID/ca.pem" "$CERTS/$NODE_ID/node.pem" "$CERTS/$NODE_ID/node-key.pem" "$TLS_DIR/"
cp "$CERTS/$NODE_ID/api-token" "$TOKEN_FILE"
chmod 0644 "$TLS_DIR/ca.pem" "$TLS_DIR/node.pem"
umask 022

# Names resolve through this node's agent first, then the other agents (so a restarting
# agent costs a one-second retry, not a failure), like DC/OS's three spartan addresses.
# Other names are forwarded by the agents to Docker's resolver (SKEIN_DNS_UPSTREAM).
{
    echo "nameserver 127.0.0.1"
    for ns in ${SKEIN_RESOLVERS:-}; do echo "nameserver $ns"; done
    echo "options timeout:1 attempts:3"
} >/etc/resolv.conf

skein-demo-apps &

# The edge (SKEIN_EDGE_GROUPS, e.g. `external` on a public node): its own process,
# supervised apart from the agent, so restarting the agent drops no edge connection.
# It keeps serving its last routes while the agent is away.
if [ -n "${SKEIN_EDGE_GROUPS:-}" ]; then
    (
        groups=
        for g in $SKEIN_EDGE_GROUPS; do groups="$groups --group $g"; done
        while :; do
            # shellcheck disable=SC2086
            skein edge $groups --state-dir /run/skein-edge || true
            echo "node-entrypoint: the edge exited; starting it again in 1s" >&2
            sleep 1
        done
    ) &
fi

stopping=0
agent=
backoff=1
trap 'stopping=1; [ -n "$agent" ] && kill -TERM "$agent" 2>/dev/null; wait' TERM INT
while :; do
    # Held (`touch /run/skein/hold`, as a stopped service on a host): the agent is not
    # started again until the file is gone; used to wipe its data dir while it is down.
    while [ -e /run/skein/hold ] && [ "$stopping" = 0 ]; do
        sleep 0.5 &
        wait $! || true
    done
    [ "$stopping" = 1 ] && exit 0
    started=$(date +%s)
    # Overrides of the agent's environment, read at every start (e.g. a shorter
    # SKEIN_DEAD_NODE_GRACE_S for a fault test): lines `export NAME=value`.
    if [ -r /run/skein/agent.env ]; then . /run/skein/agent.env; fi
    skein agent "$@" &
    agent=$!
    echo "$agent" >/run/skein-agent.pid
    rc=0
    wait "$agent" || rc=$?
    [ "$stopping" = 1 ] && exit 0
    # An agent that ran a while (or was restarted on purpose) comes back at
    # once; one that keeps failing at start-up (a bad flag, a damaged data
    # file) is retried with a doubling pause up to 30 s, not in a tight loop.
    if [ $(( $(date +%s) - started )) -ge 10 ]; then
        backoff=1
        echo "node-entrypoint: agent exited ($rc); starting it again" >&2
    else
        echo "node-entrypoint: agent exited ($rc) during start-up; starting it again in ${backoff}s" >&2
        sleep "$backoff" &
        wait $! || true
        [ "$stopping" = 1 ] && exit 0
        backoff=$(( backoff * 2 > 30 ? 30 : backoff * 2 ))
    fi
done
