#!/bin/bash
# Restore over iSCSI, as a user would: a mirrored ext4, a snapshot, then
# files changed and deleted; `mirror-server export VOLUME@SNAPSHOT` with
# mutual CHAP (the running server serves it); the Linux open-iscsi
# initiator discovers it, is refused without the secret, and logs in with
# it (checking the target's), with CRC32C header and data digests; the
# disk mounts read-only and holds the files as they were at the snapshot,
# not as they are now; writes to the disk fail (a backup cannot be
# changed) and the server's volume is untouched; logout and unexport.
source "$(dirname "$0")/lib.sh"

command -v iscsiadm >/dev/null || fail "iscsiadm is missing (open-iscsi; scripts/deps installs it)"
IMG=$WORK/disk.img
MNT=$WORK/mnt; mkdir -p "$MNT"

start_mirror_server

start_dev --backing "$IMG" --size 64M --mirror root --client-dir "$WORK/client" --mirror-interval 1s
ID=$DEV_ID
mkfs.ext4 -q -F "$DEV"
mount "$DEV" "$MNT"
mkdir "$MNT/photos"
for i in $(seq 12); do head -c $((48 * 1024)) /dev/urandom > "$MNT/photos/p$i.jpg"; done
echo "monday" > "$MNT/diary.txt"
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 md5sum) > "$WORK/monday.md5"
umount "$MNT"
"$UBLK_MIRROR" snapshot "$ID" monday --timeout 300s || fail "snapshot failed"
mount "$DEV" "$MNT"
rm "$MNT/photos/p1.jpg" "$MNT/photos/p2.jpg"
echo "tuesday" > "$MNT/diary.txt"
umount "$MNT"
"$UBLK_MIRROR" sync "$ID" --timeout 300s || fail "sync failed"
md5sum "$DATA/volumes/laptop/root/image" > "$WORK/image.md5"

printf 'vm-initiator-secret\n' > "$WORK/chap"; printf 'vm-target-secret1\n' > "$WORK/chap-mutual"
"$MS" --data "$DATA" export laptop/root@monday --listen 127.0.0.1:3260 \
  --chap-user restorer --chap-secret-file "$WORK/chap" \
  --mutual-user backup-server --mutual-secret-file "$WORK/chap-mutual" | tee "$WORK/export.out" \
  || { cat "$WORK/server.log"; fail "export failed"; }
IQN=$(sed -n 's/^  target //p' "$WORK/export.out")
[ -n "$IQN" ] || fail "export printed no target name"

# open-iscsi: its state in a tmpfs (the VM's /etc is the host's, read-only).
mount -t tmpfs tmpfs /etc/iscsi
echo "InitiatorName=iqn.2026-11.test:vm" > /etc/iscsi/initiatorname.iscsi
printf 'node.startup = manual\n' > /etc/iscsi/iscsid.conf
mkdir -p /run/lock/iscsi
modprobe iscsi_tcp
modprobe sd_mod   # no udev here to load it when the disk appears
# Its own session: iscsid signals its process group when it stops.
setsid iscsid -f > "$WORK/iscsid.log" 2>&1 &
# Ready once it listens for iscsiadm (an abstract unix socket).
for _ in $(seq 100); do grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix && break; sleep 0.1; done
iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260 | tee "$WORK/discovery"
grep -q "$IQN" "$WORK/discovery" || fail "discovery does not list $IQN"
if iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --login 2> "$WORK/login.err"; then
  fail "logged in without the CHAP secret"
fi
log "refused without CHAP: $(tail -1 "$WORK/login.err")"
node() { iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 -o update -n "$1" -v "$2"; }
node node.session.auth.authmethod CHAP
node node.session.auth.username restorer
node node.session.auth.password vm-initiator-secret
node node.session.auth.username_in backup-server
node node.session.auth.password_in vm-target-secret1
# CRC32C header and data digests, required (no "None" to fall back to).
node 'node.conn[0].iscsi.HeaderDigest' CRC32C
node 'node.conn[0].iscsi.DataDigest' CRC32C
iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --login || fail "login with mutual CHAP failed"
grep 'session up' "$WORK/server.log" | grep 'initiator=iqn.2026-11.test:vm' | tail -1 \
  | grep -q 'header_digest="CRC32C" data_digest="CRC32C"' \
  || { cat "$WORK/server.log"; fail "the session did not run with CRC32C digests"; }
log "logged in with mutual CHAP and CRC32C header and data digests"
SD=
for _ in $(seq 100); do
  SD=$(ls /sys/class/iscsi_session/*/device/target*/*/block 2>/dev/null | head -1)
  [ -n "$SD" ] && [ -b "/dev/$SD" ] && break
  sleep 0.1
done
[ -n "$SD" ] || fail "no disk appeared after login"
log "logged in: /dev/$SD ($(cat /sys/block/$SD/size) sectors, ro=$(cat /sys/block/$SD/ro))"
[ "$(cat /sys/block/$SD/ro)" = 1 ] || fail "the kernel does not see the disk as read-only"
mkdir -p "$WORK/then"
mount -o ro "/dev/$SD" "$WORK/then" || fail "the snapshot does not mount"
(cd "$WORK/then" && md5sum -c --quiet "$WORK/monday.md5") || fail "the files are not as they were on monday"
grep -q monday "$WORK/then/diary.txt" || fail "the diary is not monday's"
umount "$WORK/then"
log "the snapshot over iSCSI holds the files as they were"
blockdev --setrw "/dev/$SD" 2>/dev/null || true
if dd if=/dev/zero of="/dev/$SD" bs=4096 count=1 oflag=direct status=none 2> "$WORK/dd.err"; then
  fail "a write to the exported backup succeeded"
fi
log "a write to the disk fails: $(head -1 "$WORK/dd.err")"
iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --logout || fail "logout failed"
iscsiadm -k 0 2>/dev/null || pkill -x iscsid || true
for _ in $(seq 50); do pgrep -x iscsid >/dev/null || break; sleep 0.1; done
umount /etc/iscsi
"$MS" --data "$DATA" unexport "$IQN" || fail "unexport failed"
md5sum -c --quiet "$WORK/image.md5" || fail "the server's image changed"
stop_dev
stop_mirror_server
