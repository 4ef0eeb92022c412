//! The structural seams methods build on: a feed-forward block replaced through
//! `feed_forwards_mut` (how a mixture of experts goes in), a tensor shared by several layers
//! (counted once), and one-pass loading through a `WeightSource` that decides what a Linear is.

use candle_core::{Device, Tensor};
use models::llama::Mlp;
use models::source::{dense_linear, Bias, WeightSource};
use models::testing::max_abs_diff;
use models::{FeedForward, Linear, Model};
use std::any::Any;
use std::path::Path;

fn tiny_llama() -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    models::testing::write_tiny_llama(d.path(), false).unwrap();
    let m = Model::load(d.path().to_str().unwrap(), false).unwrap();
    (d, m)
}

fn logits(m: &Model) -> Tensor {
    let ids = Tensor::new(&[5u32, 77, 12, 200, 3, 9], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.causal().unwrap().forward(&ids, None).unwrap()
}

fn copy(l: &Linear) -> Linear {
    Linear::dense(l.weight().unwrap().copy().unwrap(), l.bias())
}

/// Two experts, each a copy of the dense block, mixed with fixed gates that sum to one: the
/// output must equal the dense block's, so only the plumbing is under test.
#[derive(Debug)]
struct TwoExperts {
    experts: [Mlp; 2],
    gates: [f64; 2],
}

impl FeedForward for TwoExperts {
    fn forward(&self, x: &Tensor) -> models::Result<Tensor> {
        let a = (self.experts[0].forward(x)? * self.gates[0])?;
        let b = (self.experts[1].forward(x)? * self.gates[1])?;
        Ok((a + b)?)
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        for (e, m) in self.experts.iter().enumerate() {
            for (n, l) in m.linears() {
                v.push((format!("experts.{e}.{n}"), l));
            }
        }
        v
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (e, m) in self.experts.iter_mut().enumerate() {
            for (n, l) in m.linears_mut() {
                v.push((format!("experts.{e}.{n}"), l));
            }
        }
        v
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn a_feed_forward_block_is_replaced_without_touching_the_architecture() {
    let (_d, mut m) = tiny_llama();
    let before = logits(&m);
    let dense_params = m.total_params();
    let models::Arch::Causal(lm) = &mut m.arch else {
        panic!("tiny llama is causal")
    };
    let mut ffn_params = 0;
    for (prefix, block) in lm.feed_forwards_mut() {
        assert!(prefix.starts_with("model.layers.") && prefix.ends_with(".mlp"));
        let mlp = block.as_any().downcast_ref::<Mlp>().expect("dense SwiGLU");
        ffn_params += mlp
            .linears()
            .iter()
            .map(|(_, l)| l.num_params())
            .sum::<usize>();
        let expert = || Mlp {
            gate_proj: copy(&mlp.gate_proj),
            up_proj: copy(&mlp.up_proj),
            down_proj: copy(&mlp.down_proj),
        };
        *block = Box::new(TwoExperts {
            experts: [expert(), expert()],
            gates: [0.25, 0.75],
        });
    }
    let after = logits(&m);
    let d = max_abs_diff(&before, &after);
    assert!(
        d < 1e-4,
        "mixture of identical experts changed the logits by {d}"
    );
    let names: Vec<String> = m.linears().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"model.layers.0.mlp.experts.1.down_proj".to_string()));
    assert!(!names.contains(&"model.layers.0.mlp.gate_proj".to_string()));
    // Two experts hold two independent copies: the FFN parameters count twice.
    assert_eq!(m.total_params(), dense_params + ffn_params);
}

#[test]
fn a_tensor_shared_by_layers_counts_once() {
    let (_d, mut m) = tiny_llama();
    let total = m.total_params();
    let bytes = m.weight_bytes();
    let shared = m
        .linears()
        .into_iter()
        .find(|(n, _)| n == "model.layers.0.mlp.up_proj")
        .map(|(_, l)| l.weight().unwrap())
        .unwrap();
    let mut replaced = 0;
    for (name, lin) in m.linears_mut() {
        if name == "model.layers.1.mlp.up_proj" {
            assert_eq!(lin.weight().unwrap().dims(), shared.dims());
            replaced = lin.num_params();
            // Layer 1 now holds layer 0's tensor itself (same storage, same id).
            *lin = Linear::dense(shared.clone(), lin.bias());
        }
    }
    assert!(replaced > 0);
    assert_eq!(m.total_params(), total - replaced);
    assert_eq!(m.weight_bytes(), bytes - replaced * 4);
    // A copy is not shared and counts again.
    for (name, lin) in m.linears_mut() {
        if name == "model.layers.1.mlp.up_proj" {
            *lin = Linear::dense(shared.copy().unwrap(), lin.bias());
        }
    }
    assert_eq!(m.total_params(), total);
}

/// A source that answers for one module itself and records every request: the architecture
/// must ask for each Linear exactly once, by HF name, and never for its `.weight` tensor.
struct Recording<'a> {
    inner: &'a models::weights::Weights,
    asked: std::sync::Mutex<Vec<String>>,
}

