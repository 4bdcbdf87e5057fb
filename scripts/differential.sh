#!/usr/bin/env bash
# The long run of the differential model test (limiter/tests/differential.rs): many more
# simulated scenarios than CI's 64, in release mode. A failure prints the shrunk scenario and
# proptest keeps it in limiter/tests/differential.proptest-regressions (commit it: it then runs
# in CI as a regression).
#
#   scripts/differential.sh            # 20 000 scenarios (about 5 minutes on 2 cores)
#   scripts/differential.sh 200000     # a night's run
#
# Exit status: 0 when every scenario held the bounds, non-zero otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-20000}"
echo "differential model test: $cases scenarios (release build)"
PROPTEST_CASES="$cases" cargo test --release --locked -p openclaw-limiter --test differential
