//! Where an architecture gets its weights. An architecture is built in one pass: it asks a
//! [`WeightSource`] for every tensor and every Linear by its HF name and shape, and the source
//! decides what that Linear is (dense f32, GGUF blocks, an MPO, packed GPTQ, f16, …). Sources
//! for method checkpoints wrap a plain one and answer only for the modules they own (candle's
//! `VarBuilder` is the model: one lookup by name, the backend chooses the storage).

use crate::gguf::{self, GgufFile};
use crate::linear::Linear;
use crate::untrusted::escape;
use crate::weights::Weights;
use crate::{Error, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

/// Whether a Linear's bias must be in the checkpoint or may be absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    Required,
    Optional,
}

pub trait WeightSource {
    /// The file names refer to, for messages.
    fn path(&self) -> &Path;

    /// Shape of the stored tensor `name` (full HF name, e.g. `model.norm.weight`).
    fn shape(&self, name: &str) -> Option<Vec<usize>>;

    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    /// The tensor `name` as f32 (or the dtype a source keeps), which must have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    fn tensor_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.tensor(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The Linear `module` (HF module name without `.weight`) of shape [out_f, in_f]; also
    /// used for embeddings ([vocab, hidden]). Plain sources build a dense layer.
    fn linear(&self, module: &str, out_f: usize, in_f: usize, bias: Bias) -> Result<Linear> {
        dense_linear(self, module, out_f, in_f, bias)
    }

    /// Whether the checkpoint holds the Linear `module` (in whatever form).
    fn has_linear(&self, module: &str) -> bool {
        self.contains(&format!("{module}.weight"))
    }
}

/// A dense Linear from `module.weight` and its bias.
pub fn dense_linear<S: WeightSource + ?Sized>(
    src: &S,
    module: &str,
    out_f: usize,
    in_f: usize,
    bias: Bias,
) -> Result<Linear> {
    let weight = src.tensor(&format!("{module}.weight"), &[out_f, in_f])?;
    Ok(Linear::dense(weight, bias_of(src, module, out_f, bias)?))
}

/// The bias `module.bias` [out_f] as `bias` asks for it.
pub fn bias_of<S: WeightSource + ?Sized>(
    src: &S,
    module: &str,
    out_f: usize,
    bias: Bias,
) -> Result<Option<Tensor>> {
    let name = format!("{module}.bias");
    match bias {
        Bias::Required => src.tensor(&name, &[out_f]).map(Some),
        Bias::Optional => src.tensor_opt(&name, &[out_f]),
    }
}

impl WeightSource for Weights {
    fn path(&self) -> &Path {
        &self.path
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)
    }
}

/// The Linears a method checkpoint stores in its own form (MPO cores, experts, shared
/// central tensors), built by the method that wrote them.
pub trait SpecialLinears {
    /// Whether `module` is stored in the special form.
    fn holds(&self, module: &str) -> bool;
    /// Build the special `module` as a Linear of shape [out_f, in_f]; `rest` holds its bias.
    fn build(
        &self,
        rest: &Weights,
        module: &str,
        out_f: usize,
        in_f: usize,
        bias: Bias,
    ) -> Result<Linear>;
}

/// A checkpoint's safetensors with the Linears `special` holds built by it: everything else
/// (embeddings, norms, dense Linears) is answered from `rest`.
pub struct Overlay<S> {
    pub rest: Weights,
    pub special: S,
    /// The special modules the architecture asked for, so a loader can tell which ones its
    /// manifest names that the model does not have.
    built: Mutex<std::collections::BTreeSet<String>>,
}

impl<S> Overlay<S> {
    pub fn new(rest: Weights, special: S) -> Self {
        Overlay {
            rest,
            special,
            built: Default::default(),
        }
    }

    /// Of `names`, those no architecture request built.
    pub fn unbuilt<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
        let built = self.built.lock().map(|b| b.clone()).unwrap_or_default();
        names.into_iter().filter(|n| !built.contains(*n)).collect()
    }
}

