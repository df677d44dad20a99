//! The allocation plot: SNR (top) and FLOPs ratio with the group bounds (bottom) over
//! timesteps, with the group boundaries as vertical lines (the paper's Fig. 3 and 4).

use std::ops::Range;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::allocation::Allocation;
use crate::plot::text_font;

const SIZE: (u32, u32) = (1200, 900);
const BOUNDARY: RGBColor = RGBColor(160, 160, 160);
const CURVE: RGBColor = RGBColor(31, 119, 180);
const BOUND: RGBColor = RGBColor(214, 39, 40);

/// Draws `alloc` as a two-panel PNG at `path`. Text (title, axes, legend, group indices) needs
/// a font ([`crate::plot::text_font`]); without one the chart is drawn without text.
pub fn plot_png(alloc: &Allocation, path: &Path) -> anyhow::Result<()> {
    draw(alloc, path, text_font())
}

fn draw(alloc: &Allocation, path: &Path, font: Option<&str>) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = match font {
        Some(f) => {
            let snr = match alloc.snr_source {
                Some(s) => format!(" (SNR of {} T={})", s.schedule.name(), s.steps),
                None => String::new(),
            };
            let title = format!(
                "{} T={}{snr}, {} schedule, k={}, N={}, clipped steps: {}; mean FLOPs bound {:.3} F",
                alloc.noise_schedule.name(),
                alloc.steps,
                alloc.flops_schedule.name(),
                alloc.k,
                alloc.groups.len(),
                alloc.clipped.name(),
                alloc.mean_flops_bound,
            );
            root.titled(&title, (f, 20))?
        }
        None => root,
    };
    let (top, bottom) = root.split_vertically(SIZE.1 / 2 - 20);

    let steps = alloc.steps;
    let x_range = -0.5..steps as f64 - 0.5;
    // Group boundaries: between t-1 and t wherever the group changes.
    let group: Vec<usize> = {
        let mut g = vec![0; steps];
        for grp in &alloc.groups {
            for &t in &grp.timesteps {
                g[t] = grp.index;
            }
        }
        g
    };
    let boundaries: Vec<f64> =
        (1..steps).filter(|&t| group[t] != group[t - 1]).map(|t| t as f64 - 0.5).collect();

    // Top: SNR (eq. 7).
    let (lo, hi) = min_max(&alloc.snr_db);
    let pad = ((hi - lo) * 0.05).max(1.0);
    let snr_points = alloc.snr_db.iter().enumerate().map(|(t, &s)| (t as f64, s));
    panel(&top, font, x_range.clone(), lo - pad..hi + pad, "SNR (dB)", &boundaries, |chart| {
        chart
            .draw_series(LineSeries::new(snr_points, CURVE.stroke_width(2)))?
            .label("SNR (eq. 7)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], CURVE.stroke_width(2)));
        Ok(())
    })?;

    // Bottom: per-timestep FLOPs ratio (eq. 8) and each group's bound (eq. 9) as steps.
    let bounds = alloc.bound_per_timestep();
    let (rlo, _) = min_max(&alloc.flops_ratio);
    let y_range = rlo.min(alloc.k) - 0.05..1.08;
    let ratio_points = alloc.flops_ratio.iter().enumerate().map(|(t, &r)| (t as f64, r));
    let step_points: Vec<(f64, f64)> = bounds
        .iter()
        .enumerate()
        .flat_map(|(t, &b)| [(t as f64 - 0.5, b), (t as f64 + 0.5, b)])
        .collect();
    panel(&bottom, font, x_range, y_range, "FLOPs / F", &boundaries, |chart| {
        chart
            .draw_series(LineSeries::new(ratio_points, CURVE.stroke_width(2)))?
            .label("FLOPs ratio (eq. 8)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], CURVE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(step_points, BOUND.stroke_width(2)))?
            .label("group bound (eq. 9)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BOUND.stroke_width(2)));
        if let Some(f) = font {
            // Group indices above their bound, where the group is wide enough to label.
            let min_width = steps as f64 * 24.0 / SIZE.0 as f64;
            for g in &alloc.groups {
                let width = (g.t_max - g.t_min + 1) as f64;
                let contiguous = g.timesteps.len() == g.t_max - g.t_min + 1;
                if contiguous && width >= min_width {
                    let x = (g.t_min + g.t_max) as f64 / 2.0;
                    let style = TextStyle::from((f, 14)).pos(Pos::new(HPos::Center, VPos::Bottom));
                    chart.draw_series(std::iter::once(Text::new(
                        format!("g{}", g.index),
                        (x, g.flops_bound + 0.01),
                        style,
                    )))?;
                }
            }
        }
        Ok(())
    })?;

    root.present()?;
    Ok(())
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// One panel: axes (with text when there is a font), the group boundaries, then `series`.
fn panel<'b>(
    area: &DrawingArea<BitMapBackend<'b>, Shift>,
    font: Option<&str>,
    x: Range<f64>,
    y: Range<f64>,
    y_desc: &str,
    boundaries: &[f64],
    series: impl FnOnce(&mut Chart<'_, 'b>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (y_lo, y_hi) = (y.start, y.end);
    let mut builder = ChartBuilder::on(area);
    builder.margin(15);
    if font.is_some() {
        builder.x_label_area_size(40).y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(x, y)?;
    let whole = |x: &f64| format!("{x:.0}");
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0)).x_label_formatter(&whole);
    match font {
        Some(f) => {
            mesh.x_desc("timestep t").y_desc(y_desc).label_style((f, 14)).axis_desc_style((f, 16));
        }
        None => {
            mesh.x_labels(0).y_labels(0);
        }
    }
    mesh.draw()?;
    for &b in boundaries {
        chart.draw_series(LineSeries::new([(b, y_lo), (b, y_hi)], BOUNDARY.stroke_width(1)))?;
    }
    series(&mut chart)?;
    if let Some(f) = font {
        chart
            .configure_series_labels()
            .label_font((f, 14))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    Ok(())
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocate::{AllocateParams, FlopsSchedule, allocate};
    use crate::schedule::NoiseSchedule;

    fn is_png(path: &Path) -> bool {
        let bytes = std::fs::read(path).unwrap();
        bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
    }

    #[test]
    fn draws_with_and_without_text() {
        let dir = tempfile::tempdir().unwrap();
        let a = allocate(NoiseSchedule::Cosine, 4000, &AllocateParams::default()).unwrap();
        // Without a font nothing may ask for text: plotters' default family is never
        // registered, so any text drawn would fail here.
        let bare = dir.path().join("bare.png");
        draw(&a, &bare, None).unwrap();
        assert!(is_png(&bare));
        if let Some(font) = text_font() {
            let full = dir.path().join("full.png");
            draw(&a, &full, Some(font)).unwrap();
            assert!(is_png(&full));
        }
        let p = AllocateParams { schedule: FlopsSchedule::Decreasing, ..AllocateParams::default() };
        let d = allocate(NoiseSchedule::Linear, 1000, &p).unwrap();
        plot_png(&d, &dir.path().join("decreasing.png")).unwrap();
    }
}
