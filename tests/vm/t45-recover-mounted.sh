#!/bin/bash
# Recovery under a mounted file system: ext4 mounted on the device, the
# daemon killed during writes and recovered; afterwards unmount and a clean
# stop work, and the backing file is a consistent ext4 holding every file.
# (A daemon started after the mount inherits it in its own mount namespace
# unless it detaches it: then umount would not end the file system.)
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
start_dev --backing "$IMG" --size 256M
mkfs.ext4 -q -F "$DEV"
mkdir -p "$WORK/mnt"; mount "$DEV" "$WORK/mnt"
head -c 16M /dev/urandom > "$WORK/mnt/before.bin"
dd if=/dev/urandom of="$WORK/mnt/during.bin" bs=1M count=24 conv=fsync status=none &
WRITER=$!
sleep 0.5
crash_dev
log "daemon killed during writes to a mounted ext4"
start_dev recover "$DEV_ID"
wait $WRITER || fail "writer failed across the crash"
grep -q " $WORK/mnt " /proc/self/mountinfo || fail "file system not mounted any more"
head -c 8M /dev/urandom > "$WORK/mnt/after.bin"
(cd "$WORK/mnt" && sha256sum ./*.bin) > "$WORK/sums"
umount "$WORK/mnt"
stop_dev
e2fsck -fn "$IMG" || fail "e2fsck found problems after recovery"
mount -o ro,loop "$IMG" "$WORK/mnt"
(cd "$WORK/mnt" && sha256sum -c --quiet "$WORK/sums") || fail "files differ"
umount "$WORK/mnt"
log "recovered under a mounted fs; unmount, stop, e2fsck and checksums all good"
