#!/usr/bin/env bash
# The qcow2fs demo: build a small qcow2 holding a partition table and an ext4 filesystem with a
# few files, mount it with qcow2fs, show `fdisk -l` of the raw file and the files through a
# read-only loop mount, then clean up everything it made. Run as root (loop devices, mount).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup-system.sh" >/dev/null
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it uses loop devices and mount)" >&2; exit 1; }
q() { node "$here/bin/qcow2fs" "$@"; }

work=$(mktemp -d /tmp/qcow2fs-demo.XXXXXX)
loop=""
cleanup() {
  set +e
  mountpoint -q "$work/fs" && umount "$work/fs"
  [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
  mountpoint -q "$work/mnt" && q umount "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building a 64 MiB disk: GPT + one ext4 partition holding a few files"
mkdir -p "$work/files/docs" "$work/mnt" "$work/fs"
echo "Hello from inside a qcow2 image." > "$work/files/hello.txt"
seq 1 2000 > "$work/files/docs/numbers.txt"
head -c 300000 /dev/urandom > "$work/files/random.bin"
truncate -s 64M "$work/disk.img"
printf 'label: gpt\nstart=2048, type=L\n' | sfdisk -q "$work/disk.img"
# The partition as its own file, filled by mkfs.ext4 -d, then copied into place.
truncate -s $(( (64 - 2) * 1024 * 1024 - 34 * 512 )) "$work/part.img"
mkfs.ext4 -q -d "$work/files" -L demo "$work/part.img"
dd if="$work/part.img" of="$work/disk.img" bs=1M seek=1 conv=notrunc,sparse status=none
qemu-img convert -c -O qcow2 "$work/disk.img" "$work/disk.qcow2"
rm -f "$work/disk.img" "$work/part.img"
q info "$work/disk.qcow2"

step "qcow2fs mount disk.qcow2 mnt --read-only"
q mount "$work/disk.qcow2" "$work/mnt" --read-only
ls -l "$work/mnt"

step "fdisk -l mnt/disk.raw"
fdisk -l "$work/mnt/disk.raw"

step "losetup -r -P, mount -o ro, and the files inside"
loop=$(losetup -f --show -r -P "$work/mnt/disk.raw")
[ -e "${loop}p1" ] || partx -a "$loop"
mount -o ro "${loop}p1" "$work/fs"
ls -lR "$work/fs" | grep -v '^total'
echo; cat "$work/fs/hello.txt"
cmp "$work/fs/random.bin" "$work/files/random.bin" && echo "random.bin: identical to the source"

step "Cleaning up"
umount "$work/fs"
losetup -d "$loop"; loop=""
q umount "$work/mnt"
echo "done: everything the demo made is removed"