impl WeightSource for Recording<'_> {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.shape(name)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> models::Result<Tensor> {
        self.asked.lock().unwrap().push(format!("tensor {name}"));
        self.inner.tensor(name, shape)
    }
    fn linear(&self, module: &str, o: usize, i: usize, bias: Bias) -> models::Result<Linear> {
        self.asked.lock().unwrap().push(format!("linear {module}"));
        if module == "model.layers.1.self_attn.v_proj" {
            // What a method checkpoint does: build this layer its own way (here: zero).
            return Ok(Linear::dense(
                Tensor::zeros((o, i), candle_core::DType::F32, &Device::Cpu)?,
                None,
            ));
        }
        dense_linear(self, module, o, i, bias)
    }
}

#[test]
fn one_pass_loading_asks_the_source_for_each_linear_once() {
    let d = tempfile::tempdir().unwrap();
    models::testing::write_tiny_llama(d.path(), false).unwrap();
    let w = models::weights::Weights::from_hf_dir(d.path()).unwrap();
    let src = Recording {
        inner: &w,
        asked: Default::default(),
    };
    let hub = models::hub::ModelSource {
        name: "tiny".into(),
        format: models::hub::Format::HfDir,
        path: d.path().to_path_buf(),
    };
    let m = Model::from_source(hub, &src, Default::default()).unwrap();
    let asked = src.asked.into_inner().unwrap();
    let linears: Vec<String> = m.linears().into_iter().map(|(n, _)| n).collect();
    for n in &linears {
        let k = asked
            .iter()
            .filter(|a| *a == &format!("linear {n}"))
            .count();
        assert_eq!(k, 1, "{n} requested {k} times");
    }
    // Dense layers read their weight through `linear`, never as a loose tensor twice.
    let mut seen = std::collections::HashSet::new();
    for a in &asked {
        assert!(seen.insert(a), "{a} requested twice");
    }
    let v = m
        .linears()
        .into_iter()
        .find(|(n, _)| n == "model.layers.1.self_attn.v_proj")
        .unwrap()
        .1
        .weight()
        .unwrap();
    let zero = v
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(zero, 0.0, "the source's layer is the one the model holds");
}

/// An attention block that keeps the original's Linears but contributes nothing.
#[derive(Debug)]
struct Silent(Box<dyn models::SelfAttention>);

impl models::SelfAttention for Silent {
    fn forward(
        &self,
        x: &Tensor,
        at: &models::arch::AttnInputs,
        kv: Option<&mut models::cache::KvSlot>,
    ) -> models::Result<Tensor> {
        Ok(self.0.forward(x, at, kv)?.zeros_like()?)
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        self.0.linears()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.0.linears_mut()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Holds a block's place for an instant while its wrapper takes it.
#[derive(Debug)]
struct Hole;

impl models::SelfAttention for Hole {
    fn forward(
        &self,
        _: &Tensor,
        _: &models::arch::AttnInputs,
        _: Option<&mut models::cache::KvSlot>,
    ) -> models::Result<Tensor> {
        Err(models::Error::Msg("hole".into()))
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        Vec::new()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        Vec::new()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn an_attention_block_is_replaced_through_the_trait() {
    // Silencing every attention block equals zeroing every o_proj.
    let (_d, mut silent) = tiny_llama();
    let models::Arch::Causal(lm) = &mut silent.arch else {
        panic!("tiny llama is causal")
    };
    let mut n = 0;
    for (prefix, block) in lm.attentions_mut() {
        assert!(prefix.ends_with(".self_attn"));
        let old = std::mem::replace(block, Box::new(Hole));
        *block = Box::new(Silent(old));
        n += 1;
    }
    assert!(n > 0);
    let (_e, mut zeroed) = tiny_llama();
    for (name, lin) in zeroed.linears_mut() {
        if name.ends_with("o_proj") {
            let w = lin.weight().unwrap().zeros_like().unwrap();
            *lin = Linear::dense(w, None);
        }
    }
    let d = max_abs_diff(&logits(&silent), &logits(&zeroed));
    assert!(d < 1e-5, "{d}");
    // The wrapper's Linears are still the model's, under the same names.
    assert_eq!(silent.linears().len(), zeroed.linears().len());
    assert_ne!(
        max_abs_diff(&logits(&silent), &logits(&tiny_llama().1)),
        0.0
    );
}
