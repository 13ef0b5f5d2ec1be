//! The PNG of `rrt bench scale`: for each cluster size a row of bar charts (p99 time to first
//! token, p99 end-to-end latency, share of prompt tokens served from cache), one bar per run
//! (policy, and router replicas), so the policies compare at a glance.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

use super::plot::{load_font, COLORS};

/// One run's bar values.
pub struct Bar {
    pub label: String,
    pub p99_ttft: f64,
    pub p99_e2e: f64,
    /// 0..1
    pub hit_rate: f64,
}

/// What a chart shows of a bar.
type Metric = fn(&Bar) -> f64;

/// One cluster size's runs.
pub struct Row {
    pub title: String,
    pub bars: Vec<Bar>,
}

pub fn write_png(title: &str, rows: &[Row], out: &Path, font: &Path) -> anyhow::Result<PathBuf> {
    load_font(font)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let height = 60 + 330 * rows.len().max(1) as u32;
    let root = BitMapBackend::new(out, (1500, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 17))?;
    for (row, area) in rows.iter().zip(root.split_evenly((rows.len().max(1), 1))) {
        let area = area.titled(&row.title, ("sans-serif", 18))?;
        let cells = area.split_evenly((1, 3));
        let metrics: [(&str, Metric); 3] = [
            ("p99 time to first token (s)", |b| b.p99_ttft),
            ("p99 end-to-end latency (s)", |b| b.p99_e2e),
            ("prompt tokens served from cache (%)", |b| {
                100.0 * b.hit_rate
            }),
        ];
        for (cell, (name, value)) in cells.iter().zip(metrics) {
            bars(cell, name, &row.bars, value)?;
        }
    }
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}

fn bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    y_label: &str,
    bars: &[Bar],
    value: Metric,
) -> anyhow::Result<()> {
    let top = bars
        .iter()
        .map(value)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.15;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .caption(y_label, ("sans-serif", 15))
        // A segmented range has a segment per value, its end included: n bars are 0..n - 1.
        .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), 0.0..top.max(1e-3))?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 11))
        .label_style(("sans-serif", 12))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let v = value(b);
        let v = if v.is_finite() { v } else { 0.0 };
        let c = COLORS[i % COLORS.len()];
        let mut r = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), v),
            ],
            c.filled(),
        );
        r.set_margin(0, 0, 6, 6);
        r
    }))?;
    Ok(())
}
