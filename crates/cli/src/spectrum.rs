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
fn plot(specs: &[MatrixSpectrum], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    // The encoder goes by the extension: the temp name ends in .png, whatever `path` is called.
    let tmp = models::tmp::file_beside(path, ".png")
        .with_context(|| format!("{}: cannot write plot", path.display()))?;
    {
        let root = BitMapBackend::new(tmp.path(), (1400, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(700);
        let comps: Vec<String> = {
            let mut c: Vec<String> = specs.iter().map(|s| s.component.clone()).collect();
            c.sort();
            c.dedup();
            c
        };
        let color =
            |c: &str| Palette99::pick(comps.iter().position(|x| x == c).unwrap_or(0)).to_rgba();
        let ymin = specs
            .iter()
            .filter_map(|s| s.mpo.spectra.get(s.mpo.central_index().saturating_sub(1)))
            .filter_map(|sp| Some(sp.last()? / sp.first()?.max(1e-30)))
            .fold(1.0f64, f64::min)
            .max(1e-6);
        let ymin = 10f64.powf(ymin.log10().floor());
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
            .build_cartesian_2d(0usize..maxlen, (ymin..1.0f64).log_scale())?;
        ch.configure_mesh()
            .x_desc("singular value index")
            .y_desc("normalized")
            .draw()?;
        for s in specs {
            // Bond left of the central tensor: the largest bonds sit around it.
            if let Some(sp) = s.mpo.spectra.get(s.mpo.central_index().saturating_sub(1)) {
                let top = sp.first().copied().unwrap_or(1.0).max(1e-30);
                let pts: Vec<(usize, f64)> = sp
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i, (v / top).max(ymin)))
                    .collect();
                ch.draw_series(LineSeries::new(pts, color(&s.component).stroke_width(1)))?;
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
        for c in &comps {
            let mut first = true;
            for s in specs.iter().filter(|s| &s.component == c) {
                let series = ch.draw_series(LineSeries::new(
                    s.curve.iter().map(|&(r, e)| (r, e.min(1.0))),
                    color(c).stroke_width(1),
                ))?;
                if first {
                    let col = color(c);
                    series.label(c.clone()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(3))
                    });
                    first = false;
                }
            }
        }
        ch.configure_series_labels()
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
