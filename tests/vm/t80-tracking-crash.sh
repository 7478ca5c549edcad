#!/bin/bash
# Change tracking across a crash. A new device gets scattered writes and a
# discard, then the daemon is killed mid-write and recovered. The regions the
# journal reports must cover every 4 KiB block that differs from the file as
# it was when tracking started (all zeroes), yet be only a small part of the
# device. The unclean stop shows as a pending resync, kept across a clean
# restart. A pre-existing file without a journal starts fully marked.
source "$(dirname "$0")/lib.sh"

# wait_status ID JQ: poll `status --json` (the daemon publishes every second)
# until the running daemon ($DEV_PID) has published a status of device ID in
# which JQ holds; the last status is left in $WORK/status.json.
wait_status() {
  for _ in $(seq 100); do
    "$UBLK_MIRROR" status --json > "$WORK/status.json"
    jq -e ".[] | select(.id == $1 and .status.pid == $DEV_PID) | $2" "$WORK/status.json" >/dev/null && return 0
    sleep 0.2
  done
  cat "$WORK/status.json"; fail "device $1: status never satisfied: $2"
}

IMG=$WORK/disk.img
start_dev --backing "$IMG" --size 256M --region-size 256K
ID=$DEV_ID
"$UBLK_MIRROR" status | grep -E "^$ID " || fail "status does not list the device"
python3 - "$DEV" <<'PY'
import os, random, sys
random.seed(7)
fd = os.open(sys.argv[1], os.O_WRONLY)
for _ in range(200):          # 200 scattered 4 KiB writes
    off = random.randrange(0, 256 << 20, 4096)
    os.pwrite(fd, os.urandom(4096), off)
os.pwrite(fd, os.urandom(1 << 20), 100 << 20)   # one 1 MiB run
os.fsync(fd)
PY
blkdiscard -o $((200 << 20)) -l $((2 << 20)) "$DEV"
dd if=/dev/urandom of="$DEV" bs=64k count=64 seek=2000 oflag=direct status=none &
WRITER=$!
sleep 0.2
crash_dev
log "daemon killed during writes"
start_dev recover "$ID"
wait $WRITER || fail "writer failed across the crash"
# a status written after the last write completed
wait_status "$ID" ".status.tracking.resync_pending and .status.updated_ms > $(date +%s%3N)"
"$UBLK_MIRROR" status
stop_dev

jq -r ".[] | select(.id == $ID) | .status.tracking.marked[] | \"\(.[0]) \(.[1])\"" "$WORK/status.json" > "$WORK/marked"
python3 - "$IMG" "$WORK/marked" <<'PY' || fail "tracking missed a change, or marked (almost) everything"
import sys
img, marked = sys.argv[1:3]
ranges = [tuple(map(int, l.split())) for l in open(marked) if l.strip()]
def covered(off):
    return any(s <= off and off + 4096 <= e for s, e in ranges)
zero = bytes(4096)
changed = uncovered = 0
with open(img, "rb") as f:
    off = 0
    while block := f.read(4096):
        if block != zero:
            changed += 1
            if not covered(off):
                uncovered += 1
                print(f"changed block at {off} not in a marked region", file=sys.stderr)
        off += 4096
marked_bytes = sum(e - s for s, e in ranges)
print(f"{changed} changed 4K blocks, all in {len(ranges)} marked ranges "
      f"({marked_bytes >> 20} MiB of {off >> 20} MiB)")
sys.exit(1 if uncovered or changed < 200 or marked_bytes > off // 4 else 0)
PY

# A clean restart keeps the resync pending.
start_dev --backing "$IMG"
wait_status "$DEV_ID" '.status.tracking.resync_pending'
stop_dev

# A file that existed before its journal: its history is unknown, all marked.
truncate -s 64M "$WORK/old.img"
start_dev --backing "$WORK/old.img" --region-size 1M
wait_status "$DEV_ID" '.status.tracking.regions_marked == 64 and .status.tracking.resync_pending'
stop_dev
log "tracking covered every change across the crash, and no more than needed"
