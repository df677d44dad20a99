//! `progdiff report --plots DIR`: PNG figures next to the report, read from the cache only.
//!
//! Per manifest `<name>`:
//! - `<name>.loss.png`: training curves, one line per `train` stage instance with a cached
//!   `metrics.jsonl` (the base model and each `finetune[i]`), loss in the top panel and mse in
//!   the bottom one, each over the instance's own steps;
//! - `<name>.<stage>.allocation.png`: a copy of each `snr-allocate` instance's allocation figure.
//!
//! Over all manifests (from the report's rows, [`write_row_plots`]):
//! - `fid.png` and `kid.png`: a bar per report row at its mean, with the 95% confidence interval
//!   over its seeds as an error bar and each seed's value as a dot, when at least two rows have
//!   the metric;
//! - `samples/<manifest>.<stage>[.<variant>].seed<seed>.png`: each evaluation's sample grid;
//! - `samples.png`: the rows side by side, each its first seed's grid under its label.
//!
//! Text needs a font ([`progdiff_kinds::plot::text_font`]); without one the charts are drawn
//! without text.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::prelude::*;
use progdiff_cache::Cache;
use progdiff_kinds::plot::text_font;

use crate::dag::Dag;
use crate::manifest::Manifest;
use crate::plan;
use crate::report::ReportRow;
use crate::summary::Summary;

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

/// Writes the figures of the report's `rows` into `dir`: the FID and KID bars and the sample
/// grids (see the module docs); returns the files written.
pub fn write_row_plots(
    rows: &[ReportRow],
    cache: &Cache,
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    let mut written = Vec::new();
    type Metric = (&'static str, &'static str, f64, fn(&ReportRow) -> Option<Summary>);
    let metrics: [Metric; 2] =
        [("fid", "FID", 1.0, |r| r.stats.fid), ("kid", "KID ×10³", 1e3, |r| r.stats.kid)];
    for (file, name, scale, get) in metrics {
        let bars = bars_of(rows, get, |r| match file {
            "fid" => r.seeds.iter().filter_map(|s| s.fid).collect(),
            _ => r.seeds.iter().filter_map(|s| s.kid).collect(),
        });
        if bars.len() < 2 {
            continue;
        }
        let bars: Vec<Bar> = bars.into_iter().map(|b| b.scaled(scale)).collect();
        let path = dir.join(format!("{file}.png"));
        draw_bars(&bars, name, &path, text_font())?;
        written.push(path);
    }
    written.extend(write_sample_grids(rows, cache, dir)?);
    Ok(written)
}

/// A row's name in figures: its label, the manifest's name first when there are several, the
/// variant after.
fn row_name(r: &ReportRow, several: bool) -> String {
    let mut name = if several { format!("{}: {}", r.manifest, r.label) } else { r.label.clone() };
    if let Some(v) = &r.variant {
        name.push_str(&format!(" [{v}]"));
    }
    name
}

fn several_manifests(rows: &[ReportRow]) -> bool {
    rows.iter().map(|r| &r.manifest).collect::<std::collections::BTreeSet<_>>().len() > 1
}

/// One bar: a row's mean, its 95% interval over seeds (when it has several) and each seed's
/// value.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    /// The row's name.
    pub name: String,
    /// Mean over seeds.
    pub mean: f64,
    /// `[low, high]` of the 95% confidence interval of the mean.
    pub interval: Option<(f64, f64)>,
    /// Each seed's value.
    pub points: Vec<f64>,
}

impl Bar {
    fn scaled(self, k: f64) -> Bar {
        Bar {
            name: self.name,
            mean: self.mean * k,
            interval: self.interval.map(|(a, b)| (a * k, b * k)),
            points: self.points.into_iter().map(|p| p * k).collect(),
        }
    }
}

