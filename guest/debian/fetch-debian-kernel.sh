#!/usr/bin/env bash
# Fetch Debian's stock x86_64 kernel (the one linux-image-amd64 points at) without
# installing it, to show that a distribution kernel boots.
#   fetch-debian-kernel.sh DEST_DIR
# DEST_DIR receives vmlinuz, config, kernel.release and package (name=version).
set -euo pipefail
dest=${1:?usage: fetch-debian-kernel.sh DEST_DIR}
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

resolve() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
pkg=$(resolve)
if [ -z "$pkg" ]; then
  $sudo apt-get update -qq || echo "fetch-debian-kernel.sh: apt-get update reported errors" >&2
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-debian-kernel.sh: apt-cache cannot resolve linux-image-amd64 (not a Debian amd64 system?)" >&2; exit 1; }
echo "BOITE-STEP downloading $pkg"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download -q "$pkg" >/dev/null
deb=$(ls ./*.deb | head -n1)
version=$(dpkg-deb -f "$deb" Version)
echo "BOITE-STEP extracting $(basename "$deb")"
dpkg-deb -x "$deb" root
release=${pkg#linux-image-}
mkdir -p "$dest"
cp "root/boot/vmlinuz-$release" "$dest/vmlinuz"
cp "root/boot/config-$release" "$dest/config"
echo "$release" > "$dest/kernel.release"
echo "$pkg=$version" > "$dest/package"
