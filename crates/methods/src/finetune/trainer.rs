//! The loss of a batch, evaluation, and the training loop: warmup/decay, clipping, per-group
//! learning rates, checkpoints, and squeezing's recovery phases.

use super::*;

/// Mean cross-entropy of a batch: classification logits vs labels, or next-token prediction.
pub fn batch_loss(m: &Model, b: &Batch) -> Result<Tensor> {
    match &m.arch {
        Arch::Encoder(enc) if b.masked.is_some() => {
            let h = enc.forward(&b.ids, None, b.mask.as_ref())?;
            let (bs, t, d) = h.dims3()?;
            let pos = b.masked.as_ref().expect("masked positions");
            let hs = h.reshape((bs * t, d))?.index_select(pos, 0)?;
            let logits = enc.mlm_logits(&hs)?;
            let gold = b
                .labels
                .as_ref()
                .ok_or_else(|| Error::Msg("masked-LM batch without targets".into()))?;
            Ok(models::fused::cross_entropy(&logits, gold)?)
        }
        Arch::Encoder(bert) => {
            let h = bert.forward(&b.ids, None, b.mask.as_ref())?;
            let logits = bert.classify(&bert.pool(&h)?)?;
            let labels = b
                .labels
                .as_ref()
                .ok_or_else(|| Error::Msg("classification batch without labels".into()))?;
            Ok(models::fused::cross_entropy(&logits, labels)?)
        }
        Arch::Causal(l) => {
            let (bs, t) = b.ids.dims2()?;
            let h = l.forward_hidden(&b.ids.narrow(1, 0, t - 1)?, None, None)?;
            let d = h.dim(2)?;
            let h = h.contiguous()?.reshape((bs * (t - 1), d))?;
            let target = b.ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
            let loss = l.head_loss(&h, &target)?;
            // A router's balance loss (recorded only by training forwards) joins the loss.
            match l.take_aux_loss()? {
                Some(aux) => Ok((loss + aux)?),
                None => Ok(loss),
            }
        }
    }
}

/// Seed of the masks of masked-LM evaluation.
const EVAL_MASK_SEED: u64 = 0x3E7A_1;

/// Loss and task metric over the evaluation set, in inference mode (masked-LM data: loss and
/// perplexity of the masked tokens).
pub fn evaluate(m: &mut Model, ds: &[Example], batch: usize) -> Result<(f64, f64, &'static str)> {
    models::ops::set_training(false);
    refresh(m);
    let mut loss_sum = 0.0;
    let mut n = 0usize;
    let mut correct = 0usize;
    let mut tokens = 0usize;
    // Loss and accuracy do not depend on the order, so batch by length: less padding.
    let mut by_len: Vec<&Example> = ds.iter().collect();
    by_len.sort_by_key(|e| e.n_tokens());
    let mlm = match (&m.arch, ds.first()) {
        (Arch::Encoder(e), Some(Example::Lm { .. })) => {
            let vocab = e
                .linears()
                .iter()
                .find(|(n, _)| n.ends_with("word_embeddings"))
                .map_or(0, |(_, l)| l.out_features());
            Some(data::MlmTokens::of(&m.tokenizer, vocab)?)
        }
        _ => None,
    };
    for (ci, chunk) in by_len.chunks(batch.max(1)).enumerate() {
        let refs: Vec<&Example> = chunk.to_vec();
        let mut b = data::make_batch(&refs)?;
        match &m.arch {
            Arch::Encoder(_) if mlm.is_some() => {
                // The same masks at every evaluation, so evaluations compare.
                data::mask_batch(
                    &mut b,
                    mlm.as_ref().expect("mlm"),
                    EVAL_MASK_SEED,
                    ci as u64,
                )?;
                let l = batch_loss(m, &b)?.to_scalar::<f32>()? as f64;
                let k = b.masked.as_ref().map_or(0, |p| p.elem_count());
                loss_sum += l * k as f64;
                tokens += k;
                n += b.rows;
            }
            Arch::Encoder(bert) => {
                let h = bert.forward(&b.ids, None, b.mask.as_ref())?;
                let logits = bert.classify(&bert.pool(&h)?)?.detach();
                let labels = b.labels.as_ref().expect("classification batch");
                let l = models::fused::cross_entropy(&logits, labels)?.to_scalar::<f32>()? as f64;
                loss_sum += l * b.rows as f64;
                let pred = logits.argmax(1)?.to_vec1::<u32>()?;
                let gold = labels.to_vec1::<u32>()?;
                correct += pred.iter().zip(&gold).filter(|(a, b)| a == b).count();
                n += b.rows;
            }
            Arch::Causal(_) => {
                let l = batch_loss(m, &b)?.to_scalar::<f32>()? as f64;
                let (bs, t) = b.ids.dims2()?;
                let k = bs * (t - 1);
                loss_sum += l * k as f64;
                tokens += k;
                n += b.rows;
            }
        }
    }
    Ok(match &m.arch {
        Arch::Encoder(_) if mlm.is_some() => {
            let l = loss_sum / tokens.max(1) as f64;
            (l, l.exp(), "perplexity")
        }
        Arch::Encoder(_) => (
            loss_sum / n.max(1) as f64,
            correct as f64 / n.max(1) as f64,
            "accuracy",
        ),
        Arch::Causal(_) => {
            let l = loss_sum / tokens.max(1) as f64;
            (l, l.exp(), "perplexity")
        }
    })
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    pub out: PathBuf,
    pub tuned_params: usize,
    pub total_params: usize,
    pub steps: usize,
    pub total_steps: usize,
    pub final_loss: Option<f64>,
    pub eval: Option<EvalLog>,
    pub train_secs: f64,
    pub examples_per_sec: f64,
    pub finished: bool,
    /// What in-training methods recorded ([`TrainHook::state`]), by name.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hooks: std::collections::BTreeMap<String, Value>,
}

