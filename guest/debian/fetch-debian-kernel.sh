#!/usr/bin/env bash
# Fetch one of Debian's stock kernels (the one a meta package such as linux-image-amd64,
# linux-image-686 or linux-image-686-pae points at) without installing it, to show that a
# distribution kernel boots.
#   fetch-debian-kernel.sh DEST_DIR [FLAVOUR]      (FLAVOUR: amd64 (default), 686, 686-pae)
# DEST_DIR receives vmlinuz, config, kernel.release, package (name=version) and the
# package itself as kernel.deb (its modules are what a stock initramfs loads).
set -euo pipefail
dest=${1:?usage: fetch-debian-kernel.sh DEST_DIR [FLAVOUR]}
flavour=${2:-amd64}
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

# The 686 kernels are i386 packages: apt must know that architecture.
if [ "$flavour" != amd64 ] && ! dpkg --print-foreign-architectures | grep -qx i386; then
  $sudo dpkg --add-architecture i386
  $sudo apt-get update -qq || echo "fetch-debian-kernel.sh: apt-get update reported errors" >&2
fi

resolve() {
  apt-cache depends "linux-image-$flavour" 2>/dev/null \
    | sed -n "s/^ *Depends: \\(linux-image-[0-9][^ :]*-$flavour\\)\\(-unsigned\\)\\?\\(:i386\\)\\?\$/\\1\\2\\3/p" | head -n1
}
pkg=$(resolve)
if [ -z "$pkg" ]; then
  $sudo apt-get update -qq || echo "fetch-debian-kernel.sh: apt-get update reported errors" >&2
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-debian-kernel.sh: apt-cache cannot resolve linux-image-$flavour (not a Debian system?)" >&2; exit 1; }
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
release=${release%:i386}
release=${release%-unsigned}
mkdir -p "$dest"
cp "root/boot/vmlinuz-$release" "$dest/vmlinuz"
cp "root/boot/config-$release" "$dest/config"
echo "$release" > "$dest/kernel.release"
echo "$pkg=$version" > "$dest/package"
cp "$deb" "$dest/kernel.deb"
