#!/bin/sh
# One-shot `certs` service of docker-compose.yml: create the cluster CA (once, in the CA
# volume only), issue a certificate per node into the shared certs volume, and write a random
# API token. Idempotent: existing material is kept.
set -eu

CA_DIR=${SKEIN_CA_DIR:-/ca}
OUT=${SKEIN_CERTS_OUT:-/certs}
CLUSTER_ID=${SKEIN_CLUSTER_ID:-skein-compose}
NODES=${SKEIN_NODES:-node1 node2 node3}

umask 077
if [ -s "$CA_DIR/ca.pem" ] && [ -s "$CA_DIR/ca-key.pem" ]; then
    echo "certs: CA exists in $CA_DIR"
else
    echo "certs: creating CA for cluster $CLUSTER_ID"
    skein cert init "$CA_DIR" --cluster-id "$CLUSTER_ID"
fi

for n in $NODES; do
    if [ -s "$OUT/$n/node.pem" ] && [ -s "$OUT/$n/node-key.pem" ]; then
        echo "certs: $n already issued"
    else
        echo "certs: issuing $n"
        rm -rf "$OUT/$n.tmp"
        skein cert issue "$CA_DIR" "$n" "$OUT/$n.tmp"
        rm -rf "$OUT/$n"
        mv "$OUT/$n.tmp" "$OUT/$n"
    fi
done

if [ ! -s "$OUT/api-token" ]; then
    echo "certs: generating API token"
    head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$OUT/api-token.tmp"
    mv "$OUT/api-token.tmp" "$OUT/api-token"
fi
# Keys stay private (umask 077); certs readable.
chmod 0755 "$OUT"
echo "certs: done"
