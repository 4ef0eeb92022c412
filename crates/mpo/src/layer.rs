//! candle layers whose weight is an MPO: the cores are `Var`s so autograd reaches each of
//! them, and every core carries a trainable flag so fine-tuning methods can freeze any subset
//! (MPOP/LFA: freeze the central tensor; CT-only; OPF: train all). A frozen core is fed to the
//! graph detached, so it gets no gradient and never shows up in an optimizer's var list.
//! Vars can be handed in from outside, which is how a central tensor is shared between
//! experts (MPOE) or layers (MPOBERT).

use crate::contract::{apply_cores, apply_flops, dense_from_cores, embed_cores, rebuild_flops};
use crate::error::{Error, Result};
use crate::mpo::Mpo;
use crate::scalar::Scalar;
use crate::shapes::MpoShape;
use candle_core::{Device, Module, Tensor, Var};
use serde::{Deserialize, Serialize};

/// How a layer computes its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ForwardMode {
    /// Rebuild W from the cores, then a dense product (what the papers' PyTorch code does).
    Rebuild,
    /// Contract the input through the cores without forming W (PRR's `tt.tto`).
    Contract,
    /// Whichever of the two needs fewer multiply-adds for this input.
    #[default]
    Auto,
}

/// The cores of one MPO weight as candle variables, with per-core trainable flags.
#[derive(Clone, Debug)]
pub struct MpoCores {
    shape: MpoShape,
    vars: Vec<Var>,
    trainable: Vec<bool>,
    spectra: Vec<Vec<f64>>,
}

impl MpoCores {
    /// Variables initialised from an MPO (all trainable).
    pub fn from_mpo<T: Scalar>(mpo: &Mpo<T>, device: &Device) -> Result<Self> {
        let vars = mpo
            .core_tensors(device)?
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut c = Self::from_vars(mpo.shape(), vars)?;
        c.spectra = mpo.spectra.clone();
        Ok(c)
    }

    /// Cores from existing variables (e.g. a central tensor shared with other layers).
    pub fn from_vars(shape: MpoShape, vars: Vec<Var>) -> Result<Self> {
        shape.validate()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let bonds = bonds_of(&tensors, &shape)?;
        shape.check_bonds(&bonds)?;
        let n = vars.len();
        Ok(Self {
            shape,
            vars,
            trainable: vec![true; n],
            spectra: Vec::new(),
        })
    }

    pub fn shape(&self) -> &MpoShape {
        &self.shape
    }

    pub fn n(&self) -> usize {
        self.vars.len()
    }

    /// Current bond dimensions d_0..d_n.
    pub fn bonds(&self) -> Vec<usize> {
        let mut b = vec![1];
        b.extend(self.vars.iter().map(|v| v.as_tensor().dims()[3]));
        b
    }

