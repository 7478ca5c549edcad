#!/bin/bash
# Runs every tests/vm/t*.sh (or those named) inside the VM, each in its own
# process; prints a line per test and the totals. Exit 0 only if all passed.
#
# Each test also fails when the kernel complained while it ran: a line of
# the kernel log since the test started that says BUG:, Oops, WARNING:, a
# general protection fault, a panic, an RCU stall or a task hung for too
# long (those lines are printed). A test that runs longer than
# VM_TEST_TIMEOUT seconds (900) is stopped and fails.
set -uo pipefail
cd "$(dirname "$0")" || exit 2
export UBLK_MIRROR=${UBLK_MIRROR:?}
tests=("$@"); [ ${#tests[@]} -gt 0 ] || tests=(t*.sh)
pass=0; failed=()
echo "vm-suite: kernel $(uname -r)"

# What in the kernel log fails a test.
KERNEL_TROUBLE='BUG:|Oops|WARNING:|general protection fault|Kernel panic|rcu: INFO|rcu_.*stall|blocked for more than|UBSAN:|KASAN:'

# kernel_trouble MARK: the kernel's complaints since the line MARK.
kernel_trouble() {
  dmesg 2>/dev/null | awk -v m="$1" 'found { print; next } index($0, m) { found = 1 }' |
    grep -E -A 12 -- "$KERNEL_TROUBLE"
}

# The check must be able to fail: a complaint planted in the kernel log is found.
selfcheck="vm-suite: self-check $RANDOM$RANDOM"
echo "$selfcheck" > /dev/kmsg
echo "vm-suite: WARNING: planted by the self-check of the kernel log check" > /dev/kmsg
kernel_trouble "$selfcheck" | grep -q 'planted by the self-check' ||
  { echo "vm-suite: cannot read the kernel log (dmesg): the oops check would see nothing" >&2; exit 1; }

for t in "${tests[@]}"; do
  t=${t%.sh}; t=${t##*/}
  echo "=== $t"
  start=$SECONDS
  mark="vm-suite: start of $t $RANDOM$RANDOM"
  echo "$mark" > /dev/kmsg
  ok=1
  rc=0
  timeout -k 10 "${VM_TEST_TIMEOUT:-900}" bash "./$t.sh" || rc=$?
  [ "$rc" = 0 ] || ok=0
  [ "$rc" != 124 ] || echo "$t: stopped after ${VM_TEST_TIMEOUT:-900} s (VM_TEST_TIMEOUT)"
  if trouble=$(kernel_trouble "$mark") && [ -n "$trouble" ]; then
    echo "$t: the kernel complained while it ran:"
    sed 's/^/    kernel: /' <<<"$trouble"
    ok=0
  fi
  if [ $ok = 1 ]; then
    pass=$((pass + 1)); echo "--- PASS $t ($((SECONDS - start)) s)"
  else
    failed+=("$t"); echo "--- FAIL $t ($((SECONDS - start)) s)"
  fi
  "$UBLK_MIRROR" del --all --force >/dev/null 2>&1 || true
  # A failed test may leave its mirror server running, holding the port.
  if pkill -x mirror-server 2>/dev/null; then
    for _ in $(seq 50); do pgrep -x mirror-server >/dev/null || break; sleep 0.1; done
    pkill -KILL -x mirror-server 2>/dev/null
  fi
  mountpoint -q /scratch/mnt 2>/dev/null && umount /scratch/mnt
  # /scratch is guest RAM: what a test left there is of no use to the next.
  awk -v d="/scratch/$t/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null; done
  rm -rf "/scratch/$t"
done
echo "vm-suite: $pass passed, ${#failed[@]} failed"
[ ${#failed[@]} = 0 ] || echo "failed: ${failed[*]}"
[ ${#failed[@]} = 0 ]
