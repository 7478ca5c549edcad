#!/bin/bash
# Bad input gets a clear error and changes nothing.
source "$(dirname "$0")/lib.sh"
U=$UBLK_MIRROR
IMG=$WORK/disk.img

expect_fail 3 "does not exist; give --size" $U add --backing "$WORK/missing.img"
[ ! -e "$WORK/missing.img" ] || fail "missing.img was created"

truncate -s 64M "$IMG"
expect_fail 2 "is 67108864 bytes but the device size is 134217728 bytes" $U add --backing "$IMG" --size 128M
[ "$(stat -c %s "$IMG")" = 67108864 ] || fail "size changed"

expect_fail 2 "--queues 0 is out of range" $U add --backing "$IMG" --queues 0
expect_fail 2 "--depth 9999 is out of range" $U add --backing "$IMG" --depth 9999
expect_fail 2 "512 or 4096" $U add --backing "$IMG" --logical-block-size 2048
expect_fail 2 "invalid size" $U add --backing "$IMG" --size 12Q

# The backing file of a running device is locked.
start_dev --backing "$IMG"
expect_fail 3 "is in use (locked by another process: ublk-mirror device $DEV_ID, /dev/ublkb$DEV_ID, pid $DEV_PID)" $U add --backing "$IMG"
expect_fail 4 "it is live, served by pid $DEV_PID" $U recover "$DEV_ID"
expect_fail 4 "the id is taken by another device" $U add --backing "$WORK/other.img" --size 64M --id "$DEV_ID"
[ ! -e "$WORK/other.img" ] || fail "other.img was left behind"
[ "$(dev_state "$DEV_ID")" = live ] && kill -0 "$DEV_PID" || fail "refusing a taken id hurt the device that has it"
stop_dev

expect_fail 4 "there is no ublk device 4242" $U del 4242
expect_fail 4 "there is no ublk device 4242" $U recover 4242

# A read-only backing file (immutable, so that even root cannot write it).
truncate -s 64M "$WORK/ro.img"
if chattr +i "$WORK/ro.img" 2>/dev/null; then
  expect_fail 3 "permission denied" $U add --backing "$WORK/ro.img"
  chattr -i "$WORK/ro.img"
else
  # tmpfs has no immutable flag: use a read-only bind mount instead.
  mkdir -p "$WORK/ro"; mount --bind "$WORK" "$WORK/ro"; mount -o remount,bind,ro "$WORK/ro"
  expect_fail 3 "read-only file system" $U add --backing "$WORK/ro/ro.img"
  umount "$WORK/ro"
fi
# A directory, a character device.
expect_fail 3 "not a regular file or block device" $U add --backing "$WORK"
expect_fail 3 "not a regular file or block device" $U add --backing /dev/null

# A device left with no description and no daemon (an `add` killed while
# setting it up; made here by killing a daemon and removing its record):
# `del` says to use --force, and --force deletes it.
start_dev --backing "$WORK/undescribed.img" --size 64M --id 21
crash_dev
rm -f "/run/ublksrvd/$(printf %04d 21).json"
expect_fail 4 "del --force" $U del 21
$U del 21 --force >/dev/null || fail "del --force did not delete a device with no description"
[ ! -e /dev/ublkb21 ] || fail "/dev/ublkb21 is still there after del --force"
log "a device left with no description was deleted with --force"

# No driver: unload it (no device may exist), then `add` explains how to load it.
cleanup_devices
rmmod ublk_drv || fail "cannot unload ublk_drv"
expect_fail 3 "modprobe ublk_drv" $U add --backing "$WORK/new.img" --size 64M
[ ! -e "$WORK/new.img" ] || fail "new.img was left behind without a driver"
expect_fail 3 "modprobe ublk_drv" $U list
modprobe ublk_drv
log "every bad input was refused and nothing changed"
