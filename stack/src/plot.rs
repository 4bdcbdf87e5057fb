//! SVG plots of a scenario: lines over scenario time, with the phases shaded and the kill
//! marked, and the alert timeline. `plotters` with its SVG backend only (no fonts, no bitmaps):
//! text is laid out by estimate and rendered by whatever displays the SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

const WIDTH: u32 = 960;
const HEIGHT: u32 = 380;

/// Colours for successive series (Tableau 10: distinct, readable on white).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One line.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    /// (scenario seconds, value); gaps are simply not drawn across when `x` jumps.
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub width: u32,
    /// Hold each value until the next point (replica counts).
    pub step: bool,
    pub dashed: bool,
}

impl Line {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Line {
        Line {
            name: name.into(),
            points,
            color,
            width: 2,
            step: false,
            dashed: false,
        }
    }

    pub fn step(mut self) -> Line {
        self.step = true;
        self
    }

    pub fn dashed(mut self) -> Line {
        self.dashed = true;
        self.width = 1;
        self
    }
}

/// What every chart of a scenario shows behind its lines.
#[derive(Debug, Clone, Default)]
pub struct Backdrop {
    /// (start s, end s, name) of each phase.
    pub phases: Vec<(f64, f64, String)>,
    /// Scenario seconds of the kill, and what was killed.
    pub kill: Option<(f64, String)>,
    /// Thin vertical marks with a short label (pods joining and leaving).
    pub marks: Vec<(f64, String)>,
    /// Scenario seconds the x axis covers.
    pub end: f64,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Other(format!("plot: {e}"))
}

/// A line chart. `y_max`: fixed top of the axis (else 10% above the highest point).
pub fn line_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    lines: &[Line],
    y_max: Option<f64>,
    backdrop: &Backdrop,
) -> Result<()> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let x_max = (backdrop.end / 60.0).max(0.1);
    let highest = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    // Headroom above the highest point keeps the legend (upper right) off the lines: the
    // legend is about one fourteenth of the plot's height per entry.
    let headroom = 1.15 + 0.07 * lines.len() as f64;
    let y_top = y_max.unwrap_or(if highest > 0.0 {
        highest * headroom
    } else {
        1.0
    });
    // Below zero only when a line goes there (a difference to an ideal).
    let lowest = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::min);
    let y_bottom = if lowest < 0.0 { lowest * 1.2 } else { 0.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, y_bottom..y_top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("scenario time (minutes)")
        .y_desc(y_desc)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    // Phase names along the top, the kill's label near the bottom (clear of the load lines).
    draw_backdrop(
        &mut chart,
        backdrop,
        (y_bottom, y_top),
        (
            y_top - (y_top - y_bottom) * 0.03,
            y_bottom + (y_top - y_bottom) * 0.09,
        ),
    )?;
    for line in lines {
        let points: Vec<(f64, f64)> = to_minutes(line);
        let style = ShapeStyle {
            color: line.color.to_rgba(),
            filled: false,
            stroke_width: line.width,
        };
        let color = line.color;
        let anno = if line.dashed {
            chart
                .draw_series(DashedLineSeries::new(points, 6, 4, style))
                .map_err(err)?
        } else {
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(err)?
        };
        anno.label(line.name.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn to_minutes(line: &Line) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(line.points.len() * 2);
    let mut last: Option<f64> = None;
    for &(x, y) in &line.points {
        if !y.is_finite() {
            continue;
        }
        if line.step
            && let Some(prev) = last
        {
            out.push((x / 60.0, prev));
        }
        out.push((x / 60.0, y));
        last = Some(y);
    }
    out
}

fn draw_backdrop<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    backdrop: &Backdrop,
    (y_bottom, y_top): (f64, f64),
    labels: (f64, f64),
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let shades = [RGBColor(246, 246, 246), RGBColor(232, 238, 246)];
    for (i, (start, end, name)) in backdrop.phases.iter().enumerate() {
        let (x0, x1) = (start / 60.0, end / 60.0);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, y_bottom), (x1, y_top)],
                shades[i % 2].filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                name.clone(),
                (x0 + (x1 - x0) * 0.02, labels.0),
                ("sans-serif", 12).into_font().color(&RGBColor(90, 90, 90)),
            )))
            .map_err(err)?;
    }
    for (i, (at, what)) in backdrop.marks.iter().enumerate() {
        let x = at / 60.0;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, y_bottom), (x, y_top)],
                RGBColor(150, 150, 150).stroke_width(1),
            )))
            .map_err(err)?;
        // Staggered so that marks close together stay readable.
        let y = labels.1 + (labels.0 - labels.1) * (0.1 + 0.08 * (i % 4) as f64);
        chart
            .draw_series(std::iter::once(Text::new(
                what.clone(),
                (x, y),
                ("sans-serif", 10).into_font().color(&RGBColor(90, 90, 90)),
            )))
            .map_err(err)?;
    }
    if let Some((at, what)) = &backdrop.kill {
        let x = at / 60.0;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, y_bottom), (x, y_top)],
                RGBColor(200, 0, 0).stroke_width(2),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" kill -9 {what}"),
                (x, labels.1),
                ("sans-serif", 12).into_font().color(&RGBColor(200, 0, 0)),
            )))
            .map_err(err)?;
    }
    Ok(())
}

