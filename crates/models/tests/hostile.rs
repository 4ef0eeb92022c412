//! Model files from strangers: each reproduction of issue 24 that concerns reading model files
//! (a malformed GGUF, config.json, safetensors or tokenizer) gives one error naming the
//! problem — never a panic, a hang or a huge allocation — plus property tests that mutate
//! small synthetic files (bit flips, truncations, field swaps, size extremes) and require
//! "error or success, no panic, bounded memory". The test binary runs under a 4 GiB
//! address-space limit, so any huge allocation aborts it instead of passing slowly.
//!
//! Cases per property: `PROPTEST_CASES` (CI default below, ~1 minute in all).

use models::testing::gguf_bytes::{Meta, RawGguf};
use models::{testing, Model};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn limit_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let lim = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: setrlimit only reads the struct.
            unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
        });
    }
}

fn load(p: &Path) -> Result<Model, String> {
    limit_memory();
    Model::load(p.to_str().unwrap(), false).map_err(|e| e.to_string())
}

fn err_of(p: &Path) -> String {
    match load(p) {
        Ok(_) => panic!("{} loaded, expected an error", p.display()),
        Err(e) => {
            assert!(!e.contains('\n'), "error must be one line: {e}");
            e
        }
    }
}

/// Write `g` as `dir/m.gguf`.
fn write_gguf(dir: &Path, g: &RawGguf) -> PathBuf {
    let p = dir.join("m.gguf");
    std::fs::write(&p, g.to_bytes()).unwrap();
    p
}

fn gguf_err(edit: impl FnOnce(&mut RawGguf)) -> String {
    let d = tempfile::tempdir().unwrap();
    let mut g = testing::tiny_llama_gguf().unwrap();
    edit(&mut g);
    err_of(&write_gguf(d.path(), &g))
}

fn hf_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    testing::write_tiny_llama(d.path(), false).unwrap();
    d
}

fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(p, v.to_string()).unwrap();
}

fn config_err(key: &str, v: serde_json::Value) -> String {
    let d = hf_dir();
    edit_json(&d.path().join("config.json"), |c| {
        c.insert(key.into(), v);
    });
    err_of(d.path())
}

fn tensor<'a>(g: &'a mut RawGguf, name: &str) -> &'a mut models::testing::gguf_bytes::RawTensor {
    g.tensors.iter_mut().find(|t| t.name == name).unwrap()
}

