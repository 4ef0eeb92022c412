//! A Linear weight held in a form other than f32 (f16, GPTQ codes) and never trained, behind
//! one candle op: forward y = x·Wᵀ, backward only the input gradient g·W (LoRA over such
//! weights). Each form supplies the two products on plain slices; the op, the checks, the
//! tracked/untracked dispatch and the shapes are written once here.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

pub trait FrozenWeight: Send + Sync + 'static {
    /// The layer kind in error messages, e.g. "f16 linear".
    const WHAT: &'static str;
    /// Names of the forward and backward ops (candle op names).
    const OP: &'static str;
    const OP_T: &'static str;
    /// (n, k) of W [n, k].
    fn dims(&self) -> (usize, usize);
    /// y [m, n] = x [m, k] · Wᵀ.
    fn x_wt(&self, x: &[f32], m: usize) -> Result<Vec<f32>>;
    /// gx [m, k] = g [m, n] · W.
    fn g_w(&self, g: &[f32], m: usize) -> Result<Vec<f32>>;
}

/// y = x·Wᵀ for an f32 CPU x [.., k]; x gets the gradient g·W when tracked, W none.
pub fn matmul<W: FrozenWeight>(x: &Tensor, w: &Arc<W>) -> Result<Tensor> {
    let k = w.dims().1;
    if x.dims().last() != Some(&k) {
        bail!(
            "{}: input {:?} does not end in {k} features",
            W::WHAT,
            x.dims()
        );
    }
    let x = x.contiguous()?;
    let op = XWt(w.clone());
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

struct XWt<W>(Arc<W>);
struct GW<W>(Arc<W>);

fn contiguous_f32<'a, W: FrozenWeight>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{}: input must be f32", W::WHAT)
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{}: input must be contiguous", W::WHAT),
    }
}

/// Runs `f(rows, data)` on [.., last] input `s` and returns its [.., out_last] result.
fn rows_op<W: FrozenWeight>(
    s: &CpuStorage,
    l: &Layout,
    last: usize,
    out_last: usize,
    f: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32::<W>(s, l)?;
    let y = f(x, x.len() / last.max(1))?;
    let mut dims = l.dims().to_vec();
    *dims.last_mut().expect("checked rank") = out_last;
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}

impl<W: FrozenWeight> CustomOp1 for XWt<W> {
    fn name(&self) -> &'static str {
        W::OP
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        rows_op::<W>(s, l, k, n, |x, m| self.0.x_wt(x, m))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = GW(self.0.clone());
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&op)?
                .reshape(arg.shape())?,
        ))
    }
}

impl<W: FrozenWeight> CustomOp1 for GW<W> {
    fn name(&self) -> &'static str {
        W::OP_T
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        rows_op::<W>(s, l, n, k, |g, m| self.0.g_w(g, m))
    }
}
