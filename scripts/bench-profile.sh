#!/usr/bin/env bash
# Profiles the qcow2fs daemon on one workload: mounts IMAGE in the foreground under
# `node --cpu-prof`, runs a fio job on the raw file, unmounts, and prints the hot spots.
#   scripts/bench-profile.sh IMAGE [randread-qd1|randread-qd16|seqread|seqread-direct|
#                                   randwrite-qd1|seqwrite] [SECONDS]
# Read jobs mount IMAGE read-only. Write jobs mount it read-write and change it: pass a copy
# (or a fresh `qemu-img create -f qcow2 X 512M` for allocating writes).
# Needs root (drops caches) and a built tree (npm run build). The profile stays in $OUT.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
image="$(realpath "$1")"
job="${2:-randread-qd1}"
secs="${3:-10}"
OUT="${OUT:-/tmp/qcow2fs-prof}"
mp="$(mktemp -d /tmp/qcow2fs-prof-mp.XXXXXX)"
mkdir -p "$OUT"
rm -f "$OUT"/*.cpuprofile
pid=""
cleanup() {
  if mountpoint -q "$mp" 2>/dev/null || grep -q " $mp " /proc/mounts; then fusermount -u -z "$mp" || true; fi
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rmdir "$mp" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

case "$job" in *write*) ro=() ;; *) ro=(-r) ;; esac
UV_THREADPOOL_SIZE="${UV_THREADPOOL_SIZE:-16}" node --cpu-prof --cpu-prof-dir="$OUT" ${NODE_PROF_FLAGS:-} \
  "$here/bin/qcow2fs" mount "${ro[@]}" -f "$image" "$mp" &
pid=$!
raw="$mp/$(basename "${image%.*}").raw"
for _ in $(seq 1 200); do [ -s "$raw" ] && break; sleep 0.05; done
[ -s "$raw" ] || { echo "bench-profile: mount did not come up" >&2; exit 1; }
sync; echo 3 > /proc/sys/vm/drop_caches; cat "$image" > /dev/null

common=(--name=prof --filename="$raw" --time_based --runtime="$secs" --randrepeat=1 --group_reporting)
case "$job" in
  randread-qd1)   fio "${common[@]}" --readonly --rw=randread --bs=4k --ioengine=psync --iodepth=1 --direct=1 ;;
  randread-qd16)  fio "${common[@]}" --readonly --rw=randread --bs=4k --ioengine=libaio --iodepth=16 --direct=1 ;;
  seqread)        fio "${common[@]}" --readonly --rw=read --bs=1M --ioengine=psync --direct=0 ;;
  seqread-direct) fio "${common[@]}" --readonly --rw=read --bs=1M --ioengine=psync --direct=1 ;;
  randwrite-qd1)  fio "${common[@]}" --rw=randwrite --bs=4k --ioengine=psync --iodepth=1 --direct=1 --end_fsync=1 ;;
  seqwrite)       fio "${common[@]}" --rw=write --bs=1M --ioengine=psync --direct=0 --end_fsync=1 ;;
  *) echo "bench-profile: unknown job $job" >&2; exit 2 ;;
esac | grep -E 'IOPS|READ:|WRITE:' || true

kill -TERM "$pid"; wait "$pid" || true; pid=""
prof="$(ls -t "$OUT"/*.cpuprofile | head -1)"
node "$here/dist/bench/cpuprofile.js" "$prof" "${TOP:-25}"
echo "profile: $prof"
