//! Three real replicas, one of them with its wall clock moved ahead by libfaketime (Debian's
//! `faketime`), driven below and above the limit by the accuracy harness
//! (`openclaw_e2e::accuracy`, the same code as `scripts/accuracy.sh`, in short runs) and compared
//! with the textbook token bucket fed the same arrivals:
//!
//! - within the clock guard (`OPENCLAW_CLOCK_SKEW_GUARD_MS`, 500 ms), the replicas follow the
//!   fastest clock and the offset costs nothing, in either direction (docs/crdt.md, "Clocks");
//! - beyond it, ahead or behind, the two others are a majority against it: it moves its clock to
//!   theirs (behind, at once; ahead, slowed down, never stepped back), and the cluster runs as
//!   with the clocks together, in both modes;
//! - a clock that steps beyond the guard while the cluster runs under load never takes `strict`
//!   mode over the limit.
//!
//! Without libfaketime the tests are skipped with a message, except under `CI=true`, where that
//! fails (scripts/install-test-deps.sh installs it). Run `cargo build --workspace --bins` first:
//! the harness starts the real limiter binary.

use openclaw_e2e::accuracy::{self, Options};
use openclaw_e2e::faketime::faketime_or_skip;
use serde_json::Value;

/// The replica the harness moves ahead (`accuracy`'s `SKEWED_REPLICA`).
const SKEWED: usize = 1;
const REPLICAS: usize = 3;

/// One short harness run in `mode` of `patterns`, 3 s each, with `extra` arguments as on its
/// command line; every row checked to have run with the clock offset it asked for
/// ([`assert_offsets_applied`]). `None` when libfaketime is missing outside CI.
fn harness(mode: &str, patterns: &str, extra: &[&str]) -> Option<Value> {
    let lib = faketime_or_skip()?;
    let lib = lib.display().to_string();
    let argv = [
        "--duration-s",
        "3",
        "--faketime-lib",
        &lib,
        "--mode",
        mode,
        "--patterns",
        patterns,
    ];
    let argv = argv.iter().chain(extra).map(|s| s.to_string());
    let options = Options::parse_from(argv).expect("harness options");
    let figures = accuracy::run(&options);
    assert_offsets_applied(&figures);
    Some(figures)
}

