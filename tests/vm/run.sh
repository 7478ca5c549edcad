#!/bin/bash
# Runs every tests/vm/t*.sh (or those named) inside the VM, each in its own
# process; prints a line per test and the totals. Exit 0 only if all passed.
set -uo pipefail
cd "$(dirname "$0")" || exit 2
export UBLK_MIRROR=${UBLK_MIRROR:?}
tests=("$@"); [ ${#tests[@]} -gt 0 ] || tests=(t*.sh)
pass=0; failed=()
for t in "${tests[@]}"; do
  t=${t%.sh}; t=${t##*/}
  echo "=== $t"
  start=$SECONDS
  if bash "./$t.sh"; then
    pass=$((pass + 1)); echo "--- PASS $t ($((SECONDS - start)) s)"
  else
    failed+=("$t"); echo "--- FAIL $t ($((SECONDS - start)) s)"
  fi
  "$UBLK_MIRROR" del --all >/dev/null 2>&1 || true
  mountpoint -q /scratch/mnt 2>/dev/null && umount /scratch/mnt
done
echo "vm-suite: $pass passed, ${#failed[@]} failed"
[ ${#failed[@]} = 0 ] || echo "failed: ${failed[*]}"
[ ${#failed[@]} = 0 ]