pub(crate) fn load_data(m: &Model, o: &FinetuneOptions) -> Result<Dataset> {
    let spec = data::Spec {
        data: &o.data,
        eval: o.eval_data.as_deref(),
        max_len: o.max_len,
        limit: o.limit,
        eval_limit: o.eval_limit,
    };
    match (o.task, &m.arch) {
        (Task::Sst2, Arch::Encoder(_)) => data::load_classification(&spec, &m.tokenizer),
        (Task::Lm, Arch::Causal(_)) => data::load_lm(&spec, &m.tokenizer),
        (Task::Mlm, Arch::Encoder(_)) => data::load_mlm(&spec, &m.tokenizer),
        (Task::Mlm, _) => Err(Error::option("task", format!(
            "`task` mlm pre-trains an encoder, but {} is a {} model; use `task` lm for causal models",
            o.model,
            m.arch_name()
        ))),
        (Task::Sst2, _) => Err(Error::option("task", format!(
            "`task` sst2 fine-tunes an encoder classifier, but {} is a {} model; use `task` lm for causal models",
            o.model,
            m.arch_name()
        ))),
        (Task::Lm, _) => Err(Error::option("task", format!(
            "`task` lm needs a causal model, but {} is a {} encoder; use `task` sst2",
            o.model,
            m.arch_name()
        ))),
    }
}

/// A training session: the model prepared for its method, data, optimizer and schedule.
pub struct Trainer<'a> {
    pub model: &'a mut Model,
    pub opts: FinetuneOptions,
    pub data: Dataset,
    pub opt: AdamW,
    pub log: FinetuneLog,
    pub steps_per_epoch: usize,
    pub warmup: usize,
    pub lora: bool,
    /// Replaces the schedule's lr multiplier (squeezing's recovery phases train at a constant lr).
    pub lr_factor_override: Option<f64>,
    /// Methods acting between steps ([`TrainHook`]).
    pub hooks: Vec<Box<dyn TrainHook>>,
    /// Masked-LM: the tokens masking uses (None for other tasks).
    pub mlm: Option<data::MlmTokens>,
    /// Modules still in full fine-tuning while the rest train as `opts.method` says (CaliSr);
    /// `None`: every module follows `opts.method`. Read by [`Trainer::rebuild_optimizer`].
    pub fft_modules: Option<std::collections::HashSet<String>>,
}

