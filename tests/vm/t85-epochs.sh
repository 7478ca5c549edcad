#!/bin/bash
# Epochs on a live ext4, as a consumer (a mirror) uses them:
#
# 1. Cut while the fs is frozen, with a copy of the backing file taken at
#    that moment; then rewrite, delete and fstrim a lot (blocks of the sealed
#    epoch get overwritten and must be preserved; little memory, so they
#    spill to a file). Applied to an empty copy, the epoch gives exactly the
#    device at the cut.
# 2. Cut at a FLUSH after `sync`: the copy, with both epochs applied, mounts
#    (after journal replay) and holds the synced files; e2fsck is clean.
# 3. After the last release, more writes, an epoch sealed and not released,
#    then kill -9 mid-write and recover: every 4 KiB block that differs
#    from the copy (the device at the last release) lies in a region the
#    status reports marked. Epoch numbers go on after the crash, never
#    reusing the unreleased one.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
COPY=$WORK/copy.img
MNT=$WORK/mnt
mkdir -p "$MNT"

# status_of JQ: JQ over this device's tracking status, once the running
# daemon has published one newer than now.
status_of() {
  local now; now=$(date +%s%3N)
  for _ in $(seq 100); do
    "$UBLK_MIRROR" status --json > "$WORK/status.json"
    if jq -e ".[] | select(.id == $DEV_ID and .status.pid == $DEV_PID and .status.updated_ms > $now)" \
        "$WORK/status.json" >/dev/null; then
      jq -r ".[] | select(.id == $DEV_ID) | .status.tracking | $1" "$WORK/status.json"
      return 0
    fi
    sleep 0.2
  done
  fail "no fresh status for device $DEV_ID"
}

start_dev --backing "$IMG" --size 256M --region-size 256K --cow-memory 1M
ID=$DEV_ID
mkfs.ext4 -q -F "$DEV"
mount "$DEV" "$MNT"
mkdir "$MNT/a"
for i in $(seq 40); do head -c $((256 * 1024)) /dev/urandom > "$MNT/a/f$i"; done
cp -a /usr/share/doc "$MNT/doc" 2>/dev/null || true
sync

# --- 1. a cut under a frozen fs, then heavy rewrites after it
fsfreeze -f "$MNT"
cp --sparse=always "$IMG" "$WORK/at-cut1.img"
E1=$("$UBLK_MIRROR" epoch seal "$ID" --now)
fsfreeze -u "$MNT"
[ "$E1" = 1 ] || fail "first epoch is $E1, not 1"
log "sealed epoch $E1 with the fs frozen"
for i in $(seq 1 2 40); do head -c $((256 * 1024)) /dev/urandom > "$MNT/a/f$i"; done
rm -rf "$MNT/doc" "$MNT/a/f2" "$MNT/a/f4"
head -c 6M /dev/urandom > "$MNT/big"
sync
fstrim "$MNT"
[ "$(status_of .oldest_unreleased_epoch)" = 1 ] || fail "status does not show epoch 1 unreleased"
[ "$(status_of .current_epoch)" = 2 ] || fail "status does not show epoch 2 current"
SPILLED=$(status_of .preserved_spilled_bytes)
[ "$SPILLED" -gt 0 ] || fail "nothing spilled with --cow-memory 1M"
log "overwrote, deleted and trimmed after the cut; $((SPILLED >> 10)) KiB of preserved blocks spilled"
"$UBLK_MIRROR" status
"$UBLK_MIRROR" epoch list "$ID"
"$UBLK_MIRROR" epoch apply "$ID" "$E1" --to "$COPY"
cmp "$COPY" "$WORK/at-cut1.img" || fail "epoch $E1 applied to an empty copy is not the device at its cut"
log "epoch $E1 applied: the copy is byte-identical to the device at the cut"
"$UBLK_MIRROR" epoch release "$ID" "$E1"

