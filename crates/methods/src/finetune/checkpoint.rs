//! The run's log, checkpoints (complete at every instant, rotated, resumed with the identical
//! loss curve) and the final model in the method's own format.

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Wall time of this optimizer step (forward, backward, update).
    #[serde(default)]
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    /// Classification accuracy, or perplexity for language modelling.
    pub metric: String,
    pub value: f64,
    pub examples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneLog {
    pub options: FinetuneOptions,
    pub steps: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    pub tuned_params: usize,
    pub total_params: usize,
    pub total_steps: usize,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub train_secs: f64,
    pub finished: bool,
    #[serde(default)]
    pub squeeze: Option<Value>,
    /// What each in-training method ([`TrainHook`]) did and needs to resume, by its name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hooks: std::collections::BTreeMap<String, Value>,
}

pub(crate) fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
    models::tmp::write_file(path, text.as_bytes()).map_err(|e| io_err(path, e))
}

pub(crate) fn io_err(p: &Path, e: std::io::Error) -> Error {
    Error::Msg(format!("{}: {e}", p.display()))
}

/// The previous checkpoint while a new one is moved into place.
pub const CHECKPOINT_OLD: &str = "checkpoint.old";

/// Save trainable tensors, AdamW moments and the log under `out/checkpoint` (replaced whole).
///
/// The new checkpoint is complete under a temp name before anything is moved, and a complete
/// checkpoint exists at every instant: `checkpoint`, or `checkpoint.old` only between the two
/// renames (which [`checkpoint_dir`] falls back to), so a run killed anywhere here resumes.
pub(crate) fn save_checkpoint(out: &Path, opt: &AdamW, log: &FinetuneLog) -> Result<()> {
    let tmp = models::tmp::dir_in(out).map_err(|e| io_err(out, e))?;
    let mut params = HashMap::new();
    let mut moments = HashMap::new();
    for s in &opt.slots {
        let shape = s.var.as_tensor().shape().clone();
        params.insert(s.name.clone(), s.var.as_tensor().contiguous()?);
        moments.insert(
            format!("{}.m", s.name),
            Tensor::from_slice(&s.m, shape.clone(), &Device::Cpu)?,
        );
        moments.insert(
            format!("{}.v", s.name),
            Tensor::from_slice(&s.v, shape, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&params, tmp.path().join("params.safetensors"))?;
    candle_core::safetensors::save(&moments, tmp.path().join("optimizer.safetensors"))?;
    write_json(
        &tmp.path().join("state.json"),
        &json!({"optimizer_step": opt.step, "log": log}),
    )?;
    let dst = out.join(CHECKPOINT_DIR);
    let old = out.join(CHECKPOINT_OLD);
    if is_checkpoint(&dst) {
        // `checkpoint` is complete, so `checkpoint.old` is not needed until the rename below.
        remove_dir_if_present(&old)?;
        std::fs::rename(&dst, &old).map_err(|e| io_err(&dst, e))?;
    } else {
        // A broken `checkpoint` (killed while being removed) is not worth keeping; a complete
        // `checkpoint.old` stays the fallback until the new one is in place.
        remove_dir_if_present(&dst)?;
    }
    tmp.rename_to(&dst).map_err(|e| io_err(&dst, e))?;
    remove_dir_if_present(&old)
}

/// Whether `dir` holds a complete checkpoint (its state is written last).
pub(crate) fn is_checkpoint(dir: &Path) -> bool {
    dir.join("state.json").is_file()
}

/// The checkpoint to resume from: `checkpoint`, else `checkpoint.old` (left by a run killed
/// while rotating them).
pub fn checkpoint_dir(out: &Path) -> Option<PathBuf> {
    [CHECKPOINT_DIR, CHECKPOINT_OLD]
        .iter()
        .map(|d| out.join(d))
        .find(|d| is_checkpoint(d))
}

pub(crate) fn remove_dir_if_present(d: &Path) -> Result<()> {
    match std::fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(d, e)),
        _ => Ok(()),
    }
}

/// Remove the checkpoints of a finished run: first renamed to a temp name (one atomic step,
/// so no half-deleted `checkpoint` is ever seen), then deleted.
pub(crate) fn remove_checkpoints(out: &Path) {
    for d in [CHECKPOINT_DIR, CHECKPOINT_OLD] {
        let p = out.join(d);
        if !p.exists() {
            continue;
        }
        if let Ok(t) = models::tmp::dir_in(out) {
            let gone = t.path().join(d);
            if std::fs::rename(&p, &gone).is_ok() {
                continue; // deleted with `t`
            }
        }
        let _ = std::fs::remove_dir_all(&p);
    }
}

