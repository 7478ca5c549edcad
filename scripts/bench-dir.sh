# scripts/bench-dir.sh — sourced by the benchmarks (bench-attach, bench-lag,
# bench-replication, bench-store): their working directory, `--dir`.
#
# A directory of the user's is never removed. The benchmark takes a new
# directory, an empty one, or one a benchmark made before (it holds the
# marker `.ublk-mirror-bench`, or is a default, ublk-mirror-bench-*);
# anything else is refused. What the run put
# there goes at the end; the directory itself only if it is left empty.

# bench_dir_check NAME DIR: refuse DIR (exit 2) unless a run may take
# it; changes nothing (a benchmark checks before it builds).
bench_dir_check() {
  local who=$1 dir=$2
  if [ -e "$dir" ] && [ ! -d "$dir" ]; then
    echo "$who: --dir $dir is not a directory" >&2; exit 2
  fi
  # (The defaults, ${TMPDIR:-/var/tmp}/ublk-mirror-bench-*, are the
  # benchmarks' own, also as left by a run from before the marker.)
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -e "$dir/.ublk-mirror-bench" ] \
    && [[ "$(basename "$dir")" != ublk-mirror-bench-* ]]; then
    echo "$who: --dir $dir holds files of its own: give a new or empty directory (what a run puts there is removed after it)" >&2
    exit 2
  fi
}

# bench_dir_take NAME DIR: make DIR the run's, empty.
bench_dir_take() {
  local dir=$2
  bench_dir_check "$1" "$dir"
  mkdir -p "$dir"
  find "$dir" -mindepth 1 -delete
  touch "$dir/.ublk-mirror-bench"
}

# bench_dir_clear DIR: what the run put in DIR goes, then DIR if empty.
bench_dir_clear() {
  find "$1" -mindepth 1 -delete 2>/dev/null || true
  rmdir "$1" 2>/dev/null || true
}
