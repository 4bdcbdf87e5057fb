#!/usr/bin/env bash
# Accuracy benchmark of replication: builds the release binaries, starts 3 `openclaw-limiter`
# replicas on 127.0.0.1 per load pattern and prints, per pattern, admitted against an ideal
# token bucket fed the same requests: refusals of clients under their limit, and overshoot.
# Overload patterns (2x the limit) also get utilization, convergence p50/p99 and replication
# bytes per decision against the bound in docs/crdt.md; below-limit patterns (50 % and 90 % of
# the limit, replicas started 1/3 s apart) include one replica's wall clock moved ahead with
# libfaketime. Method and recorded figures: docs/accuracy.md.
#
#   scripts/accuracy.sh                                  # every pattern, 10 s each, 50 ms sync
#   scripts/accuracy.sh --patterns below,clock           # the below-limit patterns only
#   scripts/accuracy.sh --patterns below --mode strict --json strict.json
#   scripts/accuracy.sh --sync-ms 10 --patterns hot-uniform,hot-one
#   scripts/accuracy.sh --patterns below --flaky-links 20   # links cut 20 % of the time
#   scripts/accuracy.sh --patterns restarts --mode strict    # a replica restarted or killed
#   scripts/accuracy.sh --api rls --patterns overload,below   # through ShouldRateLimit (gRPC)
#   scripts/accuracy.sh --help
#
# A benchmark, not a test: not run in CI, exits 0 whatever the figures. Every process it starts
# is stopped on exit, failure or interruption included.
set -euo pipefail
cd "$(dirname "$0")/.."

# The harness stops its replicas itself when it ends (also on a panic). If this script is
# interrupted or killed first, it stops them: the harness's own children, listed while it is
# still alive (their pids cannot be reused before it reaps them), then the harness. Only
# positive pids of processes started here are signalled, never a process group.
harness=
stop_harness() {
  trap - EXIT INT TERM
  [ -n "$harness" ] && kill -0 "$harness" 2>/dev/null || return 0
  local children
  children=$(pgrep -P "$harness" || true)
  # shellcheck disable=SC2086 # one pid per word
  kill -TERM $children "$harness" 2>/dev/null || true
  local pids="$children $harness" alive
  for _ in $(seq 50); do
    alive=
    for pid in $pids; do
      # Running (not a zombie waiting to be reaped).
      ps -o stat= -p "$pid" 2>/dev/null | grep -qv '^Z' && alive="$alive $pid"
    done
    [ -z "$alive" ] && return 0
    pids=$alive
    sleep 0.1
  done
  # shellcheck disable=SC2086 # one pid per word
  kill -KILL $alive 2>/dev/null || true
}
trap stop_harness EXIT
trap 'stop_harness; exit 130' INT
trap 'stop_harness; exit 143' TERM

cargo build --release --locked -p openclaw-limiter --bin openclaw-limiter
cargo build --release --locked -p openclaw-e2e --bin openclaw-accuracy

# The clock patterns need Debian's libfaketime; without it the harness skips them.
if ! compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null; then
  echo "note: libfaketime is not installed, so the clock-ahead patterns will be skipped;" \
       "install it with: apt-get install faketime" >&2
fi

# In its own process group (job control), so that a Ctrl-C at the terminal reaches this script
# only, which then stops the harness and its replicas as above.
set -m
target/release/openclaw-accuracy "$@" &
harness=$!
wait "$harness"
