//! The experiments' pictures: line charts and heatmaps as SVG, written atomically.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use rwkv_core::error::{Error, Result};
use std::path::Path;

/// One named line of a chart.
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Its points.
    pub points: Vec<(f64, f64)>,
}

fn perr(e: &dyn std::fmt::Display) -> Error {
    Error::Internal(format!("plot: {e}"))
}

/// The colours of the lines, in order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The range of `v` with a margin (a unit around a single value).
fn span(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if lo >= hi {
        return (lo - 1.0, hi + 1.0);
    }
    let m = (hi - lo) * 0.04;
    (lo - m, hi + m)
}

/// Writes a line chart of `series` to `path` (SVG).
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(&e))?;
        let all = || series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = span(all().map(|p| p.0));
        let (y0, y1) = span(all().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| perr(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(|e| perr(&e))?;
        for (i, s) in series.iter().enumerate() {
            let col = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    col.stroke_width(2),
                ))
                .map_err(|e| perr(&e))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| perr(&e))?;
        root.present().map_err(|e| perr(&e))?;
    }
    write(path, &svg)
}

/// Writes a heatmap of `cells` (rows × columns, each row as long) to `path` (SVG), with the
/// value of each cell printed in it; darker is larger.
pub fn heatmap(
    path: &Path,
    title: &str,
    row_desc: &str,
    col_desc: &str,
    cells: &[Vec<f64>],
) -> Result<()> {
    let rows = cells.len();
    let cols = cells.first().map_or(0, Vec::len);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 120 + 34 * rows.max(1) as u32))
            .into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(&e))?;
        let (w, h) = (cols.max(1) as f64, rows.max(1) as f64);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..w, 0.0..h)
            .map_err(|e| perr(&e))?;
        // One label per cell, at its centre.
        let centre = |v: &f64| {
            if (v.fract() - 0.5).abs() < 1e-6 {
                format!("{}", v.floor())
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(col_desc)
            .y_desc(row_desc)
            .x_labels(2 * cols.max(1) + 1)
            .y_labels(2 * rows.max(1) + 1)
            .x_label_formatter(&centre)
            .y_label_formatter(&centre)
            .draw()
            .map_err(|e| perr(&e))?;
        // A log scale: horizons range from one token to thousands.
        let logs = cells.iter().flatten().map(|v| v.max(1e-9).ln());
        let (lo, hi) = span(logs);
        for (r, row) in cells.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let f = ((v.max(1e-9).ln() - lo) / (hi - lo)).clamp(0.0, 1.0);
                let shade = (235.0 - 200.0 * f) as u8;
                let fill = RGBColor(shade, shade, 255);
                let (x, y) = (c as f64, r as f64);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        fill.filled(),
                    )))
                    .map_err(|e| perr(&e))?;
                let ink = if f > 0.6 { WHITE } else { BLACK };
                let font = ("sans-serif", 13)
                    .into_font()
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{v:.1}"),
                        (x + 0.5, y + 0.5),
                        font,
                    )))
                    .map_err(|e| perr(&e))?;
            }
        }
        root.present().map_err(|e| perr(&e))?;
    }
    write(path, &svg)
}

fn write(path: &Path, svg: &str) -> Result<()> {
    use std::io::Write;
    rwkv_core::checkpoint::write_atomic(path, |w| w.write_all(svg.as_bytes()))
}
