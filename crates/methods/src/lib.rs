//! The papers' methods, one file (or folder) per method, all working on `models::Model`
//! through its pluggable Linear layers.

pub mod error;
pub mod finetune;
pub mod lora;
pub mod mpop;
pub mod quant;
pub mod squeeze;

pub use error::{Error, Result};
