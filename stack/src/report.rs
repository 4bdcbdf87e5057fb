//! The report directory of a scenario: `report.md` (what ran, what the load generator, the HPA
//! and Prometheus saw, which alerts fired when, what happened around a kill), the plots as SVG,
//! and the raw series as CSV (`samples.csv`, `hpa.csv`, `load.csv`) for anyone who wants to
//! plot them differently.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use crate::deployment::EventKind;
use crate::figures::{Figures, PER_POD_TOLERANCE, STABILIZATION_S};
use crate::plot::{self, AlertRow, Backdrop, Line, PALETTE};
use crate::scenario::{HPA_TARGET_PER_POD, Outcome, minsec};
use crate::timescale::format_duration;
use crate::{Error, Result};

/// The plots, in the order the report shows them: (file, what it shows).
pub const PLOTS: &[(&str, &str)] = &[
    (
        "rps.svg",
        "Requests per second: fleet and per pod (Prometheus), sent by the load generator",
    ),
    ("rejections.svg", "Share of decisions rejected"),
    ("depletion.svg", "Token depletion and bucket usage"),
    (
        "replicas.svg",
        "Replicas: desired (the HPA), running and ready (the Deployment), each metric's proposal",
    ),
    ("per-pod.svg", "Per-pod request rate against the HPA target"),
    (
        "witness.svg",
        "Witness clients: hot-key admissions against the ideal bucket, under-limit refusals",
    ),
    ("replication-lag.svg", "Replication lag per peer"),
    ("alerts.svg", "Alerts pending and firing"),
];

/// Top of the replication lag plot: a dead peer's lag grows for the rest of the run.
const LAG_CAP_S: f64 = 30.0;

/// Writes the report into `dir` (created if needed). `command` is how the run was started.
pub fn write(outcome: &Outcome, dir: &Path, command: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let backdrop = backdrop(outcome);
    plots(outcome, dir, &backdrop)?;
    csv(outcome, dir)?;
    let md = markdown(outcome, command);
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|e| Error::io(&path, e))
}

fn backdrop(o: &Outcome) -> Backdrop {
    let end = o
        .phases
        .last()
        .map(|p| p.end_s)
        .unwrap_or(0.0)
        .max(o.samples.last().map_or(0.0, |s| s.t));
    Backdrop {
        phases: o
            .phases
            .iter()
            .map(|p| (p.start_s, p.end_s, p.phase.name.clone()))
            .collect(),
        kill: o.kill.as_ref().map(|k| (k.at_s, k.node_id.clone())),
        marks: Vec::new(),
        end,
    }
}

/// (scenario seconds, value) of a sampled series.
fn series(o: &Outcome, name: &str) -> Vec<(f64, f64)> {
    o.samples
        .iter()
        .filter_map(|s| s.get(name).map(|v| (s.t, v)))
        .collect()
}

/// Series names with a prefix (`rps:pod=`), sorted.
fn names_with(o: &Outcome, prefix: &str) -> Vec<String> {
    let set: BTreeSet<String> = o
        .samples
        .iter()
        .flat_map(|s| s.values.keys())
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    set.into_iter().collect()
}

/// The load generator's per-second counts on the scenario clock: (t, sent, allowed, rejected,
/// errors) per real second, as rates per second.
fn client_timeline(o: &Outcome) -> Vec<(f64, f64, f64, f64, f64)> {
    let mut out = Vec::new();
    for p in &o.phases {
        let Some(summary) = &p.summary else { continue };
        for c in &summary.timeline {
            let t = p.start_s + (c.second as f64 + 0.5) * o.time_scale;
            if t > p.end_s {
                continue;
            }
            out.push((
                t,
                c.sent as f64,
                c.allowed as f64,
                c.rejected as f64,
                c.errors as f64,
            ));
        }
    }
    out
}

/// The value an HPA sync read for `metric`, per sync.
fn hpa_metric(o: &Outcome, metric: &str) -> Vec<(f64, f64)> {
    o.syncs
        .iter()
        .filter_map(|s| {
            let m = s.metrics.iter().find(|m| m.name == metric)?;
            m.value.as_ref().ok().map(|v| (s.at_s, *v))
        })
        .collect()
}

