//! HF ↔ llama.cpp tensor names: one table per architecture family, read in both directions
//! (loading renames GGUF tensors to HF names, export renames them back).

/// The names of one architecture family.
pub struct NameTable {
    /// Whole-model tensors: (GGUF name, HF name); the embedding first, then those that follow
    /// the layers in the converter's order.
    pub global: &'static [(&'static str, &'static str)],
    /// Modules of decoder layer i, `blk.{i}.<gguf>` ↔ `model.layers.{i}.<hf>`, in the order
    /// llama.cpp's `convert_hf_to_gguf.py` writes a layer's tensors.
    pub layer: &'static [(&'static str, &'static str)],
}

/// llama, qwen2 and mistral: the same modules under the same names.
pub const LLAMA: NameTable = NameTable {
    global: &[
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    layer: &[
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        // Mixture-of-experts layers (Mixtral's layout): the router, and each expert matrix
        // stacked over the experts into one 3-D tensor [E, out, in].
        ("ffn_gate_inp", "mlp.gate"),
        ("ffn_gate_exps", "mlp.experts.gate_proj"),
        ("ffn_down_exps", "mlp.experts.down_proj"),
        ("ffn_up_exps", "mlp.experts.up_proj"),
    ],
};

/// gemma3: four norms per layer and q/k norms; llama.cpp's `ffn_norm` is Gemma's
/// pre-feedforward norm, not llama's post-attention one.
pub const GEMMA3: NameTable = NameTable {
    global: &[
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    layer: &[
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("post_attention_norm", "post_attention_layernorm"),
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
    ],
};

/// The table of a GGUF `general.architecture` (or HF `model_type`); None when mpolm has no
/// names for it.
pub fn table(arch: &str) -> Option<&'static NameTable> {
    match arch {
        "llama" | "qwen2" | "mistral" => Some(&LLAMA),
        "gemma3" | "gemma3_text" => Some(&GEMMA3),
        _ => None,
    }
}

impl NameTable {
    /// llama.cpp tensor name → HF name.
    pub fn hf_name(&self, gguf: &str) -> Option<String> {
        if let Some((_, hf)) = self.global.iter().find(|(g, _)| *g == gguf) {
            return Some(hf.to_string());
        }
        let (idx, module, kind) = split(gguf.strip_prefix("blk.")?)?;
        let (_, hf) = self.layer.iter().find(|(g, _)| *g == module)?;
        Some(format!("model.layers.{idx}.{hf}.{kind}"))
    }

    /// HF name → llama.cpp tensor name (inverse of [`Self::hf_name`]).
    pub fn gguf_name(&self, hf: &str) -> Option<String> {
        if let Some((g, _)) = self.global.iter().find(|(_, h)| *h == hf) {
            return Some(g.to_string());
        }
        let (idx, module, kind) = split(hf.strip_prefix("model.layers.")?)?;
        let (g, _) = self.layer.iter().find(|(_, h)| *h == module)?;
        Some(format!("blk.{idx}.{g}.{kind}"))
    }

    /// Where llama.cpp's converter puts a GGUF tensor: the whole-model tensors around the
    /// layers (embedding first, then layer by layer in [`Self::layer`] order with weights
    /// before biases, then the final norm and the head); unknown names after known ones.
    pub fn order_key(&self, gguf: &str) -> (usize, usize, usize) {
        match self.global.iter().position(|(g, _)| *g == gguf) {
            Some(0) => return (0, 0, 0),
            Some(i) => return (2, i - 1, 0),
            None => {}
        }
        let rest = gguf.strip_prefix("blk.").unwrap_or(gguf);
        let (idx, tail) = rest.split_once('.').unwrap_or(("0", rest));
        let (module, kind) = tail.rsplit_once('.').unwrap_or((tail, ""));
        let m = self
            .layer
            .iter()
            .position(|(g, _)| *g == module)
            .unwrap_or(self.layer.len());
        (
            1,
            idx.parse::<usize>().unwrap_or(usize::MAX) * 100 + m,
            usize::from(kind != "weight"),
        )
    }
}

/// `{idx}.{module}.{kind}` with a module that may itself hold dots (`self_attn.q_proj`).
fn split(rest: &str) -> Option<(&str, &str, &str)> {
    let (idx, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    Some((idx, module, kind))
}

/// The layer index of a `blk.{i}.…` GGUF name.
pub fn layer_of(gguf: &str) -> Option<usize> {
    gguf.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_both_ways() {
        for (g, h) in LLAMA.global {
            assert_eq!(LLAMA.hf_name(g).as_deref(), Some(*h));
            assert_eq!(LLAMA.gguf_name(h).as_deref(), Some(*g));
        }
        for (g, h) in LLAMA.layer {
            for kind in ["weight", "bias"] {
                let gg = format!("blk.17.{g}.{kind}");
                let hh = format!("model.layers.17.{h}.{kind}");
                assert_eq!(LLAMA.hf_name(&gg), Some(hh.clone()));
                assert_eq!(LLAMA.gguf_name(&hh), Some(gg));
            }
        }
        assert_eq!(LLAMA.hf_name("rope_freqs.weight"), None);
        assert_eq!(LLAMA.gguf_name("model.layers.0.mlp.experts.weight"), None);
        assert!(table("qwen2").is_some() && table("bert").is_none());
    }

    #[test]
    fn converter_order() {
        let mut names = vec![
            "output.weight",
            "blk.10.attn_q.weight",
            "blk.2.ffn_down.weight",
            "blk.2.attn_q.bias",
            "output_norm.weight",
            "blk.2.attn_q.weight",
            "token_embd.weight",
            "blk.2.attn_norm.weight",
        ];
        names.sort_by_key(|n| LLAMA.order_key(n));
        assert_eq!(
            names,
            [
                "token_embd.weight",
                "blk.2.attn_norm.weight",
                "blk.2.attn_q.weight",
                "blk.2.attn_q.bias",
                "blk.2.ffn_down.weight",
                "blk.10.attn_q.weight",
                "output_norm.weight",
                "output.weight",
            ]
        );
        assert_eq!(layer_of("blk.12.attn_k.bias"), Some(12));
        assert_eq!(layer_of("output.weight"), None);
    }
}
