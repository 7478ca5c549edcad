#!/bin/bash
# kill -9 of the daemon in the middle of a fio verify run: the device stays
# (quiesced), I/O waits; `ublk-mirror recover` brings it back; fio finishes
# with no error and its verify passes.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
start_dev --backing "$IMG" --size 256M --queues 2 --depth 64
ID=$DEV_ID
fio --eta=never --name=crash --filename="$DEV" --ioengine=io_uring --direct=1 --iodepth=32 \
    --rw=randwrite --bs=4k --size=128M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output="$WORK/fio.log" &
FIO=$!
sleep 3
kill -0 $FIO || fail "fio ended before the crash"
crash_dev
log "daemon killed with SIGKILL while fio runs"
sleep 1
[ -b "$DEV" ] || fail "device vanished after kill -9"
state=$(dev_state "$ID")
[ "$state" = quiesced ] || fail "device state is '$state', expected quiesced"
kill -0 $FIO || fail "fio ended while the device had no daemon"
log "device $DEV is quiesced, fio waits"

start_dev recover "$ID"
[ "$DEV_ID" = "$ID" ] || fail "recovered a different device"
[ "$(dev_state "$ID")" = live ] || fail "device not live after recovery"
rc=0; wait $FIO || rc=$?
[ $rc = 0 ] || { cat "$WORK/fio.log"; fail "fio failed with $rc after recovery"; }
grep -q "err= 0" "$WORK/fio.log" || { cat "$WORK/fio.log"; fail "fio reported errors"; }
log "fio finished after recovery with no error; verify passed"

# A second crash, this time recovered by re-running `add` with the same
# backing file (what the systemd unit does on restart).
crash_dev
start_dev --backing "$IMG" --queues 2 --depth 64
[ "$DEV_ID" = "$ID" ] || fail "add created a new device instead of recovering $ID"
grep -q "recovering it" "$WORK/daemon.$DAEMONS.log" || fail "add did not say it recovered"
fio --eta=never --name=after --filename="$DEV" --ioengine=io_uring --direct=1 --iodepth=32 --rw=read --bs=4k \
    --size=128M --verify=crc32c --verify_only --verify_fatal=1 --output="$WORK/fio2.log" \
  || { cat "$WORK/fio2.log"; fail "data written before the crashes does not verify"; }
log "re-running add recovered the device; the data still verifies"
stop_dev