fn plots(o: &Outcome, dir: &Path, backdrop: &Backdrop) -> Result<()> {
    let client = client_timeline(o);
    let end = backdrop.end;

    // Requests per second.
    let mut lines = vec![Line::new(
        "fleet (Prometheus)",
        series(o, "rps"),
        PALETTE[0],
    )];
    for (i, name) in names_with(o, "rps:pod=").iter().enumerate() {
        lines.push(
            Line::new(
                name.trim_start_matches("rps:pod="),
                series(o, name),
                PALETTE[(i + 2) % PALETTE.len()],
            )
            .dashed(),
        );
    }
    let mut sent = Line::new(
        "sent by the load generator",
        client.iter().map(|c| (c.0, c.1)).collect(),
        PALETTE[1],
    );
    sent.width = 1;
    lines.push(sent);
    lines.push(
        Line::new(
            "HPA target: 800/pod x ready pods",
            step_points(
                o.replica_counts
                    .iter()
                    .map(|c| (c.t.max(0.0), HPA_TARGET_PER_POD * c.ready as f64)),
                end,
            ),
            PALETTE[7],
        )
        .dashed(),
    );
    plot::line_chart(
        &dir.join("rps.svg"),
        "Decisions per second",
        "requests/s",
        &lines,
        None,
        backdrop,
    )?;

    // Rejections.
    let pct = |v: Vec<(f64, f64)>| v.into_iter().map(|(t, x)| (t, x * 100.0)).collect();
    let lines = vec![
        Line::new(
            "rejected share, fleet (Prometheus, recording rule)",
            pct(series(o, "rejected_ratio")),
            PALETTE[3],
        ),
        {
            let mut l = Line::new(
                "rejected share of each second's requests (load generator)",
                client
                    .iter()
                    .filter(|c| c.1 > 0.0)
                    .map(|c| (c.0, 100.0 * c.3 / c.1))
                    .collect(),
                PALETTE[1],
            );
            l.width = 1;
            l
        },
        Line::new("warning 2%", vec![(0.0, 2.0), (end, 2.0)], PALETTE[7]).dashed(),
        Line::new("critical 5%", vec![(0.0, 5.0), (end, 5.0)], PALETTE[3]).dashed(),
    ];
    plot::line_chart(
        &dir.join("rejections.svg"),
        "Share of decisions rejected",
        "percent",
        &lines,
        None,
        backdrop,
    )?;

    // Depletion and usage. The adapter's depletion metric is drawn only if the HPA asked for it
    // (the default HPA does not scale on it; deploy/components/scale-on-depletion adds it).
    let mut lines = vec![Line::new(
        "depletion: how empty the buckets requests met were (recording rule)",
        series(o, "depletion"),
        PALETTE[0],
    )];
    let served = hpa_metric(o, "openclaw_token_depletion_rate");
    if !served.is_empty() {
        lines.push(
            Line::new(
                "openclaw_token_depletion_rate served to the HPA",
                served,
                PALETTE[2],
            )
            .step(),
        );
    }
    lines.extend([
        Line::new(
            "most depleted bucket's usage ratio",
            series(o, "usage"),
            PALETTE[3],
        ),
        Line::new(
            "usage warning 0.7",
            vec![(0.0, 0.7), (end, 0.7)],
            PALETTE[1],
        )
        .dashed(),
        Line::new(
            "usage critical 0.9",
            vec![(0.0, 0.9), (end, 0.9)],
            PALETTE[3],
        )
        .dashed(),
        Line::new(
            "depletion alert 0.95",
            vec![(0.0, 0.95), (end, 0.95)],
            PALETTE[0],
        )
        .dashed(),
    ]);
    plot::line_chart(
        &dir.join("depletion.svg"),
        "Token depletion (request-weighted) and bucket usage",
        "ratio",
        &lines,
        None,
        backdrop,
    )?;

    // Replicas.
    let desired: Vec<(f64, f64)> = o
        .syncs
        .iter()
        .map(|s| (s.at_s, f64::from(s.desired)))
        .collect();
    let counts = |f: fn(&crate::scenario::ReplicaCounts) -> usize| {
        step_points(
            o.replica_counts.iter().map(|c| (c.t.max(0.0), f(c) as f64)),
            end,
        )
    };
    let mut lines = vec![
        {
            let mut l = Line::new("desired (HPA)", desired, PALETTE[0]).step();
            l.width = 3;
            l
        },
        Line::new("running", counts(|c| c.running), PALETTE[5]),
        {
            let mut l = Line::new("ready (in the Service)", counts(|c| c.ready), PALETTE[2]);
            l.width = 2;
            l
        },
    ];
    let metric_names: BTreeSet<String> = o
        .syncs
        .iter()
        .flat_map(|s| s.metrics.iter().map(|m| m.name.clone()))
        .collect();
    for (i, name) in metric_names.iter().enumerate() {
        let points: Vec<(f64, f64)> = o
            .syncs
            .iter()
            .filter_map(|s| {
                let m = s.metrics.iter().find(|m| &m.name == name)?;
                m.proposal.map(|p| (s.at_s, f64::from(p)))
            })
            .collect();
        lines.push(
            Line::new(
                format!("proposal of {name}"),
                points,
                PALETTE[(i + 1) % PALETTE.len()],
            )
            .step()
            .dashed(),
        );
    }
    let min = f64::from(o.hpa_min_replicas);
    lines.push(Line::new("minReplicas", vec![(0.0, min), (end, min)], PALETTE[7]).dashed());
    let top = o
        .syncs
        .iter()
        .flat_map(|s| std::iter::once(s.desired).chain(s.metrics.iter().filter_map(|m| m.proposal)))
        .chain(o.replica_counts.iter().map(|c| c.running as i32))
        .max()
        .unwrap_or(1);
    plot::line_chart(
        &dir.join("replicas.svg"),
        &format!(
            "HPA openclaw-hpa (simulated, {}, maxReplicas {})",
            o.hpa_source, o.hpa_max_replicas
        ),
        "replicas",
        &lines,
        Some(f64::from(top) * 1.4 + 1.0),
        backdrop,
    )?;

    // Per-pod rate.
    let mut lines = Vec::new();
    for (i, name) in names_with(o, "rps:pod=").iter().enumerate() {
        let mut l = Line::new(
            name.trim_start_matches("rps:pod="),
            series(o, name),
            PALETTE[(i + 2) % PALETTE.len()],
        );
        l.width = 1;
        lines.push(l);
    }
    let mean: Vec<(f64, f64)> = o
        .samples
        .iter()
        .filter_map(|s| {
            let ready = o
                .replica_counts
                .iter()
                .rev()
                .find(|c| c.t <= s.t)
                .map_or(0, |c| c.ready);
            let rps = s.get("rps")?;
            (ready > 0).then(|| (s.t, rps / ready as f64))
        })
        .collect();
    lines.push({
        let mut l = Line::new("fleet / ready pods", mean, PALETTE[0]);
        l.width = 3;
        l
    });
    for (label, f) in [("HPA target 800/pod", 1.0), ("-10 %", 0.9), ("+10 %", 1.1)] {
        let v = HPA_TARGET_PER_POD * f;
        let mut l = Line::new(
            label,
            vec![(0.0, v), (end, v)],
            PALETTE[if f == 1.0 { 3 } else { 7 }],
        )
        .dashed();
        if f == 1.0 {
            l.width = 2;
        }
        lines.push(l);
    }
    plot::line_chart(
        &dir.join("per-pod.svg"),
        "Decisions per second per pod (Prometheus) against the HPA's target",
        "requests/s per pod",
        &lines,
        None,
        backdrop,
    )?;

    witness_plot(o, dir, backdrop)?;

    // Replication lag: a dead peer's lag grows without bound; cap the axis so the live
    // peers' lag stays readable.
    let mut capped = false;
    let lines: Vec<Line> = names_with(o, "lag:")
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let points = series(o, name)
                .into_iter()
                .map(|(t, v)| {
                    capped |= v > LAG_CAP_S;
                    (t, v.min(LAG_CAP_S))
                })
                .collect();
            let mut l = Line::new(
                name.trim_start_matches("lag:"),
                points,
                PALETTE[i % PALETTE.len()],
            );
            l.width = 1;
            l
        })
        .collect();
    plot::line_chart(
        &dir.join("replication-lag.svg"),
        &format!(
            "Replication lag: seconds since each replica last merged state from each peer{}",
            if capped {
                format!(" (axis cut at {LAG_CAP_S:.0} s)")
            } else {
                String::new()
            }
        ),
        "seconds",
        &lines,
        capped.then_some(LAG_CAP_S * 1.5),
        backdrop,
    )?;

    // Alerts.
    let rows: Vec<AlertRow> = alert_rows(o, end);
    plot::alert_timeline(
        &dir.join("alerts.svg"),
        "Alerts in Prometheus (pending: yellow; firing: orange warning, red critical)",
        &rows,
        backdrop,
    )
}

