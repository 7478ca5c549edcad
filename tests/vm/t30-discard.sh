#!/bin/bash
# Discards reach the backing file as holes: fstrim on a mounted ext4 and
# blkdiscard on the raw device make the file's allocated size shrink. A
# backing that cannot punch holes gets no discards at all (a discard is
# mirrored as zeroes, so one it ignored would leave the mirror different).
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
start_dev --backing "$IMG" --size 256M
q=/sys/block/ublkb$DEV_ID/queue
[ "$(cat $q/discard_max_bytes)" -gt 0 ] || fail "device does not advertise discard"
[ "$(cat $q/write_zeroes_max_bytes)" -gt 0 ] || fail "device does not advertise write zeroes"

mkfs.ext4 -q -F -E nodiscard "$DEV"
mkdir -p "$WORK/mnt"; mount "$DEV" "$WORK/mnt"
head -c 100M /dev/urandom > "$WORK/mnt/big"; sync
full=$(allocated "$IMG")
rm "$WORK/mnt/big"; sync
fstrim -v "$WORK/mnt"
trimmed=$(allocated "$IMG")
log "allocated: after writing $((full >> 20)) MiB, after rm+fstrim $((trimmed >> 20)) MiB"
[ $((full - trimmed)) -gt $((80 << 20)) ] || fail "fstrim did not punch holes ($full -> $trimmed)"
umount "$WORK/mnt"

dd if=/dev/urandom of="$DEV" bs=1M count=64 oflag=direct status=none
before=$(allocated "$IMG")
blkdiscard "$DEV"
after=$(allocated "$IMG")
log "allocated: before blkdiscard $((before >> 20)) MiB, after $((after >> 20)) MiB"
[ "$after" -lt $((4 << 20)) ] || fail "blkdiscard left $after bytes allocated"
cmp -n $((64 << 20)) "$DEV" /dev/zero || fail "discarded range does not read as zeroes"

# write-zeroes (blkdiscard -z) keeps reading zeroes.
dd if=/dev/urandom of="$DEV" bs=1M count=8 oflag=direct status=none
blkdiscard -z -o 0 -l $((8 << 20)) "$DEV"
cmp -n $((8 << 20)) "$DEV" /dev/zero || fail "write-zeroes range does not read as zeroes"
log "blkdiscard -z reads back zeroes"

# A backing on a file system that cannot punch holes (ramfs has no
# fallocate): the second device offers no discard, and write-zeroes still
# reads back zeroes.
mkdir -p "$WORK/ram"; mount -t ramfs ramfs "$WORK/ram"
FIRST_PID=$DEV_PID FIRST_DEV=$DEV
start_dev --backing "$WORK/ram/noholes.img" --size 32M --name noholes --id 9
q=/sys/block/ublkb$DEV_ID/queue
[ "$(cat $q/discard_max_bytes)" = 0 ] || fail "a backing without holes, yet discard offered ($(cat $q/discard_max_bytes))"
[ "$(cat $q/write_zeroes_max_bytes)" -gt 0 ] || fail "write zeroes not offered"
if blkdiscard "$DEV" 2>"$WORK/blkdiscard.err"; then fail "blkdiscard succeeded on a device without discard"; fi
log "blkdiscard refused: $(cat "$WORK/blkdiscard.err")"
dd if=/dev/urandom of="$DEV" bs=1M count=4 oflag=direct status=none
blkdiscard -z -o 0 -l $((4 << 20)) "$DEV"
cmp -n $((4 << 20)) "$DEV" /dev/zero || fail "write-zeroes on a backing without holes does not read as zeroes"
grep -q "cannot punch holes" "$WORK/daemon.$DAEMONS.log" || fail "the daemon did not say why there is no discard"
stop_dev
umount "$WORK/ram"

# A device whose backing file lives on a file system on another ublk
# device (the daemon's own mount namespace holds none of those).
mkfs.ext4 -q -F "$FIRST_DEV"
mount "$FIRST_DEV" "$WORK/mnt"
start_dev --backing "$WORK/mnt/stacked.img" --size 16M --name stacked --id 10
# its tracking state beside it, on the same file system (not in the
# mount point's directory underneath)
[ -f "$WORK/mnt/stacked.img.ublk-mirror/journal" ] || fail "the stacked device's journal is not beside its backing file: $(ls -la "$WORK/mnt")"
head -c 1M /dev/urandom > "$WORK/pattern"
dd if="$WORK/pattern" of="$DEV" bs=1M oflag=direct status=none
cmp -n $((1 << 20)) "$WORK/pattern" "$DEV" || fail "a stacked device does not read back what was written"
"$UBLK_MIRROR" list --json | jq -e --arg p "$WORK/mnt/stacked.img" '.[] | select(.id == 10) | .backing == $p' >/dev/null ||
  fail "a stacked device's record does not name its backing: $("$UBLK_MIRROR" list --json)"
stop_dev
cmp -n $((1 << 20)) "$WORK/pattern" "$WORK/mnt/stacked.img" || fail "the stacked device's backing file lacks the data"
umount "$WORK/mnt"
log "a device stacked on another's file system works"
DEV_PID=$FIRST_PID DEV=$FIRST_DEV
stop_dev
