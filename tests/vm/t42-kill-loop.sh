#!/bin/bash
# kill -9 and recover, again and again, under a fio verify workload: the
# kernel must survive every one (run.sh fails the test on any BUG:, Oops or
# WARNING: in the kernel log), the device must come back each time, and
# every byte fio wrote must verify.
#
# Two halves of KILLS kills each (default 12, so 24 in all):
#   plain     change tracking on, no epoch held;
#   epoch     an epoch sealed and never released, so first overwrites are
#             preserved (copy-on-write) while the daemon is killed; a crash
#             drops what a daemon held in memory, so each recovered daemon
#             seals a new one at once.
# The kill comes at a random moment 0.2-1.5 s after the device is back, so
# it lands in every phase: requests in flight on the queue rings, the
# engine's copy-on-write reads, the journal's syncs, the recovery itself.
# Regression test for a NULL dereference in io_fallback_tw seen on a 6.12
# kernel when the daemon's queue threads exited (see README, "Kernels").
source "$(dirname "$0")/lib.sh"

KILLS=${KILLS:-12}
IMG=$WORK/disk.img
start_dev --backing "$IMG" --size 256M --queues 2 --depth 64 --region-size 1M --cow-memory 2M
ID=$DEV_ID

# fio in rounds: each round writes 32 MiB at random with checksums and reads
# it all back; it must end with no error however often the daemon dies.
STOP=$WORK/stop
(
  round=0
  while [ ! -e "$STOP" ]; do
    round=$((round + 1))
    fio --eta=never --name=r$round --filename="$DEV" --ioengine=io_uring --direct=1 \
        --iodepth=16 --rw=randwrite --bs=4k,64k --bssplit=4k/70:64k/30 --size=32M \
        --offset=$(( (round % 6) * 32 ))M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --output="$WORK/fio.$round.log" || { echo "$round" > "$WORK/fio.failed"; exit 1; }
  done
  echo "$round" > "$WORK/fio.rounds"
) &
FIO=$!

kill_and_recover() { # $1: label, $2: number
  sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 0.2 + (r % 130) / 100 }')"
  [ ! -e "$WORK/fio.failed" ] || fail "fio round $(cat "$WORK/fio.failed") failed before kill $2 ($1)"
  crash_dev
  local state
  state=$(dev_state "$ID")
  [ "$state" = quiesced ] || fail "kill $2 ($1): device state is '$state', expected quiesced"
  start_dev recover "$ID"
  [ "$(dev_state "$ID")" = live ] || fail "kill $2 ($1): device not live after recovery"
}

n=0
for _ in $(seq "$KILLS"); do n=$((n + 1)); kill_and_recover plain $n; done
log "$KILLS kills with no epoch held: each recovered"

for _ in $(seq "$KILLS"); do
  E=$("$UBLK_MIRROR" epoch seal "$ID" --now)
  [ "$("$UBLK_MIRROR" epoch list "$ID" --json | jq '.sealed | length')" -ge 1 ] || fail "epoch $E is not held"
  n=$((n + 1)); kill_and_recover "epoch $E held" $n
done
log "$KILLS kills, each with an epoch sealed and held: each recovered"

touch "$STOP"
wait $FIO || { tail -n 20 "$WORK"/fio.*.log; fail "fio failed across the kills (round $(cat "$WORK/fio.failed" 2>/dev/null))"; }
rounds=$(cat "$WORK/fio.rounds")
grep -L "err= 0" "$WORK"/fio.*.log | grep -q . && fail "a fio round reported errors"
log "$n kills; fio ran $rounds rounds, every one verified"

# The crashes left a resync pending (tracking's promise), and the device
# stops cleanly.
pending=false
for _ in $(seq 50); do
  pending=$("$UBLK_MIRROR" status --json | jq ".[] | select(.id == $ID) | .status.tracking.resync_pending")
  [ "$pending" = true ] && break
  sleep 0.2
done
[ "$pending" = true ] || fail "the crashes left no resync pending"
stop_dev
