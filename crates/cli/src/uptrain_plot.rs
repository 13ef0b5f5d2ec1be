//! The PNG of an uptraining run, from its CSV files: the training objective against tokens
//! seen, and the held-out perplexity after each loop (log scale), with each loop's agreement
//! with the last loop.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::bench::plot::{load_font, COLORS};

/// Columns of a CSV file by header name.
fn columns(path: &Path) -> anyhow::Result<Vec<(String, Vec<f64>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(String::from)
        .collect();
    let mut cols: Vec<(String, Vec<f64>)> = header.into_iter().map(|h| (h, Vec::new())).collect();
    for line in lines {
        for (c, v) in cols.iter_mut().zip(line.split(',')) {
            c.1.push(v.parse().unwrap_or(f64::NAN));
        }
    }
    Ok(cols)
}

fn column<'a>(cols: &'a [(String, Vec<f64>)], name: &str) -> &'a [f64] {
    cols.iter()
        .find(|c| c.0 == name)
        .map_or(&[], |c| c.1.as_slice())
}

pub fn write(train_csv: &Path, eval_csv: &Path, out: &Path, font: &Path) -> anyhow::Result<()> {
    load_font(font)?;
    let (train, eval) = (columns(train_csv)?, columns(eval_csv)?);
    let root = BitMapBackend::new(out, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled("uptraining", ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(700);
    let tokens = column(&train, "tokens");
    let objective = column(&train, "objective");
    let points: Vec<(f64, f64)> = tokens
        .iter()
        .copied()
        .zip(objective.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let x1 = tokens.iter().copied().fold(1.0, f64::max);
    let y1 = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1e-9;
    let mut chart = ChartBuilder::on(&left)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x1, 0.0..y1)?;
    chart
        .configure_mesh()
        .x_desc("training tokens")
        .x_label_formatter(&tokens_label)
        .y_desc("objective per token")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(LineSeries::new(points, COLORS[0].stroke_width(2)))?;

    let eval_tokens = column(&eval, "tokens");
    let loops: Vec<&(String, Vec<f64>)> = eval
        .iter()
        .filter(|c| c.0.starts_with("perplexity_loop"))
        .collect();
    let (lo, hi) = loops
        .iter()
        .flat_map(|c| c.1.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() {
        (lo / 1.2, hi * 1.2)
    } else {
        (1.0, 10.0)
    };
    let ex1 = eval_tokens.iter().copied().fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..ex1, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("training tokens")
        .x_label_formatter(&tokens_label)
        .y_desc("held-out perplexity")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, values)) in loops.iter().map(|c| (&c.0, &c.1)).enumerate() {
        let c = COLORS[(i + 1) % COLORS.len()];
        let pts: Vec<(f64, f64)> = eval_tokens
            .iter()
            .copied()
            .zip(values.iter().copied())
            .filter(|p| p.1.is_finite() && p.1 > 0.0)
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(name.replace("perplexity_", "after "))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// A token count as an axis label: 250k, 1.5M.
fn tokens_label(x: &f64) -> String {
    match x.abs() {
        v if v >= 1e6 => format!("{:.1}M", x / 1e6),
        v if v >= 1e3 => format!("{:.0}k", x / 1e3),
        _ => format!("{x:.0}"),
    }
}
