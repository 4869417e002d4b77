#!/bin/sh
# Build the local Debian base image (default skein-base:bookworm) without pulling anything:
# debootstrap a minbase bookworm rootfs with the tools skein and its users need, slim it,
# and `docker import` it. Skipped when the image already exists (FORCE=1 rebuilds).
set -eu

BASE_IMAGE=${SKEIN_BASE_IMAGE:-skein-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=nftables,iproute2,bind9-dnsutils,curl,ca-certificates,procps,iputils-ping

log() { printf '[build-base] %s\n' "$*" >&2; }

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE already exists; skipping (FORCE=1 to rebuild)"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get install -y debootstrap >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y debootstrap >/dev/null; }
fi

ROOTFS=$(mktemp -d /var/tmp/skein-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT INT TERM

log "debootstrap $SUITE ($PACKAGES) into $ROOTFS"
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$ROOTFS.log" 2>&1 || { tail -30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
log "debootstrap took $(( $(date +%s) - start ))s"

# Slim: package indexes and caches, docs, man/info pages, translations.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* \
       "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/log/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/usr/share/lintian "$ROOTFS"/usr/share/linda \
       "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
# Keep dpkg from reinstalling what was removed if someone apt-gets inside later.
mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d"
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/01-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG
# Docker manages these at run time.
: >"$ROOTFS/etc/hostname"
: >"$ROOTFS/etc/resolv.conf"

log "importing as $BASE_IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/sh"]' \
    - "$BASE_IMAGE" >/dev/null
log "$BASE_IMAGE: $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
