#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what the tests need, check formatting and lints,
# build every binary once (the end-to-end tests start them), run every test, then the alert
# rules and manifest checks. Run from anywhere: `scripts/test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { printf '\n==> %s (%ds)\n' "$*" "$((SECONDS - started))"; }

step "installing test dependencies"
scripts/install-test-deps.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "building the binaries the end-to-end tests start"
cargo build --workspace --bins --locked

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

step "alert rules (promtool) and dashboard"
alerts/check.sh

if [ -x deploy/tests/validate.sh ]; then
  step "Kubernetes manifests"
  deploy/tests/validate.sh
fi

step "all checks passed in $((SECONDS - started)) s"