    pub fn central_index(&self) -> usize {
        self.n() / 2
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn var(&self, k: usize) -> &Var {
        &self.vars[k]
    }

    /// Replaces core k by another variable of the same shape (e.g. a shared central tensor).
    pub fn set_var(&mut self, k: usize, var: Var) -> Result<()> {
        if var.as_tensor().dims() != self.vars[k].as_tensor().dims() {
            return Err(Error::Shape(format!(
                "core {k} has shape {:?}, replacement has {:?}",
                self.vars[k].as_tensor().dims(),
                var.as_tensor().dims()
            )));
        }
        self.vars[k] = var;
        Ok(())
    }

    pub fn is_trainable(&self, k: usize) -> bool {
        self.trainable[k]
    }

    pub fn set_trainable(&mut self, k: usize, on: bool) {
        self.trainable[k] = on;
    }

    pub fn set_all_trainable(&mut self, on: bool) {
        self.trainable.iter_mut().for_each(|t| *t = on);
    }

    /// Lightweight fine-tuning (MPOP): auxiliary tensors train, the central one is frozen.
    pub fn freeze_central(&mut self) {
        let c = self.central_index();
        for (k, t) in self.trainable.iter_mut().enumerate() {
            *t = k != c;
        }
    }

    /// Only the central tensor trains (MPOP's `CT_learn`).
    pub fn train_only_central(&mut self) {
        let c = self.central_index();
        for (k, t) in self.trainable.iter_mut().enumerate() {
            *t = k == c;
        }
    }

    /// Variables of the trainable cores (for an optimizer).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.vars
            .iter()
            .zip(&self.trainable)
            .filter(|(_, &t)| t)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// Core tensors as fed to the graph (frozen cores detached).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.vars
            .iter()
            .zip(&self.trainable)
            .map(|(v, &t)| {
                if t {
                    v.as_tensor().clone()
                } else {
                    v.as_detached_tensor()
                }
            })
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|v| v.as_tensor().elem_count()).sum()
    }

    /// W[orig_rows, orig_cols] rebuilt from the cores (differentiable).
    pub fn to_dense(&self) -> candle_core::Result<Tensor> {
        dense_from_cores(&self.tensors(), &self.shape)
    }

    /// Exports the current cores as a plain MPO. The spectra are those the layer was built
    /// from; after training call [`Mpo::canonicalize`] to refresh them.
    pub fn to_mpo<T: Scalar>(&self) -> Result<Mpo<T>> {
        let cores = self
            .vars
            .iter()
            .map(|v| {
                v.as_tensor()
                    .to_dtype(T::DTYPE)?
                    .flatten_all()?
                    .to_vec1::<T>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let spectra = if self.spectra.len() + 1 == self.n() {
            self.spectra.clone()
        } else {
            Vec::new()
        };
        Mpo::from_cores(&self.shape, self.bonds(), cores, spectra)
    }

    fn rebuild_cost(&self) -> f64 {
        rebuild_flops(&self.shape, &self.bonds())
    }
}

fn bonds_of(tensors: &[Tensor], shape: &MpoShape) -> Result<Vec<usize>> {
    if tensors.len() != shape.n() {
        return Err(Error::Shape(format!(
            "{} cores for {} sites",
            tensors.len(),
            shape.n()
        )));
    }
    let mut b = vec![1];
    for (k, t) in tensors.iter().enumerate() {
        let d = t.dims();
        if d.len() != 4
            || d[0] != b[k]
            || d[1] != shape.row_factors[k]
            || d[2] != shape.col_factors[k]
        {
            return Err(Error::Shape(format!(
                "core {k} has shape {d:?}, which does not fit {shape:?}"
            )));
        }
        b.push(d[3]);
    }
    Ok(b)
}

/// y = x·Wᵀ + b with W[out, in] an MPO.
#[derive(Clone, Debug)]
pub struct MpoLinear {
    cores: MpoCores,
    bias: Option<Var>,
    bias_trainable: bool,
    mode: ForwardMode,
}

impl MpoLinear {
    /// A layer over existing cores; `bias` has shape [out].
    pub fn new(cores: MpoCores, bias: Option<Tensor>) -> Result<Self> {
        let bias = match bias {
            Some(b) => {
                if b.dims() != [cores.shape.orig_rows] {
                    return Err(Error::Shape(format!(
                        "bias has shape {:?}, expected [{}]",
                        b.dims(),
                        cores.shape.orig_rows
                    )));
                }
                Some(Var::from_tensor(&b)?)
            }
            None => None,
        };
        Ok(Self {
            cores,
            bias,
            bias_trainable: true,
            mode: ForwardMode::Auto,
        })
    }

    /// From a decomposed weight and an optional bias (length out).
    pub fn from_mpo<T: Scalar>(mpo: &Mpo<T>, bias: Option<&[T]>, device: &Device) -> Result<Self> {
        let cores = MpoCores::from_mpo(mpo, device)?;
        let bias = bias
            .map(|b| Tensor::from_slice(b, b.len(), device))
            .transpose()?;
        Self::new(cores, bias)
    }

    pub fn with_mode(mut self, mode: ForwardMode) -> Self {
        self.mode = mode;
        self
    }

    pub fn mode(&self) -> ForwardMode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: ForwardMode) {
        self.mode = mode;
    }

    pub fn cores(&self) -> &MpoCores {
        &self.cores
    }

    pub fn cores_mut(&mut self) -> &mut MpoCores {
        &mut self.cores
    }

    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    pub fn set_bias_trainable(&mut self, on: bool) {
        self.bias_trainable = on;
    }

    /// Trainable cores plus the bias when it trains.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut v = self.cores.trainable_vars();
        if let (Some(b), true) = (&self.bias, self.bias_trainable) {
            v.push(b.clone());
        }
        v
    }

    /// The dense weight W[out, in] (differentiable).
    pub fn to_dense(&self) -> candle_core::Result<Tensor> {
        self.cores.to_dense()
    }

    /// Which path `Auto` takes for an input with `batch` rows.
    pub fn resolve_mode(&self, batch: usize) -> ForwardMode {
        match self.mode {
            ForwardMode::Auto => {
                let s = &self.cores.shape;
                let contract = apply_flops(s, &self.cores.bonds(), batch);
                let rebuild =
                    self.cores.rebuild_cost() + (batch * s.orig_rows * s.orig_cols) as f64;
                if contract <= rebuild {
                    ForwardMode::Contract
                } else {
                    ForwardMode::Rebuild
                }
            }
            m => m,
        }
    }

    /// Forward with an explicit path.
    pub fn forward_with(&self, x: &Tensor, mode: ForwardMode) -> candle_core::Result<Tensor> {
        let batch = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        let y = match if mode == ForwardMode::Auto {
            self.resolve_mode(batch)
        } else {
            mode
        } {
            ForwardMode::Contract => apply_cores(x, &self.cores.tensors(), &self.cores.shape)?,
            _ => {
                let w = self.to_dense()?;
                x.broadcast_matmul(&w.t()?)?
            }
        };
        match self.bias_tensor() {
            Some(b) => y.broadcast_add(&b),
            None => Ok(y),
        }
    }

    /// The bias as the forward pass uses it: tracked only while it is trainable.
    pub fn bias_tensor(&self) -> Option<Tensor> {
        self.bias.as_ref().map(|b| {
            if self.bias_trainable {
                b.as_tensor().clone()
            } else {
                b.as_detached_tensor()
            }
        })
    }
}