/// The log saved with the checkpoint in `out`, checked to belong to a run with options `o`.
pub(crate) fn checkpoint_log(out: &Path, o: &FinetuneOptions) -> Result<(FinetuneLog, u64)> {
    let dir = checkpoint_dir(out).unwrap_or_else(|| out.join(CHECKPOINT_DIR));
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|_| {
        Error::option(
            "resume",
            format!(
                "{}: no checkpoint to resume from (expected {}); run without `resume` to start",
                out.display(),
                sp.display()
            ),
        )
    })?;
    let state: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: invalid checkpoint state: {e}", sp.display())))?;
    let log: FinetuneLog = serde_json::from_value(state["log"].clone())
        .map_err(|e| Error::Msg(format!("{}: invalid checkpoint log: {e}", sp.display())))?;
    let (a, b) = (fingerprint(&log.options), fingerprint(o));
    if a != b {
        let diff: Vec<String> = match (a.as_object(), b.as_object()) {
            (Some(x), Some(y)) => x
                .keys()
                .filter(|k| x.get(*k) != y.get(*k))
                .map(|k| {
                    format!(
                        "{k}: {} vs {}",
                        x[k.as_str()],
                        y.get(k.as_str()).unwrap_or(&Value::Null)
                    )
                })
                .collect(),
            _ => vec![],
        };
        return Err(Error::option("out", format!(
            "{}: the checkpoint belongs to a different run ({}); resume with the same options or choose a new `out`",
            out.display(),
            diff.join(", ")
        )));
    }
    Ok((log, state["optimizer_step"].as_u64().unwrap_or(0)))
}

/// Restore a checkpoint into `opt` (same parameter names and shapes required).
pub(crate) fn load_checkpoint(
    out: &Path,
    opt: &mut AdamW,
    o: &FinetuneOptions,
) -> Result<FinetuneLog> {
    let (log, step) = checkpoint_log(out, o)?;
    let dir = checkpoint_dir(out).unwrap_or_else(|| out.join(CHECKPOINT_DIR));
    let params = candle_core::safetensors::load(dir.join("params.safetensors"), &Device::Cpu)?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    if params.len() != opt.slots.len() {
        return Err(Error::Msg(format!(
            "{}: the checkpoint holds {} trainable tensors, this run has {}",
            dir.display(),
            params.len(),
            opt.slots.len()
        )));
    }
    for s in &mut opt.slots {
        let get = |m: &HashMap<String, Tensor>, k: &str| -> Result<Tensor> {
            let t = m.get(k).ok_or_else(|| {
                Error::Msg(format!(
                    "{}: tensor '{k}' missing from the checkpoint",
                    dir.display()
                ))
            })?;
            if t.dims() != s.var.as_tensor().dims() {
                return Err(Error::Msg(format!(
                    "{}: tensor '{k}' has shape {:?}, this run expects {:?}",
                    dir.display(),
                    t.dims(),
                    s.var.as_tensor().dims()
                )));
            }
            Ok(t.clone())
        };
        s.var.set(&get(&params, &s.name)?)?;
        s.m = get(&moments, &format!("{}.m", s.name))?
            .flatten_all()?
            .to_vec1()?;
        s.v = get(&moments, &format!("{}.v", s.name))?
            .flatten_all()?
            .to_vec1()?;
    }
    opt.step = step;
    Ok(log)
}

/// Write the final model into `out` in the method's format.
pub(crate) fn save_model(m: &Model, o: &FinetuneOptions, out: &Path) -> Result<()> {
    // Writers that refuse a non-empty directory get a fresh one inside the temp dir.
    let guard = models::tmp::dir_in(out).map_err(|e| io_err(out, e))?;
    let tmp = guard.path().join("final");
    // A hook may have merged the adapters (CaliSr trained the base weights too): then the
    // model is saved whole.
    let adapters = m
        .linears()
        .iter()
        .any(|(_, l)| l.inner().as_any().is::<crate::lora::LoraLinear>());
    if o.method == Method::Lora && adapters {
        let cfg = lora_config(m, o);
        let head: Vec<(String, Tensor)> = m
            .linears()
            .into_iter()
            .filter(|(n, _)| n == "classifier")
            .flat_map(|(n, l)| {
                let mut v = vec![(format!("{n}.weight"), l.weight())];
                if let Some(b) = l.bias() {
                    v.push((format!("{n}.bias"), Ok(b)));
                }
                v
            })
            .map(|(n, t)| Ok((n, t?)))
            .collect::<candle_core::Result<_>>()?;
        let task_type = if o.task == Task::Lm {
            "CAUSAL_LM"
        } else {
            "SEQ_CLS"
        };
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        crate::lora::save_peft(m, &cfg, &o.model, task_type, &head, &tmp)?;
    } else if crate::mpoe::is_moe(m) {
        crate::mpoe::save(m, &tmp, false)?;
    } else if crate::mpobert::is_mpobert(m) {
        crate::mpobert::save(m, &tmp, None)?;
    } else if has_mpo(m) {
        mpop::save(m, &tmp)?;
    } else {
        let t = models::export::dense_state_dict(m)?;
        models::export::write_hf_dir(m, &tmp, &t, &[])?;
    }
    for e in std::fs::read_dir(&tmp).map_err(|e| io_err(&tmp, e))? {
        let e = e.map_err(|e| io_err(&tmp, e))?;
        let dst = out.join(e.file_name());
        std::fs::rename(e.path(), &dst).map_err(|er| io_err(&dst, er))?;
    }
    Ok(())
}

pub(crate) fn prepare_out(out: &Path, resume: bool) -> Result<()> {
    if !resume
        && out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::option("out", format!(
            "{}: exists and is not empty; choose a new `out`, or pass `resume` to continue the run saved there",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))
}
