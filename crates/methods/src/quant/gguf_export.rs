//! GGUF export (issue #6 item 4): any causal model mpolm loads — dense, MPO, packed GPTQ/RTN —
//! written as a llama.cpp GGUF v3 file (`llama` architecture, or `qwen2` for qwen2 models).
//!
//! * Weights are each Linear's effective dense weight (`LinearLayer::weight`: MPOs contracted,
//!   packed integers dequantized), renamed to llama.cpp names (`models::gguf::names`), with
//!   the q/k rows of llama-arch models permuted the way `convert_hf_to_gguf.py` does.
//! * Blocks come from candle's GGML quantizers (`QTensor::quantize`), which produce the block
//!   layouts of ggml's `block_q8_0`, `block_q4_K`, … (the k-quant scale search is ggml's older
//!   `make_qkx1_quants`, so values may differ in the last bit from today's `llama-quantize`,
//!   the format does not).
//! * The per-tensor type is [`tensor_type`], a pure function mirroring llama.cpp's
//!   `llama_tensor_get_type` for the recipes offered here:
//!   - 1-D tensors (norms, biases) stay f32;
//!   - `output.weight` (or `token_embd.weight` when the head is tied) becomes Q6_K for every
//!     quantized recipe except q8_0, or Q8_0 when its rows are not a multiple of 256;
//!   - q4_k_m: `attn_v` and `ffn_down` of the layers where `use_more_bits(i, n)` holds
//!     (`i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`) are Q6_K, everything else Q4_K; `i` is
//!     llama-quantize's visit counter, i.e. the layer's rank in name order
//!     ([`llama_cpp_counter`]) — checked against the llama.cpp-made Q4_K_M of the
//!     qwen2.5-0.5b package: all 291 tensor types agree;
//!   - q2_k: `attn_v` Q4_K when n_head/n_head_kv ≥ 4 else Q3_K, `ffn_down` and `attn_output`
//!     Q3_K, the rest Q2_K;
//!   - a row length that is not a multiple of the block size falls back as llama.cpp does:
//!     Q4_K→Q5_0, Q6_K→Q8_0, Q5_K→Q5_1, Q2_K/Q3_K→Q4_0 (llama.cpp uses IQ4_NL, same 4.5 bpw,
//!     which candle lacks); Q4_0/Q8_0 rows not a multiple of 32 → f16 (llama.cpp refuses);
//!     a fallback that still does not fit → f16. Each fallback is reported.
//! * Metadata mirrors `convert_hf_to_gguf.py`: `general.*`, `{arch}.*` hyper-parameters,
//!   `general.file_type`, `general.quantization_version = 2`, and the tokenizer: copied verbatim
//!   (`tokenizer.*`) from the source GGUF when the model was loaded from one, otherwise built
//!   from the model's tokenizer.json (byte-level BPE → `tokenizer.ggml.model = gpt2`).
//! * The bytes are laid out by `models::gguf::write` (this module decides only what goes in).
//! * The file is written to a temporary file next to `out` and renamed into place; an existing
//!   `out` is refused, as `export --dense` refuses a non-empty directory.

use super::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use models::gguf::names::{self, NameTable};
use models::gguf::{types, write};
use models::hub::Format;
use models::{Arch, Linear, Model};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The recipes `--type` offers (llama.cpp `llama_ftype` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4KM,
    Q6K,
    Q2K,
}

/// Names accepted by `--type`, in the order `--help` lists them.
pub const TYPE_NAMES: &[&str] = &["f32", "f16", "q8_0", "q4_0", "q4_k_m", "q6_k", "q2_k"];

impl GgufType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufType::F32,
            "f16" => GgufType::F16,
            "q8_0" => GgufType::Q8_0,
            "q4_0" => GgufType::Q4_0,
            "q4_k_m" => GgufType::Q4KM,
            "q6_k" => GgufType::Q6K,
            "q2_k" => GgufType::Q2K,
            _ => {
                return Err(Error::Msg(format!(
                    "unknown GGUF type '{s}' (choose one of {})",
                    TYPE_NAMES.join(", ")
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4KM => "q4_k_m",
            GgufType::Q6K => "q6_k",
            GgufType::Q2K => "q2_k",
        }
    }

    /// `general.file_type` (llama.cpp `enum llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q8_0 => 7,
            GgufType::Q2K => 10,
            GgufType::Q4KM => 15,
            GgufType::Q6K => 18,
        }
    }

    /// The type of an ordinary 2-D weight under this recipe.
    pub fn base(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4KM => GgmlDType::Q4K,
            GgufType::Q6K => GgmlDType::Q6K,
            GgufType::Q2K => GgmlDType::Q2K,
        }
    }

    fn quantized(self) -> bool {
        !matches!(self, GgufType::F32 | GgufType::F16)
    }
}

fn type_name(t: GgmlDType) -> &'static str {
    types::of(t).name
}

/// What [`tensor_type`] chose for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeChoice {
    pub ty: GgmlDType,
    /// The type the recipe wanted when the row length forced a fallback.
    pub fallback_from: Option<GgmlDType>,
}