#[test]
fn the_synthetic_gguf_loads_and_matches_its_hf_twin() {
    // Without this the error tests below could pass on a file that never loads.
    let d = tempfile::tempdir().unwrap();
    let g = testing::tiny_llama_gguf().unwrap();
    let m = load(&write_gguf(d.path(), &g)).unwrap();
    let h = load(hf_dir().path()).unwrap();
    assert_eq!(m.total_params(), h.total_params());
    let ids = m.tokenizer.encode("the cat", false).unwrap();
    assert_eq!(ids, h.tokenizer.encode("the cat", false).unwrap());
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    assert_eq!(
        m.tokenizer.apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

// ---- Panics -------------------------------------------------------------------------------

#[test]
fn tensor_with_zero_dimensions() {
    let e = gguf_err(|g| tensor(g, "token_embd.weight").dims.clear());
    assert!(
        e.contains("token_embd.weight") && e.contains("0 dimensions"),
        "{e}"
    );
}

#[test]
fn alignment_zero_is_refused_before_candle_divides_by_it() {
    let e = gguf_err(|g| g.set("general.alignment", Meta::U32(0)));
    assert!(
        e.contains("general.alignment") && e.contains("power of two"),
        "{e}"
    );
}

#[test]
fn zero_kv_heads_and_zero_heads() {
    let e = gguf_err(|g| g.set("llama.attention.head_count_kv", Meta::U32(0)));
    assert!(e.contains("num_key_value_heads is 0"), "{e}");
    let e = gguf_err(|g| g.set("llama.attention.head_count", Meta::U32(0)));
    assert!(e.contains("num_attention_heads is 0"), "{e}");
    let e = config_err("num_key_value_heads", serde_json::json!(0));
    assert!(
        e.contains("config.json") && e.contains("num_key_value_heads is 0"),
        "{e}"
    );
    let e = config_err("num_attention_heads", serde_json::json!(0));
    assert!(e.contains("num_attention_heads is 0"), "{e}");
}

#[test]
fn bos_token_beyond_the_vocabulary() {
    let e = gguf_err(|g| {
        g.set("tokenizer.ggml.add_bos_token", Meta::Bool(true));
        g.set("tokenizer.ggml.bos_token_id", Meta::U32(100_000));
    });
    assert!(
        e.contains("bos_token_id 100000") && e.contains("vocab"),
        "{e}"
    );
    let e = config_err("bos_token_id", serde_json::json!(100_000));
    assert!(e.contains("bos_token_id 100000 is outside"), "{e}");
    let e = config_err("eos_token_id", serde_json::json!([5, 1u64 << 40]));
    assert!(e.contains("eos_token_id"), "{e}");
}

// ---- Huge allocations ---------------------------------------------------------------------

#[test]
fn absurd_layer_counts() {
    let e = gguf_err(|g| g.set("llama.block_count", Meta::U64(1 << 40)));
    assert!(e.contains("num_hidden_layers is 1099511627776"), "{e}");
    let e = config_err("num_hidden_layers", serde_json::json!(1_000_000_000_000u64));
    assert!(e.contains("num_hidden_layers"), "{e}");
    // serde refuses a float for a count (already before issue 24; kept as a guard).
    let e = config_err("num_hidden_layers", serde_json::json!(1e12));
    assert!(e.contains("config.json") && e.contains("invalid"), "{e}");
}

#[test]
fn absurd_context_lengths() {
    for ctx in [1_000_000_000u64, 1 << 62, u64::MAX] {
        let e = gguf_err(|g| g.set("llama.context_length", Meta::U64(ctx)));
        assert!(e.contains("max_position_embeddings is"), "{ctx}: {e}");
    }
    let e = config_err("max_position_embeddings", serde_json::json!(1u64 << 62));
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn dimension_product_that_wraps_to_the_real_size() {
    // 32 × (264 + 2^59) = 8448 + 2^64 ≡ 8448: the true byte count, the wrong vocabulary.
    let e = gguf_err(|g| tensor(g, "token_embd.weight").dims[1] += 1 << 59);
    assert!(
        e.contains("token_embd.weight") && e.contains("overflow"),
        "{e}"
    );
}

#[test]
fn head_dim_times_heads_that_overflow() {
    let e = gguf_err(|g| g.set("llama.attention.key_length", Meta::U64(1 << 62)));
    assert!(e.contains("head_dim"), "{e}");
    let e = config_err("head_dim", serde_json::json!(1u64 << 61));
    assert!(e.contains("head_dim"), "{e}");
}

// ---- Hangs --------------------------------------------------------------------------------

#[test]
fn chat_template_loops_run_out_of_fuel() {
    let d = hf_dir();
    edit_json(&d.path().join("tokenizer_config.json"), |c| {
        c.insert(
            "chat_template".into(),
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                .into(),
        );
    });
    let m = load(d.path()).unwrap();
    let t0 = std::time::Instant::now();
    let e = m
        .tokenizer
        .apply_chat_template(&serde_json::json!([]), true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("did not finish") && e.contains("run without `chat`"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());
}

#[cfg(unix)]
#[test]
fn fifo_as_model_or_model_file_does_not_block() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("m.gguf");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("mkfifo unavailable; skipped");
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let p = fifo.clone();
    std::thread::spawn(move || tx.send(load(&p).map(|_| ())));
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("loading a FIFO blocked");
    let e = r.unwrap_err();
    assert!(e.contains("FIFO") && e.contains("m.gguf"), "{e}");

    // A FIFO inside an HF directory (config.json) as well.
    let h = hf_dir();
    let cfg = h.path().join("config.json");
    std::fs::remove_file(&cfg).unwrap();
    std::process::Command::new("mkfifo")
        .arg(&cfg)
        .status()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let p = h.path().to_path_buf();
    std::thread::spawn(move || tx.send(load(&p).map(|_| ())));
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("loading a directory with a FIFO config.json blocked")
        .unwrap_err();
    assert!(e.contains("FIFO") && e.contains("config.json"), "{e}");
}

// ---- Silent acceptance --------------------------------------------------------------------

/// Lay the tensors out again from their data lengths (after a test changed a size).
fn relayout(g: &mut RawGguf) {
    let a = g.alignment;
    let mut off = 0;
    for t in g.tensors.iter_mut() {
        t.offset = off;
        off = (off + t.data.len() as u64).div_ceil(a) * a;
    }
}

#[test]
fn tensor_whose_type_overruns_its_extent_into_its_neighbour() {
    // A layer norm stored as 32 f16 values (64 bytes) but declared F32 (128 bytes): its last
    // 64 bytes are the next tensor's. Same shape, so nothing else notices.
    let e = gguf_err(|g| {
        let t = tensor(g, "blk.0.attn_norm.weight");
        t.data = (0..32).flat_map(|_| 0x3c00u16.to_le_bytes()).collect();
        relayout(g);
    });
    assert!(
        e.contains("blk.0.attn_norm.weight") && e.contains("overlaps"),
        "{e}"
    );
}

#[test]
fn tensor_past_the_end_of_the_file() {
    let e = gguf_err(|g| {
        let t = g.tensors.last_mut().unwrap();
        t.data.truncate(t.data.len() / 2);
    });
    assert!(e.contains("run past the end"), "{e}");
}

#[test]
fn duplicate_tensor_names_and_keys() {
    let e = gguf_err(|g| {
        let t = g.tensors[0].clone();
        let name = t.name.clone();
        g.push(&name, t.dims, t.ggml_type, t.data);
    });
    assert!(e.contains("appears twice"), "{e}");
    let e = gguf_err(|g| {
        g.meta.push(("llama.block_count".into(), Meta::U32(1)));
    });
    assert!(
        e.contains("llama.block_count") && e.contains("appears twice"),
        "{e}"
    );
    // Two GGUF names for one HF name: the second would silently replace the first.
    let e = gguf_err(|g| {
        let t = tensor(g, "blk.0.attn_q.weight").clone();
        g.push("model.layers.0.self_attn.q_proj.weight", t.dims, 0, t.data);
    });
    assert!(e.contains("both give"), "{e}");
}

#[test]
fn nan_and_negative_scalars() {
    let e = gguf_err(|g| g.set("llama.rope.freq_base", Meta::F32(f32::NAN)));
    assert!(e.contains("rope_theta is NaN"), "{e}");
    let e = gguf_err(|g| g.set("llama.attention.layer_norm_rms_epsilon", Meta::F32(-1e-5)));
    assert!(e.contains("rms_norm_eps is -0.0000099"), "{e}");
    let e = config_err("rope_theta", serde_json::json!(-10000.0));
    assert!(e.contains("rope_theta"), "{e}");
    let e = config_err(
        "rope_scaling",
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
    );
    assert!(e.contains("high_freq_factor"), "{e}");
}

/// blk.0.attn_q.weight (32 × 32) as Q8_0: one 34-byte block per row, scale `d` then 32 codes.
fn q8_0_attn_q(g: &mut RawGguf, d: u16) {
    let mut data = vec![];
    for r in 0..32u8 {
        data.extend_from_slice(&d.to_le_bytes());
        data.extend((0..32).map(|c| (c as i8 - r as i8) as u8));
    }
    let t = tensor(g, "blk.0.attn_q.weight");
    t.ggml_type = 8;
    t.data = data;
    relayout(g);
}

#[test]
fn nan_block_scale_in_a_quantized_tensor() {
    let d = tempfile::tempdir().unwrap();
    let mut g = testing::tiny_llama_gguf().unwrap();
    q8_0_attn_q(&mut g, 0x2c00); // 1/16
    load(&write_gguf(d.path(), &g)).expect("a finite Q8_0 tensor loads");
    let e = gguf_err(|g| q8_0_attn_q(g, 0x7e00)); // f16 NaN
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("NaN or infinite block scale"),
        "{e}"
    );
    let e = gguf_err(|g| {
        let t = tensor(g, "output_norm.weight");
        t.data[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    assert!(e.contains("NaN or infinite value"), "{e}");
}

#[test]
fn index_naming_files_outside_the_model_directory() {
    let d = hf_dir();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(
        d.path().join("model.safetensors"),
        outside.path().join("stolen.safetensors"),
    )
    .unwrap();
    for target in [
        outside
            .path()
            .join("stolen.safetensors")
            .display()
            .to_string(),
        format!(
            "../{}/stolen.safetensors",
            outside.path().file_name().unwrap().to_string_lossy()
        ),
    ] {
        std::fs::write(
            d.path().join("model.safetensors.index.json"),
            serde_json::json!({"weight_map": {"model.norm.weight": target}}).to_string(),
        )
        .unwrap();
        let e = err_of(d.path());
        assert!(
            e.contains("model.safetensors.index.json") && e.contains("outside the model directory"),
            "{e}"
        );
    }
}

#[test]
fn integer_weights_are_refused_at_load() {
    let d = hf_dir();
    let st = d.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let w = t["model.norm.weight"]
        .to_dtype(candle_core::DType::I64)
        .unwrap();
    t.insert("model.norm.weight".into(), w);
    candle_core::safetensors::save(&t, &st).unwrap();
    let e = err_of(d.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("must be floating point"),
        "{e}"
    );
}

#[test]
fn tokenizer_ids_beyond_the_model_vocabulary() {
    let d = hf_dir();
    edit_json(&d.path().join("tokenizer.json"), |t| {
        t["model"]["vocab"]["zzz"] = serde_json::json!(9999);
    });
    let e = err_of(d.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("9999") && e.contains("outside"),
        "{e}"
    );
}

// ---- Messages -----------------------------------------------------------------------------

#[test]
fn untrusted_text_is_escaped_in_messages() {
    let e = gguf_err(|g| {
        g.set(
            "general.architecture",
            Meta::Str("evil\u{1b}[2J\u{7}\u{0}arch\u{202e}".into()),
        )
    });
    assert!(
        !e.chars().any(|c| c.is_control() || c == '\u{202e}'),
        "raw control characters in: {e:?}"
    );
    assert!(e.contains("evil\\u{1b}[2J\\u{7}\\u{0}arch\\u{202e}"), "{e}");
    let e = config_err("model_type", serde_json::json!("x\u{1b}]0;pwned\u{7}"));
    assert!(e.contains("x\\u{1b}]0;pwned\\u{7}"), "{e}");
}

// ---- Property tests -----------------------------------------------------------------------

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn byte_tokenizer() -> models::tokenizer::Tokenizer {
    static T: std::sync::OnceLock<models::tokenizer::Tokenizer> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), testing::byte_tokenizer_json(&[]).to_string()).unwrap();
        models::tokenizer::Tokenizer::from_file(f.path()).unwrap()
    })
    .clone()
}

fn tiny_gguf_bytes() -> &'static [u8] {
    static B: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    B.get_or_init(|| testing::tiny_llama_gguf().unwrap().to_bytes())
}