/// A step line from (t, value) changes, held until `end`.
fn step_points(changes: impl Iterator<Item = (f64, f64)>, end: f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (t, v) in changes {
        if let Some(last) = out.last()
            && last.1 != v
        {
            out.push((t, last.1));
        }
        out.push((t, v));
    }
    if let Some(&(_, v)) = out.last() {
        out.push((end, v));
    }
    out
}

/// The hot witness keys' admissions minus the ideal bucket's, cumulative over the run, with the
/// under-limit refusals (cumulative) and every join and leave marked.
fn witness_plot(o: &Outcome, dir: &Path, backdrop: &Backdrop) -> Result<()> {
    let Some(w) = &o.witness else {
        return Ok(());
    };
    let k = o.time_scale;
    let to_s = |real: f64| o.witness_start_s + real * k;
    let mut lines = Vec::new();
    for (i, key) in w.hot_keys() {
        let mine: Vec<&crate::witness::Arrival> = w
            .arrivals
            .iter()
            .filter(|a| a.key == i && a.decision != crate::witness::Decision::Error)
            .collect();
        let times: Vec<f64> = mine.iter().map(|a| a.sent_s).collect();
        let ideal =
            crate::witness::ideal_admissions(&times, w.plan.capacity as f64, w.plan.refill_rate());
        let mut diff = 0.0;
        let mut points = Vec::new();
        for (a, ideal) in mine.iter().zip(ideal) {
            diff += f64::from(u8::from(a.decision == crate::witness::Decision::Allowed))
                - f64::from(u8::from(ideal));
            points.push((to_s(a.sent_s), diff));
        }
        lines.push(Line::new(
            format!("{}: admitted - ideal bucket (tokens)", key.key),
            thin(points, 600),
            PALETTE[0],
        ));
    }
    let mut refused = 0.0;
    let mut points = vec![(0.0, 0.0)];
    for (_, t) in w.under_limit_refusals() {
        refused += 1.0;
        points.push((to_s(t), refused));
    }
    points.push((backdrop.end, refused));
    lines.push(Line::new(
        "under-limit clients refused (cumulative)",
        points,
        PALETTE[3],
    ));
    let c = w.plan.capacity as f64;
    lines.push(Line::new("+C", vec![(0.0, c), (backdrop.end, c)], PALETTE[7]).dashed());
    lines.push(Line::new("-C", vec![(0.0, -c), (backdrop.end, -c)], PALETTE[7]).dashed());
    let mut marks = backdrop.clone();
    marks.marks = o
        .pod_events
        .iter()
        .filter(|e| e.t >= 0.0)
        .filter_map(|e| {
            let label = match &e.kind {
                crate::deployment::EventKind::Ready => "+",
                crate::deployment::EventKind::Terminating => "-",
                crate::deployment::EventKind::Killed => "x",
                _ => return None,
            };
            Some((
                e.t,
                format!("{label}{}", e.pod.trim_start_matches("limiter-")),
            ))
        })
        .collect();
    plot::line_chart(
        &dir.join("witness.svg"),
        &format!(
            "Witnesses (policy `{}`: {} tokens, {}/s): + pod joined, - pod leaving, x killed",
            w.plan.policy,
            w.plan.capacity,
            w.plan.refill_rate()
        ),
        "requests",
        &lines,
        None,
        &marks,
    )
}

/// At most about `n` points, keeping the first and last.
fn thin(points: Vec<(f64, f64)>, n: usize) -> Vec<(f64, f64)> {
    let every = (points.len() / n.max(1)).max(1);
    let last = points.last().copied();
    let mut out: Vec<(f64, f64)> = points.into_iter().step_by(every).collect();
    if let Some(l) = last
        && out.last() != Some(&l)
    {
        out.push(l);
    }
    out
}

fn alert_rows(o: &Outcome, end: f64) -> Vec<AlertRow> {
    let mut rows: Vec<AlertRow> = Vec::new();
    for span in &o.alerts {
        let label = if span.labels.is_empty() {
            span.name.clone()
        } else {
            format!("{} {}", span.name, span.labels)
        };
        let stop = span.resolved_at.unwrap_or(end);
        let (pending, firing) = match span.firing_at {
            Some(f) => ((span.pending_at, f), Some((f, stop))),
            None => ((span.pending_at, stop), None),
        };
        match rows.iter_mut().find(|r| r.label == label) {
            Some(row) => {
                row.pending.push(pending);
                row.firing.extend(firing);
            }
            None => rows.push(AlertRow {
                label,
                critical: span.severity == "critical",
                pending: vec![pending],
                firing: firing.into_iter().collect(),
            }),
        }
    }
    rows
}

