//! One entry point from a MODEL argument to a loaded model, whatever it is: an alias, an HF
//! directory, a GGUF file, or a checkpoint a method wrote (MPO, quantized, PEFT adapter).
//! No global state: how GGUF weights are held comes in [`LoadOptions`].

use crate::Result;
use crate::{lora, mpobert, mpoe, mpop, quant};
use models::{LoadOptions, Model};
use std::path::Path;

/// What a MODEL argument names, told from the files in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An MPO checkpoint (`mpo_manifest.json`).
    Mpo,
    /// A mixture of experts upcycled from a dense model (`moe_manifest.json`).
    Moe,
    /// An MPOBERT checkpoint (`mpobert_manifest.json`).
    MpoBert,
    /// A GPTQ/RTN checkpoint (`quantize_config.json`).
    Quantized,
    /// A PEFT LoRA adapter directory (`adapter_config.json`).
    Adapter,
    /// An alias, an HF directory or a GGUF file.
    Plain,
}

impl Kind {
    pub fn of(model: &str) -> Kind {
        let p = Path::new(model);
        if p.join(mpop::MANIFEST).exists() {
            Kind::Mpo
        } else if p.join(mpoe::MANIFEST).exists() {
            Kind::Moe
        } else if p.join(mpobert::MANIFEST).exists() {
            Kind::MpoBert
        } else if quant::is_quantized_dir(p) {
            Kind::Quantized
        } else if p.join(lora::ADAPTER_CONFIG).exists() {
            Kind::Adapter
        } else {
            Kind::Plain
        }
    }

    /// How messages name it ("loading MPO checkpoint 'x'").
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Mpo => "MPO checkpoint",
            Kind::Moe => "mixture-of-experts checkpoint",
            Kind::MpoBert => "MPOBERT checkpoint",
            Kind::Quantized => "quantized checkpoint",
            Kind::Adapter => "LoRA adapter",
            Kind::Plain => "model",
        }
    }
}

/// Open MODEL as any command takes it. An adapter's base (`base_model_name_or_path`, itself
/// any MODEL; adapters stacked on adapters are followed, cycles refused) is opened first and
/// the adapters are applied in order.
pub fn open(model: &str, opts: &LoadOptions) -> Result<Model> {
    let p = Path::new(model);
    match Kind::of(model) {
        Kind::Mpo => mpop::load(p),
        Kind::Moe => mpoe::load(p),
        Kind::MpoBert => mpobert::load(p),
        Kind::Quantized => quant::load_quantized(p),
        Kind::Adapter => {
            let (base, chain) = lora::adapter_chain(p)?;
            let mut m = open(&base, opts)?;
            for a in chain {
                lora::load_peft(&mut m, &a)?;
            }
            Ok(m)
        }
        Kind::Plain => Ok(Model::load_with(model, opts.progress, opts.gguf)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_is_told_from_the_method_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = |n: &str, file: Option<&str>| {
            let p = d.path().join(n);
            std::fs::create_dir(&p).unwrap();
            if let Some(f) = file {
                std::fs::write(p.join(f), "{}").unwrap();
            }
            p.to_str().unwrap().to_string()
        };
        assert_eq!(Kind::of(&dir("m", Some(mpop::MANIFEST))), Kind::Mpo);
        assert_eq!(Kind::of(&dir("e", Some(mpoe::MANIFEST))), Kind::Moe);
        assert_eq!(Kind::of(&dir("b", Some(mpobert::MANIFEST))), Kind::MpoBert);
        assert_eq!(
            Kind::of(&dir("a", Some(lora::ADAPTER_CONFIG))),
            Kind::Adapter
        );
        assert_eq!(
            Kind::of(&dir("q", Some("quantize_config.json"))),
            Kind::Quantized
        );
        assert_eq!(Kind::of(&dir("h", Some("config.json"))), Kind::Plain);
        assert_eq!(Kind::of("smollm2-135m"), Kind::Plain);
    }
}
