#!/bin/bash
# O_DIRECT by default, with a logged fallback: a backing file on a file
# system with 4096-byte sectors cannot take 512-byte direct I/O, so a
# 512-byte device falls back to buffered I/O (and says why) while a
# 4096-byte device keeps O_DIRECT. Both work.
source "$(dirname "$0")/lib.sh"

truncate -s 256M "$WORK/fs.img"
LOOP=$(losetup -f --show --sector-size 4096 "$WORK/fs.img")
mkfs.ext4 -q -F "$LOOP"
mkdir -p "$WORK/fs"; mount "$LOOP" "$WORK/fs"

start_dev --backing "$WORK/fs/small-blocks.img" --size 64M
grep -q "O_DIRECT not possible" "$WORK/daemon.$DAEMONS.log" || fail "no fallback message"
log "fallback logged: $(grep -o 'O_DIRECT not possible.*' "$WORK/daemon.$DAEMONS.log" | head -n1)"
[ "$("$UBLK_MIRROR" list --json | jq ".[] | select(.id == $DEV_ID) | .direct_io")" = false ] \
  || fail "list does not show buffered I/O"
fio --eta=never --name=fallback --filename="$DEV" --ioengine=io_uring --direct=1 --iodepth=16 \
    --rw=randwrite --bs=4k --size=32M --verify=crc32c --verify_fatal=1 --output="$WORK/fio1.log" \
  || { cat "$WORK/fio1.log"; fail "I/O failed on the buffered fallback"; }
stop_dev

start_dev --backing "$WORK/fs/big-blocks.img" --size 64M --logical-block-size 4096
! grep -q "O_DIRECT not possible" "$WORK/daemon.$DAEMONS.log" || fail "4096-byte device fell back"
[ "$("$UBLK_MIRROR" list --json | jq ".[] | select(.id == $DEV_ID) | .direct_io")" = true ] \
  || fail "list does not show O_DIRECT"
fio --eta=never --name=direct --filename="$DEV" --ioengine=io_uring --direct=1 --iodepth=16 \
    --rw=randwrite --bs=4k --size=32M --verify=crc32c --verify_fatal=1 --output="$WORK/fio2.log" \
  || { cat "$WORK/fio2.log"; fail "I/O failed with O_DIRECT"; }
stop_dev
umount "$WORK/fs"; losetup -d "$LOOP"
log "O_DIRECT where possible, buffered with a reason where not"