impl Module for MpoLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, self.mode)
    }
}

/// Embedding table W[vocab, dim] as an MPO; `lm_head` reuses the same cores for tied output
/// logits x·Wᵀ (T5, BERT).
#[derive(Clone, Debug)]
pub struct MpoEmbedding {
    cores: MpoCores,
    mode: ForwardMode,
}

impl MpoEmbedding {
    pub fn new(cores: MpoCores) -> Self {
        Self {
            cores,
            mode: ForwardMode::Auto,
        }
    }

    pub fn from_mpo<T: Scalar>(mpo: &Mpo<T>, device: &Device) -> Result<Self> {
        Ok(Self::new(MpoCores::from_mpo(mpo, device)?))
    }

    pub fn with_mode(mut self, mode: ForwardMode) -> Self {
        self.mode = mode;
        self
    }

    pub fn cores(&self) -> &MpoCores {
        &self.cores
    }

    pub fn cores_mut(&mut self) -> &mut MpoCores {
        &mut self.cores
    }

    pub fn trainable_vars(&self) -> Vec<Var> {
        self.cores.trainable_vars()
    }

    /// The dense table W[vocab, dim] (differentiable).
    pub fn to_dense(&self) -> candle_core::Result<Tensor> {
        self.cores.to_dense()
    }

    /// Rows W[ids] with an explicit path; output shape ids.dims() + [dim].
    pub fn forward_with(&self, ids: &Tensor, mode: ForwardMode) -> candle_core::Result<Tensor> {
        let s = &self.cores.shape;
        let mode = match mode {
            ForwardMode::Auto => {
                let bonds = self.cores.bonds();
                let mut jdone = 1.0;
                let mut per_token = 0.0;
                for k in 0..s.n() {
                    per_token += jdone * (bonds[k] * s.col_factors[k] * bonds[k + 1]) as f64;
                    jdone *= s.col_factors[k] as f64;
                }
                if ids.elem_count() as f64 * per_token <= self.cores.rebuild_cost() {
                    ForwardMode::Contract
                } else {
                    ForwardMode::Rebuild
                }
            }
            m => m,
        };
        match mode {
            ForwardMode::Contract => embed_cores(ids, &self.cores.tensors(), s),
            _ => {
                let w = self.to_dense()?;
                let flat = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?;
                let rows = w.index_select(&flat, 0)?;
                let mut dims = ids.dims().to_vec();
                dims.push(s.orig_cols);
                rows.reshape(dims)
            }
        }
    }

    /// Tied output head: logits = x·Wᵀ over the vocabulary.
    pub fn lm_head(&self, x: &Tensor, mode: ForwardMode) -> candle_core::Result<Tensor> {
        let lin = MpoLinear {
            cores: self.cores.clone(),
            bias: None,
            bias_trainable: false,
            mode,
        };
        lin.forward(x)
    }
}

impl Module for MpoEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(ids, self.mode)
    }
}