/// Where a tensor sits, as the recipe needs it.
#[derive(Debug, Clone, Copy)]
pub struct TensorSite<'a> {
    /// llama.cpp name (`blk.3.ffn_down.weight`).
    pub name: &'a str,
    pub n_dims: usize,
    /// Row length (ggml `ne[0]`, the torch `in_features`).
    pub n_cols: usize,
    /// Layer index for `blk.N.*` tensors.
    pub layer: Option<usize>,
    pub n_layers: usize,
    /// n_head / n_head_kv.
    pub n_gqa: usize,
    /// Whether the file has a separate `output.weight` (false when tied).
    pub has_output: bool,
    /// Experts per mixture-of-experts layer (`{arch}.expert_count`); 0 for a dense model.
    pub n_expert: usize,
}

/// llama.cpp's `use_more_bits` (which layers get more bits in the *_M recipes).
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
}

/// llama-quantize visits tensors in name order (a `std::map`), so the per-kind counter that
/// feeds `use_more_bits` is a layer's rank among the layer numbers sorted as strings
/// (0, 1, 10, 11, …, 19, 2, 20, …), not the layer number itself.
pub fn llama_cpp_counter(layer: usize, n_layers: usize) -> usize {
    let key = layer.to_string();
    (0..n_layers).filter(|l| l.to_string() < key).count()
}

