//! `mpolm spectrum`: its flags, printing, the JSON report and the PNG plot of
//! `methods::spectrum::analyse` (factor shapes, full bonds, per-bond Schmidt spectra and
//! entanglement entropies, the error-bound-vs-parameters curve).

use crate::report::Report;
use crate::{load, range};
use anyhow::{Context, Result};
use methods::mpop::{self, Shapes};
use methods::spectrum::MatrixSpectrum;
use models::Model;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct SpectrumArgs {
    pub model: String,
    /// Comma-separated substrings or globs of module names (e.g. "layers.0.*,lm_head"); default all.
    #[arg(long, value_delimiter = ',')]
    pub matrices: Vec<String>,
    /// Number of MPO sites (cores), 1..=12.
    #[arg(long, default_value_t = 5, value_parser = range::sites, allow_negative_numbers = true)]
    pub n: usize,
    /// Factor shapes: `auto` (balanced) or `paper` (the papers' tables where they apply).
    #[arg(long, default_value = "auto", value_parser = ["auto", "paper"])]
    pub shapes: String,
    /// Write a PNG plot of the spectra and error curves.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(a: SpectrumArgs, lo: &models::LoadOptions, rep: &mut Report) -> Result<()> {
    let SpectrumArgs {
        model,
        matrices,
        n,
        shapes,
        plot,
    } = a;
    anyhow::ensure!(n >= 1, "--n must be at least 1");
    let m = load(&model, lo)?;
    let o = Options {
        patterns: matrices,
        n,
        paper_shapes: shapes == "paper",
        plot: plot.as_deref(),
    };
    let specs = analyse(&m, &o)?;
    println!(
        "{:<40} {:>11} {:>22} {:>10} {:>7} {:>9} {:>10}",
        "matrix", "shape", "full bonds", "params", "ratio", "C share", "max S"
    );
    for s in &specs {
        let mp = &s.mpo;
        let maxs = mp.entropies().iter().cloned().fold(0.0f64, f64::max);
        println!(
            "{:<40} {:>11} {:>22} {:>10} {:>7.3} {:>8.1}% {:>10.3}",
            s.name,
            format!("{}x{}", mp.orig_rows, mp.orig_cols),
            format!("{:?}", &mp.bond_dims[1..mp.bond_dims.len() - 1]),
            mp.num_params(),
            mp.ratio(),
            100.0 * mp.central_share(),
            maxs
        );
        // Where a 50% parameter budget lands on the bound curve, as a quick guide.
        if let Some((r, b, e)) = s.half_budget {
            println!(
                "{:<40}   at {:.0}% params: relative error {:.4} (bound {:.4})",
                "",
                100.0 * r,
                e,
                b
            );
        }
    }
    if let Some(p) = &plot {
        println!("plot written to {}", p.display());
    }
    rep.set("command", json!("spectrum"));
    rep.set("model", json!(model));
    rep.set("n", json!(n));
    rep.set("shapes", json!(shapes));
    rep.set(
        "matrices",
        json!(specs.iter().map(to_json).collect::<Vec<_>>()),
    );
    Ok(())
}

pub struct Options<'a> {
    pub patterns: Vec<String>,
    pub n: usize,
    pub paper_shapes: bool,
    pub plot: Option<&'a Path>,
}

pub fn analyse(m: &Model, o: &Options) -> Result<Vec<MatrixSpectrum>> {
    let names = mpop::select(m, &o.patterns, true);
    anyhow::ensure!(
        !names.is_empty(),
        "--matrices {:?} matches no weight matrix of {} (names look like {})",
        o.patterns.join(","),
        m.source.name,
        m.linears()
            .first()
            .map(|(n, _)| n.clone())
            .unwrap_or_default()
    );
    let shapes = if o.paper_shapes {
        Shapes::Paper
    } else {
        Shapes::Auto
    };
    let out = methods::spectrum::analyse(m, &names, o.n, shapes, true)?;
    if let Some(p) = o.plot {
        plot(&out, p).with_context(|| format!("{}: drawing the plot failed (it needs a system TTF font, e.g. Debian's fonts-dejavu-core)", p.display()))?;
    }
    Ok(out)
}

