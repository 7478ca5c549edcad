#!/bin/bash
# Going back in time, as a user would: a mirrored ext4 with files, a
# snapshot asked from the device (`ublk-mirror snapshot`), then files
# changed and deleted; `ublk-mirror restore --at SNAPSHOT` into a new file
# gives the file system as it was (e2fsck clean, the old files, not the new
# ones); restoring "now" onto that copy moves only what differs and gives
# the server's image byte for byte. The server lists and deletes snapshots.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
MNT=$WORK/mnt; mkdir -p "$MNT"

start_mirror_server
SERVER_IMG=$DATA/volumes/laptop/root/image

start_dev --backing "$IMG" --size 128M --mirror root --client-dir "$WORK/client" --mirror-interval 1s
ID=$DEV_ID
mkfs.ext4 -q -F "$DEV"
mount "$DEV" "$MNT"
mkdir "$MNT/docs"
for i in $(seq 20); do head -c $((32 * 1024)) /dev/urandom > "$MNT/docs/old$i"; done
echo "the way it was" > "$MNT/docs/letter.txt"
(cd "$MNT" && find docs -type f -print0 | sort -z | xargs -0 md5sum) > "$WORK/then.md5"
umount "$MNT"
"$UBLK_MIRROR" snapshot "$ID" before-edits --timeout 300s || fail "snapshot failed"
log "snapshot before-edits taken from the device"

mount "$DEV" "$MNT"
echo "rewritten since" > "$MNT/docs/letter.txt"
rm "$MNT/docs/old1" "$MNT/docs/old2"
for i in $(seq 5); do head -c $((256 * 1024)) /dev/urandom > "$MNT/docs/new$i"; done
umount "$MNT"
"$UBLK_MIRROR" sync "$ID" --timeout 300s || fail "sync failed"
"$MS" --data "$DATA" snapshots laptop/root
"$MS" --data "$DATA" snapshots laptop/root --json | jq -e '.[0].name == "before-edits" and .[0].bytes > 0' >/dev/null \
  || fail "the snapshot is not listed, or keeps nothing of what changed"

"$UBLK_MIRROR" restore --volume root --at before-edits --to "$WORK/then.img" --client-dir "$WORK/client" \
  || fail "restore of the snapshot failed"
# The laptop lists it too, and a time it shows (pasted with its zone)
# restores what the name did (a scheduled snapshot of the same epoch,
# taken in the same second, may be the one picked: the same bytes).
"$UBLK_MIRROR" snapshots --volume root --client-dir "$WORK/client" || fail "the laptop cannot list snapshots"
"$UBLK_MIRROR" snapshots --volume root --client-dir "$WORK/client" --json \
  | jq -e '.[0].name == "before-edits" and .[0].kind == "manual"' >/dev/null \
  || fail "the laptop's list lacks the snapshot"
SHOWN=$("$UBLK_MIRROR" snapshots --volume root --client-dir "$WORK/client" | awk '$1 == "before-edits" { print $3" "$4" "$5 }')
"$UBLK_MIRROR" restore --volume root --at "$SHOWN" --to "$WORK/shown.img" --client-dir "$WORK/client" \
  || fail "restore --at '$SHOWN' (as listed) failed"
cmp "$WORK/shown.img" "$WORK/then.img" || fail "restore --at '$SHOWN' (as listed) is not before-edits"
rm -f "$WORK/shown.img"
log "the laptop lists before-edits; its time, as shown, restores it"
e2fsck -fn "$WORK/then.img" || fail "the restored snapshot does not pass e2fsck"
mkdir -p "$WORK/then"
mount -o ro,loop "$WORK/then.img" "$WORK/then"
(cd "$WORK/then" && md5sum -c --quiet "$WORK/then.md5") || fail "the restored snapshot does not hold the files as they were"
grep -q "the way it was" "$WORK/then/docs/letter.txt" || fail "the letter is not as it was"
[ ! -e "$WORK/then/docs/new1" ] || fail "a file written after the snapshot is in it"
umount "$WORK/then"
log "restored snapshot: e2fsck clean, the files as they were"

OUT=$("$UBLK_MIRROR" restore --volume root --to "$WORK/then.img" --client-dir "$WORK/client") \
  || fail "restore of now onto the older copy failed"
echo "$OUT"
cmp "$WORK/then.img" "$SERVER_IMG" || fail "restoring now onto the old copy does not give the server's image"
received=$(sed -n 's/.*: \([0-9]*\) blocks received.*/\1/p' <<<"$OUT")
same=$(sed -n 's/.*, \([0-9]*\) already the same.*/\1/p' <<<"$OUT")
[ -n "$received" ] && [ "$same" -gt "$received" ] || fail "the restore onto an older copy did not skip what was the same: $OUT"
log "restore of now onto the old copy: $received blocks moved, $same the same, byte-identical"

"$UBLK_MIRROR" restore --volume root --at nope --to "$WORK/x.img" --client-dir "$WORK/client" 2> "$WORK/err" \
  && fail "a restore of a missing snapshot succeeded"
grep -q "no snapshot nope" "$WORK/err" || fail "unclear error: $(cat "$WORK/err")"
[ ! -e "$WORK/x.img" ] || fail "a failed restore left a file"
"$MS" --data "$DATA" delete laptop/root@before-edits || fail "delete failed"
# The restore of "now" above pinned a temporary snapshot, which the server
# removes once that restore's session has ended: give it a moment. (The
# server's own schedule may have taken one meanwhile: a slow run passes its
# first 30 s tick; those are not ours to see go.)
ours() { "$MS" --data "$DATA" snapshots laptop/root --json | jq '[.[] | select(.kind != "scheduled")] | length'; }
for _ in $(seq 50); do
  [ "$(ours)" = 0 ] && break
  sleep 0.2
done
[ "$(ours)" = 0 ] ||
  { "$MS" --data "$DATA" snapshots laptop/root; fail "a snapshot is still listed"; }
stop_dev
stop_mirror_server
