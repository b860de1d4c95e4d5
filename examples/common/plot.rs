//! PNG charts of a run's `metrics.jsonl`, written beside it for the report card to show:
//! the loss curves of every run (`loss.png`: the loss of each logged step, and the train and
//! validation losses of each evaluation, against the step), and the curves of the stages that
//! log them in their evaluation rows: the mean reward of each rollout (`reward.png`, PPO and
//! GRPO's `reward_mean`), the KL to the reference (`kl.png`, `kl`) and accuracies
//! (`accuracy.png`: `accuracy`, `train_accuracy`, DPO's `reward_accuracy`).
//!
//! plotters draws into an RGB buffer (its bitmap backend, no image codecs) that the `png`
//! crate encodes. Text is drawn with Noto Sans, which the `notosans` crate carries (SIL Open
//! Font License 1.1), registered through plotters' `ab_glyph` feature: nothing depends on
//! the machine's fonts.
//!
//! From an example: `plot::write_run_plots(&metrics_jsonl, &out_dir, "pretrain")` returns the
//! `(alt, file name)` of each image written, for [`tinygpt::report::RunCard::images`] (the
//! report helpers in `report.rs` call it for you).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use tinygpt::report::MetricsRow;

/// Image size in pixels.
pub const WIDTH: u32 = 960;
pub const HEIGHT: u32 = 540;
/// The family name the embedded font is registered under (plotters' `sans-serif`).
const FONT: &str = "sans-serif";

/// One curve.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend entry.
    pub name: String,
    /// `(x, y)` points in order of x.
    pub points: Vec<(f64, f64)>,
    /// Line colour.
    pub color: RGBColor,
    /// Draw a dot at each point (evaluations), not only the line.
    pub markers: bool,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The caption above the plot.
    pub title: String,
    /// The x axis' name.
    pub x_label: String,
    /// The y axis' name.
    pub y_label: String,
    /// The curves (empty ones are left out).
    pub series: Vec<Series>,
    /// Where the legend goes ([`render_png`] leaves headroom at the top for it).
    pub legend: SeriesLabelPosition,
}

/// Blue, orange and red of the classic palette (matplotlib's tab10), the grid's grey.
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const RED: RGBColor = RGBColor(214, 39, 40);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GRID: RGBColor = RGBColor(222, 222, 222);
const LIGHT_GRID: RGBColor = RGBColor(246, 246, 246);

/// Registers the embedded font once (plotters keeps a process-wide table).
fn register_font() -> Result<()> {
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, notosans::REGULAR_TTF).is_ok()
    });
    if !ok {
        bail!("the embedded Noto Sans font did not load");
    }
    Ok(())
}

fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// The axis range of `values`, with a margin of 5% (a single value gets one of its own size).
fn range(values: impl Iterator<Item = f64>, margin: bool) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return None;
    }
    let span = hi - lo;
    if span <= 0.0 {
        let pad = (lo.abs() * 0.1).max(1e-3);
        return Some((lo - pad, hi + pad));
    }
    let pad = if margin { span * 0.05 } else { 0.0 };
    Some((lo - pad, hi + pad))
}

/// `chart` as PNG bytes.
///
/// # Errors
/// If the chart has no points, or drawing or encoding fails.
pub fn render_png(chart: &Chart) -> Result<Vec<u8>> {
    register_font()?;
    let series: Vec<&Series> = chart
        .series
        .iter()
        .filter(|s| !s.points.is_empty())
        .collect();
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (Some((x0, x1)), Some((y0, mut y1))) = (range(xs(), false), range(ys(), true)) else {
        bail!("chart {:?} has no points", chart.title);
    };
    // Headroom for the legend in the top corner, so that no curve runs under it: about a
    // tenth of the height per entry.
    y1 += (y1 - y0) * (0.04 + 0.1 * series.len() as f64);
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, (FONT, 26))
            .margin(18)
            .x_label_area_size(56)
            .y_label_area_size(76)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(drawing)?;
        c.configure_mesh()
            .x_desc(&chart.x_label)
            .y_desc(&chart.y_label)
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .light_line_style(LIGHT_GRID)
            .bold_line_style(GRID)
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&|x| step_number(*x, x1 - x0))
            .y_label_formatter(&|y| axis_number(*y, y1 - y0))
            .draw()
            .map_err(drawing)?;
        for s in &series {
            let color = s.color;
            c.draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(drawing)?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
            if s.markers || s.points.len() == 1 {
                c.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(drawing)?;
            }
        }
        c.configure_series_labels()
            .position(chart.legend.clone())
            .margin(12)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
    }
    encode_png(&rgb, WIDTH, HEIGHT)
}

