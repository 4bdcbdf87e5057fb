//! Real clock offsets for the limiter's processes: Debian's libfaketime (package `faketime`),
//! preloaded into one process so that its wall clock runs ahead of the machine's while its
//! monotonic clock stays real (the limiter's clock starts from the wall clock and advances on
//! the monotonic one: docs/crdt.md, "Clocks").

use std::path::PathBuf;

/// Where Debian installs libfaketime (`/usr/lib/<multiarch triple>/faketime/libfaketime.so.1`).
pub fn faketime_lib() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .find_map(|dir| {
            let path = dir.path().join("faketime/libfaketime.so.1");
            path.is_file().then_some(path)
        })
}

/// [`faketime_lib`], or `None` after printing why the test is skipped. Under `CI=true` a missing
/// libfaketime fails the test instead: CI must not pass by skipping.
pub fn faketime_or_skip() -> Option<PathBuf> {
    let lib = faketime_lib();
    if lib.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(
            !ci,
            "libfaketime is not installed (Debian package faketime): scripts/install-test-deps.sh installs it"
        );
        eprintln!(
            "SKIPPED: libfaketime is not installed; `apt-get install faketime` (or scripts/install-test-deps.sh)"
        );
    }
    lib
}

/// The environment that runs a process with its wall clock `offset_ms` ahead (negative: behind),
/// through `lib`.
pub fn wall_clock_offset(lib: &std::path::Path, offset_ms: i64) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        // A relative offset in seconds; the fraction separator is the locale's, and the limiter
        // never calls setlocale, so it is "C": a dot.
        ("FAKETIME", format!("{:+.3}", offset_ms as f64 / 1e3)),
        // Monotonic clocks stay real: only the wall clock moves.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ("FAKETIME_DONT_RESET", "1".to_owned()),
    ]
}

/// The environment that runs a process with its wall clock offset by what `file` says
/// ([`set_offset`]), re-read at least once a second: a clock that can be stepped while the
/// process runs.
pub fn wall_clock_from_file(
    lib: &std::path::Path,
    file: &std::path::Path,
) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
        ("FAKETIME_CACHE_DURATION", "1".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ("FAKETIME_DONT_RESET", "1".to_owned()),
    ]
}

/// Write `offset_ms` (negative: behind) to the offset file of [`wall_clock_from_file`].
pub fn set_offset(file: &std::path::Path, offset_ms: i64) {
    std::fs::write(file, format!("{:+.3}\n", offset_ms as f64 / 1e3))
        .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
}
