#!/bin/bash
# Change tracking across a crash: a file-system workload on the device,
# kill -9 of the daemon, recovery. The regions the journal reports cover
# every 4 KiB block whose content differs from a copy of the backing file
# taken when tracking started; the unclean stop is reported as a pending
# resync, and a clean stop afterwards does not forget it.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
truncate -s 256M "$IMG"
mkfs.ext4 -q -F "$IMG"          # an existing file system: the baseline
cp --sparse=always "$IMG" "$WORK/baseline.img"

start_dev --backing "$IMG" --region-size 256K
ID=$DEV_ID
"$UBLK_MIRROR" status | grep -E "^$ID " || fail "status does not list the device"
mkdir -p "$WORK/mnt"; mount "$DEV" "$WORK/mnt"
cp -a /usr/share/doc/bash /usr/share/doc/coreutils "$WORK/mnt/" 2>/dev/null || true
head -c 20M /dev/urandom > "$WORK/mnt/random.bin"
sync
rm -rf "$WORK/mnt/bash"; sync
fstrim "$WORK/mnt" || true
dd if=/dev/urandom of="$WORK/mnt/during.bin" bs=1M count=16 conv=fsync status=none &
WRITER=$!
sleep 0.3
kill -9 "$DEV_PID"; wait "$DEV_PID" 2>/dev/null || true
log "daemon killed during a file-system workload"
start_dev recover "$ID"
wait $WRITER || fail "writer failed"
umount "$WORK/mnt"
sleep 1.5   # let the daemon publish a fresh status
"$UBLK_MIRROR" status
"$UBLK_MIRROR" status --json > "$WORK/status.json"
jq -e ".[] | select(.id == $ID) | .status.tracking.resync_pending" "$WORK/status.json" >/dev/null \
  || { cat "$WORK/status.json"; fail "the unclean stop is not reported as a pending resync"; }
stop_dev

# Every block that differs from the baseline must lie in a marked region.
jq -r ".[] | select(.id == $ID) | .status.tracking.marked[] | \"\(.[0]) \(.[1])\"" "$WORK/status.json" > "$WORK/marked"
python3 - "$WORK/baseline.img" "$IMG" "$WORK/marked" <<'PY' || fail "a changed block is outside every marked region"
import sys
base, now, marked = sys.argv[1:4]
ranges = [tuple(map(int, l.split())) for l in open(marked) if l.strip()]
def covered(off):
    return any(s <= off and off + 4096 <= e for s, e in ranges)
changed = uncovered = 0
with open(base, "rb") as a, open(now, "rb") as b:
    off = 0
    while True:
        x, y = a.read(4096), b.read(4096)
        if not x and not y:
            break
        if x != y:
            changed += 1
            if not covered(off):
                uncovered += 1
                print(f"changed block at {off} not in a marked region", file=sys.stderr)
        off += 4096
marked_bytes = sum(e - s for s, e in ranges)
print(f"{changed} changed 4K blocks, all in {len(ranges)} marked ranges ({marked_bytes >> 20} MiB)")
sys.exit(1 if uncovered or not changed else 0)
PY

# A clean stop after the crash keeps the resync pending.
start_dev --backing "$IMG"
sleep 1.5
"$UBLK_MIRROR" status --json | jq -e ".[] | select(.id == $DEV_ID) | .status.tracking.resync_pending" >/dev/null \
  || fail "a restart forgot the pending resync"
stop_dev
log "tracking covered every change across the crash"
