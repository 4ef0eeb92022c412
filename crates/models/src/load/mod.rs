//! Getting a model's bytes in: packages by name, files from strangers (checked against
//! ceilings first), configs, tokenizers, the weight sources architectures are built from, and
//! the way every output is written (temp file, then rename).

pub mod config;
pub mod export;
pub mod hub;
pub mod source;
pub mod tmp;
pub mod tokenizer;
pub mod untrusted;
pub mod weights;
