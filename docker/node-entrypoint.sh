#!/bin/sh
# Entrypoint of the compose nodes: copy this node's TLS material and the API token from the
# shared, read-only certs volume (written by the one-shot `certs` service), then exec the agent.
# The CA private key is never in that volume.
set -eu

NODE_ID=${SKEIN_NODE_ID:?SKEIN_NODE_ID must be set}
CERTS=${SKEIN_CERTS_SRC:-/certs}
TLS_DIR=${SKEIN_TLS_DIR:=/etc/skein/tls}
TOKEN_FILE=${SKEIN_API_TOKEN_FILE:=/etc/skein/api-token}
export SKEIN_TLS_DIR SKEIN_API_TOKEN_FILE

for f in ca.pem node.pem node-key.pem; do
    [ -s "$CERTS/$NODE_ID/$f" ] || { echo "node-entrypoint: missing $CERTS/$NODE_ID/$f" >&2; exit 1; }
done
[ -s "$CERTS/api-token" ] || { echo "node-entrypoint: missing $CERTS/api-token" >&2; exit 1; }

umask 077
mkdir -p "$TLS_DIR" "$(dirname "$TOKEN_FILE")" "${SKEIN_DATA_DIR:-/var/lib/skein}"
cp "$CERTS/$NODE_ID/ca.pem" "$CERTS/$NODE_ID/node.pem" "$CERTS/$NODE_ID/node-key.pem" "$TLS_DIR/"
cp "$CERTS/api-token" "$TOKEN_FILE"
chmod 0644 "$TLS_DIR/ca.pem" "$TLS_DIR/node.pem"

exec skein agent "$@"
