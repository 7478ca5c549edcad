# shellcheck shell=bash disable=SC2034
# Helpers for the end-to-end tests that run inside the VM (sourced).
# Each test is a bash script that exits 0 on success; `fail` ends it with a
# message. UBLK_MIRROR points at the binary under test.
set -euo pipefail

UBLK_MIRROR=${UBLK_MIRROR:?set UBLK_MIRROR to the ublk-mirror binary}
WORK=${WORK:-/scratch/$(basename "$0" .sh)}
rm -rf "$WORK"; mkdir -p "$WORK"

log() { echo "[$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# expect_fail CODE "text in stderr" CMD...: CMD must exit with CODE and say the text.
expect_fail() {
  local code=$1 want=$2; shift 2
  local out rc=0
  out=$("$@" 2>&1 >/dev/null) || rc=$?
  [ "$rc" = "$code" ] || fail "'$*' exited $rc, expected $code; it said: $out"
  grep -qF -- "$want" <<<"$out" || fail "'$*' did not say '$want'; it said: $out"
  log "refused as expected: $* -> $(head -n1 <<<"$out")"
}

# start_dev ARGS...: run `ublk-mirror add ARGS` (or `recover`, if ARGS starts
# with "recover") in the background; wait until it prints the device path.
# Sets DEV (/dev/ublkbN), DEV_ID, DEV_PID. Its log goes to $WORK/daemon.N.log.
DAEMONS=0
start_dev() {
  local cmd=add
  if [ "${1:-}" = recover ]; then cmd=recover; shift; fi
  DAEMONS=$((DAEMONS + 1))
  local out=$WORK/daemon.$DAEMONS.out
  : > "$out"
  "$UBLK_MIRROR" "$cmd" "$@" > "$out" 2> "$WORK/daemon.$DAEMONS.log" &
  DEV_PID=$!
  for _ in $(seq 600); do
    [ -s "$out" ] && break
    kill -0 "$DEV_PID" 2>/dev/null || { cat "$WORK/daemon.$DAEMONS.log" >&2; fail "ublk-mirror $cmd $* exited"; }
    sleep 0.1
  done
  DEV=$(head -n1 "$out")
  [ -b "$DEV" ] || { cat "$WORK/daemon.$DAEMONS.log" >&2; fail "no block device after 60 s: '$DEV'"; }
  DEV_ID=${DEV#/dev/ublkb}
  log "device $DEV up (pid $DEV_PID): ublk-mirror $cmd $*"
}

# stop_dev: SIGTERM the daemon, expect a clean exit and the device gone.
stop_dev() {
  kill -TERM "$DEV_PID"
  local rc=0
  wait "$DEV_PID" || rc=$?
  [ "$rc" = 0 ] || { cat "$WORK/daemon.$DAEMONS.log" >&2; fail "daemon exited $rc on SIGTERM"; }
  for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
  [ ! -e "$DEV" ] || fail "$DEV still exists after the daemon stopped"
  log "device $DEV stopped cleanly"
}

# crash_dev: kill the daemon with SIGKILL (as a crash would) and reap it;
# the device stays, quiesced.
crash_dev() {
  kill -9 "$DEV_PID"
  wait "$DEV_PID" 2>/dev/null || true
}

# dev_state ID: the state `ublk-mirror list --json` reports for device ID.
dev_state() {
  "$UBLK_MIRROR" list --json | jq -r --argjson id "$1" '.[] | select(.id == $id) | .state'
}

# fresh_status ID JQ: JQ over device ID's `status --json` entry, once its
# daemon has published a status newer than now (it publishes about once a
# second, so a status read right after some I/O may not count it yet).
fresh_status() {
  local now; now=$(date +%s%3N)
  for _ in $(seq 100); do
    "$UBLK_MIRROR" status --json > "$WORK/status.json"
    if jq -e --argjson id "$1" --argjson now "$now" \
        '.[] | select(.id == $id and .status.updated_ms > $now)' "$WORK/status.json" >/dev/null; then
      jq -r --argjson id "$1" ".[] | select(.id == \$id) | $2" "$WORK/status.json"
      return 0
    fi
    sleep 0.2
  done
  cat "$WORK/status.json" >&2; fail "device $1 published no status for 20 s"
}

# allocated FILE: bytes the file occupies on disk.
allocated() { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }

cleanup_devices() {
  "$UBLK_MIRROR" del --all --force >/dev/null 2>&1 || true
}

modprobe ublk_drv

# start_mirror_server: a mirror server on 127.0.0.1:4747 with its data in
# $WORK/server (DATA), and this machine enrolled as client "laptop" in
# $WORK/client. Sets MS (the binary), DATA, SPID; stop it with
# stop_mirror_server.
start_mirror_server() {
  MS=${MIRROR_SERVER:-$(dirname "$UBLK_MIRROR")/mirror-server}
  [ -x "$MS" ] || fail "no mirror-server binary at $MS"
  DATA=$WORK/server
  "$MS" --data "$DATA" init --listen 127.0.0.1:4747
  "$MS" --data "$DATA" serve > "$WORK/server.out" 2> "$WORK/server.log" &
  SPID=$!
  for _ in $(seq 100); do grep -q "listening on" "$WORK/server.out" && break; sleep 0.1; done
  grep -q "listening on" "$WORK/server.out" || { cat "$WORK/server.log"; fail "mirror-server did not start"; }
  local token
  token=$("$MS" --data "$DATA" client add laptop --address 127.0.0.1:4747)
  "$UBLK_MIRROR" enroll "$token" --client-dir "$WORK/client"
}

# stop_mirror_server: SIGTERM, and a clean exit.
stop_mirror_server() {
  kill -TERM "$SPID"; wait "$SPID" || fail "mirror-server did not stop cleanly"
}
