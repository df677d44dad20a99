//! `progdiff report --plots DIR`: PNG figures next to the report, read from the cache only.
//!
//! Per manifest `<name>`:
//! - `<name>.loss.png`: training curves, one line per `train` stage instance with a cached
//!   `metrics.jsonl` (the base model and each `finetune[i]`), loss in the top panel and mse in
//!   the bottom one, each over the instance's own steps;
//! - `<name>.<stage>.allocation.png`: a copy of each `snr-allocate` instance's allocation figure.
//!
//! Over all manifests, `fid.png`: a bar chart of FID per report row, when at least two rows
//! have an FID. Text needs a font ([`progdiff_kinds::plot::text_font`]); without one the charts
//! are drawn without text.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::prelude::*;
use progdiff_cache::Cache;
use progdiff_kinds::plot::text_font;

use crate::dag::Dag;
use crate::manifest::Manifest;
use crate::plan;
use crate::report::ReportRow;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One training curve: `(step, loss, mse)` points of a train instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    /// The train stage instance, e.g. `finetune[1]`.
    pub stage: String,
    /// `(step, loss)` points.
    pub loss: Vec<(f64, f64)>,
    /// `(step, mse)` points (absent where a line has no `mse`).
    pub mse: Vec<(f64, f64)>,
}

/// Parses a train stage's `metrics.jsonl` (lines with `step`, `loss` and `mse`).
pub fn parse_metrics(stage: &str, text: &str) -> anyhow::Result<Curve> {
    let mut c = Curve { stage: stage.into(), loss: Vec::new(), mse: Vec::new() };
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("line {} of the metrics of `{stage}`", n + 1))?;
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(l) = v["loss"].as_f64().filter(|x| x.is_finite()) {
            c.loss.push((step, l));
        }
        if let Some(m) = v["mse"].as_f64().filter(|x| x.is_finite()) {
            c.mse.push((step, m));
        }
    }
    Ok(c)
}

fn file_part(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect()
}