impl<S: SpecialLinears> WeightSource for Overlay<S> {
    fn path(&self) -> &Path {
        &self.rest.path
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.rest.shape(name)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.rest.get(name, shape)
    }
    fn has_linear(&self, module: &str) -> bool {
        self.special.holds(module) || self.rest.contains(&format!("{module}.weight"))
    }
    fn linear(&self, module: &str, out_f: usize, in_f: usize, bias: Bias) -> Result<Linear> {
        if self.special.holds(module) {
            let l = self.special.build(&self.rest, module, out_f, in_f, bias)?;
            if let Ok(mut b) = self.built.lock() {
                b.insert(module.to_string());
            }
            Ok(l)
        } else {
            dense_linear(&self.rest, module, out_f, in_f, bias)
        }
    }
}

/// A stored special layer whose shape [rows, cols] is not the [out_f, in_f] asked for.
pub fn check_linear_shape(
    path: &Path,
    module: &str,
    got: [usize; 2],
    want: [usize; 2],
) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::Shape {
        path: path.to_path_buf(),
        name: format!("{module}.weight"),
        expected: want.to_vec(),
        got: got.to_vec(),
    })
}

/// A GGUF file read tensor by tensor as the architecture asks (no whole-file copy in HF
/// names first). Names are mapped to llama.cpp's, llama's q/k rows are put back in HF order,
/// and block-typed matrices become f32 tensors or, with `keep_quantized`, [`QLinear`]s.
///
/// [`QLinear`]: crate::qlinear::QLinear
pub struct GgufSource<'a> {
    file: &'a GgufFile,
    /// Added to every norm weight as read (Gemma's converter stores 1 + w).
    norm_shift: f64,
    reader: Mutex<std::fs::File>,
    /// HF name → GGUF name.
    names: HashMap<String, String>,
    /// Query and key-value head counts when q/k rows must be unpermuted (llama only).
    heads: Option<(usize, usize)>,
    keep_quantized: bool,
    progress: Option<indicatif::ProgressBar>,
}

impl<'a> GgufSource<'a> {
    /// `table`: the architecture's GGUF ↔ HF names; `heads`: query and key-value head counts
    /// when llama.cpp interleaved the q/k rows for its RoPE (llama only).
    pub fn new(
        file: &'a GgufFile,
        table: &gguf::names::NameTable,
        heads: Option<(usize, usize)>,
        keep_quantized: bool,
        progress: Option<indicatif::ProgressBar>,
    ) -> Result<Self> {
        let mut names = HashMap::new();
        let mut gnames: Vec<&String> = file.content.tensor_infos.keys().collect();
        gnames.sort();
        for g in gnames {
            // Tensors we do not model (e.g. rope_freqs) keep their GGUF name.
            let hf = table.hf_name(g).unwrap_or_else(|| g.clone());
            if let Some(other) = names.insert(hf.clone(), g.clone()) {
                return Err(file.err(format!(
                    "tensors '{}' and '{}' both give '{}'",
                    escape(&other),
                    escape(g),
                    escape(&hf)
                )));
            }
        }
        if let Some(pb) = &progress {
            pb.set_length(names.len() as u64);
        }
        let reader =
            Mutex::new(std::fs::File::open(&file.path).map_err(|e| Error::io(&file.path, e))?);
        Ok(GgufSource {
            file,
            norm_shift: 0.0,
            reader,
            names,
            heads,
            keep_quantized,
            progress,
        })
    }

    /// Norm weights read with `by` added (Gemma's norms are stored as 1 + w).
    pub fn with_norms_shifted(mut self, by: f64) -> Self {
        self.norm_shift = by;
        self
    }

    /// Read one tensor as stored, its block scales or values checked for NaN/Inf.
    fn read(&self, hf: &str) -> Result<QTensor> {
        let g = self.names.get(hf).ok_or_else(|| Error::MissingTensor {
            path: self.file.path.clone(),
            name: hf.to_string(),
        })?;
        let mut f = self
            .reader
            .lock()
            .map_err(|_| self.file.err("reader poisoned".into()))?;
        let shown = escape(g);
        let q = self
            .file
            .content
            .tensor(&mut *f, g, &Device::Cpu)
            .map_err(|e| self.file.err(format!("tensor '{shown}': {e}")))?;
        let data = q
            .data()
            .map_err(|e| self.file.err(format!("tensor '{shown}': {e}")))?;
        if let Some(what) = gguf::nonfinite(q.dtype(), &data) {
            return Err(self.file.err(format!(
                "tensor '{shown}' holds a NaN or infinite {what} (corrupt file?)"
            )));
        }
        drop(data);
        if let Some(pb) = &self.progress {
            pb.inc(1);
        }
        Ok(q)
    }

