//! Which tensors train for a method, made `Var`s in place (shared tensors once), and the
//! classification head a new task needs.

use super::*;

/// A trainable tensor with its learning-rate group.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub mpo: bool,
    pub decay: bool,
}

/// Tensors made trainable so far, by the id they had: a tensor several layers hold (shared
/// across layers, or tied) becomes one Var that all of them train, so its gradient is
/// accumulated once per step and the optimizer sees it once.
pub(crate) type Vars = HashMap<candle_core::TensorId, Var>;

pub(crate) fn to_var(t: &mut Tensor, vars: &mut Vars) -> Result<Var> {
    if let Some(v) = vars.get(&t.id()) {
        *t = v.as_tensor().clone();
        return Ok(v.clone());
    }
    let v = Var::from_tensor(t)?;
    vars.insert(t.id(), v.clone());
    vars.insert(v.as_tensor().id(), v.clone());
    *t = v.as_tensor().clone();
    Ok(v)
}

pub(crate) fn no_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name.contains("LayerNorm")
        || name.contains("layernorm")
        || name.contains("norm.weight")
}

/// Make `name`'s dense weight (and bias) trainable in place.
pub(crate) fn dense_vars(
    name: &str,
    lin: &mut models::Linear,
    weight: bool,
    out: &mut Vec<Param>,
    vars: &mut Vars,
) -> Result<()> {
    let Some(d) = lin.inner_mut().as_any_mut().downcast_mut::<Dense>() else {
        return Ok(());
    };
    if weight {
        out.push(Param {
            name: format!("{name}.weight"),
            var: to_var(&mut d.weight, vars)?,
            mpo: false,
            decay: true,
        });
    }
    if let Some(b) = d.bias.as_mut() {
        out.push(Param {
            name: format!("{name}.bias"),
            var: to_var(b, vars)?,
            mpo: false,
            decay: false,
        });
    }
    Ok(())
}

/// Set each MPO layer's trainable cores for `method` and collect them (bias included).
pub(crate) fn mpo_vars(name: &str, mp: &mut MpoLayer, method: Method, out: &mut Vec<Param>) {
    let cores = mp.inner.cores_mut();
    match method {
        Method::MpoAux => cores.freeze_central(),
        Method::MpoCentral => cores.train_only_central(),
        Method::MpoAll | Method::Full | Method::Opf => cores.set_all_trainable(true),
        Method::Lora => cores.set_all_trainable(false),
    }
    for k in 0..cores.n() {
        if cores.is_trainable(k) {
            out.push(Param {
                name: format!("{name}.mpo.{}", mpo::Mpo::<f32>::core_name(k)),
                var: cores.var(k).clone(),
                mpo: true,
                decay: true,
            });
        }
    }
    let bias_on = method != Method::Lora;
    mp.inner.set_bias_trainable(bias_on);
    if let (Some(b), true) = (mp.inner.bias(), bias_on) {
        out.push(Param {
            name: format!("{name}.bias"),
            var: b.clone(),
            mpo: false,
            decay: false,
        });
    }
}

/// Rebuild the cached dense matrices of MPO layers after their cores changed.
pub fn refresh(m: &mut Model) {
    for (_, l) in m.linears_mut() {
        let any = l.inner_mut().as_any_mut();
        if let Some(mb) = any.downcast_mut::<crate::mpobert::MpoBertLinear>() {
            mb.mpo.invalidate();
        } else if let Some(mp) = any.downcast_mut::<MpoLayer>() {
            mp.invalidate();
        }
    }
}

pub(crate) fn has_mpo(m: &Model) -> bool {
    m.linears().iter().any(|(_, l)| {
        let any = l.inner().as_any();
        any.is::<MpoLayer>() || any.is::<crate::mpobert::MpoBertLinear>()
    })
}

pub(crate) fn lora_config(m: &Model, o: &FinetuneOptions) -> crate::lora::LoraConfig {
    crate::lora::LoraConfig {
        r: o.lora_r,
        alpha: o.lora_alpha,
        dropout: o.lora_dropout,
        target_modules: if o.lora_targets.is_empty() {
            crate::lora::LoraConfig::default_targets(m)
        } else {
            o.lora_targets.clone()
        },
        seed: o.seed,
    }
}

