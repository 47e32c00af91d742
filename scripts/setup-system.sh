#!/usr/bin/env bash
# Installs the Debian packages qcow2fs and its tests need, when they are missing.
# Run as root (CI does). As a normal user it only prints what to install.
set -euo pipefail

# package -> a file that proves it is installed
declare -A NEED=(
  [qemu-utils]=/usr/bin/qemu-img          # the oracle: qemu-img, qemu-io
  [fuse3]=/usr/bin/fusermount3            # fusermount, mount.fuse3
  [libfuse2]=/usr/lib/x86_64-linux-gnu/libfuse.so.2   # fuse-native's prebuilt binding links libfuse.so.2
  [fdisk]=/usr/sbin/sfdisk
  [e2fsprogs]=/usr/sbin/mkfs.ext4
  [util-linux]=/usr/sbin/losetup
  [sleuthkit]=/usr/bin/mmls
  [fio]=/usr/bin/fio
  [qemu-system-common]=/usr/bin/qemu-storage-daemon   # QEMU's FUSE export: the benchmark's peer; locking tests
  [libqcow-utils]=/usr/bin/qcowmount      # the benchmark's other peer (read-only)
  [kmod]=/usr/bin/kmod
  [g++]=/usr/bin/g++                      # the image-locking addon (native/, built by node-gyp)
  [make]=/usr/bin/make
  [libzstd-dev]=/usr/include/zstd.h       # the codec addon (native/codec/): zstd clusters off the JS thread
  [libdeflate-dev]=/usr/include/libdeflate.h   # the codec addon: zlib (raw deflate) clusters
  [zlib1g-dev]=/usr/include/zlib.h             # the codec addon: zlib's verdict on odd streams
  [procps]=/usr/bin/pgrep                 # tests find daemons with pgrep -f
)

missing=()
for pkg in "${!NEED[@]}"; do
  [ -e "${NEED[$pkg]}" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup-system: all system packages present"
else
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-system: missing packages; as root run: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "setup-system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# FUSE needs /dev/fuse; loop devices need the loop module (both usually present).
[ -e /dev/fuse ] || { modprobe fuse 2>/dev/null || true; }
[ -e /dev/fuse ] || { echo "setup-system: /dev/fuse is missing (no FUSE in this kernel/container)" >&2; exit 1; }
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
exit 0