    /// Heads to unpermute `hf` by, if it is a llama q/k projection.
    fn permuted_heads(&self, hf: &str) -> Option<usize> {
        let (nh, nkv) = self.heads?;
        let m = hf.trim_end_matches(".weight").trim_end_matches(".bias");
        if m.ends_with("self_attn.q_proj") {
            Some(nh)
        } else if m.ends_with("self_attn.k_proj") {
            Some(nkv)
        } else {
            None
        }
    }

    fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(Error::Shape {
                path: self.file.path.clone(),
                name: name.to_string(),
                expected: want.to_vec(),
                got: got.to_vec(),
            });
        }
        Ok(())
    }

    /// Storage types of the tensors in the file (for reports): type name → count.
    pub fn stored_types(&self) -> BTreeMap<String, usize> {
        let mut types = BTreeMap::new();
        for t in self.file.tensor_types().values() {
            *types.entry(t.clone()).or_insert(0) += 1;
        }
        types
    }

    /// Every tensor of the file, dequantized, under HF names (what an export is checked
    /// against).
    pub fn read_all(&self) -> Result<HashMap<String, Tensor>> {
        let mut names: Vec<&String> = self.names.keys().collect();
        names.sort();
        let mut out = HashMap::new();
        for n in names {
            let dims = self.shape(n).unwrap_or_default();
            out.insert(n.clone(), self.tensor(n, &dims)?);
        }
        Ok(out)
    }

    /// [`GgufSource`] for a llama-family file, with llama's q/k rows unpermuted.
    pub fn llama(file: &'a GgufFile, keep_quantized: bool) -> Result<Self> {
        let cfg = file.llama_config()?;
        let heads =
            (cfg.model_type == "llama").then(|| (cfg.num_attention_heads, cfg.num_kv_heads()));
        Self::new(file, &gguf::names::LLAMA, heads, keep_quantized, None)
    }

    pub fn finish(self) {
        if let Some(pb) = self.progress {
            pb.finish_and_clear();
        }
    }
}

impl WeightSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let g = self.names.get(name)?;
        Some(self.file.content.tensor_infos.get(g)?.shape.dims().to_vec())
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let q = self.read(name)?;
        self.check_shape(name, q.shape().dims(), shape)?;
        let shown = escape(name);
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| self.file.err(format!("tensor '{shown}': {e}")))?;
        if let Some(n) = self.permuted_heads(name) {
            t = gguf::unpermute(&t, n)?;
        }
        if self.norm_shift != 0.0 && name.ends_with("norm.weight") {
            t = (t + self.norm_shift)?;
        }
        Ok(t)
    }

    fn linear(&self, module: &str, out_f: usize, in_f: usize, bias: Bias) -> Result<Linear> {
        let wname = format!("{module}.weight");
        let kept = self.keep_quantized
            && self
                .names
                .get(&wname)
                .and_then(|g| self.file.content.tensor_infos.get(g))
                .is_some_and(|i| crate::qlinear::is_supported(i.ggml_dtype));
        if !kept {
            return dense_linear(self, module, out_f, in_f, bias);
        }
        let q = self.read(&wname)?;
        self.check_shape(&wname, q.shape().dims(), &[out_f, in_f])?;
        let err = |e: candle_core::Error| self.file.err(format!("{}: {e}", escape(module)));
        let q = match self.permuted_heads(&wname) {
            Some(n) => crate::qlinear::unpermute_rows(&q, n).map_err(err)?,
            None => q,
        };
        let b = bias_of(self, module, out_f, bias)?;
        let ql = crate::qlinear::QLinear::new(q, b).map_err(err)?;
        Ok(Linear::new(Box::new(ql)))
    }
}
