//! The fine-tuning engine every method uses: choose the trainable tensors for a method (full,
//! LoRA, MPO auxiliary / central / all), run AdamW with linear warmup + decay, gradient clipping
//! and per-group learning rates, evaluate each epoch, checkpoint every N steps and resume with
//! the identical loss curve, and save the result in the method's own format.
//!
//! Trainable tensors are `candle_core::Var`s that share storage with the model's tensors, so the
//! optimizer's in-place `Var::set` is what the model sees. Frozen tensors stay plain tensors
//! (MPO cores: detached), so no gradient flows into them.
//!
//! Output directory layout: the final model (HF dir, MPO checkpoint or PEFT adapter) at the top,
//! `finetune_log.json` (options, loss curve, evaluations), and `checkpoint/` (trainable tensors,
//! AdamW moments and the step) while training runs.

mod checkpoint;
pub mod data;
mod hooks;
pub mod optim;
mod options;
mod params;
mod trainer;

pub use checkpoint::*;
pub use hooks::TrainHook;
pub use options::*;
pub use params::*;
pub use trainer::*;

use crate::mpop::{self, MpoLayer};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use data::{Batch, Dataset, Example};
use models::linear::Dense;
use models::model::{Arch, Model};
use optim::{AdamW, AdamWConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const LOG_FILE: &str = "finetune_log.json";
pub const CHECKPOINT_DIR: &str = "checkpoint";
