//! `openclaw-accuracy`: the accuracy harness of `shared` and `strict` mode (three real replicas
//! driven above and below the limit, compared with the textbook token bucket). A benchmark, not
//! a test: `scripts/accuracy.sh` runs it, docs/accuracy.md records its figures, and the harness
//! itself is `openclaw_e2e::accuracy` (tests/tests/clock_offsets.rs runs it too).

fn main() -> std::process::ExitCode {
    openclaw_e2e::accuracy::main()
}
