#!/usr/bin/env bash
# Builds the stack, the limiter and the metrics adapter in release mode and runs a load scenario
# on the whole system (docs/local-stack.md). Arguments go to `openclaw-stack scenario`, e.g.
#   scripts/scenario.sh --out docs/reports/my-run --kill-replica-at 3m
#   scripts/scenario.sh --profile quick --time-scale 30 --out /tmp/quick
# Needs Debian's Prometheus (`apt-get install -y prometheus`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p openclaw-stack -p openclaw-limiter -p openclaw-metrics-adapter
exec target/release/openclaw-stack scenario "$@"
