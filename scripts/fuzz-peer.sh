#!/usr/bin/env bash
# Fuzzes the peer message decoder and merge with libFuzzer (cargo-fuzz), as a peer holding the
# secret could feed them; not part of CI (it needs a nightly toolchain and runs as long as asked):
#
#   scripts/fuzz-peer.sh              # 10 minutes
#   SECONDS_TO_RUN=3600 scripts/fuzz-peer.sh
#
# The target (limiter/fuzz/fuzz_targets/peer_message.rs) panics if the replica ever holds
# something no honest cluster could have sent it, and libFuzzer catches any other panic
# (overflow included: cargo-fuzz builds with debug assertions). It starts from the seeds in
# limiter/fuzz/seeds/peer_message and keeps what it finds in limiter/fuzz/corpus (ignored by git);
# a crashing input is written to limiter/fuzz/artifacts/ and the script fails. Keep a crash as a
# case of limiter/tests/hostile_peer.rs once fixed. Installs cargo-fuzz (and the nightly
# toolchain) when missing.
set -euo pipefail

SECONDS_TO_RUN=${SECONDS_TO_RUN:-600}
cd "$(dirname "$0")/../limiter/fuzz"

log() { echo "fuzz-peer: $*" >&2; }

rustup toolchain list | grep -q '^nightly' || {
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
}
cargo +nightly fuzz --version >/dev/null 2>&1 || {
    log "installing cargo-fuzz"
    cargo +nightly install cargo-fuzz --locked
}
# The versions the project builds and tests with (cargo adds the fuzzing crates to the copy).
[ -f Cargo.lock ] || cp ../../Cargo.lock Cargo.lock
mkdir -p corpus/peer_message
log "fuzzing for ${SECONDS_TO_RUN} s"
cargo +nightly fuzz run peer_message corpus/peer_message seeds/peer_message -- \
    -max_total_time="$SECONDS_TO_RUN" -max_len=65536 -timeout=10