/// Where the header ends (metadata and tensor entries; the data follows).
fn header_len() -> usize {
    let b = tiny_gguf_bytes();
    models::gguf::check_layout(&mut &b[..], b.len() as u64).unwrap() as usize
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Flip bit `bit` of byte `at` (positions are taken modulo the header length, where
    /// the parser's decisions are).
    Flip { at: usize, bit: u8 },
    /// Overwrite 8 bytes at `at` with an extreme little-endian value.
    Extreme { at: usize, v: u64 },
    /// Cut the file at `at` (modulo its length).
    Truncate { at: usize },
    /// Swap two 8-byte windows (length and count fields trading places).
    Swap { a: usize, b: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let extreme = prop::sample::select(vec![
        0u64,
        1,
        u32::MAX as u64,
        1 << 32,
        1 << 40,
        1 << 59,
        1 << 62,
        i64::MAX as u64,
        u64::MAX,
    ]);
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), extreme).prop_map(|(at, v)| Mutation::Extreme { at, v }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap { a, b }),
    ]
}

fn mutate(bytes: &[u8], hdr: usize, ms: &[Mutation]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in ms {
        let h = hdr.min(b.len()).max(1);
        match *m {
            Mutation::Flip { at, bit } => {
                let i = at % h;
                if i < b.len() {
                    b[i] ^= 1 << bit;
                }
            }
            Mutation::Extreme { at, v } => {
                let i = at % h;
                let end = (i + 8).min(b.len());
                b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
            }
            Mutation::Truncate { at } => {
                let n = at % (b.len() + 1);
                b.truncate(n);
            }
            Mutation::Swap { a, b: c } => {
                let (i, j) = (a % h, c % h);
                if i + 8 <= b.len() && j + 8 <= b.len() && (i + 8 <= j || j + 8 <= i) {
                    for k in 0..8 {
                        b.swap(i + k, j + k);
                    }
                }
            }
        }
    }
    b
}

