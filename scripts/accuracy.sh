#!/usr/bin/env bash
# Accuracy benchmark of shared-mode replication: builds the release binaries, starts 3
# `openclaw-limiter` replicas on 127.0.0.1 per load pattern, drives them at 2x the limit and
# prints admitted vs ideal (overshoot %), utilization, convergence p50/p99 and replication bytes
# per decision against the bound in docs/crdt.md. Method and recorded figures: docs/accuracy.md.
#
#   scripts/accuracy.sh                                  # every pattern, 10 s each, 50 ms sync
#   scripts/accuracy.sh --sync-ms 10 --patterns hot-uniform,hot-one
#   scripts/accuracy.sh --help
#
# A benchmark, not a test: not run in CI, exits 0 whatever the figures. Every process it starts
# is killed on exit, failure or interruption included.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p openclaw-limiter --bin openclaw-limiter
cargo build --release --locked -p openclaw-e2e --bin openclaw-accuracy

# The harness and the replicas it starts get their own process group (job control), so that
# whatever happens to this script, the whole group is stopped.
set -m
target/release/openclaw-accuracy "$@" &
harness=$!
trap 'kill -TERM -- "-$harness" 2>/dev/null || true' EXIT INT TERM
wait "$harness"
