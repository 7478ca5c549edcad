#!/bin/bash
# Restore a lost disk and keep working while it fills: `ublk-mirror
# restore --instant` serves the target at once; the ext4 on it mounts at
# once and its files read right while the background fill runs; files are
# written; the daemon is killed with SIGKILL mid-fill and recovered; the
# fill goes on from its crash-safe state; at the end every old and new
# file is right, e2fsck is clean, and the fill state is gone. A restore
# stopped mid-fill starts again where the mirror cannot be reached. With
# --mirror the restored device took the volume over: once filled it
# mirrors, the mirror ends equal to it, and the lost laptop's device is
# refused.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
MNT=$WORK/mnt; mkdir -p "$MNT"
TARGET=$WORK/restored.img

start_mirror_server
start_dev --backing "$IMG" --size 256M --mirror root --client-dir "$WORK/client" --mirror-interval 1s
ID=$DEV_ID
mkfs.ext4 -q -F "$DEV"
mount "$DEV" "$MNT"
mkdir "$MNT/docs"
for i in $(seq 8); do head -c $((4 * 1024 * 1024)) /dev/urandom > "$MNT/docs/old$i"; done
echo "before the laptop was lost" > "$MNT/docs/letter.txt"
# Not read below: the fill fetches it, at --fill-rate (holes cost
# nothing), so the fill is still under way while the test works.
head -c $((16 * 1024 * 1024)) /dev/urandom > "$MNT/ballast"
(cd "$MNT" && find docs -type f -print0 | sort -z | xargs -0 md5sum) > "$WORK/old.md5"
umount "$MNT"
"$UBLK_MIRROR" snapshot "$ID" base --timeout 300s || fail "snapshot failed"
stop_dev
log "volume root holds an ext4 with 48 MiB of files (snapshot base)"

# wait_line FILE: the first line a daemon prints (its device)
wait_line() {
  for _ in $(seq 600); do [ -s "$1" ] && break; sleep 0.1; done
  head -n1 "$1"
}
fill_status() { "$UBLK_MIRROR" status --json | jq -r --argjson id "$1" ".[] | select(.id == \$id) | .status.attach.$2"; }

"$UBLK_MIRROR" restore --instant --mirror --volume root --at base --to "$TARGET" --fill-rate 1M \
  --client-dir "$WORK/client" --state-dir "$WORK/state" > "$WORK/r1.out" 2> "$WORK/r1.log" &