impl<'a> Trainer<'a> {
    pub fn new(model: &'a mut Model, o: &FinetuneOptions, progress: bool) -> Result<Self> {
        check_options(o)?;
        check_lora_rank(model, o)?;
        crate::opf::check_model(model, o)?;
        let data = load_data(model, o)?;
        if o.task == Task::Sst2 {
            ensure_head(model, data.num_labels, o.seed)?;
        }
        let mlm = if o.task == Task::Mlm {
            ensure_mlm_head(model, o.seed)?;
            let vocab = model
                .linears()
                .iter()
                .find(|(n, _)| n.ends_with("word_embeddings"))
                .map_or(0, |(_, l)| l.out_features());
            Some(data::MlmTokens::of(&model.tokenizer, vocab)?)
        } else {
            None
        };
        let params = prepare(model, o, progress)?;
        if params.is_empty() {
            return Err(Error::Msg("this method leaves no tensor to train".into()));
        }
        let mpo_lr = o.mpo_lr.unwrap_or(o.lr);
        let slots = params
            .iter()
            .filter(|p| !(p.mpo && mpo_lr == 0.0))
            .map(|p| {
                let lr = if p.mpo { mpo_lr } else { o.lr };
                let wd = if p.decay { o.weight_decay } else { 0.0 };
                (p.name.clone(), p.var.clone(), lr, wd)
            })
            .collect();
        let opt = AdamW::new(AdamWConfig::default(), slots);
        let steps_per_epoch = data.train.len().div_ceil(o.batch);
        let mut total = steps_per_epoch * o.epochs.max(1);
        if let Some(ms) = o.max_steps {
            total = if o.epochs == 0 { ms } else { total.min(ms) };
        }
        let warmup = o
            .warmup_steps
            .unwrap_or_else(|| (o.warmup_ratio * total as f64).ceil() as usize);
        let tuned: usize = opt
            .slots
            .iter()
            .map(|s| s.var.as_tensor().elem_count())
            .sum();
        let log = FinetuneLog {
            options: o.clone(),
            steps: Vec::new(),
            evals: Vec::new(),
            tuned_params: tuned,
            total_params: model.total_params(),
            total_steps: total,
            train_examples: data.train.len(),
            eval_examples: data.eval.len(),
            train_secs: 0.0,
            finished: false,
            squeeze: None,
            hooks: Default::default(),
        };
        Ok(Trainer {
            model,
            opts: o.clone(),
            data,
            opt,
            log,
            steps_per_epoch,
            warmup,
            lora: o.method == Method::Lora,
            lr_factor_override: None,
            hooks: hooks::for_options(o)?,
            mlm,
            fft_modules: None,
        })
    }

    /// Re-collect the trainable tensors after layers were replaced (squeezing). Moments are kept
    /// for tensors that are still the same variable and reset for new ones.
    pub fn rebuild_optimizer(&mut self) -> Result<()> {
        let params = match &self.fft_modules {
            Some(fft) => prepare_phased(self.model, &self.opts, fft)?,
            None => prepare(self.model, &self.opts, false)?,
        };
        let mpo_lr = self.opts.mpo_lr.unwrap_or(self.opts.lr);
        let mut old: HashMap<String, optim::Slot> = self
            .opt
            .slots
            .drain(..)
            .map(|s| (s.name.clone(), s))
            .collect();
        for p in params {
            if p.mpo && mpo_lr == 0.0 {
                continue;
            }
            let lr = if p.mpo { mpo_lr } else { self.opts.lr };
            let wd = if p.decay { self.opts.weight_decay } else { 0.0 };
            let n = p.var.as_tensor().elem_count();
            let (m, v) = match old.remove(&p.name) {
                Some(s) if s.var.as_tensor().id() == p.var.as_tensor().id() => (s.m, s.v),
                _ => (vec![0.0; n], vec![0.0; n]),
            };
            self.opt.slots.push(optim::Slot {
                name: p.name,
                var: p.var,
                lr,
                weight_decay: wd,
                m,
                v,
            });
        }
        self.log.tuned_params = self
            .opt
            .slots
            .iter()
            .map(|s| s.var.as_tensor().elem_count())
            .sum();
        self.log.total_params = self.model.total_params();
        Ok(())
    }

