//! The CaliSr plot `finetune --calisr` writes beside its log: each component's mean stable rank
//! over the probes (FFT candidate), the LFT − FFT difference whose sign SRS_D counts, and the
//! step at which each component switched.

use anyhow::{Context, Result};
use methods::calisr::CalisrState;
use std::path::Path;

pub const PLOT_FILE: &str = "calisr_srank.png";

/// `--calisr-delta`: strictly between 0 and 1 (SRS_D is a fraction; δ = 0 or 1 would switch at
/// the first or never).
pub fn open_unit(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number, got '{s}'"))?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!("must be in (0, 1), got {v}"))
    }
}

fn color(g: &str) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    match g {
        "attention" => RGBColor(31, 119, 180),
        "ffn" => RGBColor(214, 39, 40),
        _ => RGBColor(44, 160, 44),
    }
}

fn span(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08)
        .max(hi.abs().max(lo.abs()) * 1e-9)
        .max(1e-12);
    (lo - pad, hi + pad)
}

/// Draw the state of a finished (or stopped) run over `total` steps into `path` (PNG).
pub fn plot(st: &CalisrState, total: usize, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut groups: Vec<String> = st
        .probes
        .iter()
        .flat_map(|p| p.groups.keys().cloned())
        .chain(st.switched.keys().cloned())
        .collect();
    groups.sort();
    groups.dedup();
    let series = |g: &str, f: &dyn Fn(&methods::calisr::GroupProbe) -> f64| -> Vec<(f64, f64)> {
        st.probes
            .iter()
            .filter_map(|p| p.groups.get(g).map(|x| (p.step as f64, f(x))))
            .collect()
    };
    let rel = |x: &methods::calisr::GroupProbe| (x.sr_lft - x.sr_fft) / x.sr_fft.abs().max(1e-300);
    let xmax = total.max(1) as f64;
    let tmp = models::tmp::file_beside(path, ".png")
        .with_context(|| format!("{}: cannot write plot", path.display()))?;
    {
        let root = BitMapBackend::new(tmp.path(), (1000, 800)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(420);
        let (ylo, yhi) = span(
            st.probes
                .iter()
                .flat_map(|p| p.groups.values().map(|x| x.sr_fft)),
        );
        let mut ch = ChartBuilder::on(&top)
            .caption(
                "mean stable rank after the FFT update, per component",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, ylo..yhi)?;
        ch.configure_mesh()
            .x_desc("step (0-based): a probe at s may switch; update s is then lightweight")
            .y_desc("srank")
            .draw()?;
        for g in &groups {
            let col = color(g);
            let pts = series(g, &|x| x.sr_fft);
            ch.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?
                .label(g.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(3))
                });
            ch.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))?;
            if let Some(&s) = st.switched.get(g) {
                let x = s as f64;
                ch.draw_series(std::iter::once(PathElement::new(
                    vec![(x, ylo), (x, yhi)],
                    col.stroke_width(2),
                )))?
                .label(format!("{g} switched at step {s}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x + 10, y - 6), (x + 10, y + 6)], col.stroke_width(2))
                });
            }
        }
        ch.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        let (dlo, dhi) = span(
            st.probes
                .iter()
                .flat_map(|p| p.groups.values().map(rel))
                .chain([0.0]),
        );
        let mut ch = ChartBuilder::on(&bottom)
            .caption(
                "(SR(W_LFT) - SR(W_FFT)) / SR(W_FFT): below 0 counts toward SRS_D",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, dlo..dhi)?;
        ch.configure_mesh()
            .x_desc("step (0-based): a probe at s may switch; update s is then lightweight")
            .y_desc("relative difference")
            // The tick at zero comes out of plotters' arithmetic as ±1e-20 or so.
            .y_label_formatter(&|v| {
                if v.abs() < (dhi - dlo) * 1e-6 {
                    "0".to_string()
                } else {
                    format!("{v:.1e}")
                }
            })
            .draw()?;
        ch.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 0.0), (xmax, 0.0)],
            BLACK.stroke_width(1),
        )))?;
        for g in &groups {
            let col = color(g);
            let pts = series(g, &rel);
            ch.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?;
            ch.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))?;
            if let Some(&s) = st.switched.get(g) {
                let x = s as f64;
                ch.draw_series(std::iter::once(PathElement::new(
                    vec![(x, dlo), (x, dhi)],
                    col.stroke_width(2),
                )))?;
            }
        }
        root.present()?;
    }
    tmp.persist(path)
        .with_context(|| format!("{}: cannot write plot", path.display()))?;
    Ok(())
}
