//! Small numerical ops shared by architectures. candle's fused CPU kernels for RMSNorm,
//! LayerNorm and RoPE have no backward, so when training is on we take the composed
//! (autograd-visible) forms; inference keeps the fused ones.

use candle_core::{Result, Tensor, D};
use std::cell::Cell;

thread_local! {
    // Per thread, not global: one thread evaluating (inference forms, no backward) must not
    // switch the ops of another thread that is training a different model mid-forward.
    static TRAINING: Cell<bool> = const { Cell::new(false) };
}

/// Turn on gradient-carrying forms of the fused ops (fine-tuning) for this thread; off for
/// inference.
pub fn set_training(on: bool) {
    TRAINING.with(|t| t.set(on));
}

pub fn training() -> bool {
    TRAINING.with(|t| t.get())
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::usable(&[x, w]) {
        return crate::fused::rms_norm(x, w, eps);
    }
    if training() {
        candle_nn::ops::rms_norm_slow(x, w, eps as f32)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
    }
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::usable(&[x, w, b]) {
        return crate::fused::layer_norm(x, w, b, eps);
    }
    if training() {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)
    }
}

/// HF-layout (rotate-half) rotary embedding; x is [b, heads, t, head_dim].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if training() {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)
    } else {
        candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
    }
}

pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if training() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// Exact (erf) GELU, as BERT uses.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if crate::fused::usable(&[x]) {
        return crate::fused::gelu_erf(x);
    }
    x.gelu_erf()
}