fn bars_of(
    rows: &[ReportRow],
    summary: impl Fn(&ReportRow) -> Option<Summary>,
    points: impl Fn(&ReportRow) -> Vec<f64>,
) -> Vec<Bar> {
    let several = several_manifests(rows);
    rows.iter()
        .filter_map(|r| {
            let s = summary(r).filter(|s| s.mean.is_finite())?;
            Some(Bar {
                name: row_name(r, several),
                mean: s.mean,
                interval: s.ci95.filter(|c| c.is_finite()).map(|_| s.interval()),
                points: if s.n > 1 { points(r) } else { Vec::new() },
            })
        })
        .collect()
}

/// Where an error bar was drawn, in pixels of the PNG: the whisker's column and its low and
/// high rows (for tests).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Whisker {
    /// Pixel column of the whisker.
    pub x: i32,
    /// Pixel row of the interval's upper end (smaller y).
    pub top: i32,
    /// Pixel row of the interval's lower end.
    pub bottom: i32,
}

/// The colour of error bars.
pub const WHISKER: RGBColor = BLACK;

/// A bar chart of `bars` with their intervals as error bars; returns where each bar's whisker
/// went.
pub fn draw_bars(
    bars: &[Bar],
    metric: &str,
    path: &Path,
    font: Option<&str>,
) -> anyhow::Result<Vec<Option<Whisker>>> {
    const SIZE: (u32, u32) = (1000, 700);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let any_interval = bars.iter().any(|b| b.interval.is_some());
    let title = if any_interval {
        format!("{metric} per evaluation (mean, 95% CI over seeds, seeds as dots)")
    } else {
        format!("{metric} per evaluation")
    };
    let root = match font {
        Some(f) => root.titled(&title, (f, 20))?,
        None => root,
    };
    let highest = |b: &Bar| {
        let top = b.interval.map_or(b.mean, |(_, hi)| hi.max(b.mean));
        b.points.iter().copied().fold(top, f64::max)
    };
    let lowest = |b: &Bar| {
        let low = b.interval.map_or(b.mean, |(lo, _)| lo.min(b.mean));
        b.points.iter().copied().fold(low, f64::min)
    };
    let top = bars.iter().map(highest).fold(0.0f64, f64::max).max(1e-6) * 1.15;
    // KID can be negative (it is unbiased): let the axis go below 0 when a value does.
    let bottom = bars.iter().map(lowest).fold(0.0f64, f64::min) * 1.15;
    let n = bars.len();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if font.is_some() {
        builder.x_label_area_size(60).y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(-0.5..n as f64 - 0.5, bottom..top)?;
    let names: Vec<String> = bars.iter().map(|b| b.name.clone()).collect();
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
                .y_desc(metric)
                .label_style((f, 14))
                .axis_desc_style((f, 16));
        }
        None => {
            mesh.x_labels(0).y_labels(0);
        }
    }
    mesh.draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let x = i as f64;
        Rectangle::new([(x - 0.35, 0.0), (x + 0.35, b.mean)], PALETTE[i % PALETTE.len()].filled())
    }))?;
    let mut whiskers = Vec::new();
    for (i, b) in bars.iter().enumerate() {
        let x = i as f64;
        let Some((lo, hi)) = b.interval else {
            whiskers.push(None);
            continue;
        };
        let style = WHISKER.stroke_width(2);
        chart.draw_series([
            PathElement::new(vec![(x, lo), (x, hi)], style),
            PathElement::new(vec![(x - 0.1, lo), (x + 0.1, lo)], style),
            PathElement::new(vec![(x - 0.1, hi), (x + 0.1, hi)], style),
        ])?;
        let (px, top) = chart.backend_coord(&(x, hi));
        let (_, bottom) = chart.backend_coord(&(x, lo));
        whiskers.push(Some(Whisker { x: px, top, bottom }));
        // The seeds' own values, beside the whisker.
        chart.draw_series(b.points.iter().enumerate().map(|(k, &p)| {
            let dx = 0.18 + 0.04 * (k % 3) as f64;
            Circle::new((x + dx, p), 3, RGBColor(60, 60, 60).filled())
        }))?;
    }
    if let Some(f) = font {
        let style = TextStyle::from((f, 14)).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Bottom,
        ));
        chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
            let text = match b.interval {
                Some((lo, hi)) => format!("{:.2} ± {:.2}", b.mean, (hi - lo) / 2.0),
                None => format!("{:.2}", b.mean),
            };
            let y = b.interval.map_or(b.mean, |(_, hi)| hi.max(b.mean));
            Text::new(text, (i as f64, y + top * 0.01), style.clone())
        }))?;
    }
    root.present()?;
    Ok(whiskers)
}

