//! INT8 activations with outlier features kept in full precision: the activation half of the
//! quantization study (methods.md §7, "Fine-grained sensitivity"; LLM.int8()'s decomposition).
//!
//! Calibration text is run through the model with every decoder projection recording the largest
//! |x| of each input dimension. A dimension is an *outlier* of a projection when that maximum
//! reaches the threshold (LLM.int8's 6.0). Then each projection's input is quantized per token
//! to INT8 ([`models::linear::Int8Input`]) except for the kept dimensions:
//! * `all` — every outlier of that projection (the LLM.int8 setting, "INT8 on non-outlier dims");
//! * `N` — the N outlier dimensions that are outliers in the most layers, ranked per projection
//!   role (q_proj, down_proj, …), as the paper ranks them; the rest of its outliers are quantized
//!   too. `0` quantizes every dimension.

use super::calib::{layer_index, tap, untap_all};
use super::{Error, Result};
use candle_core::{Device, Tensor};
use models::linear::Int8Input;
use models::Model;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// LLM.int8()'s outlier threshold on |x|.
pub const DEFAULT_THRESHOLD: f32 = 6.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepOutliers {
    All,
    Top(usize),
}

impl KeepOutliers {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "all" => Ok(KeepOutliers::All),
            t => t.parse().map(KeepOutliers::Top).map_err(|_| {
                Error::option(
                    "keep_outliers",
                    format!("`keep_outliers` takes 'all' or a number of dimensions, got '{s}'"),
                )
            }),
        }
    }
}

impl std::fmt::Display for KeepOutliers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepOutliers::All => write!(f, "all"),
            KeepOutliers::Top(n) => write!(f, "{n}"),
        }
    }
}

/// What a checkpoint stores (quantize_config.json) so that loading re-applies the same plan.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Int8Config {
    pub threshold: f32,
    pub keep_outliers: String,
    /// Kept input dimensions per projection; projections not listed keep none.
    pub kept_dims: BTreeMap<String, Vec<usize>>,
}

