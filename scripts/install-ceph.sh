#!/usr/bin/env bash
# Install the Ceph daemons and client libraries the cluster tests use (idempotent).
set -euo pipefail
PKGS=(ceph-mon ceph-mgr ceph-osd radosgw ceph-common python3-rados)
need=""
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need="$need $p"
done
[ -z "$need" ] && exit 0
[ "$(id -u)" = 0 ] || { echo "install-ceph: error: packages missing ($need) and not root" >&2; exit 1; }
echo "install-ceph: installing:$need (about 30 s)" >&2
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need >/dev/null \
  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
       apt-get install -y -q --no-install-recommends $need >/dev/null; } \
  || { echo "install-ceph: error: apt-get install failed for:$need" >&2; exit 1; }
