//! Human-readable output: the progress line (a bar for a terminal, one plain line per report
//! otherwise) and the summary table.

use std::fmt::Write;

use crate::record::{Progress, Summary};

/// Runs longer than this get no per-second table (the JSON summary has the timeline).
const TIMELINE_ROWS: usize = 60;

/// One line redrawn in place on a terminal: a bar of elapsed time against the duration bound,
/// then the counts and the achieved rate against the profile's.
pub fn bar_line(p: &Progress) -> String {
    const WIDTH: usize = 24;
    let total = p.duration.as_secs_f64().max(f64::EPSILON);
    let done = ((p.elapsed.as_secs_f64() / total) * WIDTH as f64).round() as usize;
    let done = done.min(WIDTH);
    let mut line = format!(
        "[{}{}] {:>6.1}s/{:.0}s  sent {}  ok {}  429 {}  err {}",
        "#".repeat(done),
        "-".repeat(WIDTH - done),
        p.elapsed.as_secs_f64(),
        total,
        p.sent,
        p.allowed,
        p.rejected,
        p.errors
    );
    if p.missed > 0 {
        let _ = write!(line, "  missed {}", p.missed);
    }
    let _ = write!(line, "  {:.0}", p.achieved_rps);
    if p.target_rate > 0.0 {
        let _ = write!(line, "/{:.0}", p.target_rate);
    }
    line.push_str(" req/s");
    line
}

/// One self-contained line per report, for logs and pipes.
pub fn plain_line(p: &Progress) -> String {
    format!(
        "t={:.1}s sent={} allowed={} rejected={} errors={} missed={} rps={:.0} target_rps={:.0}",
        p.elapsed.as_secs_f64(),
        p.sent,
        p.allowed,
        p.rejected,
        p.errors,
        p.missed,
        p.achieved_rps,
        p.target_rate
    )
}

/// `1234` µs -> `1.23ms`.
pub fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

fn share(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

/// The end-of-run table: totals, latency, per target, and per second for short runs.
pub fn summary_table(s: &Summary) -> String {
    let mut out = String::new();
    let n = s.requests;
    let _ = writeln!(
        out,
        "{} in {:.2}s{}",
        if s.cancelled {
            "stopped early"
        } else {
            "finished"
        },
        s.elapsed.as_secs_f64(),
        if s.cancelled { " (interrupted)" } else { "" }
    );
    let _ = writeln!(out, "  requests {:>10}   {:.1} req/s", n, s.achieved_rps());
    let _ = writeln!(
        out,
        "  allowed  {:>10}   {}",
        s.allowed,
        share(s.allowed, n)
    );
    let _ = writeln!(
        out,
        "  rejected {:>10}   {}",
        s.rejected,
        share(s.rejected, n)
    );
    let mut errors = format!("  errors   {:>10}   {}", s.errors, share(s.errors, n));
    for (kind, count) in &s.errors_by_kind {
        let _ = write!(errors, "  {kind}: {count}");
    }
    let _ = writeln!(out, "{errors}");
    if s.missed > 0 {
        let _ = writeln!(
            out,
            "  missed   {:>10}   due but not sent (too many in flight)",
            s.missed
        );
    }
    let l = &s.latency;
    if l.count > 0 {
        let _ = writeln!(
            out,
            "  latency  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
            micros(l.p50_us),
            micros(l.p90_us),
            micros(l.p99_us),
            micros(l.p999_us),
            micros(l.max_us),
            micros(l.mean_us.round() as u64)
        );
    }
    let g = &s.send_lag;
    if g.count > 0 {
        let _ = writeln!(
            out,
            "  send lag p50 {}  p99 {}  max {}  (generator's delay after the due time, in the latency)",
            micros(g.p50_us),
            micros(g.p99_us),
            micros(g.max_us)
        );
    }
    if !s.per_target.is_empty() {
        let width = s
            .per_target
            .iter()
            .map(|t| t.target.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            out,
            "\n  {:<width$}  {:>10}  {:>10}  {:>10}  {:>8}  {:>11}",
            "target", "requests", "allowed", "rejected", "errors", "failed over"
        );
        for t in &s.per_target {
            let _ = writeln!(
                out,
                "  {:<width$}  {:>10}  {:>10}  {:>10}  {:>8}  {:>11}",
                t.target, t.requests, t.allowed, t.rejected, t.errors, t.failed_over
            );
        }
    }
    if s.timeline.len() <= TIMELINE_ROWS {
        let _ = writeln!(
            out,
            "\n  {:>6}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
            "second", "target", "sent", "allowed", "rejected", "errors", "missed"
        );
        for row in &s.timeline {
            let _ = writeln!(
                out,
                "  {:>6}  {:>8.0}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
                row.second,
                row.target_rate,
                row.sent,
                row.allowed,
                row.rejected,
                row.errors,
                row.missed
            );
        }
    } else {
        let _ = writeln!(
            out,
            "\n  ({} seconds: --json prints the per-second timeline)",
            s.timeline.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn micros_pick_a_readable_unit() {
        assert_eq!(micros(250), "250µs");
        assert_eq!(micros(1_234), "1.23ms");
        assert_eq!(micros(2_500_000), "2.50s");
    }

    #[test]
    fn the_bar_fills_with_elapsed_time_and_shows_the_rates() {
        let p = Progress {
            elapsed: Duration::from_secs(5),
            sent: 500,
            allowed: 400,
            rejected: 99,
            errors: 1,
            missed: 0,
            target_rate: 100.0,
            achieved_rps: 98.6,
            duration: Duration::from_secs(10),
        };
        let line = bar_line(&p);
        assert!(line.starts_with(&format!("[{}{}]", "#".repeat(12), "-".repeat(12))));
        assert!(
            line.contains("429 99") && line.ends_with("99/100 req/s"),
            "{line}"
        );
        assert!(!line.contains("missed"));
        assert!(plain_line(&p).contains("rejected=99 errors=1"));
    }
}