/// An outlier dimension of one projection role and the number of layers where it is one.
#[derive(Debug, Clone, Serialize)]
pub struct Outlier {
    pub dim: usize,
    pub layers: usize,
    pub max_abs: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Int8Plan {
    pub config: Int8Config,
    /// Per role, its outlier dimensions ranked by layers affected (then by magnitude).
    pub outliers: BTreeMap<String, Vec<Outlier>>,
    pub projections: usize,
    pub kept_total: usize,
}

/// The projection role: the module name's last component ("q_proj", "down_proj", …).
fn role(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// Max |x| of every input dimension of every decoder projection over `samples` (token windows).
pub fn input_absmax(m: &mut Model, samples: &[Vec<u32>]) -> Result<BTreeMap<String, Vec<f32>>> {
    let mut stats: HashMap<String, Arc<Mutex<Vec<f32>>>> = HashMap::new();
    for (name, lin) in m.linears_mut() {
        if layer_index(&name).is_none() {
            continue;
        }
        let a = Arc::new(Mutex::new(vec![0f32; lin.in_features()]));
        stats.insert(name, a.clone());
        tap(
            lin,
            Box::new(move |xv, rows| {
                let mut a = a
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
                let n = a.len();
                for row in xv.chunks(n.max(1)).take(rows) {
                    for (m, x) in a.iter_mut().zip(row) {
                        *m = m.max(x.abs());
                    }
                }
                Ok(())
            }),
        );
    }
    let run = (|| -> Result<()> {
        let llama = m.causal()?;
        for s in samples {
            let ids = Tensor::new(s.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            llama.forward_hidden(&ids, None, None)?;
        }
        Ok(())
    })();
    // Remove the taps (always, even after an error).
    untap_all(m);
    run?;
    stats
        .into_iter()
        .map(|(k, v)| {
            let v = Arc::try_unwrap(v)
                .map_err(|_| Error::Msg("internal: recorder still shared".into()))?
                .into_inner()
                .map_err(|_| Error::Msg("poisoned".into()))?;
            Ok((k, v))
        })
        .collect()
}

/// Which input dimensions each projection keeps in full precision.
pub fn plan(absmax: &BTreeMap<String, Vec<f32>>, threshold: f32, keep: KeepOutliers) -> Int8Plan {
    // Per role: dimension → (layers where it is an outlier, largest |x|).
    let mut by_role: BTreeMap<&str, BTreeMap<usize, (usize, f32)>> = BTreeMap::new();
    for (name, a) in absmax {
        let r = by_role.entry(role(name)).or_default();
        for (d, &m) in a.iter().enumerate() {
            if m >= threshold {
                let e = r.entry(d).or_insert((0, 0.0));
                e.0 += 1;
                e.1 = e.1.max(m);
            }
        }
    }
    let outliers: BTreeMap<String, Vec<Outlier>> = by_role
        .into_iter()
        .map(|(r, dims)| {
            let mut v: Vec<Outlier> = dims
                .into_iter()
                .map(|(dim, (layers, max_abs))| Outlier {
                    dim,
                    layers,
                    max_abs,
                })
                .collect();
            v.sort_by(|a, b| {
                b.layers
                    .cmp(&a.layers)
                    .then(b.max_abs.total_cmp(&a.max_abs))
                    .then(a.dim.cmp(&b.dim))
            });
            (r.to_string(), v)
        })
        .collect();
    let mut kept_dims = BTreeMap::new();
    for (name, a) in absmax {
        let dims: Vec<usize> = match keep {
            KeepOutliers::All => (0..a.len()).filter(|&d| a[d] >= threshold).collect(),
            KeepOutliers::Top(n) => {
                let mut v: Vec<usize> =
                    outliers[role(name)].iter().take(n).map(|o| o.dim).collect();
                v.sort_unstable();
                v
            }
        };
        kept_dims.insert(name.clone(), dims);
    }
    let kept_total = kept_dims.values().map(Vec::len).sum();
    Int8Plan {
        projections: absmax.len(),
        kept_total,
        outliers,
        config: Int8Config {
            threshold,
            keep_outliers: keep.to_string(),
            kept_dims,
        },
    }
}

/// Turns INT8 inputs on for every decoder projection, keeping the dimensions `cfg` lists.
/// Returns the number of projections.
pub fn apply(m: &mut Model, cfg: &Int8Config) -> Result<usize> {
    let mut n = 0;
    for (name, lin) in m.linears_mut() {
        if layer_index(&name).is_none() {
            continue;
        }
        let keep = cfg.kept_dims.get(&name).cloned().unwrap_or_default();
        if let Some(&d) = keep.iter().max() {
            if d >= lin.in_features() {
                return Err(Error::Msg(format!(
                    "int8 activations: {name} keeps input dimension {d} but has only {} inputs",
                    lin.in_features()
                )));
            }
        }
        lin.int8_input = Some(Int8Input::new(keep));
        n += 1;
    }
    if let Some(name) = cfg
        .kept_dims
        .keys()
        .find(|k| !m.linears().iter().any(|(n, _)| n == *k))
    {
        return Err(Error::Msg(format!(
            "int8 activations: the model has no projection '{name}'"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(rows: &[(&str, &[f32])]) -> BTreeMap<String, Vec<f32>> {
        rows.iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn keep_outliers_parses() {
        assert_eq!(KeepOutliers::parse("all").unwrap(), KeepOutliers::All);
        assert_eq!(KeepOutliers::parse("3").unwrap(), KeepOutliers::Top(3));
        assert!(KeepOutliers::parse("three")
            .unwrap_err()
            .to_string()
            .contains("`keep_outliers` takes 'all'"));
    }

    #[test]
    fn plan_ranks_outliers_by_layers_affected() {
        let a = maps(&[
            ("model.layers.0.mlp.down_proj", &[7.0, 1.0, 50.0, 6.0]),
            ("model.layers.1.mlp.down_proj", &[8.0, 1.0, 2.0, 9.0]),
            ("model.layers.2.mlp.down_proj", &[6.5, 1.0, 3.0, 0.0]),
            ("model.layers.0.self_attn.q_proj", &[0.1, 9.0, 0.2, 0.3]),
        ]);
        // down_proj: dim 0 is an outlier in 3 layers, dim 3 in 2, dim 2 in 1 (largest |x|).
        let p = plan(&a, 6.0, KeepOutliers::Top(2));
        let order: Vec<(usize, usize)> = p.outliers["down_proj"]
            .iter()
            .map(|o| (o.dim, o.layers))
            .collect();
        assert_eq!(order, vec![(0, 3), (3, 2), (2, 1)]);
        let kd = &p.config.kept_dims;
        assert_eq!(kd["model.layers.0.mlp.down_proj"], vec![0, 3]);
        assert_eq!(kd["model.layers.2.mlp.down_proj"], vec![0, 3]);
        assert_eq!(kd["model.layers.0.self_attn.q_proj"], vec![1]);
        assert_eq!(p.kept_total, 7);
        // all: each projection's own outliers.
        let p = plan(&a, 6.0, KeepOutliers::All);
        let kd = &p.config.kept_dims;
        assert_eq!(kd["model.layers.0.mlp.down_proj"], vec![0, 2, 3]);
        assert_eq!(kd["model.layers.1.mlp.down_proj"], vec![0, 3]);
        assert_eq!(kd["model.layers.2.mlp.down_proj"], vec![0]);
        // 0: nothing kept.
        let p = plan(&a, 6.0, KeepOutliers::Top(0));
        assert_eq!(p.kept_total, 0);
    }
}
