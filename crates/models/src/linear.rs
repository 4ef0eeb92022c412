//! The one pluggable Linear type. Architectures only ever hold a [`Linear`]; compression,
//! adapter and quantization methods swap the implementation behind it (dense → MPO, LoRA,
//! packed integers) through `Model::linears_mut`, so no architecture file is ever edited.

use candle_core::{Module, Result, Tensor};
use std::any::Any;

/// What every Linear implementation provides. y = x·Wᵀ + b with W stored [out, in] as in torch.
pub trait LinearLayer: std::fmt::Debug + Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Parameters held by this layer as stored (packed/factored), bias included.
    fn num_params(&self) -> usize;
    /// Bytes the layer's parameters occupy in memory (f32 unless the layer packs them).
    fn storage_bytes(&self) -> usize {
        4 * self.num_params()
    }
    /// The effective dense weight [out, in]: contracted, dequantized or merged as needed.
    fn weight(&self) -> Result<Tensor>;
    fn bias(&self) -> Option<Tensor>;
    /// Short name of the implementation ("dense", "mpo", "lora", "gptq4", …) for reports.
    fn kind(&self) -> String;
    /// Row lookup for embeddings (ids: 1-D u32). Factored layers may override this to avoid
    /// materialising the whole table.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight()?.index_select(ids, 0)
    }
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A plain dense layer.
#[derive(Debug, Clone)]
pub struct Dense {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// x [.., in] · Wᵀ as one 2-D GEMM over all leading dims; the transposed view of W costs no copy.
/// f32 CPU tensors run [`crate::kernels::linear`] (fast GEMM/gemv, hand-written backward that
/// skips the weight-gradient GEMM of a frozen W); anything else takes candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    crate::kernels::linear(x, w, None)
}

impl LinearLayer for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::linear(x, &self.weight, self.bias.as_ref())
    }
    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    fn num_params(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
    fn weight(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.clone()
    }
    fn kind(&self) -> String {
        "dense".into()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The swap point held by architectures.
#[derive(Debug)]
pub struct Linear {
    inner: Box<dyn LinearLayer>,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            inner: Box::new(Dense { weight, bias }),
        }
    }
    pub fn new(inner: Box<dyn LinearLayer>) -> Self {
        Linear { inner }
    }
    /// Replace the implementation, returning the old one.
    pub fn replace(&mut self, new: Box<dyn LinearLayer>) -> Box<dyn LinearLayer> {
        std::mem::replace(&mut self.inner, new)
    }
    pub fn inner(&self) -> &dyn LinearLayer {
        self.inner.as_ref()
    }
    pub fn inner_mut(&mut self) -> &mut dyn LinearLayer {
        self.inner.as_mut()
    }
}

impl std::ops::Deref for Linear {
    type Target = dyn LinearLayer;
    fn deref(&self) -> &Self::Target {
        self.inner.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
}
