//! The PNG of `rrt bench engine`: throughput and agreement with full-depth greedy decoding
//! against the confidence-exit threshold, with the threshold-free runs (CSB, CDB without
//! exits, oracle replay) as horizontal references. Text is drawn with a TrueType font read
//! from disk (`make deps` installs DejaVu Sans).

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// One series of the plot: a label and `(threshold, value)` points, or a constant reference.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

pub struct ThresholdPlot {
    pub title: String,
    /// Tokens/s of the threshold runs, and the references drawn as flat lines.
    pub throughput: Vec<Series>,
    pub throughput_refs: Vec<(String, f64)>,
    /// Agreement with full depth (%) of the threshold runs, and its references.
    pub agreement: Vec<Series>,
    pub agreement_refs: Vec<(String, f64)>,
}

/// Makes `font` the plot's sans-serif face (once per process).
pub fn load_font(font: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "reading the plot font {} (install fonts-dejavu-core: `make deps`, or pass --font)",
            font.display()
        )
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a TrueType font", font.display()))
}

pub const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub fn write_png(plot: &ThresholdPlot, out: &Path, font: &Path) -> anyhow::Result<PathBuf> {
    load_font(font)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let root = BitMapBackend::new(out, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&plot.title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(700);
    panel(
        &left,
        "tokens/s",
        &plot.throughput,
        &plot.throughput_refs,
        None,
    )?;
    panel(
        &right,
        "agreement with full-depth greedy (%)",
        &plot.agreement,
        &plot.agreement_refs,
        Some(100.0),
    )?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    y_label: &str,
    series: &[Series],
    refs: &[(String, f64)],
    y_max: Option<f64>,
) -> anyhow::Result<()> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0 - 0.05, x1 + 0.05)
    } else {
        (0.0, 1.0)
    };
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(refs.iter().map(|r| r.1));
    let top = ys.fold(0.0f64, f64::max);
    let top = y_max.unwrap_or(top * 1.15).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("max-probability exit threshold")
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    let mut color = 0;
    for s in series {
        let c = COLORS[color % COLORS.len()];
        color += 1;
        chart
            .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    for (label, y) in refs {
        let c = COLORS[color % COLORS.len()];
        color += 1;
        chart
            .draw_series(LineSeries::new(vec![(x0, *y), (x1, *y)], c.stroke_width(1)))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    Ok(())
}