/// The storage type of one tensor under a recipe (see the module docs for the rules).
pub fn tensor_type(ft: GgufType, s: &TensorSite) -> TypeChoice {
    let keep = |ty| TypeChoice {
        ty,
        fallback_from: None,
    };
    if s.n_dims < 2 {
        return keep(GgmlDType::F32);
    }
    let module = s
        .name
        .strip_suffix(".weight")
        .unwrap_or(s.name)
        .rsplit('.')
        .next()
        .unwrap_or("");
    // llama-quantize never quantizes the router, and the converter writes it in f32.
    if module == "ffn_gate_inp" {
        return keep(GgmlDType::F32);
    }
    if !ft.quantized() {
        return keep(ft.base());
    }
    let mut ty = ft.base();
    let more =
        |i: Option<usize>| use_more_bits(llama_cpp_counter(i.unwrap_or(0), s.n_layers), s.n_layers);
    // With experts, llama.cpp reads ffn_down's layer from the tensor's name (`layer_info`), not
    // from its visit counter.
    let more_down = |i: Option<usize>| {
        if s.n_expert > 1 {
            use_more_bits(i.unwrap_or(0), s.n_layers)
        } else {
            more(i)
        }
    };
    let eight_experts = s.n_expert == 8;
    if s.name == "output.weight" || (!s.has_output && s.name == "token_embd.weight") {
        if !s.n_cols.is_multiple_of(ty.block_size()) {
            ty = GgmlDType::Q8_0;
        } else if ty != GgmlDType::Q8_0 {
            ty = GgmlDType::Q6K;
        }
    } else if s.name == "token_embd.weight" {
        // The recipes here keep the base type for a separate embedding.
    } else if module == "attn_v" {
        match ft {
            GgufType::Q2K => {
                ty = if s.n_gqa >= 4 {
                    GgmlDType::Q4K
                } else {
                    GgmlDType::Q3K
                }
            }
            GgufType::Q4KM if more(s.layer) => ty = GgmlDType::Q6K,
            _ => {}
        }
        // "for the 8-expert model, bumping this to Q8_0 trades just ~128MB" (llama.cpp)
        if eight_experts {
            ty = GgmlDType::Q8_0;
        }
    } else if module == "attn_k" && eight_experts {
        ty = GgmlDType::Q8_0;
    } else if module == "ffn_down" || module == "ffn_down_exps" {
        match ft {
            GgufType::Q2K => ty = GgmlDType::Q3K,
            GgufType::Q4KM if more_down(s.layer) => ty = GgmlDType::Q6K,
            _ => {}
        }
    } else if module == "attn_output" {
        match ft {
            GgufType::Q2K | GgufType::Q4KM if eight_experts => ty = GgmlDType::Q5K,
            GgufType::Q2K => ty = GgmlDType::Q3K,
            _ => {}
        }
    }
    if s.n_cols.is_multiple_of(ty.block_size()) {
        return keep(ty);
    }
    let mut fb = match ty {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if !s.n_cols.is_multiple_of(fb.block_size()) {
        fb = GgmlDType::F16;
    }
    TypeChoice {
        ty: fb,
        fallback_from: Some(ty),
    }
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub ftype: GgufType,
    /// An indicatif bar over tensors.
    pub progress: bool,
    /// One llama-quantize-style line per tensor on stdout.
    pub print_tensors: bool,
}

impl ExportOptions {
    pub fn new(ftype: GgufType) -> Self {
        ExportOptions {
            ftype,
            progress: false,
            print_tensors: false,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorReport {
    pub name: String,
    /// ggml order (`ne[0]` first), as llama.cpp prints it.
    pub shape: Vec<usize>,
    /// Implementation of the source layer ("dense", "mpo", "gptq4", "norm").
    pub source_kind: String,
    pub ggml_type: String,
    pub fallback_from: Option<String>,
    pub bytes: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    pub recipe: String,
    pub arch: String,
    pub file_bytes: u64,
    pub n_params: usize,
    pub bits_per_weight: f64,
    /// ggml type name → number of tensors.
    pub type_counts: BTreeMap<String, usize>,
    pub fallbacks: Vec<String>,
    pub tensors: Vec<TensorReport>,
    pub tokenizer_from: String,
    pub seconds: f64,
}

/// One tensor to write: its source and where it goes.
struct Item<'a> {
    gguf: String,
    /// torch shape ([out, in] or [n]).
    shape: Vec<usize>,
    src: Src<'a>,
    choice: TypeChoice,
    /// Rows to permute (q/k of llama arch): number of heads.
    permute: Option<usize>,
}

enum Src<'a> {
    Weight(&'a Linear),
    Bias(&'a Linear),
    Plain(&'a Tensor),
    /// One matrix of every expert of a layer, stacked [E, out, in] (llama.cpp's `*_exps`).
    Experts(Vec<&'a Linear>),
}

impl Item<'_> {
    fn kind(&self) -> String {
        match &self.src {
            Src::Weight(l) | Src::Bias(l) => l.kind(),
            Src::Plain(_) => "norm".into(),
            Src::Experts(ls) => format!("{} experts ({})", ls.len(), ls[0].kind()),
        }
    }
    fn tensor(&self) -> Result<Tensor> {
        let t = match &self.src {
            Src::Weight(l) => l.weight()?,
            Src::Bias(l) => l
                .bias()
                .ok_or_else(|| Error::Msg(format!("{}: bias vanished", self.gguf)))?,
            Src::Plain(t) => (*t).clone(),
            Src::Experts(ls) => Tensor::stack(
                &ls.iter()
                    .map(|l| Ok(l.weight()?.to_dtype(candle_core::DType::F32)?))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?,
        };
        let t = t.to_dtype(candle_core::DType::F32)?;
        let t = match self.permute {
            Some(h) => models::gguf::permute(&t, h)?,
            None => t,
        };
        Ok(t.contiguous()?)
    }
    fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Ctx {
    names: &'static NameTable,
    ftype: GgufType,
    permute: bool,
    n_heads: usize,
    n_kv: usize,
    n_layers: usize,
    n_gqa: usize,
    has_output: bool,
    n_expert: usize,
}

fn make_item<'a>(ctx: &Ctx, hf: &str, shape: Vec<usize>, src: Src<'a>) -> Result<Item<'a>> {
    let gguf = ctx
        .names
        .gguf_name(hf)
        .ok_or_else(|| Error::Msg(format!("tensor '{hf}' has no llama.cpp name")))?;
    item_named(ctx, gguf, hf, shape, src)
}

fn item_named<'a>(
    ctx: &Ctx,
    gguf: String,
    hf: &str,
    shape: Vec<usize>,
    src: Src<'a>,
) -> Result<Item<'a>> {
    let permute = if !ctx.permute {
        None
    } else if hf.contains("self_attn.q_proj.") {
        Some(ctx.n_heads)
    } else if hf.contains("self_attn.k_proj.") {
        Some(ctx.n_kv)
    } else {
        None
    };
    let site = TensorSite {
        name: &gguf,
        n_dims: shape.len(),
        n_cols: *shape.last().unwrap_or(&1),
        layer: names::layer_of(&gguf),
        n_layers: ctx.n_layers,
        n_gqa: ctx.n_gqa,
        has_output: ctx.has_output,
        n_expert: ctx.n_expert,
    };
    let choice = tensor_type(ctx.ftype, &site);
    Ok(Item {
        gguf,
        shape,
        src,
        choice,
        permute,
    })
}

/// `QTensor::quantize` reads the tensor's storage from its start, ignoring a view's offset
/// (candle 0.11), so every chunk is copied into storage of its own first.
fn quantize_owned(t: &Tensor, ty: GgmlDType) -> Result<Vec<u8>> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let owned = Tensor::from_vec(v, t.shape(), &candle_core::Device::Cpu)?;
    Ok(QTensor::quantize(&owned, ty)?.data()?.into_owned())
}

/// Quantize an f32 tensor to `ty`, row chunks in parallel (blocks never cross rows, so the
/// chunks' bytes concatenate to the whole tensor's).
fn quantize_bytes(t: &Tensor, ty: GgmlDType) -> Result<Vec<u8>> {
    let dims = t.dims().to_vec();
    if dims.len() < 2 || dims[0] < 2 {
        return quantize_owned(t, ty);
    }
    let rows = dims[0];
    let per_row: usize = dims[1..].iter().product();
    let chunk_rows = (65536 / per_row.max(1)).max(1);
    let starts: Vec<usize> = (0..rows).step_by(chunk_rows).collect();
    let parts: Vec<Vec<u8>> = starts
        .par_iter()
        .map(|&r| quantize_owned(&t.narrow(0, r, chunk_rows.min(rows - r))?, ty))
        .collect::<Result<_>>()?;
    Ok(parts.concat())
}

/// The mixture-of-experts layers of a model in llama.cpp's layout (Mixtral's: `llama`
/// architecture, every layer a mixture of the same size, softmax router, top-k gates
/// renormalized over the chosen experts, which is how [`models::moe::MoeFfn`] weighs top-1 and
/// top-2 too).
struct MoeLayout<'a> {
    experts: usize,
    used: usize,
    /// Per layer: ("gate" | "up" | "down", that matrix of every expert in expert order).
    stacks: Vec<Vec<(&'static str, Vec<&'a Linear>)>>,
}

fn moe_layout<'a>(m: &'a Model, arch: &str, n_layers: usize) -> Result<Option<MoeLayout<'a>>> {
    let layers = crate::mpoe::moe_layers(m);
    let Some((_, _, first)) = layers.first() else {
        return Ok(None);
    };
    let name = &m.source.name;
    if arch != "llama" {
        return Err(Error::Msg(format!(
            "{name}: llama.cpp has mixture-of-experts layouts for the llama architecture only, not {arch} (export dense experts to an HF directory instead)"
        )));
    }
    let (experts, used) = (first.num_experts(), first.cfg.router.k());
    if layers.len() != n_layers {
        let dense: Vec<String> = (0..n_layers)
            .filter(|i| !layers.iter().any(|(l, _, _)| l == i))
            .map(|i| i.to_string())
            .collect();
        return Err(Error::Msg(format!(
            "{name}: llama.cpp's mixture-of-experts layout needs every layer to be a mixture, but layers {} are dense",
            dense.join(", ")
        )));
    }
    let mut stacks = Vec::with_capacity(n_layers);
    for (i, _, f) in &layers {
        if f.num_experts() != experts || f.cfg.router.k() != used {
            return Err(Error::Msg(format!(
                "{name}: layer {i} has {} experts ({}), layer 0 {experts} ({}); llama.cpp needs one size for every layer",
                f.num_experts(),
                f.cfg.router.name(),
                first.cfg.router.name()
            )));
        }
        let mut per = Vec::with_capacity(3);
        for mat in ["gate", "up", "down"] {
            let want = format!("{mat}_proj");
            let mut ls = Vec::with_capacity(experts);
            for (k, ex) in f.experts.iter().enumerate() {
                let lins = ex.linears();
                let l = lins.iter().find(|(n, _)| *n == want).map(|(_, l)| *l);
                match l {
                    Some(l) if l.bias().is_none() => ls.push(l),
                    Some(_) => {
                        return Err(Error::Msg(format!(
                            "{name}: layer {i} expert {k} {want} has a bias, which llama.cpp's expert layout cannot hold"
                        )))
                    }
                    None => {
                        return Err(Error::Msg(format!(
                            "{name}: layer {i} expert {k} has no {want} (not a SwiGLU expert)"
                        )))
                    }
                }
            }
            let dims = (ls[0].out_features(), ls[0].in_features());
            if ls
                .iter()
                .any(|l| (l.out_features(), l.in_features()) != dims)
            {
                return Err(Error::Msg(format!(
                    "{name}: layer {i}: the experts' {want} matrices differ in shape"
                )));
            }
            per.push((mat, ls));
        }
        stacks.push(per);
    }
    Ok(Some(MoeLayout {
        experts,
        used,
        stacks,
    }))
}