/// Prepare the model for `o.method` and return its trainable tensors. For MPO methods a dense
/// model is first decomposed at full bond (lossless), as MPOP does before lightweight tuning.
pub fn prepare(m: &mut Model, o: &FinetuneOptions, progress: bool) -> Result<Vec<Param>> {
    let mut ps = Vec::new();
    let mut vars = Vars::new();
    let is_quant = m
        .linears()
        .iter()
        .any(|(_, l)| l.inner().as_any().is::<crate::quant::layer::QuantLinear>());
    if is_quant && o.method != Method::Lora {
        return Err(Error::option("method", format!(
            "{}: a quantized model's packed weights cannot be trained with `method` {}; use `method` lora (adapters over the frozen quantized weights)",
            o.model,
            serde_json::to_value(o.method).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        )));
    }
    if o.method.is_mpo() && !has_mpo(m) {
        if progress {
            eprintln!("decomposing every Linear and the embedding as a full-bond MPO (n = {}) before tuning", o.mpo_n);
        }
        mpop::compress(
            m,
            &mpop::CompressOptions {
                shapes: mpop::Shapes::Auto,
                n: o.mpo_n,
                budget: mpop::Budget::Full,
                patterns: Vec::new(),
            },
            progress,
        )?;
    }
    if o.method == Method::Lora {
        let cfg = lora_config(m, o);
        for (name, var) in crate::lora::apply(m, &cfg)? {
            ps.push(Param {
                name,
                var,
                mpo: false,
                decay: true,
            });
        }
        // The freshly initialised head trains too (PEFT's modules_to_save).
        for (name, lin) in m.linears_mut() {
            if name == "classifier" {
                dense_vars(&name, lin, true, &mut ps, &mut vars)?;
            }
        }
        return Ok(dedup(ps));
    }
    // OPF trains every tensor, as full fine-tuning, its chains included.
    let full = matches!(o.method, Method::Full | Method::Opf);
    for (name, lin) in m.linears_mut() {
        if let Some(mb) = lin
            .inner_mut()
            .as_any_mut()
            .downcast_mut::<crate::mpobert::MpoBertLinear>()
        {
            // Cores held by several layers are one Var: `dedup` keeps one slot for them.
            mpo_vars(&name, &mut mb.mpo, o.method, &mut ps);
            if let Some(a) = &mb.adapter {
                for (part, v) in [("u", &a.u), ("d", &a.d)] {
                    ps.push(Param {
                        name: format!("{name}.adapter.{part}"),
                        var: v.clone(),
                        mpo: false,
                        decay: true,
                    });
                }
            }
        } else if let Some(mp) = lin.inner_mut().as_any_mut().downcast_mut::<MpoLayer>() {
            mpo_vars(&name, mp, o.method, &mut ps);
        } else {
            // MPOP: non-MPO parameters (biases, the classifier) still train; dense weights that
            // were not decomposed train only in full fine-tuning.
            let head = name == "classifier" || name.starts_with("cls.");
            dense_vars(&name, lin, full || head, &mut ps, &mut vars)?;
        }
    }
    for (name, t) in m.other_tensors_mut() {
        let decay = !no_decay(&name);
        ps.push(Param {
            var: to_var(t, &mut vars)?,
            name,
            mpo: false,
            decay,
        });
    }
    Ok(dedup(ps))
}

