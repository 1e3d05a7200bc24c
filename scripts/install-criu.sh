#!/usr/bin/env bash
# Make sure a working CRIU >= 4.2 is installed (idempotent).
#
# Why we build: Debian 12's CRIU 3.17 fails `criu check` on kernels >= 6.13 and CRIU 4.1 cannot
# dump IPv4/IPv6 sockets on kernels >= 6.16 (see shared CRIU notes). CRIU 4.2.1's source tarball
# is in Debian's archive; we fetch it from the mirror the machine's apt is configured with.
set -euo pipefail

CRIU_VERSION=4.2.1
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
PREFIX=${TORPOR_CRIU_PREFIX:-/usr/local}
CACHE=${TORPOR_CACHE:-/var/cache/torpor}
BUILD_DEPS=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
  protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libnftables-dev libgnutls28-dev libaio-dev uuid-dev libdrm-dev)
RUNTIME_DEPS=(nftables)

say() { printf 'install-criu: %s\n' "$*" >&2; }
die() { printf 'install-criu: error: %s\n' "$*" >&2; exit 1; }

version_ok() {  # $1 = criu binary
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -1) || return 1
  [ -n "$v" ] || return 1
  # sort -V puts the smaller first: OK when 4.2 is not greater than v.
  [ "$(printf '%s\n%s\n' 4.2 "$v" | sort -V | head -1)" = 4.2 ]
}

check_ok() { "$1" check >/dev/null 2>&1; }

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s ' "$p"
  done
}

apt_install() {
  local need
  need=$(missing_pkgs "$@")
  [ -z "$need" ] && return 0
  [ "$(id -u)" = 0 ] || die "packages missing ($need) and not root: run as root"
  say "installing: $need"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends $need >/dev/null; } \
    || die "apt-get install failed for: $need"
}

archive_uri() {
  # The primary Debian mirror as configured for apt (deb822 or one-line format); never hard-coded.
  local f uri=""
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ /bookworm( |$)/ || $0 ~ /stable( |$)/) {print u; exit} }' "$f")
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "cannot find a Debian mirror in the apt configuration"
  printf '%s\n' "${uri%/}"
}

fetch_tarball() {
  local dest=$1 uri tmp
  uri=$(archive_uri)
  tmp="$dest.part"
  say "fetching criu_${CRIU_VERSION}.orig.tar.xz from the configured Debian mirror"
  if ! curl -fsSL --retry 3 -o "$tmp" "$uri/pool/main/c/criu/criu_${CRIU_VERSION}.orig.tar.xz"; then
    # Fall back to apt's own source machinery (a deb-src entry for sid, as apt knows it).
    say "direct fetch failed; trying apt-get source"
    local list=/etc/apt/sources.list.d/torpor-criu-src.sources
    printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$list"
    apt-get update -q >/dev/null || true
    local d; d=$(mktemp -d)
    # The .dsc answers 404 and apt exits non-zero, but the orig tarball arrives.
    (cd "$d" && apt-get source --download-only "criu=${CRIU_VERSION}-1" >/dev/null 2>&1) || true
    [ -f "$d/criu_${CRIU_VERSION}.orig.tar.xz" ] || die "could not download criu_${CRIU_VERSION}.orig.tar.xz"
    mv "$d/criu_${CRIU_VERSION}.orig.tar.xz" "$tmp"; rm -rf "$d"
  fi
  local got
  got=$(sha256sum "$tmp" | cut -d' ' -f1)
  if [ "$got" != "$CRIU_SHA256" ]; then
    rm -f "$tmp"
    die "SHA-256 mismatch for criu_${CRIU_VERSION}.orig.tar.xz: got $got, want $CRIU_SHA256 (refusing to build)"
  fi
  mv "$tmp" "$dest"
}

main() {
  local c
  for c in "$PREFIX/sbin/criu" "$(command -v criu 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ] && version_ok "$c" && check_ok "$c"; then
      apt_install "${RUNTIME_DEPS[@]}"
      say "ok: $c ($("$c" --version | sed -n 's/^Version: *//p'))"
      return 0
    fi
  done
  [ "$(id -u)" = 0 ] || die "CRIU >= 4.2 is not installed and installing it needs root"
  apt_install curl ca-certificates xz-utils "${BUILD_DEPS[@]}" "${RUNTIME_DEPS[@]}"
  mkdir -p "$CACHE"
  local tarball="$CACHE/criu_${CRIU_VERSION}.orig.tar.xz"
  if [ ! -f "$tarball" ] || [ "$(sha256sum "$tarball" | cut -d' ' -f1)" != "$CRIU_SHA256" ]; then
    rm -f "$tarball"
    fetch_tarball "$tarball"
  fi
  local src="$CACHE/criu-${CRIU_VERSION}"
  rm -rf "$src"; mkdir -p "$src"
  tar -xJf "$tarball" -C "$src" --strip-components=1
  say "building CRIU ${CRIU_VERSION} (about 20 s)"
  if ! make -C "$src" -j"$(nproc)" criu >"$CACHE/criu-build.log" 2>&1; then
    tail -n 20 "$CACHE/criu-build.log" >&2
    die "CRIU build failed; full log: $CACHE/criu-build.log"
  fi
  install -D -m 0755 "$src/criu/criu" "$PREFIX/sbin/criu"
  if ! "$PREFIX/sbin/criu" check >"$CACHE/criu-check.log" 2>&1; then
    cat "$CACHE/criu-check.log" >&2
    die "'criu check' failed for the freshly built $PREFIX/sbin/criu; see above"
  fi
  rm -rf "$src"
  say "ok: installed $PREFIX/sbin/criu ($CRIU_VERSION), criu check passes"
}

main "$@"