/// Write `m` to `out` as a GGUF file under recipe `opts.ftype`.
pub fn export_gguf(m: &Model, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    let t0 = std::time::Instant::now();
    let llama = match &m.arch {
        Arch::Causal(c) => m.llama().map_err(|_| {
            Error::Msg(format!(
                "{} is a {} model; GGUF export writes llama-family models only (llama, qwen2, mistral)",
                m.source.name,
                c.model_type()
            ))
        })?,
        Arch::Encoder(_) => {
            return Err(Error::Msg(format!(
                "{} is an encoder ({}); GGUF export needs a causal LM (llama, qwen2, mistral)",
                m.source.name,
                m.arch_name()
            )))
        }
    };
    if out.exists() {
        return Err(Error::option(
            "out",
            format!(
                "{}: output file exists; choose a new `out` (nothing is overwritten)",
                out.display()
            ),
        ));
    }
    let cfg = &llama.cfg;
    let arch = if cfg.model_type == "qwen2" {
        "qwen2"
    } else {
        "llama"
    };
    let permute = arch == "llama";
    let n_layers = cfg.num_hidden_layers;
    let n_gqa = cfg.num_attention_heads / cfg.num_kv_heads().max(1);
    let has_output = llama.lm_head.is_some();
    let moe = moe_layout(m, arch, n_layers)?;

    // Tensors, lazily: shapes now, values when written.
    let ctx = Ctx {
        names: names::table(arch)
            .ok_or_else(|| Error::Msg(format!("no GGUF tensor names for {arch}")))?,
        ftype: opts.ftype,
        permute,
        n_heads: cfg.num_attention_heads,
        n_kv: cfg.num_kv_heads(),
        n_layers,
        n_gqa,
        has_output,
        n_expert: moe.as_ref().map_or(0, |x| x.experts),
    };
    let mut items: Vec<Item> = Vec::new();
    let push = |hf: &str, shape: Vec<usize>, src| make_item(&ctx, hf, shape, src);
    if let Some(x) = &moe {
        for (i, stacks) in x.stacks.iter().enumerate() {
            for (mat, ls) in stacks {
                let (out_f, in_f) = (ls[0].out_features(), ls[0].in_features());
                let gguf = format!("blk.{i}.ffn_{mat}_exps.weight");
                let hf = format!("model.layers.{i}.mlp.experts.{mat}_proj.weight");
                let shape = vec![ls.len(), out_f, in_f];
                items.push(item_named(
                    &ctx,
                    gguf,
                    &hf,
                    shape,
                    Src::Experts(ls.clone()),
                )?);
            }
        }
    }
    for (name, l) in m.linears() {
        if moe.is_some() && name.contains(".mlp.experts.") {
            continue; // written stacked above
        }
        items.push(push(
            &format!("{name}.weight"),
            vec![l.out_features(), l.in_features()],
            Src::Weight(l),
        )?);
        if l.bias().is_some() {
            items.push(push(
                &format!("{name}.bias"),
                vec![l.out_features()],
                Src::Bias(l),
            )?);
        }
    }
    for (name, t) in m.other_tensors() {
        items.push(push(&name, t.dims().to_vec(), Src::Plain(t))?);
    }
    items.sort_by_key(|it| ctx.names.order_key(&it.gguf));

    // Metadata.
    let vocab_rows = llama.embed_tokens.out_features();
    let (mut meta, tokenizer_from) = metadata(m, arch, vocab_rows, opts.ftype)?;
    if let Some(x) = &moe {
        meta.push((format!("{arch}.expert_count"), Value::U32(x.experts as u32)));
        meta.push((
            format!("{arch}.expert_used_count"),
            Value::U32(x.used as u32),
        ));
    }
    meta.push((
        "general.quantization_version".into(),
        Value::U32(2), // GGML_QNT_VERSION
    ));

    // Header, KVs and tensor infos, then the data.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .map_err(|e| Error::Msg(format!("{}: {e}", parent.display())))?;
    let tmp = models::tmp::file_in(&parent)
        .map_err(|e| Error::Msg(format!("{}: {e}", parent.display())))?;
    let io = |e: std::io::Error| Error::Msg(format!("{}: {e}", out.display()));
    let infos = items
        .iter()
        .map(|it| write::TensorInfo {
            name: it.gguf.clone(),
            shape: it.shape.clone(),
            dtype: it.choice.ty,
        })
        .collect();
    let buf = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
    let mut w = write::Writer::new(buf, &meta, infos).map_err(io)?;

    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(items.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "gguf {bar:30} {pos}/{len} tensors {elapsed} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let n = items.len();
    let mut reports = Vec::with_capacity(n);
    let mut fallbacks = Vec::new();
    let mut type_counts = BTreeMap::new();
    let mut n_params = 0usize;
    for (i, it) in items.iter().enumerate() {
        if let Some(pb) = &pb {
            pb.set_message(it.gguf.clone());
        }
        let t = it.tensor()?;
        if t.dims() != it.shape.as_slice() {
            return Err(Error::Msg(format!(
                "{}: shape {:?}, expected {:?}",
                it.gguf,
                t.dims(),
                it.shape
            )));
        }
        let bytes = quantize_bytes(&t, it.choice.ty)
            .map_err(|e| Error::Msg(format!("quantizing {}: {e}", it.gguf)))?;
        let want = types::of(it.choice.ty).bytes_for(it.elems());
        if bytes.len() != want {
            return Err(Error::Msg(format!(
                "{}: {} bytes quantized, expected {want}",
                it.gguf,
                bytes.len()
            )));
        }
        w.write_tensor(&bytes).map_err(io)?;
        let ne: Vec<usize> = it.shape.iter().rev().cloned().collect();
        let tname = type_name(it.choice.ty);
        let fb = it.choice.fallback_from.map(type_name);
        if let Some(f) = fb {
            fallbacks.push(format!(
                "{}: {f} needs rows of a multiple of {}, has {}; using {tname}",
                it.gguf,
                it.choice.fallback_from.map_or(0, |x| x.block_size()),
                ne[0]
            ));
        }
        if opts.print_tensors {
            let shape = ne
                .iter()
                .map(|d| format!("{d:5}"))
                .collect::<Vec<_>>()
                .join(", ");
            let line = format!(
                "[{:4}/{:4}] {:>36} - [{shape}], type = {:>6}, converting to {tname}{} .. size = {:8.2} MiB -> {:8.2} MiB",
                i + 1,
                n,
                it.gguf,
                format!("f32 ({})", it.kind()),
                fb.map(|f| format!(" (fallback from {f})")).unwrap_or_default(),
                (it.elems() * 4) as f64 / 1048576.0,
                want as f64 / 1048576.0
            );
            // A hidden bar (no terminal) drops println, so print directly then.
            match &pb {
                Some(pb) if !pb.is_hidden() => pb.println(line),
                _ => println!("{line}"),
            }
        }
        *type_counts.entry(tname.to_string()).or_insert(0) += 1;
        n_params += it.elems();
        reports.push(TensorReport {
            name: it.gguf.clone(),
            shape: ne,
            source_kind: it.kind(),
            ggml_type: tname.into(),
            fallback_from: fb.map(String::from),
            bytes: want,
        });
        if let Some(pb) = &pb {
            pb.inc(1);
        }
    }
    w.finish().map_err(io)?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist_noclobber(out).map_err(|e| io(e.error))?;
    let file_bytes = std::fs::metadata(out).map_err(io)?.len();
    Ok(ExportReport {
        path: out.to_path_buf(),
        recipe: opts.ftype.name().into(),
        arch: arch.into(),
        file_bytes,
        n_params,
        bits_per_weight: file_bytes as f64 * 8.0 / n_params.max(1) as f64,
        type_counts,
        fallbacks,
        tensors: reports,
        tokenizer_from,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

type Meta = Vec<(String, Value)>;

/// general.*, {arch}.* and tokenizer.* KVs; returns where the tokenizer came from.
fn metadata(m: &Model, arch: &str, vocab_rows: usize, ft: GgufType) -> Result<(Meta, String)> {
    let llama = m.llama()?;
    let cfg = &llama.cfg;
    // The source GGUF, when the model came from one: general.* and tokenizer.* are carried.
    let src = if matches!(m.source.format, Format::Gguf) && m.source.path.is_file() {
        Some(models::gguf::GgufFile::open(&m.source.path)?)
    } else {
        None
    };
    let mut meta: Meta = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
    ];
    let mut have_name = false;
    if let Some(g) = &src {
        let mut keys: Vec<&String> = g.content.metadata.keys().collect();
        keys.sort();
        for k in keys {
            let skip = matches!(
                k.as_str(),
                "general.architecture"
                    | "general.type"
                    | "general.file_type"
                    | "general.quantization_version"
                    | "general.alignment"
            );
            if k.starts_with("general.") && !skip {
                have_name |= k == "general.name";
                meta.push((k.clone(), g.content.metadata[k].clone()));
            }
        }
    }
    if !have_name {
        meta.push(("general.name".into(), Value::String(m.source.name.clone())));
    }
    let kinds: BTreeMap<String, usize> =
        m.linears().iter().fold(BTreeMap::new(), |mut a, (_, l)| {
            *a.entry(l.kind()).or_insert(0) += 1;
            a
        });
    let kinds = kinds
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",");
    meta.push((
        "mpolm.export.source".into(),
        Value::String(format!("{} ({kinds})", m.source.name)),
    ));
    let k = |s: &str| format!("{arch}.{s}");
    let u = |x: usize| Value::U32(x as u32);
    let hd = cfg.head_dim();
    meta.extend([
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_kv_heads())),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ]);
    if hd != cfg.hidden_size / cfg.num_attention_heads {
        meta.push((k("attention.key_length"), u(hd)));
        meta.push((k("attention.value_length"), u(hd)));
    }
    if let Some(rs) = &cfg.rope_scaling {
        if let (Some(t), Some(f)) = (&rs.rope_type, rs.factor) {
            if t == "linear" || t == "yarn" {
                meta.push((k("rope.scaling.type"), Value::String(t.clone())));
                meta.push((k("rope.scaling.factor"), Value::F32(f as f32)));
                if let Some(o) = rs.original_max_position_embeddings {
                    meta.push((k("rope.scaling.original_context_length"), u(o)));
                }
            }
        }
    }
    meta.push(("general.file_type".into(), Value::U32(ft.file_type())));
    meta.push((k("vocab_size"), u(vocab_rows)));
    meta.push((k("rope.dimension_count"), u(hd)));
    let from = if let Some(g) = &src {
        let mut keys: Vec<&String> = g
            .content
            .metadata
            .keys()
            .filter(|k| k.starts_with("tokenizer."))
            .collect();
        keys.sort();
        for key in keys {
            meta.push((key.clone(), g.content.metadata[key].clone()));
        }
        format!("{} (GGUF metadata)", m.source.path.display())
    } else {
        meta.extend(tokenizer_meta(m, vocab_rows)?);
        "tokenizer.json".into()
    };
    Ok((meta, from))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer (the inverse of the grouping
/// `models::tokenizer` applies when reading GGUF).
fn infer_pre(pt: &serde_json::Value) -> &'static str {
    let s = pt.to_string();
    if s.contains(&serde_json::to_string(LLAMA3_SPLIT).unwrap_or_default()) {
        "llama-bpe"
    } else if s.contains(&serde_json::to_string(QWEN2_SPLIT).unwrap_or_default()) {
        "qwen2"
    } else if s.contains("\"Digits\"") && s.contains("\"individual_digits\":true") {
        "smollm"
    } else {
        "gpt-2"
    }
}

/// tokenizer.ggml.* from the model's (byte-level BPE) tokenizer.json, padded with
/// `[PAD{i}]` unused tokens up to the embedding's rows as `convert_hf_to_gguf.py` does.
fn tokenizer_meta(m: &Model, vocab_rows: usize) -> Result<Meta> {
    let tok = &m.tokenizer;
    let j: serde_json::Value = tok
        .inner
        .to_string(false)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| Error::Msg("cannot serialise the model's tokenizer".into()))?;
    let model = &j["model"];
    let byte_level = j.to_string().contains("\"ByteLevel\"");
    if model["type"] != "BPE" || !byte_level {
        return Err(Error::Msg(format!(
            "{}: only byte-level BPE tokenizers (GPT-2 style) can be written to GGUF yet (this one is {})",
            m.source.name, model["type"]
        )));
    }
    let mut tokens: BTreeMap<usize, String> = BTreeMap::new();
    if let Some(v) = model["vocab"].as_object() {
        for (t, id) in v {
            if let Some(id) = id.as_u64() {
                tokens.insert(id as usize, t.clone());
            }
        }
    }
    let mut types: BTreeMap<usize, i32> = BTreeMap::new();
    if let Some(a) = j["added_tokens"].as_array() {
        for t in a {
            if let (Some(id), Some(c)) = (t["id"].as_u64(), t["content"].as_str()) {
                tokens.insert(id as usize, c.to_string());
                let special = t["special"].as_bool().unwrap_or(false);
                types.insert(id as usize, if special { 3 } else { 4 });
            }
        }
    }
    let n = vocab_rows.max(tokens.keys().next_back().map_or(0, |x| x + 1));
    let mut tv = Vec::with_capacity(n);
    let mut ty = Vec::with_capacity(n);
    for i in 0..n {
        match tokens.get(&i) {
            Some(t) => {
                tv.push(Value::String(t.clone()));
                ty.push(Value::I32(*types.get(&i).unwrap_or(&1)));
            }
            None => {
                tv.push(Value::String(format!("[PAD{i}]")));
                ty.push(Value::I32(5)); // UNUSED
            }
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) if p.len() == 2 => Some(format!(
                        "{} {}",
                        p[0].as_str().unwrap_or(""),
                        p[1].as_str().unwrap_or("")
                    )),
                    _ => None,
                })
                .map(Value::String)
                .collect()
        })
        .unwrap_or_default();
    let add_bos = j["post_processor"]["type"] == "TemplateProcessing"
        && j["post_processor"]["single"][0]
            .get("SpecialToken")
            .is_some();
    let mut meta: Meta = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(infer_pre(&j["pre_tokenizer"]).into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(tv)),
        ("tokenizer.ggml.token_type".into(), Value::Array(ty)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    if let Some(b) = tok.bos_id {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = tok.eos_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*e)));
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some(c) = &tok.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(c.clone())));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::gguf::names::layer_of;

    fn site(name: &str, n_cols: usize, layer: Option<usize>, has_output: bool) -> TensorSite<'_> {
        TensorSite {
            name,
            n_dims: 2,
            n_cols,
            layer,
            n_layers: 16,
            n_gqa: 2,
            has_output,
            n_expert: 0,
        }
    }

    /// llama.cpp's `llama_tensor_get_type` for files with experts: the router stays f32 in
    /// every recipe; with exactly 8 experts attn_v and attn_k become Q8_0 and attn_output
    /// Q5_K (q2_k, q4_k_m); ffn_down_exps follows ffn_down, its layer read from the name
    /// (so layer 10 of 16 is layer 10, where the dense counter would rank it 2nd).
    #[test]
    fn expert_files_follow_llama_cpp() {
        let moe = |name, e| TensorSite {
            n_expert: e,
            n_dims: if name == "blk.10.ffn_down_exps.weight" {
                3
            } else {
                2
            },
            ..site(name, 256, layer_of(name), true)
        };
        let ty = |ft, name, e| tensor_type(ft, &moe(name, e)).ty;
        for r in TYPE_NAMES {
            let ft = GgufType::parse(r).unwrap();
            assert_eq!(
                ty(ft, "blk.3.ffn_gate_inp.weight", 8),
                GgmlDType::F32,
                "{r}"
            );
        }
        use GgufType::*;
        assert_eq!(ty(Q4KM, "blk.5.attn_v.weight", 8), GgmlDType::Q8_0);
        assert_eq!(ty(Q4KM, "blk.5.attn_v.weight", 4), GgmlDType::Q4K);
        assert_eq!(ty(Q2K, "blk.5.attn_k.weight", 8), GgmlDType::Q8_0);
        assert_eq!(ty(Q2K, "blk.5.attn_k.weight", 4), GgmlDType::Q2K);
        assert_eq!(ty(Q2K, "blk.5.attn_output.weight", 8), GgmlDType::Q5K);
        assert_eq!(ty(Q2K, "blk.5.attn_output.weight", 4), GgmlDType::Q3K);
        assert_eq!(ty(Q4KM, "blk.5.attn_output.weight", 8), GgmlDType::Q5K);
        assert_eq!(ty(Q8_0, "blk.5.attn_output.weight", 8), GgmlDType::Q8_0);
        assert_eq!(ty(Q2K, "blk.10.ffn_down_exps.weight", 8), GgmlDType::Q3K);
        // use_more_bits(10, 16): (10 − 2) % 3 == 2 → Q6_K; the name-order counter (2) is not.
        assert!(use_more_bits(10, 16) && !use_more_bits(llama_cpp_counter(10, 16), 16));
        assert_eq!(ty(Q4KM, "blk.10.ffn_down_exps.weight", 8), GgmlDType::Q6K);
        assert_eq!(ty(Q4KM, "blk.10.ffn_down.weight", 0), GgmlDType::Q4K);
        assert_eq!(ty(Q4KM, "blk.10.ffn_up_exps.weight", 8), GgmlDType::Q4K);
    }

    /// Whatever a recipe picks for any tensor, fallbacks included, the writer can store.
    #[test]
    fn every_choice_is_writable() {
        for r in TYPE_NAMES {
            let ft = GgufType::parse(r).unwrap();
            for name in [
                "blk.3.attn_v.weight",
                "blk.3.ffn_down.weight",
                "blk.3.attn_output.weight",
                "blk.3.attn_q.weight",
                "output.weight",
                "token_embd.weight",
            ] {
                for cols in [256, 96, 33] {
                    for out in [true, false] {
                        let c = tensor_type(ft, &site(name, cols, Some(3), out));
                        assert!(types::of(c.ty).write, "{r} {name} {cols}: {:?}", c.ty);
                        assert_eq!(cols % types::of(c.ty).block, 0, "{r} {name} {cols}");
                    }
                }
            }
        }
    }

    #[test]
    fn use_more_bits_matches_llama_cpp() {
        // n = 16: n/8 = 2, 7n/8 = 14 → layers 0,1, 4,7,10,13, 14,15.
        let v: Vec<usize> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
        assert_eq!(v, vec![0, 1, 4, 7, 10, 13, 14, 15]);
    }

    #[test]
    fn counter_follows_name_order() {
        // 24 layers in name order: 0, 1, 10, 11, …, 19, 2, 20, 21, 22, 23, 3, …, 9.
        assert_eq!(llama_cpp_counter(10, 24), 2);
        assert_eq!(llama_cpp_counter(2, 24), 12);
        assert_eq!(llama_cpp_counter(9, 24), 23);
        assert_eq!(llama_cpp_counter(5, 8), 5);
        let mut s = site("blk.10.attn_v.weight", 256, Some(10), true);
        s.n_layers = 24;
        assert_eq!(tensor_type(GgufType::Q4KM, &s).ty, GgmlDType::Q6K);
        let mut s = site("blk.2.ffn_down.weight", 256, Some(2), true);
        s.n_layers = 24;
        assert_eq!(tensor_type(GgufType::Q4KM, &s).ty, GgmlDType::Q4K);
    }

    #[test]
    fn q4_k_m_recipe() {
        let t = |n, c, l, o| tensor_type(GgufType::Q4KM, &site(n, c, l, o));
        assert_eq!(
            t("blk.0.attn_v.weight", 256, Some(0), true).ty,
            GgmlDType::Q6K
        );
        assert_eq!(
            t("blk.2.attn_v.weight", 256, Some(2), true).ty,
            GgmlDType::Q4K
        );
        assert_eq!(
            t("blk.4.ffn_down.weight", 512, Some(4), true).ty,
            GgmlDType::Q6K
        );
        assert_eq!(
            t("blk.3.ffn_down.weight", 512, Some(3), true).ty,
            GgmlDType::Q4K
        );
        assert_eq!(
            t("blk.3.attn_q.weight", 256, Some(3), true).ty,
            GgmlDType::Q4K
        );
        assert_eq!(t("output.weight", 256, None, true).ty, GgmlDType::Q6K);
        assert_eq!(t("token_embd.weight", 256, None, true).ty, GgmlDType::Q4K);
        assert_eq!(t("token_embd.weight", 256, None, false).ty, GgmlDType::Q6K);
        assert_eq!(t("token_embd.weight", 576, None, false).ty, GgmlDType::Q8_0);
        let c = t("blk.3.attn_q.weight", 576, Some(3), true);
        assert_eq!(
            (c.ty, c.fallback_from),
            (GgmlDType::Q5_0, Some(GgmlDType::Q4K))
        );
        let c = t("blk.0.attn_v.weight", 576, Some(0), true);
        assert_eq!(
            (c.ty, c.fallback_from),
            (GgmlDType::Q8_0, Some(GgmlDType::Q6K))
        );
        let c = t("blk.3.attn_q.weight", 40, Some(3), true);
        assert_eq!(c.ty, GgmlDType::F16);
        let mut s = site("blk.0.attn_norm.weight", 256, Some(0), true);
        s.n_dims = 1;
        assert_eq!(tensor_type(GgufType::Q4KM, &s).ty, GgmlDType::F32);
    }

    #[test]
    fn q2_k_and_simple_recipes() {
        let t = |f, n, c| tensor_type(f, &site(n, c, Some(1), true)).ty;
        assert_eq!(t(GgufType::Q2K, "blk.1.attn_v.weight", 256), GgmlDType::Q3K);
        assert_eq!(
            t(GgufType::Q2K, "blk.1.ffn_down.weight", 256),
            GgmlDType::Q3K
        );
        assert_eq!(
            t(GgufType::Q2K, "blk.1.attn_output.weight", 256),
            GgmlDType::Q3K
        );
        assert_eq!(t(GgufType::Q2K, "blk.1.ffn_up.weight", 256), GgmlDType::Q2K);
        assert_eq!(
            t(GgufType::Q2K, "blk.1.ffn_up.weight", 576),
            GgmlDType::Q4_0
        );
        assert_eq!(t(GgufType::Q8_0, "output.weight", 576), GgmlDType::Q8_0);
        assert_eq!(t(GgufType::Q4_0, "output.weight", 512), GgmlDType::Q6K);
        assert_eq!(t(GgufType::Q4_0, "blk.1.ffn_up.weight", 48), GgmlDType::F16);
        assert_eq!(t(GgufType::F16, "output.weight", 48), GgmlDType::F16);
        for n in TYPE_NAMES {
            assert_eq!(GgufType::parse(n).unwrap().name(), *n);
        }
        assert!(GgufType::parse("q5_k").is_err());
    }
}
