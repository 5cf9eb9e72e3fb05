//! Training curves as SVG: the training loss (log scale) and one validation metric against the
//! step, read back from a run's `metrics.jsonl`.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// `(step, value)` series of `key` in the lines of `split` (`train` / `val`).
pub fn series(metrics: &Path, split: &str, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == split)
        .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect())
}

fn bounds(points: &[(f64, f64)]) -> (f64, f64, f64, f64) {
    let x1 = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y0 = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y1 = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    (0.0, x1, y0, y1)
}

/// Draws `stage`'s training loss and validation `val_key` (labelled `val_label`) side by side.
pub fn training_curves(
    metrics: &Path,
    out: &Path,
    stage: &str,
    val_key: &str,
    val_label: &str,
) -> Result<()> {
    let train = series(metrics, "train", "loss")?;
    let val = series(metrics, "val", val_key)?;
    anyhow::ensure!(
        !train.is_empty(),
        "{} has no training loss to plot",
        metrics.display()
    );
    let root = SVGBackend::new(out, (900, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(450);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let (x0, x1, y0, y1) = bounds(&train);
        let mut chart = ChartBuilder::on(&left)
            .caption(format!("{stage}: training loss"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, (y0.max(1e-12) * 0.9..y1 * 1.1).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()?;
        chart.draw_series(LineSeries::new(train.iter().copied(), &BLUE))?;
        if !val.is_empty() {
            let (_, _, v0, v1) = bounds(&val);
            let pad = ((v1 - v0).abs() * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(&right)
                .caption(format!("{stage}: {val_label}"), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, v0 - pad..v1 + pad)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(val_label)
                .draw()?;
            chart.draw_series(LineSeries::new(val.iter().copied(), &RED))?;
            chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_drawn_from_a_metrics_log() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let mut lines = String::new();
        for s in 1..=20u64 {
            lines.push_str(&format!(
                "{{\"step\":{s},\"split\":\"train\",\"loss\":{}}}\n",
                1.0 / s as f64
            ));
            if s % 5 == 0 {
                lines.push_str(&format!(
                    "{{\"step\":{s},\"split\":\"val\",\"psnr_db\":{}}}\n",
                    10.0 + s as f64
                ));
            }
        }
        std::fs::write(&metrics, lines).unwrap();
        assert_eq!(series(&metrics, "val", "psnr_db").unwrap().len(), 4);
        let out = dir.path().join("curves.svg");
        training_curves(&metrics, &out, "vae", "psnr_db", "PSNR (dB)").unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(
            svg.starts_with("<svg")
                && svg.contains("vae: training loss")
                && svg.contains("polyline"),
            "{}",
            &svg[..200.min(svg.len())]
        );
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "").unwrap();
        assert!(training_curves(&empty, &out, "vae", "psnr_db", "PSNR").is_err());
    }
}
