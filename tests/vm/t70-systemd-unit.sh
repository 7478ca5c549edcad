#!/bin/bash
# The systemd unit's contract, without systemd as init: its ExecStart line,
# run with a NOTIFY_SOCKET, reports READY=1 naming the device; after kill -9
# the same line (what Restart=on-failure runs) recovers the device in place;
# SIGTERM (systemctl stop) stops it cleanly with STOPPING=1.
source "$(dirname "$0")/lib.sh"

UNIT=$(dirname "$0")/../../systemd/ublk-mirror@.service
NAME=vmtest
mkdir -p /etc/ublk-mirror
printf 'backing = "%s/unit.img"\nsize = "64M"\n' "$WORK" > /etc/ublk-mirror/$NAME.toml
exec_start=$(sed -n 's/^ExecStart=//p' "$UNIT")
exec_start=${exec_start//%i/$NAME}
exec_start=${exec_start/\/usr\/bin\/ublk-mirror/$UBLK_MIRROR}
log "ExecStart: $exec_start"

SOCK=$WORK/notify.sock
python3 -u -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
while True:
    print(s.recv(4096).decode().replace("\n", " | "), flush=True)
' "$SOCK" >> "$WORK/notify.log" &
LISTENER=$!
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done

# wait_notify TEXT: until the listener has received a message containing
# TEXT (60 s, as start_dev waits for a device: TCG can be slow).
wait_notify() {
  for _ in $(seq 600); do grep -qF -- "$1" "$WORK/notify.log" && return 0; sleep 0.1; done
  echo "notifications:"; cat "$WORK/notify.log"
  echo "daemon log:"; cat "$WORK"/unit*.log
  fail "no notification containing '$1'"
}

# shellcheck disable=SC2086 # the unit's command line is split like systemd does
NOTIFY_SOCKET=$SOCK $exec_start > "$WORK/unit.out" 2> "$WORK/unit.log" &
PID=$!
wait_notify "READY=1 | STATUS=serving /dev/ublkb"
DEV=$(head -n1 "$WORK/unit.out"); ID=${DEV#/dev/ublkb}
log "unit ready: $(tail -n1 "$WORK/notify.log")"
echo "written before the crash" | dd of="$DEV" bs=4096 conv=sync,fsync oflag=direct status=none

kill -9 $PID; wait $PID 2>/dev/null || true
[ "$(dev_state "$ID")" = quiesced ] || fail "device not quiesced after kill -9"
: > "$WORK/notify.log"
# shellcheck disable=SC2086
NOTIFY_SOCKET=$SOCK $exec_start > "$WORK/unit2.out" 2> "$WORK/unit2.log" &
PID=$!
wait_notify "READY=1 | STATUS=recovered /dev/ublkb$ID"
log "restart recovered the device: $(tail -n1 "$WORK/notify.log")"
head -c 24 "$DEV" | grep -q "written before the crash" || fail "data lost across the restart"

kill -TERM $PID
rc=0; wait $PID || rc=$?
[ $rc = 0 ] || fail "ExecStart exited $rc on SIGTERM"
wait_notify "STOPPING=1"
[ ! -e "$DEV" ] || fail "device still there after stop"
kill $LISTENER
rm -f /etc/ublk-mirror/$NAME.toml
log "unit contract ok"
