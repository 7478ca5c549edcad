#!/bin/bash
# The first sync of a disk full of data, written all along, as a user
# would live through it: `add --mirror` on an existing 256 MiB file, the
# sync asked for, and meanwhile
#
# 1. fio random writes during the first pre-copy round: no chunk is kept
#    for copy-on-write and no write waits for one, and the round gives way
#    to the busy device (reads at the default minimum rate, 1 MiB/s:
#    `status` says it yields); the write rate is printed next to the same
#    fio once the mirror is idle, and must stay above half of it (0.9 in
#    a quiet VM; without the yielding it was 0.35 to 0.53: the client's
#    and the server's hashing, compression and QUIC share the guest's two
#    emulated CPUs with fio);
# 2. a writer that stamps each 4 KiB it writes with a sequence number
#    (about 40 a second: a device the sync need not yield to), until
#    after the server published: the published image is the device
#    at one cut: outside the stamped area it equals the backing file (no
#    write touched it since fio ended), and inside it holds exactly the
#    stamps of a prefix of the writes;
# 3. then a sync, and the server's image is the backing file, byte for byte;
# 4. the mirror away in the middle of an ordinary epoch (48 MiB, under the
#    pre-copy size): 10 s later the epoch lets go of its cut (status
#    counts it) and fio's writes into its unread blocks wait for no
#    copy-on-write; the server back, a sync, and the image is the backing
#    file again.
source "$(dirname "$0")/lib.sh"

IMG=$WORK/disk.img
SIZE_MB=256
STAMPS_MB=224 # the stamped area is [224 MiB, 256 MiB); fio writes [0, 64 MiB)

start_mirror_server
SERVER_IMG=$DATA/volumes/laptop/root/image
head -c ${SIZE_MB}M /dev/urandom > "$IMG"
# Cuts only when asked; the first sync paced so that it lasts a while.
start_dev --backing "$IMG" --mirror root --client-dir "$WORK/client" \
  --mirror-interval 1h --mirror-bandwidth 12M --mirror-precopy 64M
ID=$DEV_ID
mirror() { fresh_status "$ID" ".status.mirror.$1"; }
tracking() { fresh_status "$ID" ".status.tracking.$1"; }

"$UBLK_MIRROR" sync "$ID" --timeout 600s > "$WORK/sync.out" 2>&1 &
SYNC=$!
for _ in $(seq 300); do grep -q "pre-copy round" "$WORK/daemon.$DAEMONS.log" && break; sleep 0.2; done
grep -q "pre-copy round" "$WORK/daemon.$DAEMONS.log" || fail "the first sync did not start in pre-copy rounds"
sleep 3 # past the first batches read ahead

# --- 1. writes during the first round
fio_iops() {
  fio --name=w --filename="$DEV" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
    --iodepth=8 --size=64M --runtime=5 --time_based --randseed=$1 \
    --output-format=json > "$WORK/fio.$1.json"
  jq '.jobs[0].write.iops | floor' "$WORK/fio.$1.json"
}
DURING=$(fio_iops 1)
[ "$(mirror server_epoch)" = 0 ] && [ "$(mirror precopy_rounds)" = 0 ] ||
  fail "the first round was over before fio was (raise the image size or lower the bandwidth)"
[ "$(tracking preserved_memory_bytes)" = 0 ] && [ "$(tracking preserved_spilled_bytes)" = 0 ] ||
  fail "chunks were kept for copy-on-write during a pre-copy round"
[ "$(tracking writes_waiting_for_cow)" = 0 ] || fail "writes wait for copy-on-write during a pre-copy round"
YIELDED=$(mirror yielded_ms)
[ "$YIELDED" -gt 0 ] || fail "the first sync did not give way to fio's writes"
log "fio during the first round: $DURING IOPS; nothing kept for copy-on-write; the sync yielded (${YIELDED} ms at the minimum rate)"