RPID=$!
RDEV=$(wait_line "$WORK/r1.out")
[ -b "$RDEV" ] || { cat "$WORK/r1.log" >&2; fail "restore --instant printed no device: '$RDEV'"; }
RID=${RDEV#/dev/ublkb}
mount "$RDEV" "$MNT" || fail "the restoring device does not mount at once"
(cd "$MNT" && md5sum -c --quiet "$WORK/old.md5") || fail "files read during the fill are wrong"
remaining=$(fill_status "$RID" remaining_bytes)
[ "$remaining" -gt 0 ] || fail "the fill was over before the test could work during it"
log "mounted at once and the files read right, $remaining bytes still to fill"
head -c $((3 * 1024 * 1024)) /dev/urandom > "$MNT/docs/new1"
echo "written while it filled" > "$MNT/docs/note.txt"
sync
md5sum "$MNT/docs/new1" "$MNT/docs/note.txt" | sed "s#$MNT/##" > "$WORK/new.md5"

kill -KILL "$RPID"; wait "$RPID" 2>/dev/null || true
ls "$WORK/state"/*.fill >/dev/null || fail "no fill state after the kill"
"$UBLK_MIRROR" recover "$RID" > "$WORK/r2.out" 2> "$WORK/r2.log" &
RPID=$!
[ "$(wait_line "$WORK/r2.out")" = "$RDEV" ] || { cat "$WORK/r2.log" >&2; fail "recover of the restoring device failed"; }
log "daemon killed mid-fill and recovered"
head -c $((2 * 1024 * 1024)) /dev/urandom > "$MNT/docs/new2"
sync
md5sum "$MNT/docs/new2" | sed "s#$MNT/##" >> "$WORK/new.md5"
for _ in $(seq 600); do [ "$(fill_status "$RID" filled)" = true ] && break; sleep 1; done
[ "$(fill_status "$RID" filled)" = true ] || { "$UBLK_MIRROR" status; fail "the fill did not finish"; }
"$UBLK_MIRROR" status
ls "$WORK/state"/*.fill 2>/dev/null && fail "the fill state outlived the fill"
ls "$WORK/state"/*.fill.done >/dev/null || fail "no finished marker beside the fill state"
echo 3 > /proc/sys/vm/drop_caches
(cd "$MNT" && md5sum -c --quiet "$WORK/old.md5" && md5sum -c --quiet "$WORK/new.md5") \
  || fail "after the fill, the files are not right"
umount "$MNT"
e2fsck -fn "$RDEV" || fail "e2fsck finds the restored file system damaged"
"$UBLK_MIRROR" sync "$RID" --timeout 300s || { cat "$WORK/r2.log" >&2; fail "the filled device does not mirror"; }
[ "$(fresh_status "$RID" .status.mirror.resync_same_bytes)" -gt 0 ] \
  || { "$UBLK_MIRROR" status; fail "the first epoch did not compare by hash"; }
kill -TERM "$RPID"; wait "$RPID" || { cat "$WORK/r2.log" >&2; fail "the restore daemon did not stop cleanly"; }
for _ in $(seq 50); do [ -e "$RDEV" ] || break; sleep 0.1; done
e2fsck -fn "$TARGET" || fail "the target file does not pass e2fsck"
# The same restore run again (after a reboot, say) would undo the
# writes made since: refused, nothing served, the target untouched.
sum=$(md5sum < "$TARGET")
rc=0
"$UBLK_MIRROR" restore --instant --mirror --volume root --at base --to "$TARGET" \
  --client-dir "$WORK/client" --state-dir "$WORK/state" > "$WORK/r3.out" 2> "$WORK/r3.log" || rc=$?
[ "$rc" = 2 ] && grep -q "finished an instant restore" "$WORK/r3.log" \
  || { cat "$WORK/r3.log" >&2; fail "the same restore run again after the fill was not refused (rc $rc)"; }
[ "$(md5sum < "$TARGET")" = "$sum" ] || fail "a refused restore changed the target"
log "filled: every file right, e2fsck clean, an ordinary image, mirrored; the same restore again is refused"
"$UBLK_MIRROR" restore --volume root --to "$WORK/mirror.img" --client-dir "$WORK/client" \
  || fail "restoring the volume's newest version failed"
cmp "$WORK/mirror.img" "$TARGET" || fail "the mirror is not the restored device"
"$UBLK_MIRROR" restore --volume root --at base --to "$WORK/base.img" --client-dir "$WORK/client" \
  || fail "the volume's history was lost"
# Onto a disk bigger than the volume (a new laptop's): the device is
# the volume's size, the disk's first 256 MiB become the version, the
# rest is left as it was.
truncate -s 320M "$WORK/big.img"
printf 'tail' | dd of="$WORK/big.img" bs=1 seek=$((300 * 1024 * 1024)) conv=notrunc status=none
LOOP=$(losetup -f --show "$WORK/big.img")
"$UBLK_MIRROR" restore --instant --volume root --at base --to "$LOOP" --fill-rate 8M \
  --client-dir "$WORK/client" --state-dir "$WORK/state" > "$WORK/r4.out" 2> "$WORK/r4.log" &
RPID=$!
BDEV=$(wait_line "$WORK/r4.out")
[ -b "$BDEV" ] || { cat "$WORK/r4.log" >&2; losetup -d "$LOOP"; fail "restore --instant onto a bigger disk printed no device: '$BDEV'"; }
[ "$(blockdev --getsize64 "$BDEV")" = $((256 * 1024 * 1024)) ] || fail "the device is not the volume's size"
BID=${BDEV#/dev/ublkb}
# Shut down mid-fill, then started again where the mirror cannot be
# reached (a reboot away from the network): what is here is served at
# once, and the fill goes on once the mirror is back.
for _ in $(seq 600); do [ "$(fill_status "$BID" remaining_bytes)" -lt $((255 * 1024 * 1024)) ] && break; sleep 0.2; done
kill -TERM "$RPID"; wait "$RPID" || { cat "$WORK/r4.log" >&2; fail "the restore daemon did not stop cleanly mid-fill"; }
for _ in $(seq 50); do [ -e "$BDEV" ] || break; sleep 0.1; done
stop_mirror_server
"$UBLK_MIRROR" restore --instant --volume root --at base --to "$LOOP" \
  --client-dir "$WORK/client" --state-dir "$WORK/state" > "$WORK/r5.out" 2> "$WORK/r5.log" &
RPID=$!
BDEV=$(wait_line "$WORK/r5.out")
[ -b "$BDEV" ] || { cat "$WORK/r5.log" >&2; losetup -d "$LOOP"; fail "the restore under way did not start again without the mirror: '$BDEV'"; }
BID=${BDEV#/dev/ublkb}
[ "$(fresh_status "$BID" .status.attach.link_up)" = false ] || { "$UBLK_MIRROR" status; fail "the link is said to be up with no mirror"; }
# The first block was filled before the stop (O_DIRECT: no read-ahead
# into blocks that would wait for the mirror).
dd if="$BDEV" of="$WORK/first" bs=64k count=1 iflag=direct status=none || fail "reading what is here failed"
cmp -n 65536 "$WORK/first" "$WORK/base.img" || fail "what was here is not served right without the mirror"
"$MS" --data "$DATA" serve > "$WORK/server3.out" 2> "$WORK/server3.log" &
SPID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/server3.out" && break; sleep 0.1; done
log "a restore under way started again without the mirror, served what was here, and went on once it was back"
for _ in $(seq 600); do [ "$(fill_status "$BID" filled)" = true ] && break; sleep 1; done
[ "$(fill_status "$BID" filled)" = true ] || { "$UBLK_MIRROR" status; fail "the fill onto the bigger disk did not finish"; }
kill -TERM "$RPID"; wait "$RPID" || { cat "$WORK/r5.log" >&2; fail "the restore daemon did not stop cleanly"; }
for _ in $(seq 50); do [ -e "$BDEV" ] || break; sleep 0.1; done
cmp -n $((256 * 1024 * 1024)) "$LOOP" "$WORK/base.img" || { losetup -d "$LOOP"; fail "the bigger disk does not start with the version"; }
[ "$(dd if="$LOOP" bs=1 skip=$((300 * 1024 * 1024)) count=4 status=none)" = tail ] \
  || { losetup -d "$LOOP"; fail "the restore wrote past the volume on the bigger disk"; }
losetup -d "$LOOP"
rm -f "$WORK/mirror.img" "$WORK/base.img" "$WORK/big.img"
log "restored onto a bigger disk: its first 256 MiB are the version, the rest untouched"
# The lost laptop comes back online: its device is refused by the mirror.
start_dev --backing "$IMG" --mirror root --client-dir "$WORK/client" --mirror-interval 1s
dd if=/dev/urandom of="$DEV" bs=1M count=1 oflag=direct status=none
refused=
for _ in $(seq 60); do
  "$UBLK_MIRROR" status --json | jq -r ".[] | select(.id == $DEV_ID) | .status.mirror.last_error // empty" \
    | grep -q "another device" && { refused=1; break; }
  sleep 1
done
[ -n "$refused" ] || { "$UBLK_MIRROR" status; fail "the old device was not refused after the take-over"; }
stop_dev
log "the mirror equals the restored device, its history is kept, the old device is refused"
stop_mirror_server
