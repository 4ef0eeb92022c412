//! Methods that act while training runs, not only when the trainable tensors are chosen at the
//! start: they replace layers or change which tensors train between steps (OPF's dynamic
//! decomposition, CaliSr's switch from full to lightweight tuning), edit the gradients before
//! the optimizer sees them (MPOE's mask on the shared central tensor, CaliSr's probes), and
//! undo their training-time structure before the model is saved (OPF contracts its chains).
//!
//! A hook's `state` is stored in the log with every checkpoint; on resume `restore` gets it
//! back before the checkpoint's tensors are loaded, so a hook that changed the model re-applies
//! the change first and the checkpoint's tensor names match again.

use super::*;
use candle_core::backprop::GradStore;

pub trait TrainHook {
    /// The key of this hook's entry in the log.
    fn name(&self) -> &'static str;

    /// Before the batch of `step` (0-based) runs. After changing which tensors train, call
    /// [`Trainer::rebuild_optimizer`] (moments are kept for tensors that keep training).
    fn before_step(&mut self, _tr: &mut Trainer<'_>, _step: usize) -> Result<()> {
        Ok(())
    }

    /// After the backward pass of `step`, before clipping and the optimizer update.
    fn after_backward(
        &mut self,
        _tr: &mut Trainer<'_>,
        _grads: &mut GradStore,
        _step: usize,
    ) -> Result<()> {
        Ok(())
    }

    /// After the last step, before evaluation of the final model and saving it.
    fn finish(&mut self, _tr: &mut Trainer<'_>) -> Result<()> {
        Ok(())
    }

    /// What this hook did so far and what it needs to resume (stored in the log).
    fn state(&self) -> Value {
        Value::Null
    }

    /// Resume from `state` as [`TrainHook::state`] returned it at the checkpoint.
    fn restore(&mut self, _tr: &mut Trainer<'_>, _state: &Value) -> Result<()> {
        Ok(())
    }
}

/// The hooks the options ask for, in the order they run.
pub(crate) fn for_options(o: &FinetuneOptions) -> Result<Vec<Box<dyn TrainHook>>> {
    let mut hooks: Vec<Box<dyn TrainHook>> = Vec::new();
    if o.method == Method::Opf {
        hooks.push(Box::new(crate::opf::OpfHook::new(o)));
    }
    // Idle on a model without experts (unless asked to mask, which it then refuses).
    hooks.push(Box::new(crate::mpoe::MoeHook::new(
        o.central_mask_p,
        o.seed,
    )?));
    if let Some(c) = &o.calisr {
        hooks.push(Box::new(crate::calisr::CalisrHook::new(c.clone())));
    }
    Ok(hooks)
}

impl Trainer<'_> {
    /// Run `f` on every hook with the trainer; the hooks are taken out meanwhile so that a hook
    /// can borrow the trainer mutably.
    pub(crate) fn each_hook(
        &mut self,
        mut f: impl FnMut(&mut dyn TrainHook, &mut Self) -> Result<()>,
    ) -> Result<()> {
        let mut hooks = std::mem::take(&mut self.hooks);
        let r = hooks.iter_mut().try_for_each(|h| f(h.as_mut(), self));
        self.hooks = hooks;
        r
    }

    /// Every hook's state into the log (before it is written).
    pub(crate) fn record_hooks(&mut self) {
        for h in &self.hooks {
            let s = h.state();
            if !s.is_null() {
                self.log.hooks.insert(h.name().to_string(), s);
            }
        }
    }
}
