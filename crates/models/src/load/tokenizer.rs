//! Tokenizers: HF `tokenizer.json` for directories, and for GGUF files a tokenizer.json built
//! from the `tokenizer.ggml.*` metadata (BPE vocab + merges, control tokens as added special
//! tokens, and the pre-tokenizer that llama.cpp associates with `tokenizer.ggml.pre`).
//! Chat templates are the model's own Jinja template rendered with minijinja.

use crate::gguf::{as_u64, GgufFile};
use crate::untrusted;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use std::path::Path;

#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos_id)
            .field("eos", &self.eos_ids)
            .finish()
    }
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(pattern: &str) -> serde_json::Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> serde_json::Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name, following llama.cpp's grouping.
fn pre_tokenizer(pre: &str) -> serde_json::Value {
    let seq = |v: Vec<serde_json::Value>| json!({"type": "Sequence", "pretokenizers": v});
    match pre {
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "falcon3" | "pixtral" | "dbrx" => {
            seq(vec![split(LLAMA3_REGEX), byte_level(false)])
        }
        "qwen2" | "deepseek-r1-qwen" | "qwen35" | "megrez" | "hunyuan" => {
            seq(vec![split(QWEN2_REGEX), byte_level(false)])
        }
        // StarCoder-style: every digit on its own, then GPT-2 splitting.
        "starcoder" | "smollm" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            seq(vec![
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ])
        }
        _ => byte_level(true),
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = untrusted::read_text(path, untrusted::MAX_TOKENIZER_BYTES)?;
        let mut inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        // Padding/truncation saved in tokenizer.json are per-call choices in transformers
        // (it clears them on load); batching code pads explicitly.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer {
            inner,
            bos_id: None,
            eos_ids: vec![],
            chat_template: None,
            bos_token: None,
            eos_token: None,
        })
    }

    /// An HF directory: tokenizer.json plus the special tokens and chat template from
    /// tokenizer_config.json when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let mut t = Self::from_file(&dir.join("tokenizer.json"))?;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = untrusted::read_text(&cfg_path, untrusted::MAX_JSON_BYTES)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&cfg_path, format!("invalid JSON: {e}")))?;
            let tok = |k: &str| -> Option<String> {
                match v.get(k) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                    None => None,
                }
            };
            t.bos_token = tok("bos_token");
            t.eos_token = tok("eos_token");
            t.bos_id = t.bos_token.as_deref().and_then(|s| t.inner.token_to_id(s));
            t.eos_ids = t
                .eos_token
                .as_deref()
                .and_then(|s| t.inner.token_to_id(s))
                .into_iter()
                .collect();
            t.chat_template = v
                .get("chat_template")
                .and_then(|c| c.as_str())
                .map(String::from);
        }
        Ok(t)
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", g.path.display()));
        let model = g
            .meta_str("tokenizer.ggml.model")
            .map_err(|e| err(e.to_string()))?;
        if model != "gpt2" && model != "llama" {
            return Err(err(format!(
                "tokenizer model '{}' is not supported yet (byte-level BPE 'gpt2' and SentencePiece 'llama'); use an HF directory with tokenizer.json",
                untrusted::escape(&model)
            )));
        }
        let tokens = match g.meta("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| err(e.to_string())))
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(err("missing tokenizer.ggml.tokens".into())),
        };
        if model == "llama" {
            // Other SentencePiece GGUFs rank merges by score and add a prefix space, which this
            // builder (Gemma's rules) does not; they stay refused rather than tokenized wrong.
            let arch = g.architecture().unwrap_or_default();
            if !matches!(arch.as_str(), "gemma3") {
                return Err(err(format!(
                    "SentencePiece ('llama') tokenizers are supported for gemma3 GGUF files only, not '{}'; use an HF directory with tokenizer.json",
                    untrusted::escape(&arch)
                )));
            }
            return Self::spm_from_gguf(g, tokens);
        }
        let merges: Vec<String> = match g.meta("tokenizer.ggml.merges") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.to_string().ok().cloned())
                .collect(),
            _ => return Err(err("missing tokenizer.ggml.merges".into())),
        };
        let types: Vec<u64> = match g.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| as_u64(v).unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let pre = g
            .meta_str("tokenizer.ggml.pre")
            .unwrap_or_else(|_| "default".into());
        // Ids that do not fit u32 become u32::MAX, which the range check below refuses.
        let id = |k: &str| {
            g.meta(k)
                .and_then(as_u64)
                .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
        };
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        for (key, v) in [("bos", bos_id), ("eos", eos_id)] {
            if let Some(v) = v.filter(|&v| v as usize >= tokens.len()) {
                return Err(err(format!(
                    "tokenizer.ggml.{key}_token_id {v} is outside the {}-token vocabulary",
                    tokens.len()
                )));
            }
        }
        let add_bos = matches!(
            g.meta("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );

        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // Control (3) and user-defined (4) tokens are matched before BPE, as in HF.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let post = match (add_bos, bos_id) {
            (true, Some(b)) => {
                let bos = &tokens[b as usize];
                json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {bos.clone(): {"id": bos, "ids": [b], "tokens": [bos]}}})
            }
            _ => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
            }
        };
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(&pre),
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": pre == "llama3" || pre == "llama-bpe",
                      "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(tj)
            .map_err(|e| err(format!("cannot build tokenizer from GGUF metadata: {e}")))?;
        let chat_template = g.meta_str("tokenizer.chat_template").ok();
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_ids: eos_id.into_iter().collect(),
            chat_template,
            bos_token: bos_id.and_then(|b| tokens.get(b as usize).cloned()),
            eos_token: eos_id.and_then(|e| tokens.get(e as usize).cloned()),
        })
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) rebuilt as BPE the way
    /// transformers' GGUF converter does for Gemma (`gemma_tokenizer` in its
    /// gguf_tokenizer_mapping): tokens of two or more spaces respelled with ▁, merges derived
    /// from the vocabulary and ranked by the tokens' order in the file (Gemma's scores do not
    /// follow its merge order), byte fallback, spaces normalized to ▁, control tokens as special
    /// added tokens and user-defined ones (`\n`, `<start_of_turn>`'s neighbours) as plain added
    /// tokens, BOS prepended unless the file says not to.
    fn spm_from_gguf(g: &GgufFile, tokens: Vec<String>) -> Result<Self> {
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", g.path.display()));
        let n = tokens.len();
        // Python's str.isspace, which the converter's strip() uses.
        let blank = |t: &str| {
            t.chars()
                .all(|c| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
        };
        let orig = tokens;
        let tokens: Vec<String> = orig
            .iter()
            .cloned()
            .map(|t| {
                if t.contains(' ') && blank(&t) {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t
                }
            })
            .collect();
        let types: Vec<u64> = match g.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| as_u64(v).unwrap_or(1)).collect(),
            _ => vec![1; n],
        };
        let id = |k: &str| {
            g.meta(k)
                .and_then(as_u64)
                .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
        };
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let unk_id = id("tokenizer.ggml.unknown_token_id");
        for (key, v) in [("bos", bos_id), ("eos", eos_id), ("unknown", unk_id)] {
            if let Some(v) = v.filter(|&v| v as usize >= n) {
                return Err(err(format!(
                    "tokenizer.ggml.{key}_token_id {v} is outside the {n}-token vocabulary"
                )));
            }
        }
        // A missing flag means BOS for SentencePiece vocabularies (llama.cpp, transformers).
        let add_bos = !matches!(
            g.meta("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(false))
        );

        // Python dict semantics: a repeated token keeps its last id, first place in the order.
        let mut vocab: std::collections::HashMap<String, u32> =
            std::collections::HashMap::with_capacity(n);
        let mut order: Vec<&str> = Vec::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if vocab.insert(t.clone(), i as u32).is_none() {
                order.push(t);
            }
        }
        // Every split of a token into two tokens is a merge, ranked by the token's position,
        // then longer left, then longer right (transformers' generate_merges, stable sorts).
        let mut merges: Vec<(u32, usize, usize, &str, &str)> = Vec::new();
        for t in order {
            let rank = vocab[t];
            let mut local: Vec<(u32, u32, &str, &str)> = Vec::new();
            for (pos, _) in t.char_indices().skip(1) {
                let (l, r) = t.split_at(pos);
                if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                    local.push((il, ir, l, r));
                }
            }
            local.sort_by_key(|m| (m.0, m.1));
            merges.extend(
                local
                    .into_iter()
                    .map(|(_, _, l, r)| (rank, l.chars().count(), r.chars().count(), l, r)),
            );
        }
        merges.sort_by(|a, b| (a.0, b.1, b.2).cmp(&(b.0, a.1, a.2)));
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
            .collect();
        let mut bpe = tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(u) = unk_id {
            bpe = bpe.unk_token(tokens[u as usize].clone());
        }
        let bpe = bpe
            .build()
            .map_err(|e| err(format!("cannot build tokenizer from GGUF metadata: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let normalizer: tokenizers::NormalizerWrapper = serde_json::from_value(
            json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
        )
        .map_err(|e| err(e.to_string()))?;
        let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(json!(
            {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}
        ))
        .map_err(|e| err(e.to_string()))?;
        let decoder: tokenizers::DecoderWrapper = serde_json::from_value(json!(
            {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]}
        ))
        .map_err(|e| err(e.to_string()))?;
        inner.with_normalizer(Some(normalizer));
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(decoder));
        if let (true, Some(b)) = (add_bos, bos_id) {
            let bos = &tokens[b as usize];
            let post: tokenizers::PostProcessorWrapper = serde_json::from_value(json!(
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {bos.clone(): {"id": bos, "ids": [b], "tokens": [bos]}}}
            ))
            .map_err(|e| err(e.to_string()))?;
            inner.with_post_processor(Some(post));
        }
        // Added tokens keep the file's spelling; a respelled run of spaces is then no longer
        // in the vocabulary and is left to BPE, as in transformers.
        let in_vocab: std::collections::HashSet<&str> = tokens.iter().map(|t| t.as_str()).collect();
        let added = |want: u64, special: bool| -> Vec<tokenizers::AddedToken> {
            orig.iter()
                .zip(&types)
                .filter(|(t, &ty)| ty == want && !t.is_empty() && in_vocab.contains(t.as_str()))
                .map(|(t, _)| tokenizers::AddedToken::from(t.clone(), special).normalized(false))
                .collect()
        };
        // Control (3) tokens are special; user-defined (4) ones are matched whole but are text.
        inner.add_special_tokens(&added(3, true));
        inner.add_tokens(&added(4, false));
        let chat_template = g.meta_str("tokenizer.chat_template").ok();
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_ids: eos_id.into_iter().collect(),
            chat_template,
            bos_token: bos_id.and_then(|b| orig.get(b as usize).cloned()),
            eos_token: eos_id.and_then(|e| orig.get(e as usize).cloned()),
        })
    }

    /// The largest token id the tokenizer can produce (added tokens included), if any.
    pub fn max_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).into_values().max()
    }

    /// Every id the tokenizer can emit or names as special must index the model's embedding
    /// of `vocab` rows; checked at load so a bad file fails there, not mid-generation.
    pub fn check_fits(&self, vocab: usize, path: &Path) -> Result<()> {
        let ids = self
            .max_id()
            .into_iter()
            .map(|i| ("token", i))
            .chain(self.bos_id.map(|i| ("bos token", i)))
            .chain(self.eos_ids.iter().map(|&i| ("eos token", i)));
        for (what, id) in ids {
            if id as usize >= vocab {
                return Err(Error::Tokenizer(format!(
                    "{}: {what} id {id} is outside the model's vocabulary of {vocab} (tokenizer and weights do not belong together)",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let e = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    /// Render the model's chat template for `messages` ([{role, content}, …]).
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            Error::option(
                "chat",
                "chat template: this model has no chat template; run without `chat`",
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // A template is code from the model file: bound its instructions (nested loops would
        // otherwise run for hours) and its output.
        env.set_fuel(Some(untrusted::TEMPLATE_FUEL));
        env.add_template("chat", tpl)
            .map_err(|e| Error::Template(e.to_string()))?;
        let t = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut out = Capped::default();
        t.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            },
            &mut out,
        )
        .map_err(|e| {
            if e.kind() == minijinja::ErrorKind::OutOfFuel {
                Error::option("chat", format!(
                    "chat template: the model's chat template did not finish within {} instructions; run without `chat`",
                    untrusted::TEMPLATE_FUEL
                ))
            } else if out.overflow {
                Error::option("chat", format!(
                    "chat template: the model's chat template produced more than {} MiB; run without `chat`",
                    untrusted::MAX_TEMPLATE_OUTPUT >> 20
                ))
            } else {
                Error::Template(e.to_string())
            }
        })?;
        String::from_utf8(out.buf).map_err(|e| Error::Template(e.to_string()))
    }
}

/// Template output that refuses to grow past [`untrusted::MAX_TEMPLATE_OUTPUT`].
#[derive(Default)]
struct Capped {
    buf: Vec<u8>,
    overflow: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > untrusted::MAX_TEMPLATE_OUTPUT {
            self.overflow = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
