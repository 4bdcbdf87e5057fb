//! Three real replicas, one of them stopped and started again while clients use the cluster,
//! driven by the accuracy harness (`openclaw_e2e::accuracy`, the same code as
//! `scripts/accuracy.sh`, in short runs) and compared with the textbook token bucket fed the
//! same arrivals. The restarted replica starts on its own snapshot directory, as a container
//! restarting in its pod does (deploy/ gives each pod an `emptyDir`); while it is down or not
//! ready, its clients' requests go to the others, as a Service sends them.
//!
//! - A crash (SIGKILL) in `strict` mode: the process that starts again on the directory takes
//!   over from the dead replica (`lineage`: the directory's lock was free), so its peers stop
//!   needing the dead one's answers for their leases at once instead of after `lease + guard`
//!   (docs/crdt.md, "What it costs"). Clients under their limit are refused little more than
//!   with no restart, and nobody gets beyond the bucket.
//! - A rolling update (SIGTERM) in `strict` mode: the stopping replica says it retires.
//!
//! Run `cargo build --workspace --bins` first: the harness starts the real limiter binary.

use openclaw_e2e::accuracy::{self, Options};
use serde_json::Value;

/// One harness run in `mode` of `pattern` for `seconds`, with `extra` arguments as on its command
/// line: the figures as its `--json` writes them.
fn harness(mode: &str, pattern: &str, seconds: &str, extra: &[&str]) -> Value {
    let argv = [
        "--duration-s",
        seconds,
        "--mode",
        mode,
        "--patterns",
        pattern,
    ];
    let argv = argv.iter().chain(extra).map(|s| s.to_string());
    let options = Options::parse_from(argv).expect("harness options");
    accuracy::run(&options)
}

fn u64_of(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {value:#}"))
}

fn f64_of(value: &Value, field: &str) -> f64 {
    value[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {field} in {value:#}"))
}

/// The rows of a below-limit run, each checked to have restarted its replica as asked.
fn restarted_rows<'a>(figures: &'a Value, stop: &str) -> Vec<&'a Value> {
    let rows: Vec<&Value> = figures["rows"].as_array().expect("rows").iter().collect();
    assert!(!rows.is_empty(), "no run: {figures:#}");
    for row in &rows {
        let restart = &row["restart"];
        assert_eq!(restart["stop"], stop, "{row:#}");
        assert!(
            f64_of(restart, "ready_at_s") > f64_of(restart, "stopped_at_s"),
            "{row:#}"
        );
        // Nobody beyond the bucket in strict mode, restart or not.
        assert_eq!(
            u64_of(row, "overshoot"),
            0,
            "strict mode went over: {row:#}"
        );
    }
    rows
}

/// Refused although the ideal admitted, as a fraction of the ideal's admissions: from the stop
/// until one refill interval after the restarted replica was ready, and after that.
fn refused_around_the_restart(row: &Value) -> (f64, f64) {
    let restart = &row["restart"];
    let fraction = |refused: &str, ideal: &str| {
        u64_of(restart, refused) as f64 / u64_of(restart, ideal).max(1) as f64
    };
    (
        fraction(
            "refused_under_limit_until_ready_plus_interval",
            "ideal_until_ready_plus_interval",
        ),
        fraction("refused_under_limit_after", "ideal_after"),
    )
}

#[test]
fn a_strict_replica_that_crashes_and_restarts_on_its_directory_costs_its_peers_clients_little() {
    let figures = harness("strict", "replica-crashes", "6", &["--below", "0.5,0.9"]);
    for row in restarted_rows(&figures, "sigkill") {
        let load = f64_of(row, "load_factor");
        let (during, after) = refused_around_the_restart(row);
        eprintln!(
            "strict, crash and restart at {load}: refused under the limit {:.1} % until ready + 1 s, \
             {:.1} % after",
            during * 100.0,
            after * 100.0
        );
        // Without the restarted process taking over, every lease needed the dead replica's
        // answers until its share was reassigned (lease + guard + a little, 1.6 s), then every
        // sub-bucket started empty: 7.8 % / 16.8 % at half the limit and 23 % / 18 % at 90 %
        // (docs/accuracy.md, "A replica restarted under load"). With no restart at all strict mode refuses
        // 0.2-0.6 % at half the limit and 2-4.5 % at 90 %; a loaded CI machine adds to that
        // (one CI run, debug build: 4.5 % at 90 % before any restart). At 90 % the second after
        // the stop costs the stopped replica's share whatever happens (its tokens are gone, the
        // survivors' grown parts start empty); what tells the two apart is the time after it.
        let (during_max, after_max) = if load < 0.7 {
            (0.04, 0.03)
        } else {
            (0.20, 0.08)
        };
        assert!(
            during <= during_max && after <= after_max,
            "at {load} of the limit, strict refused {:.1} % of what the ideal bucket admitted \
             from the crash until the restarted replica was ready plus one refill interval \
             (at most {:.0} % expected) and {:.1} % after (at most {:.0} %): {row:#}",
            during * 100.0,
            during_max * 100.0,
            after * 100.0,
            after_max * 100.0
        );
    }
}

#[test]
fn a_strict_replica_stopped_for_a_rolling_update_costs_its_peers_clients_little() {
    let figures = harness("strict", "replica-restarts", "6", &["--below", "0.9"]);
    for row in restarted_rows(&figures, "sigterm") {
        assert_eq!(
            row["restart"]["exited_cleanly"], true,
            "SIGTERM did not stop the replica: {row:#}"
        );
        let (during, after) = refused_around_the_restart(row);
        // Measured: 6.9 % and 1.1 % (docs/accuracy.md, "A replica restarted under load"); in
        // one CI run, debug build, 13.6 % and 2.8 % (4.5 % before the stop). The bounds are the
        // crash test's at 90 %.
        assert!(
            during <= 0.20 && after <= 0.08,
            "strict refused {:.1} % / {:.1} % of what the ideal bucket admitted around a \
             rolling restart: {row:#}",
            during * 100.0,
            after * 100.0
        );
    }
}

#[test]
fn a_strict_replica_that_crashes_under_overload_takes_the_cluster_neither_over_nor_far_under() {
    let figures = harness("strict", "hot-uniform-replica-crashes", "6", &[]);
    let report = &figures["overload"][0];
    let admitted = f64_of(report, "admitted");
    let limit = f64_of(report, "c_plus_rt");
    assert!(
        admitted <= limit,
        "strict admitted {admitted} where the bucket allows {limit}: {report:#}"
    );
    // Before the restarted process took over: 88 % in 9 s, the cluster admitting nothing for
    // about two seconds. A loaded machine costs a few points more.
    let utilization = f64_of(report, "utilization_pct");
    assert!(
        utilization >= 92.0,
        "strict admitted {utilization:.1} % of C + r·T around a crash: {report:#}"
    );
}