fn csv(o: &Outcome, dir: &Path) -> Result<()> {
    let names: BTreeSet<String> = o
        .samples
        .iter()
        .flat_map(|s| s.values.keys().cloned())
        .collect();
    let mut out = String::from("t_s");
    for n in &names {
        out.push(',');
        out.push_str(n);
    }
    out.push('\n');
    for s in &o.samples {
        let _ = write!(out, "{:.1}", s.t);
        for n in &names {
            out.push(',');
            if let Some(v) = s.get(n) {
                let _ = write!(out, "{v}");
            }
        }
        out.push('\n');
    }
    write_file(&dir.join("samples.csv"), &out)?;

    let mut out = String::from("t_s,current,proposed,stabilized,desired,reason");
    let metric_names: Vec<String> = o
        .syncs
        .first()
        .map(|s| s.metrics.iter().map(|m| m.name.clone()).collect())
        .unwrap_or_default();
    for m in &metric_names {
        let _ = write!(out, ",{m},{m}_proposal");
    }
    out.push('\n');
    for s in &o.syncs {
        let _ = write!(
            out,
            "{:.1},{},{},{},{},\"{}\"",
            s.at_s,
            s.current,
            s.proposed,
            s.stabilized,
            s.desired,
            s.reason.replace('"', "'")
        );
        for name in &metric_names {
            let m = s.metrics.iter().find(|m| &m.name == name);
            let value = m
                .and_then(|m| m.value.as_ref().ok())
                .map_or(String::new(), |v| v.to_string());
            let proposal = m
                .and_then(|m| m.proposal)
                .map_or(String::new(), |v| v.to_string());
            let _ = write!(out, ",{value},{proposal}");
        }
        out.push('\n');
    }
    write_file(&dir.join("hpa.csv"), &out)?;

    let mut out = String::from("t_s,sent_per_s,allowed_per_s,rejected_per_s,errors_per_s\n");
    for (t, sent, allowed, rejected, errors) in client_timeline(o) {
        let _ = writeln!(out, "{t:.1},{sent},{allowed},{rejected},{errors}");
    }
    write_file(&dir.join("load.csv"), &out)
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// `2m05s` scenario time, with the real time when compressed.
fn when(o: &Outcome, t: f64) -> String {
    if o.time_scale == 1.0 {
        minsec(t)
    } else {
        format!("{} ({:.1} s real)", minsec(t), t / o.time_scale)
    }
}

fn phase_name(o: &Outcome, t: f64) -> String {
    o.phase_at(t)
        .map(|p| p.phase.name.clone())
        .unwrap_or_else(|| "after the phases".into())
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn markdown(o: &Outcome, command: &str) -> String {
    let mut md = String::new();
    let figures = Figures::of(o);
    let k = o.time_scale;
    let total: f64 = o.phases.iter().map(|p| p.end_s - p.start_s).sum();
    let date = humantime::format_rfc3339_seconds(o.started);
    let _ = writeln!(
        md,
        "# Scenario `{}`: {} limiter replicas, time scale {k}\n",
        o.profile.name, o.replicas
    );
    let _ = writeln!(
        md,
        "Run {date}. {} of scenario time{} in {:.0} s of real time (stack started in {:.1} s). \
         Everything on 127.0.0.1: the limiter Deployment played by the stack ({} pods at the start, scaled to what the HPA decides, found by each other through a shared peers file, the load on the ready ones), Debian's \
         Prometheus scraping every {} with the rules of `alerts/rules/`{}, `openclaw-metrics-adapter` \
         serving the external metrics API from it (plain HTTP, no authentication: no Kubernetes API \
         server here), and the HPA controller's algorithm run on `{}` \
         against that adapter every {} of scenario time.{}\n",
        minsec(total),
        if k == 1.0 { " (real time)" } else { "" },
        o.wall.as_secs_f64(),
        o.stack_startup.as_secs_f64(),
        o.replicas,
        format_duration(o.scrape_interval),
        if k == 1.0 { "" } else { " (compressed copies)" },
        o.hpa_source,
        if k == 1.0 {
            "15 s".to_owned()
        } else {
            format!("15 s ({:.2} s real)", 15.0 / k)
        },
        if o.cancelled {
            " **Cut short by Ctrl-C.**"
        } else {
            ""
        }
    );

    // Headline figures.
    let _ = writeln!(md, "## In short\n");
    let rps = series(o, "rps");
    let max_rps = rps.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    if let Some((t, _)) = rps.iter().find(|p| p.1 >= 0.995 * max_rps && max_rps > 0.0) {
        let _ = writeln!(
            md,
            "- Peak fleet rate seen by Prometheus: **{max_rps:.0} decisions/s**, first reached at \
             {} ({}).",
            when(o, *t),
            phase_name(o, *t)
        );
    }
    if let Some((peak, at)) = o.peak_desired() {
        let start = o.syncs.first().map_or(0, |s| s.current);
        let last = o.syncs.last().map_or(0, |s| s.desired);
        let _ = writeln!(
            md,
            "- HPA: {start} replicas at the start, peak desired **{peak}** from {} ({}), **{last}** at the end.",
            when(o, at),
            phase_name(o, at)
        );
        if let Some(down) = first_scale_down_after_peak(o) {
            let _ = writeln!(
                md,
                "- First scale-down after the peak: {} -> {} at {} ({}).",
                down.0,
                down.1,
                when(o, down.2),
                phase_name(o, down.2)
            );
        }
    }
    let fired: BTreeSet<&str> = o
        .alerts
        .iter()
        .filter(|a| a.firing_at.is_some())
        .map(|a| a.name.as_str())
        .collect();
    let _ = writeln!(
        md,
        "- Alerts that fired: {}.",
        if fired.is_empty() {
            "none".to_owned()
        } else {
            fired
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    if let Some(kill) = &o.kill {
        let _ = writeln!(
            md,
            "- `{}` (pid {}) was killed with SIGKILL at {} ({}): see [the kill](#the-kill).",
            kill.node_id,
            kill.pid,
            when(o, kill.at_s),
            phase_name(o, kill.at_s)
        );
    }
    md.push('\n');

    targets_section(&mut md, o, &figures);
    deployment_section(&mut md, o, &figures);

    // Phases.
    let _ = writeln!(md, "## Phases and the load generator's view\n");
    let _ = writeln!(
        md,
        "Open-loop load from `openclaw_loadgen` (latency measured from each request's due time), \
         spread round-robin over the Service's endpoints, the ready pods at the moment each \
         request leaves, with failover (a pod refusing connections before the Service drops it \
         is skipped). The witness clients' {:.0} requests/s come on top of what is asked here.\n",
        o.profile.witness.rate()
    );
    let _ = writeln!(
        md,
        "| phase | scenario time | asked | keys | sent | allowed | rejected | errors | missed | p50 | p99 | max |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for p in &o.phases {
        let keys = match &p.phase.load {
            Some(l) => match l.keys {
                openclaw_loadgen::Keys::Many { count } => format!("{count} keys"),
                openclaw_loadgen::Keys::Hot { count, share } => {
                    format!("{count} hot keys ({:.0}%)", share * 100.0)
                }
            },
            None => "-".into(),
        };
        let span = format!("{}-{}", minsec(p.start_s), minsec(p.end_s));
        match &p.summary {
            Some(s) => {
                let _ = writeln!(
                    md,
                    "| {} | {span} | {:.0}/s | {keys} | {} ({:.0}/s) | {} | {} ({:.1}%) | {} | {} | {} | {} | {} |",
                    p.phase.name,
                    p.rate,
                    s.requests,
                    s.achieved_rps(),
                    s.allowed,
                    s.rejected,
                    if s.requests > 0 {
                        100.0 * s.rejected as f64 / s.requests as f64
                    } else {
                        0.0
                    },
                    errors_text(s),
                    s.missed,
                    ms(s.latency.p50_us),
                    ms(s.latency.p99_us),
                    ms(s.latency.max_us),
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| {} | {span} | none | - | - | - | - | - | - | - | - | - |",
                    p.phase.name
                );
            }
        }
    }
    md.push('\n');
    for p in &o.phases {
        let _ = writeln!(md, "- **{}**: {}.", p.phase.name, p.phase.purpose);
    }
    md.push('\n');

    // HPA.
    let _ = writeln!(md, "## The HPA's decisions\n");
    let _ = writeln!(
        md,
        "`metrics_adapter::hpa_sim` on `{}`: each sync lists the \
         HPA's external metrics from the adapter as the controller does, then applies \
         tolerance, the max over metrics, the stabilization windows and the `behavior` policies. \
         The count it sets is the Deployment's: the stack starts or stops pods to match (see \
         [the Deployment](#the-deployment)). Changes of the desired count:\n",
        o.hpa_source
    );
    let _ = writeln!(
        md,
        "| scenario time | phase | current -> desired | reason | metrics |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    let mut last = None;
    for s in &o.syncs {
        if last == Some(s.desired) {
            continue;
        }
        last = Some(s.desired);
        let metrics: Vec<String> = s
            .metrics
            .iter()
            .map(|m| shorten(&m.to_string(), 160))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} -> **{}** | {} | {} |",
            when(o, s.at_s),
            phase_name(o, s.at_s),
            s.current,
            s.desired,
            shorten(&s.reason, 60),
            metrics.join("<br>")
        );
    }
    let failed = o
        .syncs
        .iter()
        .filter(|s| s.metrics.iter().any(|m| m.value.is_err()))
        .count();
    let _ = writeln!(
        md,
        "\n{} syncs in all; {failed} had a metric the adapter could not serve.\n",
        o.syncs.len()
    );

    // Alerts.
    let _ = writeln!(md, "## Alerts\n");
    let _ = writeln!(
        md,
        "From Prometheus' `/api/v1/alerts`, polled every {} of scenario time. *Pending* is \
         Prometheus' `activeAt` (when the condition started to hold); *firing* and *resolved* \
         are the first poll that saw the change.\n",
        {
            let real = (5.0 / k).max(o.scrape_interval.as_secs_f64());
            if k == 1.0 {
                format!("{real:.0} s (every scrape interval)")
            } else {
                format!("{:.0} s ({real:.2} s real)", real * k)
            }
        }
    );
    if o.alerts.is_empty() {
        let _ = writeln!(md, "No alert went pending.\n");
    } else {
        let _ = writeln!(
            md,
            "| alert | severity | labels | pending | firing | resolved | last value |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
        for a in &o.alerts {
            let _ = writeln!(
                md,
                "| `{}` | {} | {} | {} | {} | {} | {} |",
                a.name,
                a.severity,
                a.labels,
                when(o, a.pending_at),
                a.firing_at.map_or("never".into(), |t| when(o, t)),
                a.resolved_at
                    .map_or("still active at the end".into(), |t| when(o, t)),
                short_value(&a.last_value),
            );
        }
        md.push('\n');
    }

    // Kill.
    if let Some(kill) = &o.kill {
        kill_section(&mut md, o, kill);
    }

    // Plots.
    let _ = writeln!(md, "## Plots\n");
    let _ = writeln!(
        md,
        "Shaded bands are the phases{}.\n",
        if o.kill.is_some() {
            "; the red line is the kill"
        } else {
            ""
        }
    );
    for (file, what) in PLOTS {
        let _ = writeln!(md, "### {what}\n\n![{what}]({file})\n");
    }
    plot_notes(&mut md, o);

    // Commands.
    let _ = writeln!(md, "## How this was produced\n");
    let _ = writeln!(md, "```sh\n{command}\n```\n");
    let _ = writeln!(md, "The stack listened on:\n\n```");
    for l in &o.listening {
        let _ = writeln!(md, "{l}");
    }
    let _ = writeln!(md, "```\n");
    let _ = writeln!(
        md,
        "The external metrics' PromQL, as the adapter loaded it:\n"
    );
    for (name, q) in &o.adapter_queries {
        let _ = writeln!(md, "- `{name}`: `{q}`");
    }
    md.push('\n');
    if k != 1.0 {
        let _ = writeln!(
            md,
            "Time scale {k}: Prometheus scraped and evaluated every {}, every rule's `for:` and \
             range window, the adapter's windows and cache lifetime, the HPA's sync period, \
             windows and policy periods, and the phases were divided by {k} (floors: windows at \
             least 4 scrapes, `for` at least 2 evaluations; see docs/local-stack.md). Request \
             rates, bucket refill and thresholds in seconds are not compressed. All times in \
             this report are scenario times.\n",
            format_duration(o.scrape_interval)
        );
    }
    let h = &o.health;
    let num =
        |v: Option<f64>, digits: usize| v.map_or("unknown".to_owned(), |v| format!("{v:.digits$}"));
    let _ = writeln!(
        md,
        "Measurement health (Prometheus about itself, over the run): {} of {} limiter scrapes \
         failed{}, the slowest took {} s (timeout {}), {} rule evaluations were skipped. Failed \
         scrapes and skipped evaluations leave holes in the rates and reset alerts' `for`.\n",
        num(h.failed_scrapes, 0),
        num(h.scrapes, 0),
        if o.kill.is_some() {
            " (the killed replica's included)"
        } else {
            ""
        },
        num(h.slowest_scrape_s, 3),
        format_duration(o.scrape_interval.min(std::time::Duration::from_secs(10))),
        num(h.missed_evaluations, 0),
    );
    let _ = writeln!(
        md,
        "Raw data: `samples.csv` (Prometheus), `hpa.csv` (every HPA sync), `load.csv` (the load \
         generator's per-second counts)."
    );
    md
}

/// `12 (timeout: 10, connect: 2)`.
fn errors_text(s: &openclaw_loadgen::Summary) -> String {
    if s.errors == 0 {
        return "0".into();
    }
    let kinds: Vec<String> = s
        .errors_by_kind
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    format!("{} ({})", s.errors, kinds.join(", "))
}

/// At most `max` characters, with an ellipsis when cut (the full text is in hpa.csv).
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{cut}...")
    }
}

fn short_value(v: &str) -> String {
    match v.parse::<f64>() {
        Ok(x) => format!("{x:.3}"),
        Err(_) => v.to_owned(),
    }
}

/// (from, to, scenario seconds) of the first decrease of the desired count after its peak.
fn first_scale_down_after_peak(o: &Outcome) -> Option<(i32, i32, f64)> {
    let (peak, at) = o.peak_desired()?;
    let mut prev = peak;
    for s in o.syncs.iter().filter(|s| s.at_s >= at) {
        if s.desired < prev {
            return Some((prev, s.desired, s.at_s));
        }
        prev = s.desired;
    }
    None
}

fn plot_notes(md: &mut String, o: &Outcome) {
    let _ = writeln!(
        md,
        "Reading the plots: the fleet rate is `sum(openclaw:requests:rate1m)` (the recording \
         rule the alerts read), per pod `sum by (pod) (rate(openclaw_requests_total[1m]))`{}; \
         both trail the load by up to one window. Replication lag is \
         `openclaw_replication_lag_seconds`, the time since a replica last merged a message from \
         a peer: under load deltas flow every 50 ms; idle replicas exchange only the full-state \
         heartbeat every 5 s, so the lag saws up to about 5 s without anything being wrong (scraped \
         every {}: when that is a multiple of 5 s, each scrape catches the sawtooth at about the \
         same phase and it looks flat). A dead peer's lag grows until the end.\n",
        if o.time_scale == 1.0 {
            ""
        } else {
            " (windows compressed)"
        },
        format_duration(o.scrape_interval)
    );
}

fn kill_section(md: &mut String, o: &Outcome, kill: &crate::scenario::KillOutcome) {
    let _ = writeln!(md, "## The kill\n");
    let _ = writeln!(
        md,
        "`{}` ({}, pid {}) got SIGKILL at {} ({} phase): no shutdown, no last push to its peers.\n",
        kill.node_id,
        kill.api,
        kill.pid,
        when(o, kill.at_s),
        phase_name(o, kill.at_s)
    );
    // The load generator around it.
    if let Some(p) = o.phase_at(kill.at_s)
        && let Some(s) = &p.summary
    {
        let target = openclaw_loadgen::plan::loopback_base(&kill.api).unwrap_or_default();
        if let Some(t) = s.per_target.iter().find(|t| t.target == target) {
            let _ = writeln!(
                md,
                "- Load generator, {} phase: requests whose last attempt went to `{}`: {}; \
                 requests moved from it to a live replica (failover): **{}**; errors in the \
                 whole phase: {} ({}).",
                p.phase.name,
                kill.node_id,
                t.requests,
                t.failed_over,
                s.errors,
                if s.errors_by_kind.is_empty() {
                    "none".to_owned()
                } else {
                    s.errors_by_kind
                        .iter()
                        .map(|(k, n)| format!("{k}: {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        let after: Vec<String> = s
            .per_target
            .iter()
            .filter(|t| t.target != target)
            .map(|t| {
                format!(
                    "{}: {} allowed, {} rejected",
                    t.target, t.allowed, t.rejected
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "- The survivors answered in that phase: {}.",
            after.join("; ")
        );
    }
    let client = client_timeline(o);
    let window = 60.0_f64.max(3.0 * o.time_scale);
    let errs: f64 = client
        .iter()
        .filter(|c| (c.0 - kill.at_s).abs() <= window)
        .map(|c| c.4)
        .sum();
    let answered: f64 = client
        .iter()
        .filter(|c| c.0 > kill.at_s && c.0 <= kill.at_s + window)
        .map(|c| c.2 + c.3)
        .sum();
    let _ = writeln!(
        md,
        "- Within {} of the kill: {errs:.0} requests failed; {answered:.0} were answered in the \
         {} after it.",
        minsec(window),
        minsec(window)
    );
    // The kubelet's part.
    let restarted = o
        .pod_events
        .iter()
        .find(|e| e.pod == kill.node_id && e.t >= kill.at_s && e.kind == EventKind::Restarted);
    let ready = restarted.and_then(|r| {
        o.pod_events
            .iter()
            .find(|e| e.pod == kill.node_id && e.t >= r.t && e.kind == EventKind::Ready)
    });
    let _ = writeln!(
        md,
        "- The stack, as the kubelet: restarted `{}` {} (back-off {} s of scenario time), from \
         its snapshot directory; {}.",
        kill.node_id,
        restarted.map_or("never".to_owned(), |r| format!("at {}", when(o, r.t))),
        crate::deployment::FIRST_BACKOFF.as_secs(),
        ready.map_or("never ready again".to_owned(), |r| format!(
            "ready again at {}, {:.0} s of scenario time after the kill",
            when(o, r.t),
            r.t - kill.at_s
        ))
    );
    // Prometheus.
    let up_key = format!("up:{}", kill.node_id);
    if let Some(s) = o
        .samples
        .iter()
        .find(|s| s.t >= kill.at_s && s.get(&up_key) == Some(0.0))
    {
        let _ = writeln!(
            md,
            "- Prometheus: `up{{pod=\"{}\"}}` was 0 from {} on (a failed scrape); the replica's \
             series went stale, so the fleet rate is the survivors' from one window later.",
            kill.node_id,
            when(o, s.t)
        );
    }
    let before = o
        .samples
        .iter()
        .rev()
        .find(|s| s.t < kill.at_s)
        .and_then(|s| s.get("rps"));
    let after = o
        .samples
        .iter()
        .find(|s| s.t > kill.at_s + window)
        .and_then(|s| s.get("rps"));
    if let (Some(b), Some(a)) = (before, after) {
        let _ = writeln!(
            md,
            "- Fleet rate (Prometheus) just before: {b:.0}/s; {} later: {a:.0}/s (the survivors \
             took the dead replica's share).",
            minsec(window)
        );
    }
    let started: Vec<String> = o
        .alerts
        .iter()
        .filter(|a| {
            a.pending_at >= kill.at_s - 1.0
                && (a.labels.contains(&kill.node_id) || a.name.starts_with("OpenClaw"))
        })
        .map(|a| {
            format!(
                "`{}` ({}) pending {}, firing {}",
                a.name,
                a.labels,
                when(o, a.pending_at),
                a.firing_at.map_or("never".into(), |t| when(o, t))
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "- Alerts about the replicas after the kill: {}.",
        if started.is_empty() {
            "none".to_owned()
        } else {
            started.join("; ")
        }
    );
    let hpa_failed: Vec<f64> = o
        .syncs
        .iter()
        .filter(|s| s.at_s >= kill.at_s && s.metrics.iter().any(|m| m.value.is_err()))
        .map(|s| s.at_s)
        .collect();
    let _ = writeln!(
        md,
        "- HPA: {} after the kill with a metric the adapter could not serve.\n",
        if hpa_failed.is_empty() {
            "no sync".to_owned()
        } else {
            format!("{} syncs", hpa_failed.len())
        }
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

/// The issue's targets, each with its figure and whether it was met.
fn targets_section(md: &mut String, o: &Outcome, f: &Figures) {
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | figure | |\n| --- | --- | --- |");
    // Per-pod rate.
    if f.settled.is_empty() {
        let _ = writeln!(
            md,
            "| per-pod rate within {:.0} % of the HPA target after a scale-up settles | no \
             stretch with the Deployment settled above its starting size under load | **not measured** |",
            PER_POD_TOLERANCE * 100.0
        );
    }
    for s in &f.settled {
        let _ = writeln!(
            md,
            "| per-pod rate within {:.0} % of {} after the scale-up to {} settles | {:.0}/s per pod \
             ({:+.1} %) over {}-{} (median of {} samples; pods within {:.0} % of each other) | {} |",
            PER_POD_TOLERANCE * 100.0,
            if s.expected == HPA_TARGET_PER_POD {
                "the HPA target (800/s)".to_owned()
            } else {
                format!("load / pods at maxReplicas ({:.0}/s)", s.expected)
            },
            s.pods,
            s.per_pod,
            (s.per_pod - s.expected) / s.expected * 100.0,
            minsec(s.from_s),
            minsec(s.to_s),
            s.samples,
            s.pod_spread * 100.0,
            verdict(s.ok())
        );
    }
    // Under-limit refusals.
    let joins = f
        .changes
        .iter()
        .filter(|c| c.what == "joined" || c.what == "restarted")
        .count();
    let leaves = f
        .changes
        .iter()
        .filter(|c| c.what == "leaving" || c.what == "killed")
        .count();
    match &o.witness {
        Some(w) => {
            let under: Vec<String> = w
                .plan
                .keys
                .iter()
                .filter(|k| !k.hot)
                .map(|k| k.key.clone())
                .collect();
            let _ = writeln!(
                md,
                "| zero refusals of clients under their limit across every join and leave | {} \
                 refusals of {} ({} keys at 80 % of their limit) over the whole run, {} joins and \
                 {} leaves; {} witness requests without a decision | {} |",
                f.under_limit_refusals.len(),
                under.join(", "),
                under.len(),
                joins,
                leaves,
                f.witness_errors,
                verdict(f.under_limit_refusals.is_empty())
            );
            let bad: Vec<&crate::figures::Change> = f.changes.iter().filter(|c| !c.ok()).collect();
            let _ = writeln!(
                md,
                "| hot-key admissions within the `shared` bound across membership changes | \
                 {} of {} changes within [ideal - U, C + r·T + O] (table below); whole run: {} \
                 admitted, the ideal bucket {} ({:+}) | {} |",
                f.changes.len() - bad.len(),
                f.changes.len(),
                f.hot_total.admitted,
                f.hot_total.ideal,
                f.hot_total.admitted as i64 - f.hot_total.ideal as i64,
                verdict(bad.is_empty() && !f.changes.is_empty())
            );
        }
        None => {
            let _ = writeln!(md, "| witnesses | none ran | **not measured** |");
        }
    }
    // Scale-down.
    let early: Vec<&crate::figures::ScaleDown> = f.scale_downs.iter().filter(|s| !s.ok()).collect();
    let first = f.scale_downs.first();
    let _ = writeln!(
        md,
        "| scale-down only after the {:.0} s stabilization window | {} scale-downs; {}; {} \
         with a higher recommendation inside the window | {} |",
        STABILIZATION_S,
        f.scale_downs.len(),
        first.map_or("none".to_owned(), |s| format!(
            "the first, {} -> {} at {}, {:.0} s after the last recommendation of {}",
            s.from,
            s.to,
            minsec(s.at_s),
            s.since_last_high_s,
            s.from
        )),
        early.len(),
        verdict(early.is_empty() && !f.scale_downs.is_empty())
    );
    let _ = writeln!(
        md,
        "| `HPAReplicaStuck` silent while the stack follows the HPA | {} spans, {} fired | {} |\n",
        f.hpa_stuck,
        f.hpa_stuck_fired,
        verdict(f.hpa_stuck_fired == 0)
    );
}

/// The Deployment's story: decisions to ready pods, every join and leave with what the
/// witnesses saw around it.
fn deployment_section(md: &mut String, o: &Outcome, f: &Figures) {
    let k = o.time_scale;
    let _ = writeln!(md, "## The Deployment\n");
    let _ = writeln!(
        md,
        "The stack plays the Deployment and its Service: the HPA's count starts new \
         `openclaw-limiter` processes (each pulls its peers' state before `/ready`) and stops \
         surplus ones with SIGTERM (each hands its last changes to the survivors); the Service's \
         endpoints, where the load goes, are the pods whose readiness probe passed (`/ready`, \
         every {} s of scenario time); a killed pod is restarted after the kubelet's back-off \
         from its snapshot directory. See `replicas.svg`.\n",
        crate::deployment::PROBE_PERIOD.as_secs()
    );
    let _ = writeln!(md, "From a decision to ready pods:\n");
    let _ = writeln!(
        md,
        "| scenario time | asked | ready after |\n| --- | --- | --- |"
    );
    for r in &f.to_ready {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            when(o, r.at_s),
            r.what,
            r.after_s.map_or("never".to_owned(), |d| if k == 1.0 {
                format!("{d:.1} s")
            } else {
                format!("{d:.1} s ({:.2} s real)", d / k)
            })
        );
    }
    if f.to_ready.is_empty() {
        let _ = writeln!(md, "| - | no scale-up | - |");
    }
    md.push('\n');
    if let Some(w) = &o.witness {
        let _ = writeln!(
            md,
            "Every join and leave, and what the witness clients (policy `{}`: {} tokens, \
             refilled {}/s; {} under-limit keys at 80 %, {} hot key(s) at 180 %) saw from {:.0} s \
             before to {:.0} s after it (real time). Bounds from docs/crdt.md with `N` the most \
             pods running in the window, `D` = {} ms: over-admission `C + r·T + O`, `O = (N - 1)(C \
             + r·D)` (+ `C + r·s` per pod killed), under-admission `ideal - (N - 1)(C + r·D)`, \
             per hot key.\n",
            w.plan.policy,
            w.plan.capacity,
            w.plan.refill_rate(),
            w.plan.keys.iter().filter(|k| !k.hot).count(),
            w.plan.keys.iter().filter(|k| k.hot).count(),
            crate::figures::CHANGE_BEFORE.as_secs_f64(),
            crate::figures::CHANGE_AFTER.as_secs_f64(),
            crate::figures::REPLICATION_DELAY.as_millis(),
        );
        let _ = writeln!(
            md,
            "| scenario time | pod | change | pods | under-limit refused | hot: admitted | ideal | allowed range | |"
        );
        let _ = writeln!(
            md,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for c in &f.changes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {:.0}-{:.0} | {} |",
                when(o, c.at_s),
                c.pod,
                c.what,
                c.pods,
                c.under_limit_refused,
                c.hot.admitted,
                c.hot.ideal,
                c.lower.max(0.0),
                c.upper,
                if c.ok() { "ok" } else { "**out**" }
            );
        }
        md.push('\n');
        if !f.under_limit_refusals.is_empty() {
            let list: Vec<String> = f
                .under_limit_refusals
                .iter()
                .take(20)
                .map(|(key, t)| format!("{key} at {}", when(o, *t)))
                .collect();
            let _ = writeln!(md, "Under-limit refusals: {}.\n", list.join(", "));
        }
    }
}
