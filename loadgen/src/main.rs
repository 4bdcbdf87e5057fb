//! `openclaw-load`: the command-line front of the load generator (in progress: the library is
//! usable, the CLI lands in the next commit).

fn main() -> std::process::ExitCode {
    eprintln!("openclaw-load: the command line is not built yet; use the openclaw_loadgen library");
    std::process::ExitCode::from(70)
}
