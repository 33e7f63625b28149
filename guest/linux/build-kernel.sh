#!/usr/bin/env bash
# Build one tiny guest kernel from Debian's linux-source-6.1.
#   build-kernel.sh ARCH SRC_DIR BUILD_DIR DEST_DIR
# ARCH is i386 or x86_64. SRC_DIR is an extracted linux-source tree (made here from
# /usr/src/linux-source-6.1.tar.xz if missing). BUILD_DIR holds the objects (O=, reused
# between builds so a config change rebuilds little). DEST_DIR receives bzImage,
# vmlinux (for a PVH entry), config and kernel.release.
# BOITE_JOBS sets make's -j (default 2: the CI and dev machines have 2 cores).
set -euo pipefail

arch=${1:?usage: build-kernel.sh ARCH SRC_DIR BUILD_DIR DEST_DIR}
src=${2:?}
build=${3:?}
dest=${4:?}
here=$(cd "$(dirname "$0")" && pwd)
jobs=${BOITE_JOBS:-2}

case "$arch" in
  i386 | x86_64) ;;
  *) echo "build-kernel.sh: unknown ARCH '$arch' (expected i386 or x86_64)" >&2; exit 2 ;;
esac

step() { echo "BOITE-STEP $*"; }

# Both kernel builds share the source tree: one extracts it, the other waits.
mkdir -p "$(dirname "$src")"
exec 9>"$src.lock"
flock 9
tarball=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)
# A tree extracted from an older linux-source-6.1 is replaced when the package updates.
stamp() { stat -c '%n %s %Y' "$tarball"; }
if [ -n "$tarball" ] && [ -f "$src/Makefile" ]; then
  if [ ! -f "$src/.boite-tarball" ]; then
    stamp > "$src/.boite-tarball"
  elif [ "$(cat "$src/.boite-tarball")" != "$(stamp)" ]; then
    step "linux-source-6.1 was updated: extracting it again"
    rm -rf "$src"
  fi
fi
if [ ! -f "$src/Makefile" ]; then
  if [ -z "$tarball" ]; then
    step "installing linux-source-6.1"
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq linux-source-6.1 >/dev/null
    tarball=$(ls /usr/src/linux-source-6.1.tar.* | head -n1)
  fi
  step "extracting $tarball"
  rm -rf "$src.part"
  mkdir -p "$src.part"
  tar -xaf "$tarball" -C "$src.part" --strip-components=1
  stamp > "$src.part/.boite-tarball"
  mv "$src.part" "$src"
fi

# Objects compiled from another source tree are not reused (tar keeps the tarball's
# mtimes, so make alone would not notice).
if [ -f "$build/.boite-source" ] && ! cmp -s "$build/.boite-source" "$src/.boite-tarball"; then
  rm -rf "$build"
fi
flock -u 9
mkdir -p "$build" "$dest"
[ -f "$src/.boite-tarball" ] && cp "$src/.boite-tarball" "$build/.boite-source"
mk() { nice make -s -C "$src" O="$build" ARCH="$arch" "$@"; }

step "configuring (tinyconfig + common.config + $arch.config)"
mk tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" \
  "$here/common.config" "$here/$arch.config" >/dev/null
mk olddefconfig >/dev/null

# Every requested value must have survived olddefconfig (a missing dependency drops it
# silently otherwise).
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) want=$line; key=${line%%=*} ;;
    "# CONFIG_"*" is not set") key=${line#\# }; key=${key%% *}; want="# $key is not set" ;;
    *) continue ;;
  esac
  if [[ "$want" == *" is not set" ]]; then
    grep -q "^$key=" "$build/.config" && { echo "config: $key is set, wanted unset" >&2; bad=1; }
  else
    grep -qx "$want" "$build/.config" || {
      echo "config: wanted $want, got: $(grep "^$key=\|^# $key is not set" "$build/.config" || echo absent)" >&2
      bad=1
    }
  fi
done < <(cat "$here/common.config" "$here/$arch.config")
[ "$bad" = 0 ] || { echo "build-kernel.sh: the config fragment did not apply" >&2; exit 1; }

step "compiling bzImage with make -j$jobs"
mk -j"$jobs" bzImage

cp "$build/arch/x86/boot/bzImage" "$dest/bzImage"
cp "$build/.config" "$dest/config"
mk -s kernelrelease > "$dest/kernel.release"
# vmlinux: the ELF with the PVH entry note, for a direct boot without the decompressor.
cp "$build/vmlinux" "$dest/vmlinux"
strip --strip-debug "$dest/vmlinux" 2>/dev/null || true
step "done"
