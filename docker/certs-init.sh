#!/bin/sh
# One-shot `certs` service of docker-compose.yml: create the cluster CA (once, in the CA
# volume only), issue a certificate per node and write a random API token per node, each
# into that node's own volume. Idempotent: existing material is kept, except certificates
# this CA dir has no record of (issued by a skein before certificates named their cluster,
# which agents now refuse): those are issued anew. The CA's CRL (`skein cert revoke
# --ca-dir /ca NODE`) is copied to every node on each run; agents reload it within seconds.
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

# Each node's directory is a volume of its own (docker-compose.yml), mounted into that node
# only: a node holds its own key and token, never another node's.
# Whether $1 is a certificate this CA dir recorded when issuing it.
recorded() {
    for f in "$CA_DIR"/issued/*.pem; do
        [ -f "$f" ] && cmp -s "$f" "$1" && return 0
    done
    return 1
}

for n in $NODES; do
    mkdir -p "$OUT/$n"
    if [ -s "$OUT/$n/node.pem" ] && [ -s "$OUT/$n/node-key.pem" ] && recorded "$OUT/$n/node.pem"; then
        echo "certs: $n already issued"
    else
        echo "certs: issuing $n"
        rm -rf "/tmp/$n.tmp"
        skein cert issue "$CA_DIR" "$n" "/tmp/$n.tmp"
        for f in ca.pem node.pem node-key.pem; do
            cp "/tmp/$n.tmp/$f" "$OUT/$n/$f.tmp"
            mv "$OUT/$n/$f.tmp" "$OUT/$n/$f"
        done
        rm -rf "/tmp/$n.tmp"
    fi
    if [ -s "$CA_DIR/ca.crl.pem" ]; then
        cp "$CA_DIR/ca.crl.pem" "$OUT/$n/ca.crl.pem.tmp"
        chmod 0644 "$OUT/$n/ca.crl.pem.tmp"
        mv "$OUT/$n/ca.crl.pem.tmp" "$OUT/$n/ca.crl.pem"
    fi
    if [ ! -s "$OUT/$n/api-token" ]; then
        echo "certs: generating $n's API token"
        head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$OUT/$n/api-token.tmp"
        mv "$OUT/$n/api-token.tmp" "$OUT/$n/api-token"
    fi
    chmod 0755 "$OUT/$n"
done

# Keys stay private (umask 077); certs readable.
chmod 0755 "$OUT"
echo "certs: done"
