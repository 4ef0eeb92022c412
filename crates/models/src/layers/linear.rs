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
    /// Parameter tensors that other layers may hold too (a shared core, a tied weight), with
    /// their element counts, so a model counts and saves each once. Packed layers own theirs.
    fn param_ids(&self) -> Vec<(candle_core::TensorId, usize)> {
        Vec::new()
    }
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
    fn param_ids(&self) -> Vec<(candle_core::TensorId, usize)> {
        let mut v = vec![(self.weight.id(), self.weight.elem_count())];
        if let Some(b) = &self.bias {
            v.push((b.id(), b.elem_count()));
        }
        v
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

/// Per-token INT8 quantization of a Linear's input, as LLM.int8() does it (vector-wise absmax:
/// each row x is replaced by round(x·127/max|x|)·max|x|/127), except for `keep`, the input
/// dimensions (outlier features) that stay in full precision and are left out of the absmax.
/// Simulated ("fake") quantization: it measures the accuracy cost of INT8 activations with any
/// weight format behind the Linear. In training the rounding is a straight-through estimator.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Input {
    /// Sorted, unique input dimensions kept in full precision.
    pub keep: Vec<usize>,
}

impl Int8Input {
    pub fn new(mut keep: Vec<usize>) -> Self {
        keep.sort_unstable();
        keep.dedup();
        Int8Input { keep }
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let n = *x.dims().last().unwrap_or(&0);
        if let Some(&d) = self.keep.last() {
            if d >= n {
                candle_core::bail!(
                    "int8 input: kept dimension {d} is outside an input of width {n}"
                );
            }
        }
        let dtype = x.dtype();
        let xf = x.detach().to_dtype(candle_core::DType::F32)?.contiguous()?;
        let mut v = xf.flatten_all()?.to_vec1::<f32>()?;
        let mut quantized = vec![true; n];
        for &d in &self.keep {
            quantized[d] = false;
        }
        for row in v.chunks_mut(n.max(1)) {
            let amax = row
                .iter()
                .zip(&quantized)
                .filter(|(_, &q)| q)
                .fold(0f32, |m, (x, _)| m.max(x.abs()));
            if amax == 0.0 {
                continue;
            }
            let s = amax / 127.0;
            for (x, &q) in row.iter_mut().zip(&quantized) {
                if q {
                    *x = (*x / s).round().clamp(-127.0, 127.0) * s;
                }
            }
        }
        let q = Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(dtype)?;
        if x.track_op() {
            // x + (q − x) with the difference constant: values of q, gradient of the identity.
            return x + (q - x.detach())?;
        }
        Ok(q)
    }
}

/// A 0×0 layer that holds a Linear's place for an instant while a wrapper takes the old one.
pub fn empty() -> Box<dyn LinearLayer> {
    Box::new(Dense {
        weight: Tensor::zeros((0, 0), candle_core::DType::F32, &candle_core::Device::Cpu)
            .expect("an empty tensor allocates nothing"),
        bias: None,
    })
}

/// The swap point held by architectures.
#[derive(Debug)]
pub struct Linear {
    inner: Box<dyn LinearLayer>,
    /// INT8 activations (LLM.int8 study); None = the input as it comes.
    pub int8_input: Option<Int8Input>,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::new(Box::new(Dense { weight, bias }))
    }
    pub fn new(inner: Box<dyn LinearLayer>) -> Self {
        Linear {
            inner,
            int8_input: None,
        }
    }
    /// The layer's output, with the input INT8-quantized first when `int8_input` is set. An
    /// inherent method, so architectures calling `lin.forward(x)` get it rather than the inner
    /// layer's through `Deref`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.int8_input {
            Some(q) => self.inner.forward(&q.apply(x)?),
            None => self.inner.forward(x),
        }
    }
    /// Replace the implementation, returning the old one.
    pub fn replace(&mut self, new: Box<dyn LinearLayer>) -> Box<dyn LinearLayer> {
        std::mem::replace(&mut self.inner, new)
    }
    /// Replace the layer by `f(old)`: how a wrapper (a LoRA adapter, a calibration tap) takes
    /// ownership of the layer it wraps.
    pub fn wrap(&mut self, f: impl FnOnce(Box<dyn LinearLayer>) -> Box<dyn LinearLayer>) {
        let old = std::mem::replace(&mut self.inner, empty());
        self.inner = f(old);
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
        Linear::forward(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn int8_input_quantizes_rows_except_kept_dims() {
        let x = Tensor::new(
            &[[1.0f32, -2.0, 100.0, 0.5], [0.0, 0.0, 0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let q = Int8Input::new(vec![2]).apply(&x).unwrap();
        let v = q.to_vec2::<f32>().unwrap();
        // Row 0: absmax over dims 0, 1, 3 is 2 → step 2/127; dim 2 is kept as is.
        let s = 2.0f32 / 127.0;
        let want = [64.0 * s, -127.0 * s, 100.0, 32.0 * s];
        for (a, b) in v[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?} vs {want:?}", v[0]);
        }
        assert_eq!(v[1], vec![0.0; 4]);
        // Nothing kept: the 100 sets the step and the small values round to 0 or ±1 step.
        let v = Int8Input::new(vec![])
            .apply(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let s = 100.0f32 / 127.0;
        for (a, b) in v[0].iter().zip([s, -3.0 * s, 127.0 * s, s]) {
            assert!((a - b).abs() < 1e-5, "{:?}", v[0]);
        }
        assert!(Int8Input::new(vec![4]).apply(&x).is_err());
    }

    #[test]
    fn int8_input_passes_the_gradient_straight_through() {
        let x = Var::new(&[[0.3f32, -1.7, 2.2]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let mut lin = Linear::dense(w, None);
        lin.int8_input = Some(Int8Input::new(vec![]));
        let y = lin.forward(x.as_tensor()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gx, vec![vec![1.0, 2.0, 3.0]]);
        // The forward value is that of the quantized input.
        let s = 2.2f32 / 127.0;
        let xq = [(0.3f32 / s).round() * s, (-1.7f32 / s).round() * s, 2.2];
        let want = xq[0] + 2.0 * xq[1] + 3.0 * xq[2];
        assert!((y.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    }
}