# --- 2. a cut at a FLUSH, after sync
mkdir "$MNT/b"
for i in $(seq 20); do head -c $((128 * 1024)) /dev/urandom > "$MNT/b/g$i"; done
(cd "$MNT" && find a b -type f -print0 | sort -z | xargs -0 md5sum) > "$WORK/synced.md5"
sync
"$UBLK_MIRROR" epoch seal "$ID" --timeout 60s > "$WORK/e2" &
SEALER=$!
# fsync of the block device always sends a FLUSH.
while kill -0 "$SEALER" 2>/dev/null; do
  python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$DEV"
  sleep 0.2
done
wait "$SEALER" || fail "seal failed"
E2=$(cat "$WORK/e2")
[ "$E2" = 2 ] || fail "second epoch is $E2, not 2"
"$UBLK_MIRROR" epoch list "$ID" --json | jq -e '.sealed[0].at_flush' >/dev/null \
  || fail "epoch $E2 was not cut at a FLUSH"
"$UBLK_MIRROR" epoch apply "$ID" "$E2" --to "$COPY"
"$UBLK_MIRROR" epoch release "$ID" "$E2"
cp --sparse=always "$COPY" "$WORK/check.img"
LOOP=$(losetup -f --show "$WORK/check.img")
mkdir -p "$WORK/check"
mount "$LOOP" "$WORK/check"     # replays the journal, as after a crash
(cd "$WORK/check" && md5sum -c --quiet "$WORK/synced.md5") || fail "files synced before the cut differ in the copy"
umount "$WORK/check"
e2fsck -fn "$LOOP" || fail "e2fsck found problems in the copy at epoch $E2"
losetup -d "$LOOP"
log "epoch $E2 was cut at a FLUSH; the copy mounts, holds every synced file, e2fsck clean"

# --- 3. a crash after the last release
for i in $(seq 1 3 40); do head -c $((256 * 1024)) /dev/urandom > "$MNT/a/f$i" 2>/dev/null || true; done
sync
E3=$("$UBLK_MIRROR" epoch seal "$ID" --timeout 2s)
head -c 4M /dev/urandom > "$MNT/c"
sync
umount "$MNT"
dd if=/dev/urandom of="$DEV" bs=64k count=200 seek=2000 oflag=direct status=none &
WRITER=$!
sleep 0.3
crash_dev
log "daemon killed during writes, epoch $E3 sealed and not released"
start_dev recover "$ID"
wait $WRITER || fail "writer failed across the crash"
[ "$(status_of .resync_pending)" = true ] || fail "the crash left no resync pending"
CURRENT=$(status_of .current_epoch)
[ "$CURRENT" = $((E3 + 1)) ] || fail "after the crash the current epoch is $CURRENT, expected $((E3 + 1)): epoch $E3 was handed out before"
[ "$(status_of .released_epoch)" = "$E2" ] || fail "the last released epoch is not $E2"
expect_fail 4 "not a sealed, unreleased epoch" "$UBLK_MIRROR" epoch release "$ID" "$E3"
status_of '.marked[] | "\(.[0]) \(.[1])"' > "$WORK/marked"
stop_dev

python3 - "$IMG" "$COPY" "$WORK/marked" <<'PY' || fail "a block changed since the last release is not in a marked region"
import sys
img, copy, marked = sys.argv[1:4]
ranges = [tuple(map(int, l.split())) for l in open(marked) if l.strip()]
def covered(off):
    return any(s <= off and off + 4096 <= e for s, e in ranges)
changed = uncovered = 0
with open(img, "rb") as a, open(copy, "rb") as b:
    off = 0
    while (x := a.read(4096)):
        if x != b.read(4096):
            changed += 1
            if not covered(off):
                uncovered += 1
                print(f"block at {off} differs from the last release but is not marked", file=sys.stderr)
        off += 4096
marked_bytes = sum(e - s for s, e in ranges)
print(f"{changed} blocks differ from the copy at the last release, all in "
      f"{len(ranges)} marked ranges ({marked_bytes >> 20} MiB of {off >> 20} MiB)")
sys.exit(1 if uncovered or changed == 0 else 0)
PY
log "every block changed since the last release is in a marked region"
