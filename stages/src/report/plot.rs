//! SVG line charts of a report: a metric against the grid's `x` variable,
//! one line per series with its 95% CI band over replicates; and per
//! dataset the trade-off charts, mono against multi and against bias, one
//! point per value of `x` with CI crosses.
//!
//! Written directly as SVG (a few elements per series), which opens in any
//! browser or Markdown viewer, plus a PNG of each rendered by resvg with
//! the machine's fonts, for slides and papers.

use std::fmt::Write as _;
use std::path::Path;

use xlpipe_eval::results::BIAS;

use super::load::TrainingCurve;
use super::tables::{Cell, Report};
use super::Point;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const MARGIN: (f64, f64, f64, f64) = (60.0, 170.0, 40.0, 50.0); // left, right, top, bottom
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One line: (x, mean, CI half-width) points.
struct Series {
    label: String,
    points: Vec<(f64, f64, Option<f64>)>,
    /// A level outside the grid (an untuned model's): drawn dashed across
    /// the whole x range; its one point's x is ignored.
    level: bool,
    /// The setting (mono, cross, ...) it shows: a level takes the colour of
    /// the grid line of its setting.
    setting: String,
}

pub(super) fn write_plots(report: &Report, dir: &Path) -> anyhow::Result<()> {
    let x = &report.p.x;
    // Plots need x to vary numerically; every other variable splits lines.
    let others: Vec<Point> = {
        let mut others: Vec<Point> = Vec::new();
        for point in &report.points {
            let rest: Point = point.iter().filter(|(k, _)| k != x).cloned().collect();
            if !others.contains(&rest) {
                others.push(rest);
            }
        }
        others
    };
    let x_of = |point: &Point| {
        point
            .iter()
            .find(|(k, _)| k == x)
            .and_then(|(_, v)| v.as_f64())
    };
    if !report.points.iter().any(|p| x_of(p).is_some()) {
        return Ok(());
    }
    // Scanning the system fonts only when there is something to draw.
    let canvas = Canvas::new();
    let series_of = |cell: &Cell, rest: &Point, label: String| -> Series {
        let mut points: Vec<(f64, f64, Option<f64>)> = report
            .points
            .iter()
            .filter(|p| p.iter().filter(|(k, _)| k != x).cloned().collect::<Point>() == *rest)
            .filter_map(|p| {
                let s = report.summarise(p, cell)?;
                Some((x_of(p)?, s.mean, s.ci95))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        Series {
            label,
            points,
            level: false,
            setting: cell.1.clone(),
        }
    };
    // Evaluations outside the grid (no x): a level line per cell.
    let levels_of = |cell: &Cell| -> Vec<Series> {
        report
            .points
            .iter()
            .filter(|p| x_of(p).is_none())
            .filter_map(|p| {
                let s = report.summarise(p, cell)?;
                let label = if p.is_empty() {
                    format!("{} (untuned)", cell.1)
                } else {
                    format!("{} ({})", cell.1, super::point_label(p))
                };
                Some(Series {
                    label,
                    points: vec![(f64::NAN, s.mean, None)],
                    level: true,
                    setting: cell.1.clone(),
                })
            })
            .collect()
    };
    let suffix = |rest: &Point| {
        if others.len() > 1 {
            format!(" ({})", super::point_label(rest))
        } else {
            String::new()
        }
    };
    let cells = report.cells();
    let datasets: Vec<&String> = {
        let mut d: Vec<&String> = cells.iter().map(|c| &c.0).collect();
        d.dedup();
        d
    };
    let metric = &report.p.metric;
    // Per dataset: the main metric per setting.
    for dataset in &datasets {
        for (wanted, name, y_label) in [
            (
                metric.as_str(),
                format!("{dataset}-{metric}"),
                metric.clone(),
            ),
            (
                BIAS,
                format!("{dataset}-bias"),
                "max-min rank distance (lower is better)".into(),
            ),
        ] {
            let series: Vec<Series> = cells
                .iter()
                .filter(|c| c.0 == **dataset && c.2 == wanted)
                .flat_map(|c| {
                    let mut lines: Vec<Series> = others
                        .iter()
                        .map(|rest| series_of(c, rest, format!("{}{}", c.1, suffix(rest))))
                        .collect();
                    lines.extend(levels_of(c));
                    lines
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            if series.iter().any(|s| !s.level) {
                let title = format!("{dataset}: {wanted} vs {x}");
                canvas.write(dir, &file_name(&name), &chart(&title, x, &y_label, &series))?;
            }
        }
    }
    // Per dataset: mono against multi (and against bias), one point per
    // value of x with its CI cross, joined in x order; the untuned model
    // (outside the grid) as a hollow square.
    for dataset in &datasets {
        let mono: Cell = ((*dataset).clone(), "mono".into(), metric.clone());
        for (other, name) in [
            (
                ((*dataset).clone(), "multi".into(), metric.clone()),
                "multi",
            ),
            (
                ((*dataset).clone(), "multi".into(), BIAS.to_string()),
                "bias",
            ),
        ] {
            let pair = |p: &Point| -> Option<TradeoffPoint> {
                let (a, b) = (report.summarise(p, &mono)?, report.summarise(p, &other)?);
                Some(TradeoffPoint {
                    x: (a.mean, a.ci95),
                    y: (b.mean, b.ci95),
                    label: x_of(p).map_or_else(|| "untuned".to_string(), trim_number),
                })
            };
            let mut lines: Vec<TradeoffLine> = others
                .iter()
                .map(|rest| {
                    let mut in_order: Vec<(f64, TradeoffPoint)> = report
                        .points
                        .iter()
                        .filter(|p| {
                            p.iter().filter(|(k, _)| k != x).cloned().collect::<Point>() == *rest
                        })
                        .filter_map(|p| Some((x_of(p)?, pair(p)?)))
                        .collect();
                    in_order.sort_by(|a, b| a.0.total_cmp(&b.0));
                    TradeoffLine {
                        label: format!("{x}{}", suffix(rest)),
                        points: in_order.into_iter().map(|(_, t)| t).collect(),
                        outside_grid: false,
                    }
                })
                .filter(|l| !l.points.is_empty())
                .collect();
            if lines.is_empty() {
                continue;
            }
            lines.extend(
                report
                    .points
                    .iter()
                    .filter(|p| x_of(p).is_none())
                    .filter_map(|p| {
                        Some(TradeoffLine {
                            label: if p.is_empty() {
                                "untuned".into()
                            } else {
                                super::point_label(p)
                            },
                            points: vec![pair(p)?],
                            outside_grid: true,
                        })
                    }),
            );
            let y_label = if name == "bias" {
                "multi max-min rank distance (lower is better)".to_string()
            } else {
                format!("multi {metric}")
            };
            canvas.write(
                dir,
                &file_name(&format!("{dataset}-mono-vs-{name}")),
                &tradeoff_chart(
                    &format!("{dataset}: mono vs {name}, by {x}"),
                    &format!("mono {metric}"),
                    &y_label,
                    &lines,
                ),
            )?;
        }
    }
    // In-domain against out-of-domain, per setting.
    let domain_series: Vec<Series> = cells
        .iter()
        .filter(|c| (c.0 == "in-domain" || c.0 == "out-of-domain") && c.2 == *metric)
        .flat_map(|c| {
            others
                .iter()
                .map(|rest| series_of(c, rest, format!("{} {}{}", c.0, c.1, suffix(rest))))
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !domain_series.is_empty() {
        canvas.write(
            dir,
            &format!("domains-{}", file_name(metric)),
            &chart(
                &format!("in-domain vs out-of-domain: {metric} vs {x}"),
                x,
                metric,
                &domain_series,
            ),
        )?;
    }
    Ok(())
}

/// One model of a trade-off chart: both measures' means and CI half-widths.
struct TradeoffPoint {
    x: (f64, Option<f64>),
    y: (f64, Option<f64>),
    label: String,
}

/// The grid's points in x order (joined), or one model outside the grid.
struct TradeoffLine {
    label: String,
    points: Vec<TradeoffPoint>,
    outside_grid: bool,
}

/// A scatter of two measures: each point with its 95% CI on both axes, a
/// grid's points joined in order of x and labelled with x, a model outside
/// the grid as a hollow square.
fn tradeoff_chart(title: &str, x_label: &str, y_label: &str, lines: &[TradeoffLine]) -> String {
    let (left, right, top, _) = MARGIN;
    let plot_w = WIDTH - left - right;
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for t in lines.iter().flat_map(|l| &l.points) {
        let (cx, cy) = (t.x.1.unwrap_or(0.0), t.y.1.unwrap_or(0.0));
        x_min = x_min.min(t.x.0 - cx);
        x_max = x_max.max(t.x.0 + cx);
        y_min = y_min.min(t.y.0 - cy);
        y_max = y_max.max(t.y.0 + cy);
    }
    let x_pad = ((x_max - x_min) * 0.08).max(1e-6);
    let y_pad = ((y_max - y_min) * 0.08).max(1e-6);
    (x_min, x_max, y_min, y_max) = (x_min - x_pad, x_max + x_pad, y_min - y_pad, y_max + y_pad);
    let frame = Frame {
        x: (x_min, x_max),
        y: (y_min, y_max),
        width: canvas_width(lines.iter().map(|l| l.label.as_str())),
    };
    let (sx, sy) = (|x| frame.sx(x), |y| frame.sy(y));
    let mut svg = frame.open_svg(title, x_label, y_label);
    for (i, line) in lines.iter().enumerate() {
        let colour = if line.outside_grid {
            "#444444"
        } else {
            COLOURS[i % COLOURS.len()]
        };
        let (lx, ly) = (left + plot_w + 12.0, top + 10.0 + i as f64 * 18.0);
        let _ = writeln!(
            svg,
            r#"<circle cx="{:.1}" cy="{ly}" r="4" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 9.0,
            lx + 24.0,
            ly + 4.0,
            escape(&line.label)
        );
        if line.points.len() > 1 {
            let path: Vec<String> = line
                .points
                .iter()
                .map(|t| format!("{:.1},{:.1}", sx(t.x.0), sy(t.y.0)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1" stroke-opacity="0.6"/>"#,
                path.join(" ")
            );
        }
        for t in &line.points {
            let (px, py) = (sx(t.x.0), sy(t.y.0));
            if let Some(ci) = t.x.1 {
                let _ = writeln!(
                    svg,
                    r#"<line x1="{:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="{colour}"/>"#,
                    sx(t.x.0 - ci),
                    sx(t.x.0 + ci)
                );
            }
            if let Some(ci) = t.y.1 {
                let _ = writeln!(
                    svg,
                    r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{colour}"/>"#,
                    sy(t.y.0 - ci),
                    sy(t.y.0 + ci)
                );
            }
            if line.outside_grid {
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="9" height="9" fill="white" stroke="{colour}" stroke-width="2"/>"#,
                    px - 4.5,
                    py - 4.5
                );
            } else {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{colour}"/>"#
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                px + 6.0,
                py - 6.0,
                escape(&t.label)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// `training-loss` (the training loss, a running mean over 10 steps, as
/// single steps are noisy) and `validation-loss` against step, one line per
/// training run.
pub(super) fn write_training_curves(curves: &[TrainingCurve], dir: &Path) -> anyhow::Result<()> {
    if curves.is_empty() {
        return Ok(());
    }
    let canvas = Canvas::new();
    let line = |c: &TrainingCurve, points: Vec<(f64, f64)>| Series {
        label: c.label.clone(),
        points: points.into_iter().map(|(x, y)| (x, y, None)).collect(),
        level: false,
        // Each run its own colour.
        setting: c.label.clone(),
    };
    let smoothed: Vec<Series> = curves
        .iter()
        .map(|c| line(c, running_mean(&c.loss, 10)))
        .collect();
    canvas.write(
        dir,
        "training-loss",
        &chart(
            "training loss (running mean of 10 steps)",
            "step",
            "InfoNCE loss",
            &smoothed,
        ),
    )?;
    let validation: Vec<Series> = curves
        .iter()
        .filter(|c| !c.val_loss.is_empty())
        .map(|c| line(c, c.val_loss.clone()))
        .collect();
    if !validation.is_empty() {
        canvas.write(
            dir,
            "validation-loss",
            &chart("validation loss", "step", "InfoNCE loss", &validation),
        )?;
    }
    Ok(())
}

/// A labelled line through (x, mean, 95% CI half-width) points.
pub type ChartLine = (String, Vec<(f64, f64, Option<f64>)>);

/// One line per label through its (x, mean, 95% CI half-width) points, as
/// `STEM.svg` and `STEM.png` in `dir`: for charts of other kinds (a search's
/// objective by budget), drawn as the report's own.
pub fn write_line_chart(
    dir: &Path,
    stem: &str,
    (title, x_label, y_label): (&str, &str, &str),
    lines: &[ChartLine],
) -> anyhow::Result<()> {
    let series: Vec<Series> = lines
        .iter()
        .map(|(label, points)| Series {
            label: label.clone(),
            points: points.clone(),
            level: false,
            setting: label.clone(),
        })
        .collect();
    Canvas::new().write(dir, stem, &chart(title, x_label, y_label, &series))
}

/// Each point's y replaced by the mean of it and the `window - 1` before.
fn running_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let ys = &points[from..=i];
            let mean = ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64;
            (points[i].0, mean)
        })
        .collect()
}

/// Writes each chart as `STEM.svg` and, rendered at twice its size,
/// `STEM.png`.
struct Canvas {
    options: resvg::usvg::Options<'static>,
}

impl Canvas {
    fn new() -> Canvas {
        let mut options = resvg::usvg::Options::default();
        let fonts = options.fontdb_mut();
        fonts.load_system_fonts();
        // The charts ask for `sans-serif`, which fontdb maps to Arial unless
        // told otherwise; Linux machines rarely have Arial.
        let families: Vec<String> = fonts
            .faces()
            .flat_map(|face| face.families.iter().map(|(name, _)| name.clone()))
            .collect();
        let preferred = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial"];
        match preferred
            .iter()
            .find(|p| families.iter().any(|f| f == *p))
            .map(|p| p.to_string())
            .or_else(|| families.first().cloned())
        {
            Some(family) => fonts.set_sans_serif_family(family),
            None => tracing::warn!("no fonts on this machine: the PNG plots have no text"),
        }
        Canvas { options }
    }

    fn write(&self, dir: &Path, stem: &str, svg: &str) -> anyhow::Result<()> {
        std::fs::write(dir.join(format!("{stem}.svg")), svg)?;
        let tree = resvg::usvg::Tree::from_str(svg, &self.options)?;
        let size = tree.size().to_int_size();
        let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width() * 2, size.height() * 2)
            .ok_or_else(|| anyhow::anyhow!("chart {stem} has no area"))?;
        resvg::render(
            &tree,
            resvg::tiny_skia::Transform::from_scale(2.0, 2.0),
            &mut pixmap.as_mut(),
        );
        pixmap.save_png(dir.join(format!("{stem}.png")))?;
        Ok(())
    }
}

fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Round tick positions covering [low, high].
fn ticks(low: f64, high: f64) -> Vec<f64> {
    let span = (high - low).max(1e-9);
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| span / s <= 6.0)
        .unwrap_or(magnitude * 10.0);
    let first = (low / step).ceil() as i64;
    let last = (high / step).floor() as i64;
    // Rounded so that 3 x 0.2 prints as 0.6.
    (first..=last)
        .map(|i| (i as f64 * step * 1e9).round() / 1e9)
        .collect()
}

/// A colour per series: grid lines in turn; a level line the colour of
/// the first grid line of its setting (or the next one free).
fn colours(series: &[Series]) -> Vec<&'static str> {
    let mut next = 0;
    let mut by_setting: Vec<(&str, &'static str)> = Vec::new();
    let mut take = || {
        let c = COLOURS[next % COLOURS.len()];
        next += 1;
        c
    };
    let lines: Vec<Option<&'static str>> = series
        .iter()
        .map(|s| {
            (!s.level).then(|| {
                let c = take();
                if !by_setting.iter().any(|(k, _)| *k == s.setting) {
                    by_setting.push((&s.setting, c));
                }
                c
            })
        })
        .collect();
    series
        .iter()
        .zip(lines)
        .map(|(s, c)| {
            c.unwrap_or_else(|| {
                by_setting
                    .iter()
                    .find(|(k, _)| *k == s.setting)
                    .map(|(_, c)| *c)
                    .unwrap_or_else(&mut take)
            })
        })
        .collect()
}

/// A chart's plot area: the data ranges it shows and where they land, and
/// the width of the whole canvas (the plot's, plus a legend column wide
/// enough for its labels).
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
    width: f64,
}

/// The canvas width that shows every legend label whole: the plot keeps
/// its size and the legend column widens (at the fixed width, labels such
/// as "multi (series=all layers)" were cut off).
fn canvas_width<'a>(labels: impl Iterator<Item = &'a str>) -> f64 {
    let (_, right, _, _) = MARGIN;
    let longest = labels.map(|l| l.chars().count()).max().unwrap_or(0) as f64;
    // The text starts 24 px into the column, past 12 px of gap; about 7 px
    // a character at 12 px sans-serif; 8 px to spare.
    WIDTH.max(WIDTH - right + 12.0 + 24.0 + 7.0 * longest + 8.0)
}

impl Frame {
    fn sx(&self, x: f64) -> f64 {
        let (left, right, _, _) = MARGIN;
        left + (x - self.x.0) / (self.x.1 - self.x.0) * (WIDTH - left - right)
    }

    fn sy(&self, y: f64) -> f64 {
        let (_, _, top, bottom) = MARGIN;
        top + (1.0 - (y - self.y.0) / (self.y.1 - self.y.0)) * (HEIGHT - top - bottom)
    }

    /// The SVG up to the data: background, title, grid lines with their
    /// tick labels, the plot's box and the axis labels.
    fn open_svg(&self, title: &str, x_label: &str, y_label: &str) -> String {
        let (left, right, top, bottom) = MARGIN;
        let (plot_w, plot_h) = (WIDTH - left - right, HEIGHT - top - bottom);
        let width = self.width;
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>
"#,
            left + plot_w / 2.0,
            escape(title)
        );
        for t in ticks(self.y.0, self.y.1) {
            let y = self.sy(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                y + 4.0,
                trim_number(t)
            );
        }
        for t in ticks(self.x.0, self.x.1) {
            let x = self.sx(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                top + plot_h,
                top + plot_h + 16.0,
                trim_number(t)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
            left + plot_w / 2.0,
            HEIGHT - 12.0,
            escape(x_label),
            top + plot_h / 2.0,
            escape(y_label)
        );
        svg
    }
}

fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (left, right, top, _) = MARGIN;
    let plot_w = WIDTH - left - right;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y, ci) in all {
        let ci = ci.unwrap_or(0.0);
        if x.is_finite() {
            x_min = x_min.min(x);
            x_max = x_max.max(x);
        }
        y_min = y_min.min(y - ci);
        y_max = y_max.max(y + ci);
    }
    if x_max <= x_min {
        (x_min, x_max) = (x_min - 0.5, x_max + 0.5);
    }
    let pad = ((y_max - y_min) * 0.08).max(1e-6);
    (y_min, y_max) = (y_min - pad, y_max + pad);
    let frame = Frame {
        x: (x_min, x_max),
        y: (y_min, y_max),
        width: canvas_width(series.iter().map(|s| s.label.as_str())),
    };
    let (sx, sy) = (|x| frame.sx(x), |y| frame.sy(y));
    let mut svg = frame.open_svg(title, x_label, y_label);
    let colours = colours(series);
    for (i, s) in series.iter().enumerate() {
        let colour = colours[i];
        let ly = top + 10.0 + i as f64 * 18.0;
        let lx = left + plot_w + 12.0;
        let dash = if s.level {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&s.label)
        );
        if s.level {
            let y = sy(s.points[0].1);
            let _ = writeln!(
                svg,
                r#"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="1.5"{dash}/>"#,
                left + plot_w
            );
            continue;
        }
        if s.points.iter().all(|p| p.2.is_some()) && s.points.len() > 1 {
            let upper = s
                .points
                .iter()
                .map(|&(x, y, ci)| (x, y + ci.unwrap_or(0.0)));
            let lower = s
                .points
                .iter()
                .rev()
                .map(|&(x, y, ci)| (x, y - ci.unwrap_or(0.0)));
            let outline: Vec<String> = upper
                .chain(lower)
                .map(|(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polygon points="{}" fill="{colour}" fill-opacity="0.15" stroke="none"/>"#,
                outline.join(" ")
            );
        }
        let line: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y, _)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            line.join(" ")
        );
        for &(x, y, _) in &s.points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                sx(x),
                sy(y)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn trim_number(v: f64) -> String {
    let text = format!("{v:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short labels keep the standard canvas; a long one widens it to fit,
    /// the plot area unchanged.
    #[test]
    fn the_canvas_widens_for_long_legend_labels() {
        assert_eq!(canvas_width(["mono", "alpha_h"].into_iter()), WIDTH);
        let long = "multi (series=all layers)";
        let width = canvas_width(["mono", long].into_iter());
        let (left, right, _, _) = MARGIN;
        let text_starts = left + (WIDTH - left - right) + 12.0 + 24.0;
        assert!(width >= text_starts + 6.5 * long.len() as f64, "{width}");
        let svg = chart(
            "t",
            "x",
            "y",
            &[Series {
                label: long.into(),
                points: vec![(0.0, 1.0, None), (1.0, 2.0, None)],
                level: false,
                setting: "multi".into(),
            }],
        );
        assert!(svg.contains(&format!(r#"width="{width}""#)), "{svg}");
    }

    #[test]
    fn training_curves_are_drawn_one_line_per_run() {
        let dir = tempfile::tempdir().unwrap();
        let curve = |label: &str, offset: f64| TrainingCurve {
            label: label.into(),
            loss: (1..=30)
                .map(|s| (s as f64, offset + 1.0 / s as f64))
                .collect(),
            val_loss: vec![(10.0, offset + 0.5), (20.0, offset + 0.4)],
        };
        let curves = [
            curve("alpha=0.0, seed=1", 0.0),
            curve("alpha=1.0, seed=1", 0.1),
        ];
        write_training_curves(&curves, dir.path()).unwrap();
        for stem in ["training-loss", "validation-loss"] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).unwrap();
            assert!(svg.contains("alpha=0.0, seed=1") && svg.contains("alpha=1.0, seed=1"));
            assert!(dir.path().join(format!("{stem}.png")).is_file());
        }
        // The running mean: step 10 averages steps 1..=10, step 30 steps 21..=30.
        let smooth = running_mean(&curves[0].loss, 10);
        let mean = |a: usize, b: usize| (a..=b).map(|s| 1.0 / s as f64).sum::<f64>() / 10.0;
        assert!((smooth[9].1 - mean(1, 10)).abs() < 1e-12);
        assert!((smooth[29].1 - mean(21, 30)).abs() < 1e-12);
        assert_eq!(smooth[0], curves[0].loss[0]);
    }

    #[test]
    fn ticks_are_round_and_inside() {
        assert_eq!(ticks(0.0, 1.0), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let t = ticks(0.613, 0.688);
        assert!(
            t.iter().all(|&v| (0.613..=0.688).contains(&v)) && t.len() >= 3,
            "{t:?}"
        );
    }

    #[test]
    fn chart_is_an_svg_with_a_band_per_series() {
        let series = [
            Series {
                label: "mono <en>".into(),
                points: vec![(0.0, 0.5, Some(0.01)), (1.0, 0.6, Some(0.02))],
                level: false,
                setting: "mono".into(),
            },
            Series {
                label: "cross".into(),
                points: vec![(0.0, 0.3, None), (1.0, 0.35, None)],
                level: false,
                setting: "cross".into(),
            },
            Series {
                label: "mono (untuned)".into(),
                points: vec![(f64::NAN, 0.45, None)],
                level: true,
                setting: "mono".into(),
            },
        ];
        // The untuned level shares its setting's colour.
        assert_eq!(colours(&series), vec![COLOURS[0], COLOURS[1], COLOURS[0]]);
        let svg = chart("t", "alpha", "map", &series);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("NaN"), "{svg}");
        assert_eq!(svg.matches("<polygon").count(), 1);
        assert!(svg.contains("mono (untuned)"));
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        assert!(svg.contains("mono &lt;en&gt;"));
    }
}