pub fn to_json(s: &MatrixSpectrum) -> Value {
    let m = &s.mpo;
    let round = |x: f64| (x * 1e6).round() / 1e6;
    let spectra: Vec<Vec<f64>> = m
        .spectra
        .iter()
        .map(|sp| {
            let top = sp.first().copied().unwrap_or(1.0).max(1e-30);
            sp.iter().map(|v| round(v / top)).collect()
        })
        .collect();
    json!({
        "name": s.name,
        "component": s.component,
        "rows": m.orig_rows,
        "cols": m.orig_cols,
        "row_factors": m.row_factors,
        "col_factors": m.col_factors,
        "full_bonds": m.bond_dims,
        "full_params": m.num_params(),
        "dense_params": m.orig_rows * m.orig_cols,
        "full_ratio": m.ratio(),
        "central_index": m.central_index(),
        "central_share": m.central_share(),
        "entropies": m.entropies(),
        "frobenius_norm": s.fro,
        "full_bond_relative_error": s.full_rel_error,
        "spectra_normalized": spectra,
        "half_budget": s.half_budget.map(|(r, b, e)| json!({"param_ratio": r, "rel_error_bound": b, "rel_error_exact": e})),
        "curve": s.curve.iter().map(|(r, e)| json!({"param_ratio": r, "rel_error_bound": e})).collect::<Vec<_>>(),
    })
}

/// Two panels: the central bond's normalized spectrum per matrix (log scale), and the
/// relative error bound against the parameter ratio, one line per matrix coloured by component.
/// Up to this many matrices each get a colour and a legend entry of their own; beyond it a
/// legend line per component, with its layers shaded light (first) to dark (last).
const OWN_LEGEND_MAX: usize = 12;

/// Each matrix's line colour (RGB) and legend label (None: shares its component's entry).
fn styles(specs: &[MatrixSpectrum]) -> Vec<((u8, u8, u8), Option<String>)> {
    use plotters::style::{Color, Palette, Palette99};
    let rgb = |c: plotters::style::RGBAColor| c.rgb();
    if specs.len() <= OWN_LEGEND_MAX {
        return specs
            .iter()
            .enumerate()
            .map(|(i, s)| (rgb(Palette99::pick(i).to_rgba()), Some(short(&s.name))))
            .collect();
    }
    let mut comps: Vec<&str> = specs.iter().map(|s| s.component.as_str()).collect();
    comps.sort();
    comps.dedup();
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ci = comps.iter().position(|c| *c == s.component).unwrap_or(0);
            let (r, g, b) = Palette99::COLORS[ci % Palette99::COLORS.len()];
            let same: Vec<usize> = (0..specs.len())
                .filter(|&j| specs[j].component == s.component)
                .collect();
            let k = same.iter().position(|&j| j == i).unwrap_or(0);
            // Light (k = 0) to the full colour darkened (last layer).
            let t = if same.len() > 1 {
                k as f64 / (same.len() - 1) as f64
            } else {
                1.0
            };
            let shade = |c: u8| {
                let light = 255.0 - (255.0 - c as f64) * 0.35;
                let dark = c as f64 * 0.55;
                (light + (dark - light) * t).round().clamp(0.0, 255.0) as u8
            };
            let label = (k == 0).then(|| format!("{} (light → dark: layer order)", s.component));
            ((shade(r), shade(g), shade(b)), label)
        })
        .collect()
}

/// A legend-sized module name: `model.layers.3.mlp.up_proj` → `L3.mlp.up_proj`.
fn short(name: &str) -> String {
    name.trim_start_matches("model.")
        .trim_start_matches("bert.")
        .replacen("layers.", "L", 1)
        .replacen("encoder.layer.", "L", 1)
}

/// The y axis of the spectrum panel: log10(s / s_max) from `lo` (≤ −1) to 0, labelled as
/// the ratios themselves so a range within one decade still gets several ticks.
fn log_axis(min_ratio: f64) -> (f64, f64) {
    let lo = min_ratio.max(1e-6).log10().floor().min(-1.0);
    (lo, 0.0)
}

fn ratio_label(v: &f64) -> String {
    format!("{:.0e}", 10f64.powf(*v))
}