/// A tick label on an axis spanning `span`: every label of an axis with the same decimals,
/// as few as its span needs (steps as integers; thousands as `k` past 100,000; scientific
/// notation for a span under 1e-5).
fn axis_number(v: f64, span: f64) -> String {
    let span = span.abs();
    if span >= 1e5 {
        return format!("{:.0}k", v / 1e3);
    }
    if span < 1e-5 {
        return format!("{v:.2e}");
    }
    // One decimal more than the span's first significant digit: 2.7 → 1, 0.012 → 3.
    let decimals = ((-span.log10()).ceil() + 1.0).clamp(0.0, 6.0) as usize;
    let s = format!("{v:.decimals$}");
    // No "-0.0".
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

/// A tick label on the step axis: steps are whole numbers (decimals only on a span under 2).
fn step_number(v: f64, span: f64) -> String {
    if span.abs() >= 2.0 && span.abs() < 1e5 {
        format!("{v:.0}")
    } else {
        axis_number(v, span)
    }
}

/// 8-bit RGB pixels as a PNG file.
fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // A chart is mostly flat colour: the best compression takes it to a fraction.
        encoder.set_compression(png::Compression::Best);
        encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
        let mut writer = encoder.write_header().context("encoding a PNG")?;
        writer.write_image_data(rgb).context("encoding a PNG")?;
        writer.finish().context("encoding a PNG")?;
    }
    Ok(out)
}

/// `(step, value of key)` of the rows of `kind` that have it.
fn points(rows: &[MetricsRow], kind: &str, key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r.kind == kind)
        .filter_map(|r| Some((r.step as f64, r.get(key)?)))
        .collect()
}

fn series(name: &str, points: Vec<(f64, f64)>, color: RGBColor, markers: bool) -> Series {
    Series {
        name: name.to_string(),
        points,
        color,
        markers,
    }
}

/// The charts of a run's metrics rows, each with the file it goes to: `loss.png` when any row
/// has a loss, `reward.png`, `kl.png` and `accuracy.png` when evaluation rows have those
/// fields. `stage` heads each caption.
pub fn charts(rows: &[MetricsRow], stage: &str) -> Vec<(&'static str, Chart)> {
    let mut out = Vec::new();
    let chart = |title: &str, y: &str, series: Vec<Series>, legend| Chart {
        title: format!("{stage}: {title}"),
        x_label: "step".into(),
        y_label: y.into(),
        series: series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect(),
        legend,
    };
    let loss = chart(
        "loss",
        "loss",
        vec![
            series(
                "train (logged steps)",
                points(rows, "train", "loss"),
                BLUE,
                false,
            ),
            series(
                "train (evaluations)",
                points(rows, "eval", "train_loss"),
                ORANGE,
                true,
            ),
            series(
                "val (evaluations)",
                points(rows, "eval", "val_loss"),
                RED,
                true,
            ),
        ],
        SeriesLabelPosition::UpperRight,
    );
    if !loss.series.is_empty() {
        out.push(("loss.png", loss));
    }
    let reward = chart(
        "mean reward of each rollout",
        "reward",
        vec![series(
            "reward_mean",
            points(rows, "eval", "reward_mean"),
            GREEN,
            true,
        )],
        SeriesLabelPosition::UpperRight,
    );
    if !reward.series.is_empty() {
        out.push(("reward.png", reward));
    }
    let kl = chart(
        "KL to the reference model",
        if stage == "grpo" {
            "KL (nats per token)"
        } else {
            "KL (nats per reply)"
        },
        vec![series("kl", points(rows, "eval", "kl"), PURPLE, true)],
        SeriesLabelPosition::UpperRight,
    );
    if !kl.series.is_empty() {
        out.push(("kl.png", kl));
    }
    let accuracy = chart(
        "accuracy",
        "accuracy",
        vec![
            series("accuracy", points(rows, "eval", "accuracy"), GREEN, true),
            series(
                "train accuracy",
                points(rows, "eval", "train_accuracy"),
                ORANGE,
                true,
            ),
            series(
                "reward accuracy",
                points(rows, "eval", "reward_accuracy"),
                BLUE,
                true,
            ),
        ],
        SeriesLabelPosition::UpperRight,
    );
    if !accuracy.series.is_empty() {
        out.push(("accuracy.png", accuracy));
    }
    out
}

/// Draws the charts of the `metrics.jsonl` at `metrics` ([`charts`]) into `dir` (replacing
/// each file atomically) and returns `(alt text, file name)` of each.
///
/// # Errors
/// If the metrics cannot be read or a chart cannot be drawn or written.
pub fn write_run_plots(metrics: &Path, dir: &Path, stage: &str) -> Result<Vec<(String, String)>> {
    let rows = tinygpt::report::read_metrics(metrics)?;
    let mut written = Vec::new();
    for (file, chart) in charts(&rows, stage) {
        let png = render_png(&chart)?;
        let path = dir.join(file);
        tinygpt::report::write_atomic(&path, &png)?;
        let alt = file.trim_end_matches(".png").to_string();
        written.push((alt, file.to_string()));
    }
    Ok(written)
}