/// One row of the alert timeline.
#[derive(Debug, Clone)]
pub struct AlertRow {
    pub label: String,
    pub critical: bool,
    /// (from, to) scenario seconds pending, then firing.
    pub pending: Vec<(f64, f64)>,
    pub firing: Vec<(f64, f64)>,
}

/// Rows of room above the alerts for the phase names and the kill's label.
const TOP_BAND: f64 = 1.5;

/// Alerts over time: one row each, pending in amber, firing in red (orange for warnings).
pub fn alert_timeline(
    path: &Path,
    title: &str,
    rows: &[AlertRow],
    backdrop: &Backdrop,
) -> Result<()> {
    let n = rows.len().max(1);
    let height = (120 + 26 * n as u32).max(220);
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let x_max = (backdrop.end / 60.0).max(0.1);
    let label_width = rows
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(10)
        .clamp(10, 60) as u32
        * 7;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(38)
        .y_label_area_size(label_width)
        .build_cartesian_2d(0.0..x_max, 0.0..n as f64 + TOP_BAND)
        .map_err(err)?;
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    chart
        .configure_mesh()
        .x_desc("scenario time (minutes)")
        .y_labels(n * 2 + 4)
        .y_label_formatter(&|y| {
            // Rows are drawn top to bottom; label each at its middle.
            let i = (n as f64 - y - 0.5).round();
            if (n as f64 - y - 0.5 - i).abs() < 0.01 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .disable_y_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    let top = n as f64 + TOP_BAND;
    draw_backdrop(&mut chart, backdrop, (0.0, top), (top - 0.15, top - 0.75))?;
    for (i, row) in rows.iter().enumerate() {
        let top = n as f64 - i as f64 - 0.15;
        let bottom = n as f64 - i as f64 - 0.85;
        let firing = if row.critical {
            RGBColor(200, 30, 30)
        } else {
            RGBColor(240, 130, 20)
        };
        for &(a, b) in &row.pending {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(a / 60.0, bottom + 0.2), (b / 60.0, top - 0.2)],
                    RGBColor(250, 210, 80).filled(),
                )))
                .map_err(err)?;
        }
        for &(a, b) in &row.firing {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(a / 60.0, bottom), (b / 60.0, top)],
                    firing.filled(),
                )))
                .map_err(err)?;
        }
    }
    if rows.is_empty() {
        chart
            .draw_series(std::iter::once(Text::new(
                "no alert went pending".to_owned(),
                (x_max * 0.4, 0.5),
                ("sans-serif", 14).into_font(),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_an_svg_with_its_title_legend_and_phases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let backdrop = Backdrop {
            phases: vec![
                (0.0, 60.0, "baseline".into()),
                (60.0, 120.0, "spike".into()),
            ],
            kill: Some((90.0, "limiter-2".into())),
            marks: vec![(70.0, "+3".into())],
            end: 120.0,
        };
        line_chart(
            &path,
            "Requests per second",
            "req/s",
            &[
                Line::new(
                    "fleet",
                    vec![(0.0, 10.0), (60.0, 30.0), (120.0, 20.0)],
                    PALETTE[0],
                ),
                Line::new("desired", vec![(0.0, 2.0), (60.0, 5.0)], PALETTE[1]).step(),
            ],
            None,
            &backdrop,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for text in [
            "Requests per second",
            "fleet",
            "desired",
            "baseline",
            "spike",
            "kill -9 limiter-2",
        ] {
            assert!(svg.contains(text), "missing {text}");
        }
        let path = dir.path().join("a.svg");
        alert_timeline(
            &path,
            "Alerts",
            &[AlertRow {
                label: "TokenBucketHighUsage policy=default".into(),
                critical: false,
                pending: vec![(10.0, 40.0)],
                firing: vec![(40.0, 100.0)],
            }],
            &backdrop,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("TokenBucketHighUsage policy=default"));
    }
}
