#!/bin/bash
# fio with verify=crc32c through the device: 4k random, 64k random and 1M
# sequential writes at iodepth 32, on several queues; every block read back
# and checked.
source "$(dirname "$0")/lib.sh"

for lbs in 512 4096; do
  start_dev --backing "$WORK/disk-$lbs.img" --size 256M --queues 2 --depth 64 --logical-block-size $lbs
  [ "$(cat /sys/block/ublkb$DEV_ID/queue/logical_block_size)" = $lbs ] || fail "logical block size"
  for job in "randwrite 4k" "randwrite 64k" "write 1M"; do
    set -- $job
    fio --eta=never --name="$1-$2" --filename="$DEV" --ioengine=io_uring --direct=1 --iodepth=32 \
        --rw=$1 --bs=$2 --size=96M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --numjobs=1 --output="$WORK/fio-$lbs-$1-$2.log" \
      || { cat "$WORK/fio-$lbs-$1-$2.log"; fail "fio $job (lbs $lbs) failed"; }
    grep -q "err= 0" "$WORK/fio-$lbs-$1-$2.log" || fail "fio $job reported errors"
    log "fio $job, logical block $lbs: verify passed"
  done
  stop_dev
done