/// The trainable tensors when the modules named in `fft` (Linears and other tensors) are in full
/// fine-tuning and the rest in `o.method`'s lightweight set (CaliSr's switch). Full tuning of an
/// MPO layer trains every core; of a LoRA-wrapped layer its base weight and bias beside the
/// adapter; of a plain Linear or other tensor under LoRA the tensor itself. Tensors leaving the
/// set are detached so that no gradient is computed for them any more, but stay in the list:
/// without a gradient the optimizer leaves them alone, and checkpoints keep the values they
/// reached while fully tuned. The model must already be prepared for `o.method` (decomposed,
/// adapters attached) by [`prepare`].
pub fn prepare_phased(
    m: &mut Model,
    o: &FinetuneOptions,
    fft: &std::collections::HashSet<String>,
) -> Result<Vec<Param>> {
    let mut ps = Vec::new();
    let mut vars = Vars::new();
    let lora = o.method == Method::Lora;
    let freeze = |name: String, t: &mut Tensor, vars: &mut Vars, ps: &mut Vec<Param>| {
        let var = to_var(t, vars)?;
        *t = var.as_tensor().detach();
        ps.push(Param {
            name,
            var,
            mpo: false,
            decay: false,
        });
        Result::Ok(())
    };
    for (name, lin) in m.linears_mut() {
        let full = fft.contains(&name);
        if let Some(mp) = lin.inner_mut().as_any_mut().downcast_mut::<MpoLayer>() {
            mpo_vars(
                &name,
                mp,
                if full { Method::MpoAll } else { o.method },
                &mut ps,
            );
            let c = mp.inner.cores();
            for k in (0..c.n()).filter(|&k| !c.is_trainable(k)) {
                ps.push(Param {
                    name: format!("{name}.mpo.{}", mpo::Mpo::<f32>::core_name(k)),
                    var: c.var(k).clone(),
                    mpo: true,
                    decay: false,
                });
            }
        } else if let Some(ll) = lin
            .inner_mut()
            .as_any_mut()
            .downcast_mut::<crate::lora::LoraLinear>()
        {
            for (suffix, v) in [("lora_A", ll.a().clone()), ("lora_B", ll.b().clone())] {
                ps.push(Param {
                    name: format!("{name}.{suffix}.weight"),
                    var: v,
                    mpo: false,
                    decay: true,
                });
            }
            let Some(d) = ll.base_mut().as_any_mut().downcast_mut::<Dense>() else {
                if full {
                    return Err(Error::Msg(format!(
                        "{name}: full fine-tuning needs a dense base weight under the adapter, this one is not"
                    )));
                }
                continue;
            };
            for (suffix, t) in std::iter::once(("weight", &mut d.weight))
                .chain(d.bias.as_mut().map(|b| ("bias", b)))
            {
                if full {
                    ps.push(Param {
                        name: format!("{name}.{suffix}"),
                        var: to_var(t, &mut vars)?,
                        mpo: false,
                        decay: suffix == "weight",
                    });
                } else {
                    freeze(format!("{name}.{suffix}"), t, &mut vars, &mut ps)?;
                }
            }
        } else if lora {
            // The new head always trains (PEFT's modules_to_save).
            if full || name == "classifier" {
                dense_vars(&name, lin, true, &mut ps, &mut vars)?;
            } else if let Some(d) = lin.inner_mut().as_any_mut().downcast_mut::<Dense>() {
                freeze(format!("{name}.weight"), &mut d.weight, &mut vars, &mut ps)?;
                if let Some(b) = d.bias.as_mut() {
                    freeze(format!("{name}.bias"), b, &mut vars, &mut ps)?;
                }
            }
        } else {
            // As `prepare` does for MPO methods: undecomposed weights stay frozen.
            dense_vars(&name, lin, name == "classifier", &mut ps, &mut vars)?;
        }
    }
    for (name, t) in m.other_tensors_mut() {
        if !lora || fft.contains(&name) {
            let decay = !no_decay(&name);
            ps.push(Param {
                var: to_var(t, &mut vars)?,
                name,
                mpo: false,
                decay,
            });
        } else {
            freeze(name, t, &mut vars, &mut ps)?;
        }
    }
    Ok(dedup(ps))
}

/// Each trainable tensor once, under the first name that holds it.
pub(crate) fn dedup(ps: Vec<Param>) -> Vec<Param> {
    let mut seen = std::collections::HashSet::new();
    ps.into_iter()
        .filter(|p| seen.insert(p.var.as_tensor().id()))
        .collect()
}

/// Attach a masked-LM head initialised as BERT does (transform N(0, 0.02²) with zero bias,
/// LayerNorm 1/0, zero output bias) when the encoder has none: sentence-transformers
/// checkpoints such as all-MiniLM-L6-v2 ship the bare BertModel.
pub(crate) fn ensure_mlm_head(m: &mut Model, seed: u64) -> Result<()> {
    let Arch::Encoder(b) = &mut m.arch else {
        return Ok(());
    };
    if b.has_mlm_head() {
        return Ok(());
    }
    let h = b.hidden_size();
    let vocab = b
        .linears()
        .iter()
        .find(|(n, _)| n.ends_with("word_embeddings"))
        .map(|(_, l)| l.out_features())
        .ok_or_else(|| {
            Error::Msg("the encoder has no word embeddings to tie an MLM head to".into())
        })?;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x0317_4EAD);
    let w: Vec<f32> = (0..h * h)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
            (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    let dev = Device::Cpu;
    b.set_mlm_head([
        Tensor::from_vec(w, (h, h), &dev)?,
        Tensor::zeros(h, DType::F32, &dev)?,
        Tensor::ones(h, DType::F32, &dev)?,
        Tensor::zeros(h, DType::F32, &dev)?,
        Tensor::zeros(vocab, DType::F32, &dev)?,
    ]);
    Ok(())
}

/// Attach a new classification head (HF init: N(0, 0.02), zero bias) when the encoder has none.
pub(crate) fn ensure_head(m: &mut Model, num_labels: usize, seed: u64) -> Result<()> {
    let Arch::Encoder(b) = &mut m.arch else {
        return Ok(());
    };
    if let Some(c) = b.num_labels() {
        if c != num_labels {
            return Err(Error::Msg(format!(
                "the model's classification head has {c} labels but the data has {num_labels}"
            )));
        }
        return Ok(());
    }
    use rand::{Rng, SeedableRng};
    let h = b.hidden_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC1A5_5EED);
    // Box-Muller normal samples, N(0, 0.02²).
    let w: Vec<f32> = (0..num_labels * h)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
            (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    b.set_classifier(
        Tensor::from_vec(w, (num_labels, h), &Device::Cpu)?,
        Tensor::zeros(num_labels, DType::F32, &Device::Cpu)?,
    );
    Ok(())
}
