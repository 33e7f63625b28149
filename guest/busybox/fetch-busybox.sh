#!/usr/bin/env bash
# Fetch Debian's static i386 busybox (busybox-static:i386) without installing it.
#   fetch-busybox.sh DEST_FILE
# i386 so one binary runs under both guest kernels (x86_64 through IA32 emulation).
# Adds the i386 dpkg architecture when it is missing (needs root or sudo, once).
set -euo pipefail
dest=${1:?usage: fetch-busybox.sh DEST_FILE}
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

if ! dpkg --print-foreign-architectures | grep -qx i386 && [ "$(dpkg --print-architecture)" != i386 ]; then
  echo "BOITE-STEP adding the i386 dpkg architecture"
  $sudo dpkg --add-architecture i386
  $sudo apt-get update -qq || echo "fetch-busybox.sh: apt-get update reported errors; trying the download anyway" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download -q busybox-static:i386 >/dev/null 2>&1; then
  # The package lists may predate the architecture or be stale.
  $sudo apt-get update -qq || echo "fetch-busybox.sh: apt-get update reported errors; trying the download anyway" >&2
  apt-get download -q busybox-static:i386 >/dev/null
fi
deb=$(ls busybox-static_*_i386.deb)
dpkg-deb -x "$deb" root
file root/bin/busybox | grep -q "ELF 32-bit" || { echo "fetch-busybox.sh: $deb holds no 32-bit busybox" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
cp root/bin/busybox "$dest.part"
chmod 755 "$dest.part"
mv "$dest.part" "$dest"
echo "BOITE-STEP busybox from $deb"
