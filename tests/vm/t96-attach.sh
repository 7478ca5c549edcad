#!/bin/bash
# Getting a file back from an earlier version without restoring the disk:
# `ublk-mirror attach --at SNAPSHOT` makes the version a read-only block
# device whose blocks are fetched as they are read. An ext4 volume's
# snapshot mounts read-only with its files as they were (and not the newer
# ones), having fetched only what was read; a read waits while the server
# is down and completes, right, when it is back; `--writable` takes writes
# in a local overlay the mirror never sees; `detach` removes the device.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
MNT=$WORK/mnt; mkdir -p "$MNT"
AT=$WORK/at; mkdir -p "$AT"

start_mirror_server
start_dev --backing "$IMG" --size 256M --mirror root --client-dir "$WORK/client" --mirror-interval 1s
ID=$DEV_ID
mkfs.ext4 -q -F "$DEV"
mount "$DEV" "$MNT"
mkdir "$MNT/docs"
for i in $(seq 10); do head -c $((64 * 1024)) /dev/urandom > "$MNT/docs/old$i"; done
head -c $((24 * 1024 * 1024)) /dev/urandom > "$MNT/docs/big"
echo "the way it was" > "$MNT/docs/letter.txt"
(cd "$MNT" && find docs -type f -print0 | sort -z | xargs -0 md5sum) > "$WORK/then.md5"
umount "$MNT"
"$UBLK_MIRROR" snapshot "$ID" evening --timeout 300s || fail "snapshot failed"
mount "$DEV" "$MNT"
echo "rewritten since" > "$MNT/docs/letter.txt"
rm "$MNT/docs/old1"
head -c $((1024 * 1024)) /dev/urandom > "$MNT/docs/new1"
umount "$MNT"
"$UBLK_MIRROR" sync "$ID" --timeout 300s || fail "sync failed"
log "snapshot evening taken, then files changed and synced"

attach() {
  "$UBLK_MIRROR" attach --volume root --client-dir "$WORK/client" --background "$@" 2> "$WORK/attach.err" \
    || { cat "$WORK/attach.err" >&2; fail "attach $* failed"; }
}
ADEV=$(attach --at evening --cache 64M)
[ -b "$ADEV" ] || fail "attach printed no block device: '$ADEV'"
AID=${ADEV#/dev/ublkb}
blockdev --getro "$ADEV" | grep -qx 1 || fail "the attached version is not read-only"
mount -o ro "$ADEV" "$AT" || mount -o ro,noload "$ADEV" "$AT" || fail "cannot mount the attached version"
grep -v ' docs/big$' "$WORK/then.md5" > "$WORK/small.md5"
(cd "$AT" && md5sum -c --quiet "$WORK/small.md5") \
  || fail "the attached version does not hold the small files as they were"
grep -q "the way it was" "$AT/docs/letter.txt" || fail "the letter is not as it was"
[ ! -e "$AT/docs/new1" ] || fail "a file written after the snapshot is in the attached version"
[ -e "$AT/docs/old1" ] || fail "a file deleted after the snapshot is missing from the attached version"
fetched=$(fresh_status "$AID" .status.attach.fetched_bytes)
log "small files read from the attached version: $fetched bytes fetched"
# Reading the small files (and the file system's metadata, sequentially,
# with read-ahead) fetches a fraction of the 256 MiB volume; the 24 MiB
# file not read yet is not all of it.
[ "$fetched" -gt 0 ] && [ "$fetched" -lt $((64 * 1024 * 1024)) ] || fail "fetched $fetched bytes: not on demand"
"$UBLK_MIRROR" status | tee "$WORK/status.txt"

# The server goes away while the big file is read: the read waits, and
# completes right when the server is back.
stop_mirror_server
(md5sum "$AT/docs/big" > "$WORK/big.md5") &
READER=$!
sleep 5
kill -0 "$READER" 2>/dev/null || fail "the read finished without the mirror"
[ "$(fresh_status "$AID" .status.attach.link_up)" = false ] \
  || fail "status does not show the link down"
"$MS" --data "$DATA" serve > "$WORK/server2.out" 2> "$WORK/server2.log" &
SPID=$!
wait "$READER" || fail "the read failed across the server's restart"
expected=$(grep ' docs/big$' "$WORK/then.md5" | cut -d' ' -f1)
[ "$(cut -d' ' -f1 "$WORK/big.md5")" = "$expected" ] || fail "the big file read across the outage is wrong"
log "a read waited for the server's restart and came back right"
umount "$AT"
"$UBLK_MIRROR" detach "$ADEV" || fail "detach failed"
for _ in $(seq 50); do [ -e "$ADEV" ] || break; sleep 0.1; done
[ ! -e "$ADEV" ] || fail "$ADEV still exists after detach"
"$UBLK_MIRROR" detach "$DEV" 2> "$WORK/err" && fail "detach took a device that is not attached"
grep -q "not an attached version" "$WORK/err" || fail "unclear error: $(cat "$WORK/err")"

# Writable: ext4 replays and writes; the mirror never sees it.
WDEV=$(attach --at evening --writable)
mount "$WDEV" "$AT" || fail "cannot mount the writable version"
echo "an edit" > "$AT/docs/edited.txt"
rm "$AT/docs/old2"
umount "$AT"
e2fsck -fn "$WDEV" || fail "the writable version does not pass e2fsck after writes"
"$UBLK_MIRROR" detach "$WDEV"
for _ in $(seq 50); do [ -e "$WDEV" ] || break; sleep 0.1; done
ADEV=$(attach --at evening)
mount -o ro "$ADEV" "$AT" || mount -o ro,noload "$ADEV" "$AT" || fail "cannot mount the version again"
[ ! -e "$AT/docs/edited.txt" ] && [ -e "$AT/docs/old2" ] || fail "writes to a --writable version reached the mirror"
umount "$AT"
"$UBLK_MIRROR" detach "$ADEV"
log "writable overlay: ext4 clean after writes, the mirror's version untouched"

"$UBLK_MIRROR" attach --volume root --at nope --client-dir "$WORK/client" 2> "$WORK/err" \
  && fail "attach of a missing snapshot succeeded"
grep -q "no snapshot nope" "$WORK/err" || fail "unclear error: $(cat "$WORK/err")"
ls /var/cache/ublk-mirror/ | grep -q attach- && fail "attach left a cache file behind"
stop_dev
stop_mirror_server