/// Writes manifest `m`'s figures into `dir` (created if needed); returns the files written.
pub fn write_manifest_plots(
    m: &Manifest,
    cache: &Cache,
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let dag = Dag::build(m);
    let plan = plan::plan(m, &dag, cache)?;
    // `name`, or `name/variant` for a sweep variant (`/` becomes `_` in file names).
    let label = plan::ref_namespace(m);
    let mut written = Vec::new();
    let mut curves = Vec::new();
    for (i, inst) in dag.instances.iter().enumerate() {
        let Some(record) = plan.stages[i].record.as_ref() else { continue };
        match m.stages[inst.stage].params.kind() {
            progdiff_kinds::train::KIND => {
                let Some(o) = record.outputs.get(progdiff_kinds::train::METRICS_FILE) else {
                    continue;
                };
                let bytes = cache.read_object(&o.digest)?;
                let curve = parse_metrics(&inst.id, &String::from_utf8_lossy(&bytes))?;
                if !curve.loss.is_empty() {
                    curves.push(curve);
                }
            }
            progdiff_kinds::allocate::KIND => {
                let Some(o) = record.outputs.get(progdiff_kinds::allocate::ALLOCATION_PNG) else {
                    continue;
                };
                let path = dir.join(format!(
                    "{}.{}.allocation.png",
                    file_part(&label),
                    file_part(&inst.id)
                ));
                std::fs::write(&path, cache.read_object(&o.digest)?)
                    .with_context(|| format!("writing `{}`", path.display()))?;
                written.push(path);
            }
            _ => {}
        }
    }
    if !curves.is_empty() {
        // Keep manifest order (the DAG's order is topological).
        let order: Vec<&str> = m.stages.iter().map(|s| s.name.as_str()).collect();
        curves.sort_by_key(|c| {
            let base = c.stage.split('[').next().unwrap_or(&c.stage);
            order.iter().position(|s| *s == base)
        });
        let path = dir.join(format!("{}.loss.png", file_part(&label)));
        draw_curves(&curves, &label, &path, text_font())?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `fid.png` into `dir` when at least two rows have an FID.
pub fn write_fid_bars(rows: &[ReportRow], dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let several =
        rows.iter().map(|r| &r.manifest).collect::<std::collections::BTreeSet<_>>().len() > 1;
    let bars: Vec<(String, f64)> = rows
        .iter()
        .filter_map(|r| {
            let mut name =
                if several { format!("{}: {}", r.manifest, r.label) } else { r.label.clone() };
            if let Some(v) = &r.variant {
                name.push_str(&format!(" [{v}]"));
            }
            r.fid.filter(|f| f.is_finite()).map(|f| (name, f))
        })
        .collect();
    if bars.len() < 2 {
        return Ok(None);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let path = dir.join("fid.png");
    draw_bars(&bars, &path, text_font())?;
    Ok(Some(path))
}

fn range_of<'a>(points: impl Iterator<Item = &'a (f64, f64)>) -> (f64, f64, f64, f64) {
    points.fold(
        (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY),
        |(x0, x1, y0, y1), &(x, y)| (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
    )
}

fn draw_curves(
    curves: &[Curve],
    title: &str,
    path: &Path,
    font: Option<&str>,
) -> anyhow::Result<()> {
    const SIZE: (u32, u32) = (1200, 900);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = match font {
        Some(f) => root.titled(&format!("{title}: training curves"), (f, 20))?,
        None => root,
    };
    let has_mse = curves.iter().any(|c| !c.mse.is_empty());
    fn loss(c: &Curve) -> &[(f64, f64)] {
        &c.loss
    }
    fn mse(c: &Curve) -> &[(f64, f64)] {
        &c.mse
    }
    type Series = fn(&Curve) -> &[(f64, f64)];
    let panels: Vec<(&str, Series)> =
        if has_mse { vec![("loss", loss), ("mse", mse)] } else { vec![("loss", loss)] };
    let areas = root.split_evenly((panels.len(), 1));
    for ((name, get), area) in panels.iter().zip(&areas) {
        let (x0, x1, y0, y1) = range_of(curves.iter().flat_map(|c| get(c).iter()));
        if !x0.is_finite() {
            continue;
        }
        let xpad = ((x1 - x0) * 0.02).max(0.5);
        let ypad = ((y1 - y0) * 0.05).max(1e-6);
        let mut builder = ChartBuilder::on(area);
        builder.margin(15);
        if font.is_some() {
            builder.x_label_area_size(40).y_label_area_size(70);
        }
        let mut chart = builder.build_cartesian_2d(x0 - xpad..x1 + xpad, y0 - ypad..y1 + ypad)?;
        let whole = |x: &f64| format!("{x:.0}");
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(WHITE.mix(0.0)).x_label_formatter(&whole);
        match font {
            Some(f) => {
                mesh.x_desc("step").y_desc(*name).label_style((f, 14)).axis_desc_style((f, 16));
            }
            None => {
                mesh.x_labels(0).y_labels(0);
            }
        }
        mesh.draw()?;
        for (k, c) in curves.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let points = get(c).to_vec();
            if points.is_empty() {
                continue;
            }
            let s = chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
            s.label(c.stage.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
            // Single-point curves would be invisible as lines.
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        if let Some(f) = font {
            chart
                .configure_series_labels()
                .label_font((f, 14))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

fn draw_bars(bars: &[(String, f64)], path: &Path, font: Option<&str>) -> anyhow::Result<()> {
    const SIZE: (u32, u32) = (1000, 700);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = match font {
        Some(f) => root.titled("FID per evaluation", (f, 20))?,
        None => root,
    };
    let top = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-6) * 1.15;
    let n = bars.len();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if font.is_some() {
        builder.x_label_area_size(60).y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-9 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0)).disable_x_mesh();
    match font {
        Some(f) => {
            mesh.x_labels(n)
                .x_label_formatter(&label)
                .y_desc("FID")
                .label_style((f, 14))
                .axis_desc_style((f, 16));
        }
        None => {
            mesh.x_labels(0).y_labels(0);
        }
    }
    mesh.draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        let x = i as f64;
        Rectangle::new([(x - 0.35, 0.0), (x + 0.35, *v)], PALETTE[i % PALETTE.len()].filled())
    }))?;
    if let Some(f) = font {
        let style = TextStyle::from((f, 14)).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Bottom,
        ));
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            Text::new(format!("{v:.2}"), (i as f64, *v + top * 0.01), style.clone())
        }))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_png(path: &Path) -> bool {
        let bytes = std::fs::read(path).unwrap();
        bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
    }

    #[test]
    fn parses_metrics_lines() {
        let text =
            "{\"step\":10,\"loss\":1.5,\"mse\":1.0,\"vb\":0.5}\n\n{\"step\":20,\"loss\":1.0}\n";
        let c = parse_metrics("base", text).unwrap();
        assert_eq!(c.loss, vec![(10.0, 1.5), (20.0, 1.0)]);
        assert_eq!(c.mse, vec![(10.0, 1.0)]);
        assert!(parse_metrics("base", "not json").is_err());
    }

    #[test]
    fn draws_curves_and_bars_with_and_without_text() {
        let dir = tempfile::tempdir().unwrap();
        let curves = vec![
            Curve {
                stage: "base".into(),
                loss: vec![(0.0, 2.0), (10.0, 1.0)],
                mse: vec![(0.0, 1.0), (10.0, 0.5)],
            },
            Curve { stage: "finetune[0]".into(), loss: vec![(5.0, 0.8)], mse: vec![] },
        ];
        let bars = vec![("IDDPM".to_string(), 10.0), ("ours".to_string(), 9.0)];
        let fonts: Vec<Option<&str>> = [None].into_iter().chain(text_font().map(Some)).collect();
        for (k, font) in fonts.into_iter().enumerate() {
            let p = dir.path().join(format!("curves{k}.png"));
            draw_curves(&curves, "m", &p, font).unwrap();
            assert!(is_png(&p));
            let p = dir.path().join(format!("bars{k}.png"));
            draw_bars(&bars, &p, font).unwrap();
            assert!(is_png(&p));
        }
    }
}