/// An 8-bit image decoded from a PNG: RGB, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `[height, width, 3]`.
    pub pixels: Vec<u8>,
}

impl Rgb {
    /// Decodes a PNG (gray, gray + alpha, RGB or RGBA, any bit depth, palettes) to 8-bit RGB.
    pub fn decode(bytes: &[u8]) -> anyhow::Result<Rgb> {
        let mut decoder = png::Decoder::new(bytes);
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder.read_info()?;
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf)?;
        let channels = info.color_type.samples();
        let (w, h) = (info.width, info.height);
        let mut pixels = Vec::with_capacity((w * h * 3) as usize);
        for px in buf[..info.buffer_size()].chunks_exact(channels) {
            match channels {
                1 | 2 => pixels.extend([px[0]; 3]),
                _ => pixels.extend(&px[..3]),
            }
        }
        Ok(Rgb { width: w, height: h, pixels })
    }

    /// The pixel at `(x, y)`.
    pub fn at(&self, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * self.width + x) * 3) as usize;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// Each evaluation's sample grid under `dir/samples/`, and `dir/samples.png` with every row's
/// (first evaluated seed's) grid side by side under its name.
fn write_sample_grids(
    rows: &[ReportRow],
    cache: &Cache,
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let several = several_manifests(rows);
    let mut written = Vec::new();
    let mut panels: Vec<(String, Rgb)> = Vec::new();
    for r in rows {
        let mut first = None;
        for s in &r.seeds {
            let Some(digest) = s.grid else { continue };
            let bytes = cache.read_object(&digest)?;
            let mut name = format!("{}.{}", file_part(&r.manifest), file_part(&r.stage));
            if let Some(v) = &r.variant {
                name.push_str(&format!(".{}", file_part(v)));
            }
            let sub = dir.join("samples");
            std::fs::create_dir_all(&sub)
                .with_context(|| format!("creating `{}`", sub.display()))?;
            let path = sub.join(format!("{name}.seed{}.png", s.seed));
            std::fs::write(&path, &bytes)
                .with_context(|| format!("writing `{}`", path.display()))?;
            written.push(path);
            if first.is_none() {
                first = Some((s.seed, bytes));
            }
        }
        if let Some((seed, bytes)) = first {
            let mut name = row_name(r, several);
            if r.seeds.len() > 1 {
                name.push_str(&format!(" (seed {seed})"));
            }
            panels.push((name, Rgb::decode(&bytes)?));
        }
    }
    if !panels.is_empty() {
        let path = dir.join("samples.png");
        draw_side_by_side(&panels, &path, text_font())?;
        written.push(path);
    }
    Ok(written)
}

