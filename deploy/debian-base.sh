#!/usr/bin/env bash
# Build the base image the Dockerfile starts from, debian:bookworm-slim, out of Debian's own archive
# (debootstrap, the minbase variant) and import it into the local Docker daemon. For builders that
# reach the package registries but no container registry: with this, `docker build` needs nothing but
# Debian's archive and PyPI. Where the container registry is reachable, `docker pull debian:bookworm-slim`
# gives the same thing.
#
#   deploy/debian-base.sh [TAG]        default TAG: debian:bookworm-slim
#   DEBIAN_MIRROR=URL deploy/debian-base.sh   another mirror than debootstrap's default
#
# Needs root (debootstrap) and `apt-get install debootstrap`.
set -euo pipefail

tag=${1:-debian:bookworm-slim}
suite=bookworm
command -v debootstrap >/dev/null || { echo "debian-base: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debian-base: debootstrap needs root" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/munet-debian-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

# shellcheck disable=SC2086
debootstrap --variant=minbase --components=main "$suite" "$rootfs" ${DEBIAN_MIRROR:-} >"$rootfs.log" 2>&1 \
  || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

# the suite's updates and security archives beside the main one (the security archive sits next to the
# main archive as <archive>-security on Debian's mirrors)
mirror=$(awk '$1 == "deb" {print $2; exit}' "$rootfs/etc/apt/sources.list")
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${mirror%/}-security $suite-security main
SOURCES

# what a slim image leaves out: package lists, caches, documentation, logs
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log

tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "debian-base: imported $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