proptest! {
    #![proptest_config(cases(2000))]

    /// The layout check alone, in memory: fast, so many cases.
    #[test]
    fn gguf_layout_check_never_panics(ms in prop::collection::vec(mutation(), 1..4)) {
        limit_memory();
        let b = mutate(tiny_gguf_bytes(), header_len(), &ms);
        let _ = models::gguf::check_layout(&mut &b[..], b.len() as u64);
    }
}

proptest! {
    #![proptest_config(cases(150))]

    /// The whole loader (layout, candle's parser, config, tokenizer, weights) over mutated
    /// GGUF files; a success must still be a model within the ceilings.
    #[test]
    fn gguf_loader_never_panics(ms in prop::collection::vec(mutation(), 1..3)) {
        let d = tempfile::tempdir().unwrap();
        let b = mutate(tiny_gguf_bytes(), header_len(), &ms);
        let p = d.path().join("m.gguf");
        std::fs::write(&p, &b).unwrap();
        match load(&p) {
            Ok(m) => {
                let l = m.llama().unwrap();
                prop_assert!(l.cfg.num_hidden_layers <= models::untrusted::MAX_LAYERS);
                prop_assert!(l.cfg.max_position_embeddings <= models::untrusted::MAX_CONTEXT);
            }
            Err(e) => prop_assert!(!e.contains('\n'), "{}", e),
        }
    }

    /// config.json with one field set to an extreme or ill-typed value.
    #[test]
    fn config_fields_at_extremes(
        key in prop::sample::select(vec![
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id",
            "rope_scaling", "model_type", "hidden_act", "tie_word_embeddings",
        ]),
        v in prop::sample::select(vec![
            serde_json::json!(0), serde_json::json!(1), serde_json::json!(-1),
            serde_json::json!(3), serde_json::json!(1u64 << 32), serde_json::json!(1u64 << 62),
            serde_json::json!(u64::MAX), serde_json::json!(1e12), serde_json::json!(-0.0),
            serde_json::json!(1e-300), serde_json::json!(1e300), serde_json::json!(null),
            serde_json::json!("llama"), serde_json::json!("\u{1b}[31m"), serde_json::json!([]),
            serde_json::json!({"rope_type": "llama3", "factor": 0.0}), serde_json::json!(true),
        ]),
    ) {
        let d = hf_dir();
        edit_json(&d.path().join("config.json"), |c| {
            c.insert(key.into(), v.clone());
        });
        if let Err(e) = load(d.path()) {
            prop_assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{}", e);
        }
    }

    /// Bit flips, extremes and truncations of a safetensors file's header (8-byte length
    /// plus JSON) and data.
    #[test]
    fn safetensors_loader_never_panics(ms in prop::collection::vec(mutation(), 1..3)) {
        let d = hf_dir();
        let st = d.path().join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        let hdr = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        std::fs::write(&st, mutate(&bytes, hdr, &ms)).unwrap();
        if let Err(e) = load(d.path()) {
            prop_assert!(!e.contains('\n'), "{}", e);
        }
    }

    /// Arbitrary templates made of loops, sets and output: they end (fuel) and never panic.
    #[test]
    fn chat_templates_end(
        n in prop::sample::select(vec![0u64, 1, 1000, 100_000, 1 << 40]),
        body in prop::sample::select(vec![
            "x", "{{ 'y' * 1000 }}", "{% set z = 'a' * 100000 %}{{ z }}",
            "{{ messages }}", "{% for m in messages %}{{ m.content }}{% endfor %}",
        ]),
        depth in 1usize..4,
    ) {
        limit_memory();
        let mut t = body.to_string();
        for k in 0..depth {
            t = format!("{{% for i{k} in range({n}) %}}{t}{{% endfor %}}");
        }
        let mut tok = byte_tokenizer();
        tok.chat_template = Some(t);
        let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
        if let Err(e) = tok.apply_chat_template(&msgs, true) {
            prop_assert!(!e.to_string().contains('\n'), "{}", e);
        }
    }
}