/// The panels' images side by side (at most four a line), each scaled by a whole factor to
/// about 300 pixels and labelled above.
pub fn draw_side_by_side(
    panels: &[(String, Rgb)],
    path: &Path,
    font: Option<&str>,
) -> anyhow::Result<()> {
    const TARGET: u32 = 300;
    const LABEL: u32 = 40;
    const GAP: u32 = 20;
    let per_line = panels.len().min(4) as u32;
    let lines = (panels.len() as u32).div_ceil(per_line);
    let scale = |img: &Rgb| (TARGET / img.width.max(img.height).max(1)).max(1);
    let cell_w = panels.iter().map(|(_, i)| i.width * scale(i)).max().unwrap_or(1);
    let cell_h = panels.iter().map(|(_, i)| i.height * scale(i)).max().unwrap_or(1);
    let label = if font.is_some() { LABEL } else { 0 };
    let size = (GAP + per_line * (cell_w + GAP), GAP + lines * (label + cell_h + GAP));
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    for (k, (name, img)) in panels.iter().enumerate() {
        let k = k as u32;
        let (x0, y0) =
            (GAP + (k % per_line) * (cell_w + GAP), GAP + (k / per_line) * (label + cell_h + GAP));
        if let Some(f) = font {
            // At most two lines within the panel's width (a long label would run into the
            // next panel's): wrapped at spaces, the rest cut with an ellipsis.
            let style = TextStyle::from((f, 15)).color(&BLACK);
            let fits = |t: &str| root.estimate_text_size(t, &style).is_ok_and(|(w, _)| w <= cell_w);
            for (i, line) in wrap_label(name, 2, &fits).iter().enumerate() {
                root.draw_text(line, &style, (x0 as i32, y0 as i32 + 2 + 18 * i as i32))?;
            }
        }
        let s = scale(img);
        for y in 0..img.height * s {
            for x in 0..img.width * s {
                let [r, g, b] = img.at(x / s, y / s);
                root.draw_pixel(((x0 + x) as i32, (y0 + label + y) as i32), &RGBColor(r, g, b))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// `text` in at most `lines` lines that each `fits`: words wrapped greedily, a word too long
/// for a line cut, and the last line ended with `…` when text is left over.
fn wrap_label(text: &str, lines: usize, fits: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut words = text.split_whitespace().peekable();
    let mut cut = false;
    while out.len() < lines && !cut {
        let Some(first) = words.next() else { break };
        let mut line = first.to_string();
        while !fits(&line) && line.chars().count() > 1 {
            line.pop();
            cut = true;
        }
        while let Some(w) = words.peek().filter(|_| !cut) {
            let candidate = format!("{line} {w}");
            if !fits(&candidate) {
                break;
            }
            line = candidate;
            words.next();
        }
        out.push(line);
    }
    if (cut || words.peek().is_some())
        && let Some(last) = out.last_mut()
    {
        loop {
            let candidate = format!("{last}…");
            if fits(&candidate) || last.is_empty() {
                *last = candidate;
                break;
            }
            last.pop();
        }
    }
    out
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
        let bars = vec![
            Bar { name: "IDDPM".into(), mean: 10.0, interval: None, points: vec![] },
            Bar {
                name: "ours".into(),
                mean: 9.0,
                interval: Some((8.0, 10.0)),
                points: vec![8.5, 9.5],
            },
        ];
        let fonts: Vec<Option<&str>> = [None].into_iter().chain(text_font().map(Some)).collect();
        for (k, font) in fonts.into_iter().enumerate() {
            let p = dir.path().join(format!("curves{k}.png"));
            draw_curves(&curves, "m", &p, font).unwrap();
            assert!(is_png(&p));
            let p = dir.path().join(format!("bars{k}.png"));
            draw_bars(&bars, "FID", &p, font).unwrap();
            assert!(is_png(&p));
        }
    }

    /// Issue 13: the bars decode as PNG and each interval is drawn as an error bar where it
    /// belongs: the whisker's column is drawn in its colour from the interval's low end to its
    /// high end, and a bar without an interval gets none.
    #[test]
    fn bars_show_intervals_as_error_bars() {
        let dir = tempfile::tempdir().unwrap();
        let bars = vec![
            Bar {
                name: "a".into(),
                mean: 10.0,
                interval: Some((6.0, 14.0)),
                points: vec![7.0, 12.0, 11.0],
            },
            Bar { name: "b".into(), mean: 5.0, interval: None, points: vec![] },
            Bar {
                name: "c".into(),
                mean: -1.0,
                interval: Some((-2.5, 0.5)),
                points: vec![-2.0, 0.0],
            },
        ];
        let fonts: Vec<Option<&str>> = [None].into_iter().chain(text_font().map(Some)).collect();
        for (k, font) in fonts.into_iter().enumerate() {
            let p = dir.path().join(format!("bars{k}.png"));
            let whiskers = draw_bars(&bars, "FID", &p, font).unwrap();
            let img = Rgb::decode(&std::fs::read(&p).unwrap()).unwrap();
            assert_eq!((img.width, img.height), (1000, 700));
            assert!(whiskers[1].is_none());
            let black = [WHISKER.0, WHISKER.1, WHISKER.2];
            for w in [whiskers[0].unwrap(), whiskers[2].unwrap()] {
                assert!(w.bottom - w.top > 20, "{w:?}");
                for y in w.top..=w.bottom {
                    assert_eq!(img.at(w.x as u32, y as u32), black, "{w:?} at y {y}");
                }
                // Nothing of the whisker's colour beyond its ends (the bar is coloured, the
                // background white).
                for y in [w.top - 6, w.bottom + 6] {
                    assert_ne!(img.at(w.x as u32, y as u32), black, "{w:?} at y {y}");
                }
            }
            // The interval around 10 spans 8 units; the one around -1 spans 3.
            let (a, c) = (whiskers[0].unwrap(), whiskers[2].unwrap());
            let ratio = (a.bottom - a.top) as f64 / (c.bottom - c.top) as f64;
            assert!((ratio - 8.0 / 3.0).abs() < 0.1, "{ratio}");
        }
    }

    #[test]
    fn long_labels_wrap_into_two_lines_and_end_with_an_ellipsis() {
        let fits = |t: &str| t.chars().count() <= 12;
        assert_eq!(wrap_label("short", 2, &fits), ["short"]);
        assert_eq!(
            wrap_label("two-stage training (Table 2)", 2, &fits),
            ["two-stage", "training…"]
        );
        assert_eq!(wrap_label("full strategy (seed 0)", 2, &fits), ["full", "strategy…"]);
        assert_eq!(wrap_label("abcdefghijklmnopq", 2, &fits), ["abcdefghijk…"]);
    }

    #[test]
    fn side_by_side_figure_scales_each_grid() {
        let dir = tempfile::tempdir().unwrap();
        // A 4x2 gray image: one white pixel at (3, 1), the rest black.
        let mut gray = vec![0u8; 8];
        gray[7] = 255;
        let src = dir.path().join("g.png");
        {
            let f = std::fs::File::create(&src).unwrap();
            let mut e = png::Encoder::new(std::io::BufWriter::new(f), 4, 2);
            e.set_color(png::ColorType::Grayscale);
            e.set_depth(png::BitDepth::Eight);
            e.write_header().unwrap().write_image_data(&gray).unwrap();
        }
        let img = Rgb::decode(&std::fs::read(&src).unwrap()).unwrap();
        assert_eq!((img.width, img.height, img.at(3, 1), img.at(0, 0)), (4, 2, [255; 3], [0; 3]));
        let out = dir.path().join("side.png");
        draw_side_by_side(&[("a".into(), img.clone()), ("b".into(), img)], &out, None).unwrap();
        let fig = Rgb::decode(&std::fs::read(&out).unwrap()).unwrap();
        // Scale 75 (300 / 4): panels of 300 x 150, 20-pixel gaps, no labels without a font.
        assert_eq!((fig.width, fig.height), (20 + 2 * 320, 20 + 170));
        assert_eq!(fig.at(20 + 3 * 75 + 10, 20 + 75 + 10), [255; 3]);
        assert_eq!(fig.at(20 + 10, 20 + 10), [0; 3]);
        assert_eq!(fig.at(340 + 3 * 75 + 10, 20 + 75 + 10), [255; 3]);
        assert_eq!(fig.at(330, 100), [255; 3]); // the gap between the panels
    }
}
