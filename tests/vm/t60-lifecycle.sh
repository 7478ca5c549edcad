#!/bin/bash
# Device lifecycle and what the device advertises: list, del, config files,
# queues, cache/FUA flags, and a clean stop that leaves the file synced.
source "$(dirname "$0")/lib.sh"
U=$UBLK_MIRROR

cat > "$WORK/laptop.toml" <<TOML
backing = "laptop.img"   # relative to this file
size = "128M"
queues = 2
depth = 32
TOML
start_dev --config "$WORK/laptop.toml"
A=$DEV_ID; APID=$DEV_PID; ADEV=$DEV
q=/sys/block/ublkb$A
[ "$(ls $q/mq | wc -l)" = 2 ] || fail "expected 2 hardware queues, got $(ls $q/mq)"
[ "$(cat $q/queue/nr_requests)" -le 32 ] || fail "queue depth not applied"
grep -q "write back" $q/queue/write_cache || fail "volatile write cache not advertised"
[ "$(cat $q/queue/fua)" = 1 ] || fail "FUA not advertised"
[ "$(cat $q/size)" = $((128 << 11)) ] || fail "size is $(cat $q/size) sectors"
[ -f "$WORK/laptop.img" ] || fail "the config's relative backing path was not used"

start_dev --backing "$WORK/b.img" --size 64M --name second --id 7 --buffered
[ "$DEV_ID" = 7 ] || fail "asked for id 7, got $DEV_ID"
B=$DEV_ID; BPID=$DEV_PID

$U list
$U list --json > "$WORK/list.json"
jq -e --argjson a "$A" '.[] | select(.id == $a) | .name == "laptop" and .state == "live" and .size == 134217728 and .queues == 2 and (.backing | endswith("/laptop.img"))' "$WORK/list.json" >/dev/null \
  || { cat "$WORK/list.json"; fail "list --json does not describe device $A"; }
jq -e --argjson b "$B" --argjson pid "$BPID" '.[] | select(.id == $b) | .name == "second" and .pid == $pid and .direct_io == false' "$WORK/list.json" >/dev/null \
  || { cat "$WORK/list.json"; fail "list --json does not describe device $B"; }
$U list | grep -E "^$B +/dev/ublkb$B +second +live" >/dev/null || fail "table lacks device $B"

# Data written and flushed before `del` is in the file afterwards.
head -c 1M /dev/urandom > "$WORK/chunk"
dd if="$WORK/chunk" of=/dev/ublkb$B bs=1M seek=3 conv=fsync status=none
$U del "$B" | grep -q "deleted /dev/ublkb$B" || fail "del did not report"
rc=0; wait "$BPID" || rc=$?
[ $rc = 0 ] || fail "daemon of $B exited $rc after del"
[ ! -e /dev/ublkb$B ] || fail "device $B still there after del"
cmp <(dd if="$WORK/b.img" bs=1M skip=3 count=1 status=none) "$WORK/chunk" || fail "data lost after del"
log "del stopped device $B; its daemon exited 0; data in the file"

# A write without any flush, then SIGTERM: the clean stop syncs the file.
DEV=$ADEV; DEV_PID=$APID
dd if="$WORK/chunk" of="$DEV" bs=1M seek=5 oflag=direct status=none
stop_dev
cmp <(dd if="$WORK/laptop.img" bs=1M skip=5 count=1 status=none) "$WORK/chunk" || fail "data lost after SIGTERM"

# The record directory is root's alone (libublk would make it 0777).
[ "$(stat -c %a /run/ublksrvd)" = 755 ] || fail "/run/ublksrvd is $(stat -c %a /run/ublksrvd)"

# A mounted device: SIGHUP (a closed terminal) is ignored; `del` refuses
# it; a SIGTERM stop (systemctl stop, Ctrl-C) writes the file system back
# first, so what it held in memory is in the backing file.
start_dev --backing "$WORK/m.img" --size 64M
MDEV=$DEV; MPID=$DEV_PID; M=$DEV_ID
mkfs.ext4 -q "$MDEV"
mkdir -p "$WORK/mnt"; mount "$MDEV" "$WORK/mnt"
kill -HUP "$MPID"; sleep 0.5
kill -0 "$MPID" || fail "SIGHUP killed the daemon"
expect_fail 4 "is in use" $U del "$M"
[ -e "$MDEV" ] || fail "del of a mounted device removed it"
head -c 3M /dev/urandom > "$WORK/mounted.dat"
cp "$WORK/mounted.dat" "$WORK/mnt/data"   # in the page cache, not synced
kill -TERM "$MPID"
# The device goes; its deletion then waits for the mount to end (the
# kernel holds the disk while it is mounted).
for _ in $(seq 100); do [ -e "$MDEV" ] || break; sleep 0.1; done
[ ! -e "$MDEV" ] || fail "$MDEV still there after SIGTERM"
umount -l "$WORK/mnt" 2>/dev/null || true
rc=0; wait "$MPID" || rc=$?
[ $rc = 0 ] || fail "daemon of a mounted device exited $rc on SIGTERM"
grep -q "is in use" "$WORK/daemon.$DAEMONS.log" || fail "the stop did not say the device was mounted"
loop=$(losetup -f --show "$WORK/m.img")
mount -o ro "$loop" "$WORK/mnt" || fail "the file system of the stopped device does not mount"
cmp "$WORK/mnt/data" "$WORK/mounted.dat" || fail "a file written before the stop of a mounted device is not whole"
umount "$WORK/mnt"; losetup -d "$loop"
log "a mounted device: SIGHUP ignored, del refused, a stop wrote its file system back first"

start_dev --backing "$WORK/c.img" --size 64M
CPID=$DEV_PID
$U del --all
rc=0; wait "$CPID" || rc=$?
[ $rc = 0 ] || fail "daemon exited $rc after del --all"
[ "$($U list --json | jq length)" = 0 ] || fail "devices left after del --all"
log "lifecycle ok"
