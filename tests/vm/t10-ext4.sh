#!/bin/bash
# ext4 on /dev/ublkbN: mkfs, mount, write a tree of files, unmount, stop the
# daemon; then from "the host side" (the backing file itself) e2fsck -fn
# passes and the files are identical.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
start_dev --backing "$IMG" --size 512M --queues 2
# The device's I/O threads ask for a short time slice, so that they run as
# soon as their I/O completes (kernels 6.12 and later take it and show it
# in /proc): its 2 queue threads and 2 copy-on-write threads at least, and
# not the daemon's other threads.
# (A thread may end meanwhile: read each file once, quietly.)
slices=$(grep -HE '^se\.slice ' /proc/"$DEV_PID"/task/*/sched 2>/dev/null || true)
short=$(grep -cE ': +100000$' <<< "$slices" || true)
longer=$(grep -cvE ': +100000$' <<< "$slices" || true)
names=$(grep -E ': +100000$' <<< "$slices" | sed 's,/sched:.*,/comm,' | xargs cat 2>/dev/null | sort | tr '\n' ' ' || true)
[ "$short" -ge 4 ] || fail "$short of the daemon's threads run with a 100 us slice ($names), not its 2 queues' and 2 copy-on-write threads'"
[ "$longer" -ge 1 ] || fail "every thread of the daemon has the I/O threads' short slice"
log "$short of the daemon's threads have the I/O threads' 100 us slice ($names), $longer the default"
mkfs.ext4 -q -F -L ublk-e2e "$DEV"
mkdir -p "$WORK/mnt"
mount "$DEV" "$WORK/mnt"

# The tree: real files of many sizes, a deep directory, a large random file.
SRC=$WORK/src
mkdir -p "$SRC/deep/a/b/c/d"
cp -a /usr/share/doc/. "$SRC/doc/" 2>/dev/null || true
cp -a /usr/lib/x86_64-linux-gnu/libc.so.6 "$SRC/" 2>/dev/null || true
head -c 32M /dev/urandom > "$SRC/random.bin"
for i in $(seq 200); do echo "small file $i" > "$SRC/deep/a/b/c/d/f$i"; done
cp -a "$SRC" "$WORK/mnt/tree"
sync
umount "$WORK/mnt"
log "wrote $(du -sh "$SRC" | cut -f1) in $(find "$SRC" | wc -l) entries"
stop_dev

e2fsck -fn "$IMG" || fail "e2fsck found problems in the backing file"
log "e2fsck -fn on the backing file: clean"
LOOP=$(losetup -f --show -r "$IMG")
mount -o ro "$LOOP" "$WORK/mnt"
diff -r --no-dereference "$SRC" "$WORK/mnt/tree" || fail "contents differ"
umount "$WORK/mnt"; losetup -d "$LOOP"
log "contents identical"
