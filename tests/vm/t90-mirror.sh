#!/bin/bash
# Mirroring a live device to a mirror server on 127.0.0.1, as a user would:
# init, client add, enroll, add --mirror; ext4 with files; unmount and
# `ublk-mirror sync`: the server's image passes e2fsck -fn and holds the same
# files. Then kill -9 of the daemon mid-write, recover, sync: the image is
# byte-identical to the backing file.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
MNT=$WORK/mnt; mkdir -p "$MNT"

start_mirror_server
SERVER_IMG=$DATA/volumes/laptop/root/image
"$MS" --data "$DATA" client list | grep -q "laptop .*enrolled" || fail "the server does not list the enrolled client"
log "server up, client enrolled"

start_dev --backing "$IMG" --size 256M --mirror root --client-dir "$WORK/client" --mirror-interval 1s
ID=$DEV_ID
mkfs.ext4 -q -F "$DEV"
mount "$DEV" "$MNT"
mkdir "$MNT/files"
cp -a /usr/share/doc/bash "$MNT/files/" 2>/dev/null || true
for i in $(seq 30); do head -c $((64 * 1024)) /dev/urandom > "$MNT/files/r$i"; done
seq 1 200000 > "$MNT/files/numbers.txt"
(cd "$MNT" && find files -type f -print0 | sort -z | xargs -0 md5sum) > "$WORK/files.md5"
umount "$MNT"
"$UBLK_MIRROR" sync "$ID" --timeout 300s || { cat "$WORK/daemon.$DAEMONS.log"; fail "sync failed"; }
"$UBLK_MIRROR" status
"$UBLK_MIRROR" status --json | jq -e ".[] | select(.id == $ID) | .status.mirror.link == \"connected\"" >/dev/null \
  || fail "status does not show the mirror connected"
"$MS" --data "$DATA" volumes
e2fsck -fn "$SERVER_IMG" || fail "e2fsck found problems in the server's image"
mkdir -p "$WORK/check"
mount -o ro,loop "$SERVER_IMG" "$WORK/check"
(cd "$WORK/check" && md5sum -c --quiet "$WORK/files.md5") || fail "the server's image holds other files"
umount "$WORK/check"
log "after sync: the server's image passes e2fsck -fn and holds the same files"

# kill -9 mid-write, recover, sync: identical images
mount "$DEV" "$MNT"
dd if=/dev/urandom of="$MNT/during-crash.bin" bs=1M count=24 conv=fsync status=none &
WRITER=$!
sleep 0.5
crash_dev
log "daemon killed during writes"
start_dev recover "$ID"
wait $WRITER || fail "writer failed across the crash"
umount "$MNT"
"$UBLK_MIRROR" sync "$ID" --timeout 300s || { cat "$WORK/daemon.$DAEMONS.log"; fail "sync after the crash failed"; }
stop_dev
cmp "$IMG" "$SERVER_IMG" || fail "after recovery and sync the server's image differs from the backing file"
log "after kill -9, recover and sync: the server's image is byte-identical to the backing file"
stop_mirror_server
