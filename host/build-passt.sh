#!/usr/bin/env bash
# Builds Debian 13's passt from its source into boite's cache, for boite's NAT.
# Why: Debian 12's passt (0.0~git20230309.7c7625d-1) resets a guest-opened TCP connection
# 24 s after its SYN-ACK while the host side has sent no data (docs/architecture.md,
# netback); Debian 13's binary needs glibc 2.38, so boite builds its source instead.
# The tarball is the one in Debian's pool, checked against the SHA-256 from trixie's
# Sources. Prints the binary's path on success; one line on stderr and status 1 if not.
set -euo pipefail
VERSION=0.0~git20250503.587980c
TARBALL=passt_$VERSION.orig.tar.xz
SHA256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
URL=http://deb.debian.org/debian/pool/main/p/passt/$TARBALL

CACHE=${BOITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/boite}
DEST=$CACHE/passt-$VERSION
if [ -x "$DEST/passt" ]; then echo "$DEST/passt"; exit 0; fi

echo "boite: building passt $VERSION (Debian 13's source) into $DEST" >&2
fail() { echo "boite: $1; NAT uses Debian's passt from PATH" >&2; exit 1; }
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.passt-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
curl -sSfL --retry 2 -o "$WORK/$TARBALL" "$URL" 2>"$WORK/log" ||
  fail "cannot download passt's source ($URL)"
echo "$SHA256  $WORK/$TARBALL" | sha256sum -c --quiet - >/dev/null 2>&1 ||
  fail "passt's source $TARBALL does not match its pinned SHA-256"
tar -xJf "$WORK/$TARBALL" -C "$WORK" 2>>"$WORK/log" || fail "cannot unpack $TARBALL"
SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'passt*' | head -n 1)
[ -n "$SRC" ] || fail "no source folder in $TARBALL"
# passt.avx2 too: on an AVX2 CPU, passt re-executes itself as passt.avx2 and warns if absent.
targets=(passt)
[ "$(uname -m)" = x86_64 ] && targets+=(passt.avx2)
make -C "$SRC" -j"$(nproc)" VERSION="$VERSION" "${targets[@]}" >>"$WORK/log" 2>&1 ||
  fail "building passt $VERSION failed (make)"
mkdir -p "$WORK/out"
for t in "${targets[@]}"; do install -m 755 "$SRC/$t" "$WORK/out/$t"; done
rm -rf "$DEST"
mv "$WORK/out" "$DEST"  # whole or not at all: a half-built folder never looks ready
echo "$DEST/passt"