    /// The examples of global step `step` (epoch order from the seed).
    pub(crate) fn batch_at(&self, step: usize) -> Result<Batch> {
        let epoch = step / self.steps_per_epoch;
        let k = step % self.steps_per_epoch;
        let order = if self.opts.group_by_length {
            let lens: Vec<usize> = self.data.train.iter().map(Example::n_tokens).collect();
            data::grouped_epoch_order(&lens, self.opts.batch, self.opts.seed, epoch)
        } else {
            data::epoch_order(self.data.train.len(), self.opts.seed, epoch)
        };
        let idx = &order[k * self.opts.batch..((k + 1) * self.opts.batch).min(order.len())];
        let ex: Vec<&Example> = idx.iter().map(|&i| &self.data.train[i]).collect();
        let mut b = data::make_batch(&ex)?;
        if let Some(t) = &self.mlm {
            data::mask_batch(&mut b, t, self.opts.seed, step as u64)?;
        }
        Ok(b)
    }

    /// One optimizer step on the batch of global step `step`; returns the loss.
    pub fn train_step(&mut self, step: usize) -> Result<StepLog> {
        let t0 = Instant::now();
        self.each_hook(|h, tr| h.before_step(tr, step))?;
        let b = self.batch_at(step)?;
        models::ops::set_training(true);
        if self.lora {
            crate::lora::set_step(self.model, step as u64);
        }
        let loss = batch_loss(self.model, &b)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            return Err(Error::option(
                "lr",
                format!(
                    "the loss became {lv} at step {step}; lower `lr` or enable `max_grad_norm`"
                ),
            ));
        }
        let mut grads = loss.backward()?;
        self.each_hook(|h, tr| h.after_backward(tr, &mut grads, step))?;
        let norm = self.opt.grad_norm(&grads)?;
        let scale = optim::clip_scale(norm, self.opts.max_grad_norm);
        let f = self
            .lr_factor_override
            .unwrap_or_else(|| optim::linear_schedule(step, self.warmup, self.log.total_steps));
        self.opt.step(&grads, f, scale)?;
        Ok(StepLog {
            step: step + 1,
            epoch: step / self.steps_per_epoch,
            loss: lv,
            lr: self.opts.lr * f,
            grad_norm: norm,
            secs: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn evaluate(&mut self, step: usize) -> Result<Option<EvalLog>> {
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        let (loss, value, metric) = evaluate(self.model, &self.data.eval, self.opts.eval_batch)?;
        Ok(Some(EvalLog {
            step,
            epoch: step.saturating_sub(1) / self.steps_per_epoch,
            loss,
            metric: metric.into(),
            value,
            examples: self.data.eval.len(),
        }))
    }
}

/// The trainer runs squeezing's recovery phases.
impl crate::squeeze::Recovery for Trainer<'_> {
    fn model(&self) -> &Model {
        self.model
    }
    fn model_mut(&mut self) -> &mut Model {
        self.model
    }
    fn trains_mpo(&self) -> bool {
        self.opts.method.is_mpo()
    }
    fn has_eval_data(&self) -> bool {
        !self.data.eval.is_empty()
    }
    fn start_recovery(&mut self, lr_factor: f64) -> Result<()> {
        self.opts.method = Method::MpoAux;
        self.lr_factor_override = Some(lr_factor);
        self.rebuild_optimizer()
    }
    fn end_recovery(&mut self) {
        self.lr_factor_override = None;
    }
    fn layers_replaced(&mut self) -> Result<()> {
        self.rebuild_optimizer()
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.opt
            .slots
            .iter()
            .map(|s| (s.name.clone(), s.var.clone()))
            .collect()
    }
    fn recovery_step(&mut self, step: usize) -> Result<f64> {
        let s = self.train_step(step)?;
        let loss = s.loss;
        self.log.steps.push(s);
        Ok(loss)
    }
    fn score(&mut self, step: usize) -> Result<Option<crate::squeeze::Score>> {
        Ok(self.evaluate(step)?.map(|e| crate::squeeze::Score {
            loss: e.loss,
            metric: e.metric,
            value: e.value,
        }))
    }
}

/// Fine-tune `m` as `o` says, writing everything under `out`.
pub fn finetune(
    m: &mut Model,
    o: &FinetuneOptions,
    out: &Path,
    ctl: &RunControl,
) -> Result<FinetuneReport> {
    if ctl.resume && checkpoint_dir(out).is_none() {
        return Err(Error::option(
            "resume",
            format!(
                "{}: no checkpoint to resume from; run without `resume` to start a new run there",
                out.display()
            ),
        ));
    }
    let mut tr = Trainer::new(m, o, ctl.progress)?;
    if let Some(so) = &o.squeeze {
        crate::squeeze::check(&tr, so)?;
    }
    prepare_out(out, ctl.resume)?;
    let mut start = 0usize;
    if ctl.resume {
        // Hooks that changed the model re-apply it first, so the checkpoint's names match.
        let (saved, _) = checkpoint_log(out, o)?;
        tr.each_hook(|h, tr| match saved.hooks.get(h.name()) {
            Some(s) => h.restore(tr, s),
            None => Ok(()),
        })?;
        tr.log = load_checkpoint(out, &mut tr.opt, o)?;
        start = tr.opt.step as usize;
        refresh(tr.model);
    }
    let total = tr.log.total_steps;
    let pb = ctl.progress.then(|| {
        let pb = indicatif::ProgressBar::new(total as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_prefix("finetune");
        pb.set_position(start as u64);
        pb
    });
    let t0 = Instant::now();
    let secs_before = tr.log.train_secs;
    let mut examples = 0usize;
    let mut step = start;
    let mut stopped = false;
    while step < total {
        let s = tr.train_step(step)?;
        examples += tr.opts.batch.min(tr.data.train.len());
        step += 1;
        if let Some(pb) = &pb {
            let rate = examples as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!(
                "loss {:.4} lr {:.2e} {:.1} ex/s",
                s.loss, s.lr, rate
            ));
            pb.set_position(step as u64);
        }
        tr.log.steps.push(s);
        let epoch_end = step % tr.steps_per_epoch == 0 || step == total;
        if epoch_end {
            if let Some(e) = tr.evaluate(step)? {
                if let Some(pb) = &pb {
                    pb.println(format!(
                        "epoch {} step {step}: eval loss {:.4}, {} {:.4}",
                        e.epoch + 1,
                        e.loss,
                        e.metric,
                        e.value
                    ));
                }
                tr.log.evals.push(e);
            }
        }
        tr.log.train_secs = secs_before + t0.elapsed().as_secs_f64();
        let stop_now = ctl.stop_after.is_some_and(|k| step >= k) && step < total;
        if ctl.save_every.is_some_and(|k| k > 0 && step % k == 0)
            || (epoch_end && step < total)
            || stop_now
        {
            tr.record_hooks();
            save_checkpoint(out, &tr.opt, &tr.log)?;
            write_json(&out.join(LOG_FILE), &tr.log)?;
        }
        if stop_now {
            stopped = true;
            break;
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if !stopped {
        tr.each_hook(|h, tr| h.finish(tr))?;
    }
    tr.record_hooks();
    if let (false, Some(so)) = (stopped, tr.opts.squeeze.clone()) {
        let t1 = Instant::now();
        let r = crate::squeeze::squeeze(&mut tr, &so, step, ctl.progress)?;
        if ctl.progress {
            eprintln!(
                "squeezed {} -> {} parameters ({:.1}% of dense) in {} iterations: {}",
                r.start_params,
                r.final_params,
                100.0 * r.final_ratio,
                r.iters.len(),
                r.stop_reason
            );
        }
        tr.log.train_secs += t1.elapsed().as_secs_f64();
        tr.log.squeeze = serde_json::to_value(&r).ok();
        tr.log.total_params = tr.model.total_params();
        if let Some(e) = tr.evaluate(step)? {
            tr.log.evals.push(e);
        }
    }
    models::ops::set_training(false);
    refresh(tr.model);
    if !stopped {
        tr.log.finished = true;
        save_model(tr.model, &tr.opts, out)?;
        // The finished log before the checkpoints go, so that a kill in between leaves a
        // finished run rather than neither.
        write_json(&out.join(LOG_FILE), &tr.log)?;
        remove_checkpoints(out);
    } else {
        write_json(&out.join(LOG_FILE), &tr.log)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(FinetuneReport {
        out: out.to_path_buf(),
        tuned_params: tr.log.tuned_params,
        total_params: tr.log.total_params,
        steps: step,
        total_steps: total,
        final_loss: tr.log.steps.last().map(|s| s.loss),
        eval: tr.log.evals.last().cloned(),
        train_secs: tr.log.train_secs,
        examples_per_sec: examples as f64 / secs.max(1e-9),
        finished: !stopped,
        hooks: tr.log.hooks.clone(),
    })
}