fn plot(specs: &[MatrixSpectrum], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    // The encoder goes by the extension: the temp name ends in .png, whatever `path` is called.
    let tmp = models::tmp::file_beside(path, ".png")
        .with_context(|| format!("{}: cannot write plot", path.display()))?;
    {
        let root = BitMapBackend::new(tmp.path(), (1400, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(700);
        let style = styles(specs);
        let color = |i: usize| {
            let (r, g, b) = style[i].0;
            RGBColor(r, g, b)
        };
        let min_ratio = specs
            .iter()
            .filter_map(|s| s.mpo.spectra.get(s.mpo.central_index().saturating_sub(1)))
            .filter_map(|sp| Some(sp.last()? / sp.first()?.max(1e-30)))
            .fold(1.0f64, f64::min);
        let (ylo, yhi) = log_axis(min_ratio);
        let maxlen = specs
            .iter()
            .map(|s| {
                s.mpo
                    .spectra
                    .get(s.mpo.central_index().saturating_sub(1))
                    .map_or(1, |v| v.len())
            })
            .max()
            .unwrap_or(1);
        let mut ch = ChartBuilder::on(&left)
            .caption("central-bond spectrum (s / s_max)", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0usize..maxlen, ylo..yhi)?;
        ch.configure_mesh()
            .x_desc("singular value index")
            .y_desc("normalized (log scale)")
            .y_labels(((yhi - ylo) as usize * 2 + 1).clamp(3, 13))
            .y_label_formatter(&ratio_label)
            .draw()?;
        for (i, s) in specs.iter().enumerate() {
            // Bond left of the central tensor: the largest bonds sit around it.
            if let Some(sp) = s.mpo.spectra.get(s.mpo.central_index().saturating_sub(1)) {
                let top = sp.first().copied().unwrap_or(1.0).max(1e-30);
                let pts: Vec<(usize, f64)> = sp
                    .iter()
                    .enumerate()
                    .map(|(k, v)| (k, (v / top).max(1e-30).log10().max(ylo)))
                    .collect();
                ch.draw_series(LineSeries::new(pts, color(i).stroke_width(1)))?;
            }
        }
        let xmax = specs
            .iter()
            .flat_map(|s| s.curve.iter().map(|c| c.0))
            .fold(1.0f64, f64::max);
        let mut ch = ChartBuilder::on(&right)
            .caption("error bound vs parameters", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..1.0f64)?;
        ch.configure_mesh()
            .x_desc("MPO params / dense params")
            .y_desc("relative error bound")
            .draw()?;
        for (i, s) in specs.iter().enumerate() {
            let col = color(i);
            let series = ch.draw_series(LineSeries::new(
                s.curve.iter().map(|&(r, e)| (r, e.min(1.0))),
                col.stroke_width(1),
            ))?;
            if let Some(label) = &style[i].1 {
                series.label(label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(3))
                });
            }
        }
        // The exact error at the sweep point nearest below half the parameters, the number
        // the text output prints, drawn where the bound curve says it should sit under.
        let mut marked = false;
        for (i, s) in specs.iter().enumerate() {
            if let Some((r, _, exact)) = s.half_budget {
                let series = ch.draw_series(std::iter::once(Cross::new(
                    (r, exact.min(1.0)),
                    6,
                    color(i).stroke_width(2),
                )))?;
                if !marked {
                    series
                        .label("exact error at ≤ 50% params")
                        .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
                    marked = true;
                }
            }
        }
        // Lower left: the curves fall from upper left to lower right, so it covers none.
        ch.configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot write plot", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, component: &str) -> MatrixSpectrum {
        let w: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let shape = mpo::MpoShape::new(vec![2, 2], vec![2, 2], 4, 4).unwrap();
        let mpo = mpo::Mpo::<f32>::decompose(&w, &shape).unwrap();
        MatrixSpectrum {
            name: name.into(),
            component: component.into(),
            mpo,
            fro: 1.0,
            full_rel_error: 0.0,
            curve: vec![(0.5, 0.2), (1.0, 0.0)],
            half_budget: Some((0.5, 0.2, 0.1)),
        }
    }

    #[test]
    fn few_matrices_get_a_colour_and_a_legend_entry_each() {
        let specs: Vec<_> = (0..4)
            .map(|i| spec(&format!("model.layers.{i}.mlp.up_proj"), "ffn_up"))
            .collect();
        let st = styles(&specs);
        let mut colours: Vec<_> = st.iter().map(|s| s.0).collect();
        colours.dedup();
        assert_eq!(colours.len(), 4, "same-component layers were one colour");
        assert!(st.iter().all(|s| s.1.is_some()));
        assert_eq!(st[2].1.as_deref(), Some("L2.mlp.up_proj"));
    }

    #[test]
    fn many_matrices_shade_each_component_by_layer_with_one_legend_line() {
        let mut specs = Vec::new();
        for i in 0..10 {
            specs.push(spec(&format!("model.layers.{i}.mlp.up_proj"), "ffn_up"));
            specs.push(spec(
                &format!("model.layers.{i}.self_attn.q_proj"),
                "attn_q",
            ));
        }
        let st = styles(&specs);
        let labels = st.iter().filter(|s| s.1.is_some()).count();
        assert_eq!(labels, 2);
        let ups: Vec<(u8, u8, u8)> = st.iter().step_by(2).map(|s| s.0).collect();
        let mut distinct = ups.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 10, "every layer has its own shade");
        // Light to dark: the channel sum falls with depth.
        let sum = |c: &(u8, u8, u8)| c.0 as u32 + c.1 as u32 + c.2 as u32;
        assert!(ups.windows(2).all(|w| sum(&w[0]) >= sum(&w[1])));
    }

    #[test]
    fn the_log_axis_spans_at_least_a_decade_so_it_has_several_ticks() {
        assert_eq!(log_axis(0.4), (-1.0, 0.0));
        assert_eq!(log_axis(0.004), (-3.0, 0.0));
        assert_eq!(log_axis(0.0), (-6.0, 0.0));
        assert_eq!(ratio_label(&-2.0), "1e-2");
        assert_eq!(ratio_label(&0.0), "1e0");
    }
}
