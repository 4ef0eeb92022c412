//! The papers' methods, one file (or folder) per method, all working on `models::Model`
//! through its pluggable Linear layers.

pub mod calisr;
pub mod error;
pub mod finetune;
pub mod lora;
pub mod mpobert;
pub mod mpoe;
pub mod mpop;
pub mod mpop_calib;
pub mod open;
pub mod opf;
pub mod quant;
pub mod spectrum;
pub mod squeeze;
pub use open::{open, Kind};

pub use error::{Error, Result};