fn f64_of(row: &Value, field: &str) -> f64 {
    row[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {field} in {row:#}"))
}

/// Every row ran with replica [`SKEWED`] as far ahead as asked (read from its log), the others
/// on the machine's clock: otherwise the test would measure nothing.
fn assert_offsets_applied(figures: &Value) {
    let rows = figures["rows"].as_array().expect("rows");
    assert!(!rows.is_empty(), "no run: {figures:#}");
    for row in rows {
        let asked = f64_of(&row["clock_offset_ms"], "ms");
        let seen = &row["clock_offsets_seen_ms"];
        for replica in 0..REPLICAS {
            let offset = seen[replica]
                .as_f64()
                .unwrap_or_else(|| panic!("replica-{replica}'s clock unknown: {row:#}"));
            let expected = if replica == SKEWED { asked } else { 0.0 };
            assert!(
                (offset - expected).abs() <= 20.0,
                "replica-{replica} is {offset} ms off, expected {expected}: libfaketime did not \
                 move the clock as asked ({row:#})"
            );
        }
    }
}

fn below_rows(figures: &Value) -> Vec<&Value> {
    figures["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|row| f64_of(row, "load_factor") < 1.0)
        .collect()
}

/// The one overload run's figures against docs/crdt.md.
fn the_overload_report(figures: &Value) -> &Value {
    let overload = figures["overload"].as_array().expect("overload");
    assert_eq!(overload.len(), 1, "{figures:#}");
    &overload[0]
}

/// Refused although the ideal bucket admitted it, as a share of the ideal's admissions.
fn refused_under_pct(row: &Value) -> f64 {
    f64_of(row, "refused_under_limit_pct_of_ideal")
}

/// No replica's `/status` shows a peer separated from it by the clock guard.
fn assert_no_separation(row: &Value) {
    for replica in 0..REPLICAS {
        let shown = row["clock_separated_peers"][replica]
            .as_array()
            .unwrap_or_else(|| panic!("no clock_separated_peers: {row:#}"));
        assert!(shown.is_empty(), "replica-{replica} separated: {row:#}");
    }
}

#[test]
fn within_the_clock_guard_one_clock_ahead_costs_nothing_in_shared_mode() {
    let Some(figures) = harness(
        "shared",
        "clock-ahead-500ms,hot-uniform-clock-ahead-500ms",
        &[],
    ) else {
        return;
    };
    // Below the limit: before the replicas followed the fastest clock, a replica 500 ms ahead
    // made the others refuse 37 % of these clients at half their limit and 12 % at 90 %
    // (docs/accuracy.md); measured since, 0 to 0.2 %.
    for row in below_rows(&figures) {
        assert!(
            refused_under_pct(row) <= 2.0,
            "clients under their limit refused: {row:#}"
        );
    }
    assert_shared_bound_held(&figures);
}

#[test]
fn within_the_clock_guard_strict_mode_never_goes_over_with_one_clock_ahead() {
    let Some(figures) = harness(
        "strict",
        "clock-ahead-500ms,hot-uniform-clock-ahead-500ms",
        &[],
    ) else {
        return;
    };
    // Measured, with the offset as without: 0.2-1.3 % at half the limit, 2.7-3.4 % at 90 %
    // (shares move with demand once a round); 500 ms ahead on the code before the shared
    // clock: 17-18 %.
    for row in below_rows(&figures) {
        let bound = if f64_of(row, "load_factor") <= 0.5 {
            4.0
        } else {
            8.0
        };
        assert!(
            refused_under_pct(row) <= bound,
            "clients under their limit refused beyond {bound} %: {row:#}"
        );
    }
    assert_strict_overload_held(&figures);
}

/// Above the limit, `strict` mode never goes over `C + r·T` and admits most of it.
fn assert_strict_overload_held(figures: &Value) {
    let report = the_overload_report(figures);
    assert!(
        f64_of(report, "overshoot_over_c_plus_rt") <= 0.0,
        "strict mode admitted beyond C + r*T: {report:#}"
    );
    assert!(
        f64_of(report, "utilization_pct") >= 80.0,
        "strict mode refused most of what the bucket allows: {report:#}"
    );
}

/// Above the limit, `shared` mode within its bound (docs/crdt.md) and no more than with the
/// clocks together (about 0.3 % over C + r*T, measured).
fn assert_shared_bound_held(figures: &Value) {
    let report = the_overload_report(figures);
    let over = f64_of(report, "overshoot_over_c_plus_rt");
    assert!(
        over <= f64_of(report, "bound") && over <= 0.05 * f64_of(report, "c_plus_rt"),
        "over the limit beyond the shared bound: {report:#}"
    );
}

/// `strict` mode with replica 1's clock beyond the guard from the two others (`patterns`: one
/// below-limit pattern at 90 % and one overload pattern), once it has moved to their clock:
/// as with the clocks together (`within_the_clock_guard_strict_mode_...`: 8 % at 90 %), replica
/// 1 included, nobody separated, and never over. Before, it was shut out: it held no lease and
/// refused every request of its clients the textbook bucket admitted (673 of 2022 at 90 %).
fn assert_strict_as_with_the_clocks_together(patterns: &str) {
    let Some(figures) = harness("strict", patterns, &["--below", "0.9"]) else {
        return;
    };
    let rows = below_rows(&figures);
    assert_eq!(rows.len(), 1, "{figures:#}");
    let row = rows[0];
    assert!(
        refused_under_pct(row) <= 8.0,
        "clients under their limit refused beyond 8 %: {row:#}"
    );
    assert_no_separation(row);
    // Per key, never more than the textbook bucket admits (a few requests sent just before a
    // token came back may be decided just after it, hence the 1 %).
    assert!(
        f64_of(row, "overshoot") <= 0.01 * f64_of(row, "ideal"),
        "strict mode admitted beyond the ideal bucket: {row:#}"
    );
    assert_strict_overload_held(&figures);
}

#[test]
fn ahead_beyond_the_clock_guard_in_strict_mode_a_replica_falls_back_to_the_majority_and_serves() {
    // The two others, a majority, are behind replica 1 beyond the guard: its clock is the wrong
    // one, and it slows down until it runs on theirs.
    assert_strict_as_with_the_clocks_together("clock-ahead-2s,hot-uniform-clock-ahead-2s");
}

#[test]
fn ahead_beyond_the_clock_guard_in_shared_mode_the_fleet_holds_the_shared_bound() {
    // Before replica 1 fell back to the majority, the others did not count what it admitted:
    // one hot key at twice its limit went 11.7 % over C + r*T (its third of the load).
    if let Some(figures) = harness("shared", "hot-uniform-clock-ahead-2s", &[]) {
        assert_shared_bound_held(&figures);
    }
}

#[test]
fn behind_beyond_the_clock_guard_in_strict_mode_a_replica_follows_the_majority_and_serves() {
    // The two others, a majority, are ahead of replica 1 beyond the guard: its clock is the
    // wrong one, and it catches up with theirs.
    assert_strict_as_with_the_clocks_together("clock-behind-2s,hot-uniform-clock-behind-2s");
}

#[test]
fn behind_beyond_the_clock_guard_in_shared_mode_the_fleet_holds_the_shared_bound() {
    // Before replica 1 followed the majority, the others counted its spending 2 s late and it
    // counted none of theirs: one hot key at twice its limit went 24-33 % over C + r*T.
    if let Some(figures) = harness("shared", "hot-uniform-clock-behind-2s", &[]) {
        assert_shared_bound_held(&figures);
    }
}

#[test]
fn a_clock_stepping_beyond_the_guard_under_load_never_takes_strict_mode_over() {
    // The cluster forms with all clocks together; a second into the run (of 3 s) replica 1's
    // clock steps 2 s ahead, under load at twice the limit. The others stop hearing it, wait out
    // its lease and share its part, and it slows its clock down to theirs and rejoins: spending
    // pauses for those membership changes (as when a replica dies and comes back,
    // docs/crdt.md), and nothing is ever admitted beyond C + r*T.
    let Some(figures) = harness("strict", "hot-uniform-clock-steps-ahead-2s", &[]) else {
        return;
    };
    let report = the_overload_report(&figures);
    assert!(
        f64_of(report, "overshoot_over_c_plus_rt") <= 0.0,
        "strict mode admitted beyond C + r*T across the clock step: {report:#}"
    );
}