# --- 2. stamped writes until after the first version is published
cat > "$WORK/stamp.py" <<'EOF'
import mmap, os, random, struct, sys, time
dev, log_path, stop, lo, hi = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
rnd = random.Random(7)
seq = 0
with open(log_path, "w") as log:
    while not os.path.exists(stop):
        seq += 1
        off = lo + rnd.randrange((hi - lo) // 4096) * 4096
        buf.seek(0)
        buf.write(struct.pack("<8sQQ", b"STAMPSEQ", seq, off) + rnd.randbytes(4072))
        os.pwrite(fd, buf, off)  # O_DIRECT: on the device when it returns
        log.write(f"{seq} {off}\n")
        time.sleep(0.02)
EOF
cat > "$WORK/check.py" <<'EOF'
import struct, sys
image, log_path = sys.argv[1], sys.argv[2]
writes = [tuple(map(int, l.split())) for l in open(log_path)]
seen = {}
with open(image, "rb") as f:
    for off in {o for _, o in writes}:
        f.seek(off)
        magic, seq, at = struct.unpack("<8sQQ", f.read(24))
        seen[off] = seq if magic == b"STAMPSEQ" and at == off else None
k = max((s for s in seen.values() if s), default=0)
last = {}
for seq, off in writes:
    if seq <= k:
        last[off] = seq
bad = [off for off in seen if seen[off] != last.get(off)]
print(f"cut after write {k} of {len(writes)}; {len(bad)} blocks not at that cut")
sys.exit(0 if not bad and 0 < k < len(writes) else 1)
EOF
python3 "$WORK/stamp.py" "$DEV" "$WORK/stamps.log" "$WORK/stop" $((STAMPS_MB << 20)) $((SIZE_MB << 20)) &
WRITER=$!
wait $SYNC || { cat "$WORK/sync.out" "$WORK/daemon.$DAEMONS.log"; fail "the first sync failed"; }
sleep 1
touch "$WORK/stop"
wait $WRITER || fail "the stamping writer failed"
grep -q "pre-copy run published" "$WORK/daemon.$DAEMONS.log" || fail "the first sync did not travel in pre-copy rounds"
grep "pre-copy round" "$WORK/daemon.$DAEMONS.log" | sed 's/^.*pre-copy round/  round:/' | head -n 8
# The rounds and the cut were published as the server's epoch 1: one
# version.
RUN=$(grep "pre-copy run published" "$WORK/daemon.$DAEMONS.log" | head -n 1 | sed -n 's/.* remote=\([0-9]*\).*/\1/p')
[ "$RUN" = 1 ] || fail "the first sync was published as server epoch '$RUN', not as one version (1)"
# The interval is an hour: nothing else is cut, except what a last kick of
# the sync (sent while the run was being published) cuts of the writes
# since. Either way the image is a version: the device at one cut. Outside
# the stamped area, the device as it is.
for _ in $(seq 150); do [ "$(tracking 'sealed | length')" = 0 ] && break; sleep 0.2; done
[ "$(tracking 'sealed | length')" = 0 ] || fail "an epoch stays sealed after the first sync, with nothing written"
EPOCH=$(mirror server_epoch)
[ "$EPOCH" -ge 1 ] && [ "$EPOCH" -le 2 ] || fail "the server holds epoch $EPOCH after the first sync (1, or 2 after a last kick)"
log "the first sync published as epoch 1 (the server is at epoch $EPOCH)"
cmp -n $((STAMPS_MB << 20)) "$IMG" "$SERVER_IMG" ||
  fail "the published image differs from the device outside the stamped area"
python3 "$WORK/check.py" "$SERVER_IMG" "$WORK/stamps.log" || fail "the published image is not the device at one cut"
log "the published image is the device at one cut, written all along"

# --- the same fio with the mirror idle
AFTER=$(fio_iops 2)
RATIO=$(awk -v a="$DURING" -v b="$AFTER" 'BEGIN { printf "%.2f", a / b }')
log "fio: $DURING IOPS during the first sync, $AFTER IOPS with the mirror idle: ratio $RATIO"
awk -v r="$RATIO" 'BEGIN { exit !(r >= 0.5) }' || fail "writes during the first sync ran at $RATIO of the idle rate"

# --- 3. in sync: the backing file, byte for byte
"$UBLK_MIRROR" sync "$ID" --timeout 300s || { cat "$WORK/daemon.$DAEMONS.log"; fail "sync failed"; }
cmp "$IMG" "$SERVER_IMG" || fail "after a sync the server's image differs from the backing file"
log "after a sync the server's image is the backing file"

# --- 4. the mirror away mid-epoch
dd if=/dev/urandom of="$DEV" bs=1M count=48 seek=64 oflag=direct status=none
"$UBLK_MIRROR" sync "$ID" --timeout 600s > "$WORK/sync4.out" 2>&1 &
SYNC=$!
for _ in $(seq 100); do [ "$(tracking 'sealed | length')" -ge 1 ] && break; sleep 0.1; done
sleep 1 # some blocks read, most not (12 MB/s)
[ "$(tracking 'sealed | map(select(.precopy | not)) | length')" = 1 ] ||
  fail "no ordinary epoch was being shipped: $(tracking sealed)"
kill -TERM "$SPID"; wait "$SPID" || fail "mirror-server did not stop cleanly"
for _ in $(seq 150); do [ "$(mirror cuts_let_go)" -ge 1 ] && break; sleep 0.2; done
[ "$(mirror cuts_let_go)" = 1 ] || fail "the epoch kept its cut with the mirror away: $(mirror link) $(tracking sealed)"
[ "$(tracking 'sealed | map(select(.precopy | not)) | length')" = 0 ] || fail "an epoch still holds a cut"
WAITS=$(tracking cow_waits)
fio --eta=never --name=away --filename="$DEV" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
  --iodepth=8 --offset=64M --size=48M --runtime=3 --time_based --output=/dev/null
[ "$(tracking cow_waits)" = "$WAITS" ] || fail "writes waited for copy-on-write with the cut let go of"
log "the mirror away: the epoch let go of its cut, and fio's writes into it waited for no copy"
"$MS" --data "$DATA" serve > "$WORK/server.out" 2> "$WORK/server.log" &
SPID=$!
wait $SYNC || { cat "$WORK/sync4.out" "$WORK/daemon.$DAEMONS.log"; fail "the sync across the mirror's absence failed"; }
# That sync was asked before fio's writes while the mirror was away: they
# are on the mirror after a sync asked now.
"$UBLK_MIRROR" sync "$ID" --timeout 600s || fail "the sync after the mirror came back failed"
stop_dev
cmp "$IMG" "$SERVER_IMG" || fail "after a sync the server's image differs from the backing file"
log "after a sync the server's image is the backing file"
stop_mirror_server
