//! The binary as a user runs it: reports are written, bad input gives one `error:` line and
//! exit code 2, never a panic.

use std::process::{Command, Output};

fn mpolm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mpolm"))
        .args(args)
        .output()
        .unwrap()
}

/// A JSON file the binary wrote (a --report, a config).
fn read_json(path: impl AsRef<std::path::Path>) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Run the binary and require success (its stderr is the failure message).
fn mpolm_ok(args: &[&str]) -> Output {
    let o = mpolm(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// A fresh temp dir holding a tiny synthetic llama model directory at `m`.
fn tiny_llama() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    (d, m)
}

fn assert_clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn inspect_and_generate_tiny_model_with_reports() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let rep = d.path().join("out/inspect.json");
    let o = mpolm(&[
        "inspect",
        m.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v = read_json(&rep);
    let total = v["inspect"]["total_params"].as_u64().unwrap();
    let printed = stdout
        .lines()
        .find(|l| l.starts_with("total"))
        .unwrap()
        .replace(',', "");
    assert!(printed.contains(&total.to_string()), "{printed} vs {total}");
    assert_eq!(v["inspect"]["architecture"], "llama");

    let rep = d.path().join("gen.json");
    let o = mpolm(&[
        "generate",
        m.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = read_json(&rep);
    assert_eq!(v["generate"]["output_ids"].as_array().unwrap().len(), 4);
    assert!(v["generate"]["stats"]["decode_tok_per_s"].as_f64().unwrap() > 0.0);

    let o = mpolm(&[
        "generate",
        m.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--max-new-tokens",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bad_inputs_give_one_line_errors() {
    assert_clean_error(
        &mpolm(&["inspect", "no-such-alias"]),
        "unknown model 'no-such-alias'",
    );
    assert_clean_error(
        &mpolm(&["inspect", "/nonexistent/dir/"]),
        "/nonexistent/dir/",
    );
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("bert");
    models::testing::write_tiny_bert(&b).unwrap();
    assert_clean_error(
        &mpolm(&["generate", b.to_str().unwrap(), "--prompt", "x"]),
        "is an encoder",
    );
    let l = d.path().join("llama");
    models::testing::write_tiny_llama(&l, false).unwrap();
    assert_clean_error(
        &mpolm(&[
            "generate",
            l.to_str().unwrap(),
            "--prompt",
            "x",
            "--top-p",
            "0",
        ]),
        "--top-p",
    );
    // A report that cannot be written: the parent is a file.
    let f = d.path().join("file");
    std::fs::write(&f, "x").unwrap();
    let bad = f.join("r.json");
    assert_clean_error(
        &mpolm(&[
            "inspect",
            l.to_str().unwrap(),
            "--report",
            bad.to_str().unwrap(),
        ]),
        "cannot create directory",
    );
}

#[test]
fn fetch_without_model_lists_aliases() {
    let o = mpolm(&["fetch"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for a in ["smollm2-135m", "qwen2.5-0.5b", "minilm-l6"] {
        assert!(s.contains(a), "{s}");
    }
}

#[test]
fn spectrum_reports_exact_full_bond_mpos_and_plots() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let rep = d.path().join("spec.json");
    let png = d.path().join("spec.png");
    let o = mpolm(&[
        "spectrum",
        m.to_str().unwrap(),
        "--matrices",
        "layers.0.*proj",
        "--n",
        "3",
        "--plot",
        png.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = read_json(&rep);
    let mats = v["matrices"].as_array().unwrap();
    assert_eq!(mats.len(), 7, "q,k,v,o,gate,up,down of layer 0");
    for mtx in mats {
        assert!(mtx["name"].as_str().unwrap().starts_with("model.layers.0."));
        assert!(
            mtx["full_bond_relative_error"].as_f64().unwrap() < 1e-5,
            "{mtx}"
        );
        let rows = mtx["rows"].as_u64().unwrap();
        let rf: u64 = mtx["row_factors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .product();
        assert!(rf >= rows);
        // The bound must hold at the half-budget point and the curve must end at error 0.
        if let Some(h) = mtx["half_budget"].as_object() {
            assert!(
                h["rel_error_exact"].as_f64().unwrap()
                    <= h["rel_error_bound"].as_f64().unwrap() * (1.0 + 1e-4) + 1e-6
            );
        }
        let last = mtx["curve"].as_array().unwrap().last().unwrap();
        assert!(last["rel_error_bound"].as_f64().unwrap() < 1e-6);
    }
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    assert_clean_error(
        &mpolm(&[
            "spectrum",
            m.to_str().unwrap(),
            "--matrices",
            "nothing_like_this",
        ]),
        "matches no weight matrix",
    );
}

/// Fine-tune a tiny causal model with LoRA from the CLI, split by --stop-after and --resume,
/// then evaluate the saved adapter (loaded through its base model) and check the report.
#[test]
fn finetune_lora_resume_and_evaluate_the_adapter() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let data = d.path().join("train.txt");
    std::fs::write(&data, "a small text about a cat and a dog. ".repeat(50)).unwrap();
    let out = d.path().join("ft");
    let rep = d.path().join("ft.json");
    let (ms, ds, os, rs) = (
        m.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        rep.to_str().unwrap(),
    );
    let base = [
        "finetune",
        ms,
        "--task",
        "lm",
        "--data",
        ds,
        "--method",
        "lora",
        "--lr",
        "1e-2",
        "--epochs",
        "2",
        "--batch",
        "2",
        "--max-len",
        "16",
        "--out",
        os,
        "--report",
        rs,
    ];
    let mut first = base.to_vec();
    first.extend(["--stop-after", "3"]);
    let o = mpolm(&first);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--resume"));
    // Without --resume the used directory is refused.
    assert_clean_error(&mpolm(&base), "--resume");
    let mut again = base.to_vec();
    again.push("--resume");
    let o = mpolm(&again);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = read_json(&rep);
    assert_eq!(v["command"], "finetune");
    assert_eq!(v["result"]["finished"], true);
    let tuned = v["result"]["tuned_params"].as_u64().unwrap();
    assert!(tuned > 0 && tuned < v["result"]["total_params"].as_u64().unwrap());
    // The adapter directory loads as a model (base + adapter) for inspect.
    let total = |model: &str| -> u64 {
        let r = d.path().join("inspect.json");
        let o = mpolm(&["inspect", model, "--report", r.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = read_json(&r);
        v["inspect"]["total_params"].as_u64().unwrap()
    };
    assert_eq!(total(os), total(ms) + tuned, "base + adapter parameters");
    // A malformed JSONL row names its line.
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"txt\": 1}\n").unwrap();
    let o = mpolm(&[
        "finetune",
        ms,
        "--task",
        "lm",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        d.path().join("x").to_str().unwrap(),
    ]);
    assert_clean_error(&o, "bad.jsonl:2");
}

/// CaliSr from the command line on a causal model: both rules run, the log and report name
/// each component's switch step, the plot is written, and LoRA's result (base weights trained in
/// the full phase) is a whole model that loads.
#[test]
fn finetune_calisr_logs_switches_and_plots() {
    let (d, m) = tiny_llama();
    let data = d.path().join("train.txt");
    std::fs::write(&data, "a small text about a cat and a dog. ".repeat(50)).unwrap();
    for (method, rule) in [("lora", "s"), ("mpo-aux", "d")] {
        let out = d.path().join(format!("ft-{method}"));
        let rep = d.path().join(format!("ft-{method}.json"));
        let o = mpolm_ok(&[
            "finetune",
            m.to_str().unwrap(),
            "--task",
            "lm",
            "--data",
            data.to_str().unwrap(),
            "--method",
            method,
            "--calisr",
            rule,
            "--calisr-every",
            "2",
            "--calisr-switch-at",
            "0.5",
            "--lr",
            "1e-2",
            "--batch",
            "2",
            "--max-len",
            "16",
            "--max-steps",
            "8",
            "--out",
            out.to_str().unwrap(),
            "--report",
            rep.to_str().unwrap(),
        ]);
        let text = String::from_utf8_lossy(&o.stdout);
        let v = read_json(&rep);
        let sw = v["calisr"]["switched"].as_object().unwrap();
        let groups: Vec<&str> = sw.keys().map(|k| k.as_str()).collect();
        let want: &[&str] = if rule == "d" {
            &["model"]
        } else {
            &["attention", "ffn"]
        };
        assert_eq!(groups, want, "{text}");
        assert!(sw.values().all(|s| s == 4), "{sw:?}");
        assert!(
            text.contains("switched to lightweight tuning at step 4 of 8"),
            "{text}"
        );
        // Probes at steps 1 and 3, before the switch.
        assert_eq!(v["calisr"]["probes"], 2);
        let log = read_json(out.join("finetune_log.json"));
        assert_eq!(log["hooks"]["calisr"]["probes"][1]["step"], 3);
        let png = std::fs::read(out.join("calisr_srank.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        mpolm_ok(&["inspect", out.to_str().unwrap()]);
    }
}

#[test]
fn quantize_gptq_end_to_end_and_bad_inputs() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let text = d.path().join("calib.txt");
    let t: String = (0..200)
        .map(|i| format!("the cat {i} sat on the mat and then the dog ran in the hall. "))
        .collect();
    std::fs::write(&text, t).unwrap();
    let (ms, ts) = (m.to_str().unwrap(), text.to_str().unwrap());
    let out = d.path().join("q");
    let os = out.to_str().unwrap();
    let ppl_of = |args: &[&str]| -> (f64, serde_json::Value) {
        let rep = d.path().join("rep.json");
        let mut a = args.to_vec();
        a.extend(["--ppl-windows", "4", "--ppl-window", "64", "--ppl-data", ts]);
        a.extend(["--report", rep.to_str().unwrap()]);
        let o = mpolm(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = read_json(&rep);
        (v["model_summary"]["perplexity"]["ppl"].as_f64().unwrap(), v)
    };
    let (base, _) = ppl_of(&["quantize", ms, "--method", "none"]);
    let gptq = [
        "quantize",
        ms,
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "16",
        "--act-order",
        "--calib",
        ts,
        "--nsamples",
        "6",
        "--seqlen",
        "32",
        "--out",
        os,
    ];
    let (q, v) = ppl_of(&gptq);
    let layers = v["quantize"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 14);
    assert!(layers.iter().all(|l| l["kind"] == "gptq4"), "{layers:?}");
    assert_eq!(
        v["quantize"]["calib_first_ids"].as_array().unwrap().len(),
        4
    );
    assert!(out.join("quantize_config.json").exists());
    // 4-bit GPTQ of a random model: close to the f32 model but not identical.
    assert!(
        q.is_finite() && q != base && (q / base - 1.0).abs() < 0.2,
        "{q} vs {base}"
    );
    // The checkpoint reloads on its own and evaluates to the same perplexity (the quantize
    // run already scored the reloaded checkpoint).
    let (again, v) = ppl_of(&["quantize", os, "--method", "none"]);
    assert!((again / q - 1.0).abs() < 1e-6, "{again} vs {q}");
    assert!(v["model_summary"]["bits_per_param"].as_f64().unwrap() < 32.0);
    // A used output directory is refused.
    assert_clean_error(&mpolm(&gptq), "already exists and is not empty");
    // GPTQModel's gptq_v2: the same quantization, zero points stored as themselves; the
    // checkpoint says so and reloads to what the run scored.
    let v2 = d.path().join("q2");
    let v2s = v2.to_str().unwrap();
    let mut gptq2 = gptq.to_vec();
    let n = gptq2.len();
    gptq2[n - 1] = v2s;
    gptq2.extend(["--checkpoint-format", "gptq_v2"]);
    let (q2, _) = ppl_of(&gptq2);
    assert!((q2 / q - 1.0).abs() < 1e-2, "{q2} vs {q}");
    let qc = read_json(&v2.join("quantize_config.json"));
    assert_eq!(qc["checkpoint_format"], "gptq_v2");
    let (again2, _) = ppl_of(&["quantize", v2s, "--method", "none"]);
    assert!((again2 / q2 - 1.0).abs() < 1e-6, "{again2} vs {q2}");

    // Bad input: one-line error, exit code 2, no output directory left behind.
    let bad = d.path().join("bad");
    let bs = bad.to_str().unwrap();
    let base_args = [
        "quantize", ms, "--method", "gptq", "--seqlen", "32", "--out", bs,
    ];
    for (extra, needle) in [
        (
            &["--bits", "5", "--calib", ts][..],
            "unsupported bit width 5",
        ),
        (
            &["--group-size", "24", "--calib", ts][..],
            "--group-size 24 does not divide in_features 32",
        ),
        (
            &["--calib", "/nonexistent/calib.txt"][..],
            "calibration file /nonexistent/calib.txt",
        ),
    ] {
        let mut a = base_args.to_vec();
        a.extend(extra);
        assert_clean_error(&mpolm(&a), needle);
        assert!(!bad.exists(), "{extra:?} left {bs} behind");
    }
}

#[test]
fn quantize_with_int8_activations_saves_and_reapplies_the_outlier_plan() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let text = d.path().join("calib.txt");
    let t: String = (0..200)
        .map(|i| format!("the cat {i} sat on the mat and then the dog ran in the hall. "))
        .collect();
    std::fs::write(&text, t).unwrap();
    let (ms, ts) = (m.to_str().unwrap(), text.to_str().unwrap());
    let out = d.path().join("q");
    let os = out.to_str().unwrap();
    let rep = d.path().join("rep.json");
    let ppl = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--ppl-windows", "4", "--ppl-window", "64", "--ppl-data", ts]);
        a.extend(["--report", rep.to_str().unwrap()]);
        let o = mpolm(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_json(&rep)
    };
    let calib = ["--calib", ts, "--nsamples", "4", "--seqlen", "32"];
    let base = ppl(&["quantize", ms, "--method", "none"]);
    // A threshold of 0 makes every dimension an outlier, so `all` keeps every input: the
    // activations are untouched and the perplexity is the f32 one.
    let mut a = vec!["quantize", ms, "--method", "none", "--int8-activations"];
    a.extend(calib);
    a.extend(["--outlier-threshold", "1e-30"]);
    let v = ppl(&a);
    let p = |v: &serde_json::Value| v["model_summary"]["perplexity"]["ppl"].as_f64().unwrap();
    assert!(
        (p(&v) / p(&base) - 1.0).abs() < 1e-9,
        "{} vs {}",
        p(&v),
        p(&base)
    );
    // Quantizing every input dimension changes it a little.
    let mut a = vec!["quantize", ms, "--method", "none", "--int8-activations"];
    a.extend(calib);
    a.extend(["--keep-outliers", "0"]);
    let v = ppl(&a);
    assert!(p(&v) != p(&base) && (p(&v) / p(&base) - 1.0).abs() < 0.05);
    assert_eq!(v["int8_activations"]["kept_dims"], 0);
    // With a checkpoint the plan is saved and re-applied on load.
    let mut a = vec![
        "quantize",
        ms,
        "--method",
        "rtn",
        "--bits",
        "8",
        "--group-size",
        "16",
    ];
    a.extend([
        "--int8-activations",
        "--keep-outliers",
        "1",
        "--outlier-threshold",
        "0.5",
    ]);
    a.extend(calib);
    a.extend(["--out", os]);
    let v = ppl(&a);
    let cfg = read_json(out.join("quantize_config.json"));
    let kept = cfg["mpolm_int8_activations"]["kept_dims"]
        .as_object()
        .unwrap();
    assert_eq!(kept.len(), 14);
    assert!(kept.values().all(|d| d.as_array().unwrap().len() <= 1));
    let again = ppl(&["quantize", os, "--method", "none"]);
    assert!(
        (p(&again) / p(&v) - 1.0).abs() < 1e-9,
        "{} vs {}",
        p(&again),
        p(&v)
    );
    // Bad input.
    let o = mpolm(&["quantize", ms, "--method", "none", "--keep-outliers", "2"]);
    assert_clean_error(&o, "only apply with --int8-activations");
    let o = mpolm(&[
        "quantize",
        ms,
        "--method",
        "none",
        "--int8-activations",
        "--keep-outliers",
        "x",
    ]);
    assert_clean_error(&o, "--keep-outliers takes 'all' or a number");
    let o = mpolm(&[
        "quantize",
        ms,
        "--method",
        "none",
        "--int8-activations",
        "--outlier-threshold",
        "0",
    ]);
    assert_clean_error(&o, "--outlier-threshold");
    assert!(String::from_utf8_lossy(&o.stderr).contains("must be > 0"));
    // A checkpoint whose outlier plan names a projection the model lacks is refused on load,
    // naming the config file.
    let cpath = out.join("quantize_config.json");
    let text = std::fs::read_to_string(&cpath)
        .unwrap()
        .replace("model.layers.0.mlp.down_proj", "model.layers.0.mlp.nope");
    std::fs::write(&cpath, text).unwrap();
    let o = mpolm(&["quantize", os, "--method", "none"]);
    assert_clean_error(&o, "quantize_config.json");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no projection 'model.layers.0.mlp.nope'"));
}

#[test]
fn gguf_weights_quantized_keeps_blocks_and_bad_value_errors() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let g = d.path().join("m.gguf");
    let o = mpolm(&[
        "export",
        m.to_str().unwrap(),
        "--gguf",
        "--type",
        "q8_0",
        "--out",
        g.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut bytes = vec![];
    for w in ["f32", "quantized"] {
        let rep = d.path().join(format!("inspect-{w}.json"));
        let o = mpolm(&[
            "inspect",
            g.to_str().unwrap(),
            "--gguf-weights",
            w,
            "--report",
            rep.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = read_json(&rep);
        assert_eq!(v["inspect"]["gguf_weights"], w);
        let kinds = v["inspect"]["linear_kinds"].as_object().unwrap();
        let want = if w == "f32" { "dense" } else { "gguf-q8_0" };
        assert_eq!(kinds.keys().collect::<Vec<_>>(), vec![want], "{kinds:?}");
        bytes.push(v["inspect"]["weight_bytes"].as_u64().unwrap());
    }
    // Q8_0 holds 34 bytes per 32 weights instead of 128 (the norms stay f32).
    assert!(bytes[1] * 3 < bytes[0], "{bytes:?}");
    let rep = d.path().join("gen.json");
    let o = mpolm(&[
        "generate",
        g.to_str().unwrap(),
        "--gguf-weights",
        "quantized",
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "3",
        "--report",
        rep.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_clean_error(
        &mpolm(&["inspect", g.to_str().unwrap(), "--gguf-weights", "int4"]),
        "invalid value 'int4'",
    );
}

fn mpolm_env(args: &[&str], env: &[(&str, Option<&std::path::Path>)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mpolm"));
    c.args(args);
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.output().unwrap()
}

#[test]
fn data_command_reports_the_folder_in_effect_and_verifies_checksums() {
    let d = tempfile::tempdir().unwrap();
    let rep = d.path().join("data.json");
    let r = rep.to_str().unwrap();
    // Neither flag nor variable: the project's own data, complete and intact.
    let o = mpolm_env(
        &["data", "--verify", "--report", r],
        &[("MPOLM_DATA", None)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = read_json(&rep);
    assert_eq!(v["origin"], "project");
    assert!(v["checksums_listed"].as_u64().unwrap() > 170);
    assert_eq!(v["verify"]["differ"].as_array().unwrap().len(), 0);
    for s in v["datasets"].as_array().unwrap() {
        assert_eq!(s["present_files"], s["expected_files"], "{s}");
    }

    // The variable wins over the project's folder, and the flag over both.
    let mine = d.path().join("mine");
    std::fs::create_dir_all(mine.join("ifeval")).unwrap();
    let body = "{\"key\": 1}\n";
    std::fs::write(mine.join("ifeval/input_data.jsonl"), body).unwrap();
    let o = mpolm_env(&["data", "--report", r], &[("MPOLM_DATA", Some(&mine))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_json(&rep)["origin"], "env");
    let o = mpolm_env(
        &["data", "--data-dir", mine.to_str().unwrap(), "--report", r],
        &[("MPOLM_DATA", Some(d.path()))],
    );
    assert!(o.status.success());
    let v = read_json(&rep);
    assert_eq!(v["origin"], "flag");
    assert_eq!(v["data_dir"], mine.to_str().unwrap());

    // A changed file fails --verify in one line naming it; no checksums = nothing to verify.
    let o = mpolm(&["data", "--data-dir", mine.to_str().unwrap(), "--verify"]);
    assert_clean_error(&o, "no SHA256SUMS");
    std::fs::write(
        mine.join("SHA256SUMS"),
        format!("{}  ifeval/input_data.jsonl\n", "0".repeat(64)),
    )
    .unwrap();
    let o = mpolm(&["data", "--data-dir", mine.to_str().unwrap(), "--verify"]);
    assert_clean_error(&o, "ifeval/input_data.jsonl");
    let o = mpolm(&["data", "--data-dir", "/nonexistent/mpolm-data"]);
    assert_clean_error(&o, "/nonexistent/mpolm-data: not found");
}

#[test]
fn eval_rerun_reuses_every_cached_request_and_no_cache_bypasses() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval/data");
    let cache = d.path().join("cache");
    let run = |extra: &[&str], rep: &str| {
        let mut args = vec![
            "eval",
            m.to_str().unwrap(),
            "--task",
            "mmlu_anatomy,wikitext2,gsm8k",
            "--data-dir",
            data.to_str().unwrap(),
            "--max-gen-tokens",
            "4",
            "--report",
            rep,
        ];
        args.extend_from_slice(extra);
        let o = mpolm_env(&args, &[("MPOLM_CACHE", Some(&cache))]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_json(rep)
    };
    let r1 = d.path().join("1.json");
    let r2 = d.path().join("2.json");
    let r3 = d.path().join("3.json");
    let a = run(&[], r1.to_str().unwrap());
    let b = run(&[], r2.to_str().unwrap());
    let c = run(&["--no-cache"], r3.to_str().unwrap());
    let computed = a["config"]["request_cache"]["computed"].as_u64().unwrap();
    assert!(computed > 0);
    assert_eq!(b["config"]["request_cache"]["computed"], 0);
    assert_eq!(b["config"]["request_cache"]["reused"], computed);
    assert!(c["config"]["request_cache"].is_null());
    for r in [&b, &c] {
        assert_eq!(r["results"], a["results"]);
    }
}

/// Every numeric flag is checked while the arguments are parsed: the model named here does
/// not exist, so a flag checked only after loading would report the model instead.
#[test]
fn numeric_flags_are_range_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let nomodel = d.path().join("no-such-model");
    let (m, out) = (
        nomodel.to_str().unwrap(),
        d.path().join("out").to_str().unwrap().to_string(),
    );
    let gen = ["generate", m, "--prompt", "x"];
    let comp = ["compress", m, "--out", &out];
    let ft = ["finetune", m, "--task", "lm", "--data", m, "--out", &out];
    let quant = ["quantize", m, "--method", "rtn", "--out", &out];
    let cases: &[(&[&str], &[&str], &str)] = &[
        (&gen, &["--threads", "10000"], "--threads"),
        (&gen, &["--threads", "0"], "--threads"),
        (&gen, &["--temperature", "nan"], "--temperature"),
        (&gen, &["--temperature", "-1"], "--temperature"),
        (&gen, &["--top-p", "1.5"], "--top-p"),
        (&gen, &["--max-new-tokens", "0"], "--max-new-tokens"),
        (&comp, &["--params-ratio", "1.5"], "--params-ratio"),
        (&comp, &["--params-ratio", "0"], "--params-ratio"),
        (&comp, &["--rel-error", "-0.1"], "--rel-error"),
        (&comp, &["--bond", "0"], "--bond"),
        (&comp, &["--n", "0"], "--n"),
        (&comp, &["--n", "100"], "--n"),
        (&["spectrum", m], &["--n", "0"], "--n"),
        (&ft, &["--max-steps", "0"], "--max-steps"),
        (&ft, &["--limit", "0"], "--limit"),
        (&ft, &["--epochs", "0"], "--epochs"),
        (&ft, &["--max-grad-norm", "nan"], "--max-grad-norm"),
        (&ft, &["--warmup-ratio", "2"], "--warmup-ratio"),
        (&ft, &["--lr", "0"], "--lr"),
        (&ft, &["--lr", "inf"], "--lr"),
        (&ft, &["--mpo-lr", "-1"], "--mpo-lr"),
        (&ft, &["--batch", "0"], "--batch"),
        (&ft, &["--lora-r", "0"], "--lora-r"),
        (&ft, &["--lora-dropout", "1"], "--lora-dropout"),
        (&ft, &["--weight-decay", "nan"], "--weight-decay"),
        (&ft, &["--save-every", "0"], "--save-every"),
        (&ft, &["--calisr", "s"], "--method"),
        (&ft, &["--calisr", "x"], "--calisr"),
        (
            &ft,
            &["--method", "lora", "--calisr", "d", "--calisr-delta", "1"],
            "--calisr-delta",
        ),
        (
            &ft,
            &["--method", "lora", "--calisr", "d", "--calisr-delta", "0"],
            "--calisr-delta",
        ),
        (
            &ft,
            &["--method", "lora", "--calisr", "d", "--calisr-probes", "0"],
            "--calisr-probes",
        ),
        (
            &ft,
            &["--method", "lora", "--calisr", "d", "--calisr-every", "0"],
            "--calisr-every",
        ),
        (
            &ft,
            &[
                "--method",
                "lora",
                "--calisr",
                "d",
                "--calisr-switch-at",
                "1.5",
            ],
            "--calisr-switch-at",
        ),
        (
            &ft,
            &["--method", "lora", "--calisr", "d", "--calisr-fft-lr", "0"],
            "--calisr-fft-lr",
        ),
        (
            &ft,
            &["--method", "lora", "--calisr-delta", "0.5"],
            "required arguments",
        ),
        (&quant, &["--nsamples", "0"], "--nsamples"),
        (&quant, &["--seqlen", "1"], "--seqlen"),
        (&quant, &["--damp", "1"], "--damp"),
        (
            &quant,
            &["--outlier-threshold", "nan"],
            "--outlier-threshold",
        ),
        (
            &["eval", m, "--task", "wikitext2"],
            &["--batch", "0"],
            "--batch",
        ),
        (
            &["eval", m, "--task", "wikitext2"],
            &["--max-length", "1"],
            "--max-length",
        ),
        (
            &["bench", "generate", m],
            &["--new-tokens", "1"],
            "--new-tokens",
        ),
    ];
    for (base, extra, flag) in cases {
        let mut a = base.to_vec();
        a.extend(*extra);
        let o = mpolm(&a);
        assert_clean_error(&o, flag);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("no-such-model"),
            "{extra:?} was checked only after loading: {err}"
        );
    }
    assert!(!d.path().join("out").exists());
}

/// Ranges that depend on the model are checked once it is loaded, before any work.
#[test]
fn model_dependent_ranges_are_checked_before_work() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let ms = m.to_str().unwrap();
    let data = d.path().join("train.txt");
    std::fs::write(&data, "a small text about a cat. ".repeat(20)).unwrap();
    let out = d.path().join("out");
    let os = out.to_str().unwrap();
    // v_proj of the tiny model is 16×32.
    let o = mpolm(&[
        "finetune",
        ms,
        "--task",
        "lm",
        "--data",
        data.to_str().unwrap(),
        "--method",
        "lora",
        "--lora-r",
        "1000000",
        "--out",
        os,
    ]);
    assert_clean_error(&o, "--lora-r 1000000 is out of range");
    assert!(String::from_utf8_lossy(&o.stderr).contains("1..=16"));
    assert!(!out.exists());
    let o = mpolm(&[
        "quantize",
        ms,
        "--method",
        "rtn",
        "--group-size",
        "16",
        "--keep-fp16",
        "crucial:99999",
        "--out",
        os,
    ]);
    assert_clean_error(&o, "--keep-fp16 crucial:99999 is out of range");
    assert!(String::from_utf8_lossy(&o.stderr).contains("crucial:0..=14"));
    assert!(!out.exists());
}

/// `--out`, `--report` and `--plot` that cannot be written are refused before the model is
/// even looked at (the model here does not exist).
#[test]
fn output_targets_are_checked_before_the_job() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("no-such-model");
    let ms = m.to_str().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let dangling = d.path().join("dangling");
    std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling).unwrap();
    let full = d.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("a"), "x").unwrap();
    let under_file = file.join("r.json");
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["inspect".into(), ms.into(), "--report".into(), p(&link)],
            "symbolic link",
        ),
        (
            vec!["inspect".into(), ms.into(), "--report".into(), p(&dangling)],
            "dangling symbolic link",
        ),
        (
            vec!["inspect".into(), ms.into(), "--report".into(), p(&full)],
            "is a directory",
        ),
        (
            vec![
                "inspect".into(),
                ms.into(),
                "--report".into(),
                p(&under_file),
            ],
            "cannot create directory",
        ),
        (
            vec!["compress".into(), ms.into(), "--out".into(), p(&link)],
            "symbolic link",
        ),
        (
            vec!["compress".into(), ms.into(), "--out".into(), p(&dangling)],
            "dangling",
        ),
        (
            vec!["compress".into(), ms.into(), "--out".into(), p(&full)],
            "already exists and is not empty",
        ),
        (
            vec!["compress".into(), ms.into(), "--out".into(), p(&file)],
            "not a directory",
        ),
        (
            vec![
                "export".into(),
                ms.into(),
                "--dense".into(),
                "--out".into(),
                p(&under_file),
            ],
            "cannot create directory",
        ),
        (
            vec![
                "export".into(),
                ms.into(),
                "--gguf".into(),
                "--out".into(),
                p(&file),
            ],
            "already exists",
        ),
        (
            vec!["spectrum".into(), ms.into(), "--plot".into(), p(&dangling)],
            "dangling symbolic link",
        ),
        (
            vec![
                "quantize".into(),
                ms.into(),
                "--method".into(),
                "rtn".into(),
                "--out".into(),
                p(&full),
            ],
            "already exists and is not empty",
        ),
        (
            vec![
                "finetune".into(),
                ms.into(),
                "--task".into(),
                "lm".into(),
                "--data".into(),
                ms.into(),
                "--out".into(),
                p(&full),
            ],
            "--resume",
        ),
        (
            vec![
                "finetune".into(),
                ms.into(),
                "--task".into(),
                "lm".into(),
                "--data".into(),
                ms.into(),
                "--resume".into(),
                "--out".into(),
                p(&link),
            ],
            "symbolic link",
        ),
    ];
    for (args, needle) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = mpolm(&a);
        assert_clean_error(&o, needle);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("no-such-model"), "{args:?}: {err}");
    }
    // Nothing was replaced or created.
    assert_eq!(std::fs::read_to_string(&link).unwrap(), "x");
    assert!(std::fs::symlink_metadata(&dangling).unwrap().is_symlink());
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);
}

/// Temp entries left by a killed run (the next run's prefix, unlocked, older than it) are
/// removed by the next run that writes in the same directory; other files stay.
#[test]
fn leftovers_of_a_killed_run_are_cleaned_by_the_next_write() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let orphan = d.path().join(format!("{}4242-killed", models::tmp::PREFIX));
    std::fs::create_dir_all(orphan.join("x")).unwrap();
    std::fs::write(orphan.join("x/model.safetensors"), vec![1u8; 1 << 16]).unwrap();
    let foreign = d.path().join(".tmp-not-ours");
    std::fs::create_dir(&foreign).unwrap();
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for p in [&orphan, &foreign] {
        std::fs::File::open(p)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }
    let out = d.path().join("dense");
    let o = mpolm(&[
        "export",
        m.to_str().unwrap(),
        "--dense",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").exists());
    assert!(!orphan.exists(), "the killed run's temp dir stays");
    assert!(
        foreign.exists(),
        "a temp dir of another program was removed"
    );
    let ours: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(models::tmp::PREFIX)
        })
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}

/// What a new user read (issue 27): inspect names the GGUF weight mode only for GGUF files, and
/// every flag has a description that is about the command itself.
#[test]
fn inspect_and_help_texts_describe_what_the_code_does() {
    let (_d, m) = tiny_llama();
    let o = mpolm_ok(&["inspect", m.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("GGUF weights"), "{out}");
    assert!(out.contains("weights held as stored"), "{out}");
    for cmd in ["quantize", "finetune", "eval", "inspect"] {
        let h = String::from_utf8_lossy(&mpolm(&[cmd, "--help"]).stdout).into_owned();
        assert!(!h.contains("issue #"), "{cmd}: {h}");
        assert!(!h.contains("main job"), "{cmd}: {h}");
    }
    let h = String::from_utf8_lossy(&mpolm(&["finetune", "--help"]).stdout).into_owned();
    let lines: Vec<&str> = h.lines().collect();
    for flag in ["--warmup-steps", "--eval-limit", "--eval-batch"] {
        let i = lines
            .iter()
            .position(|l| l.trim_start().starts_with(flag))
            .unwrap();
        // clap prints the description after the value name, or on the next line.
        let same_line = lines[i]
            .split_once('>')
            .is_some_and(|(_, rest)| !rest.trim().is_empty());
        let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
        let next_line = !next.is_empty() && !next.starts_with('-');
        assert!(same_line || next_line, "{flag} has no description:\n{h}");
    }
}

/// Written models, GGUF files and reports are ordinary readable files (rw-r--r--), not the
/// private 0600 of a temp file (issue 27).
#[cfg(unix)]
#[test]
fn outputs_are_written_with_the_usual_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (d, m) = tiny_llama();
    let (hf, gguf, rep) = (
        d.path().join("hf"),
        d.path().join("m.gguf"),
        d.path().join("r.json"),
    );
    mpolm_ok(&[
        "export",
        m.to_str().unwrap(),
        "--dense",
        "--out",
        hf.to_str().unwrap(),
    ]);
    mpolm_ok(&[
        "export",
        m.to_str().unwrap(),
        "--gguf",
        "--out",
        gguf.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ]);
    let mut files: Vec<_> = std::fs::read_dir(&hf)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.extend([gguf, rep]);
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{}: {mode:o}", f.display());
    }
}

/// `export --dense` reports the parameters it wrote, not the source model's count (a full-bond
/// MPO holds more than the dense matrices it contracts to; issue 27).
#[test]
fn dense_export_reports_what_it_wrote() {
    let (d, m) = tiny_llama();
    let (mpo, hf, rep) = (
        d.path().join("mpo"),
        d.path().join("hf"),
        d.path().join("r.json"),
    );
    mpolm_ok(&[
        "compress",
        m.to_str().unwrap(),
        "--out",
        mpo.to_str().unwrap(),
    ]);
    let o = mpolm_ok(&[
        "export",
        mpo.to_str().unwrap(),
        "--dense",
        "--out",
        hf.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ]);
    let tensors =
        candle_core::safetensors::load(hf.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let in_file: usize = tensors.values().map(|t| t.elem_count()).sum();
    let v = read_json(&rep);
    assert_eq!(v["parameters_written"].as_u64().unwrap() as usize, in_file);
    let printed = String::from_utf8_lossy(&o.stdout).replace(',', "");
    assert!(
        printed.contains(&format!("({in_file} params)")),
        "{printed}"
    );
    // The full-bond MPO has more parameters than what it contracts to, so the old count differs.
    assert!(
        v["source_parameters"].as_u64().unwrap() as usize > in_file,
        "{v}"
    );
}

/// OPF from the CLI on a tiny llama: a dense model of the original size comes out, with the
/// train- and deploy-time parameter counts reported; every bad OPF input is one error line
/// before any training (the output directory is not even created).
#[test]
fn finetune_opf_end_to_end_and_bad_inputs() {
    let (d, m) = tiny_llama();
    let data = d.path().join("train.txt");
    std::fs::write(&data, "a small text about a cat and a dog. ".repeat(50)).unwrap();
    let (ms, ds) = (m.to_str().unwrap(), data.to_str().unwrap());
    let out = d.path().join("ft");
    let rep = d.path().join("ft.json");
    let base = [
        "finetune",
        ms,
        "--task",
        "lm",
        "--data",
        ds,
        "--lr",
        "1e-3",
        "--max-steps",
        "3",
        "--batch",
        "2",
        "--max-len",
        "16",
    ];
    let mut ok = base.to_vec();
    ok.extend([
        "--method",
        "opf",
        "--opf-top-n",
        "1",
        "--opf-sites",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ]);
    let o = mpolm_ok(&ok);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("deployed"), "{stdout}");
    let v = read_json(&rep);
    let st = &v["result"]["hooks"]["opf"];
    let total = |model: &str| -> u64 {
        let r = d.path().join("inspect.json");
        mpolm_ok(&["inspect", model, "--report", r.to_str().unwrap()]);
        read_json(&r)["inspect"]["total_params"].as_u64().unwrap()
    };
    let dense = total(ms);
    assert_eq!(st["deploy_params"].as_u64(), Some(dense));
    assert!(st["train_params"].as_u64().unwrap() > dense);
    assert_eq!(total(out.to_str().unwrap()), dense);
    assert!(!out.join("mpo_manifest.json").exists());

    let never = d.path().join("never");
    let cases: &[(&[&str], &str)] = &[
        (&["--method", "opf"], "--opf-top-n"),
        (
            &["--method", "opf", "--opf-top-n", "3"],
            "larger than the module group",
        ),
        (
            &["--method", "full", "--opf-top-n", "1"],
            "only with --method opf",
        ),
        (&["--opf-score", "fisher"], "only with --method opf"),
        (
            &["--method", "opf", "--opf-top-n", "1", "--opf-sites", "1"],
            "--opf-sites 1 is out of range",
        ),
        (
            &["--method", "opf", "--opf-top-n", "1", "--opf-sites", "65"],
            "--opf-sites 65 is out of range",
        ),
        (
            &["--method", "opf", "--opf-top-n", "1", "--opf-every", "2"],
            "only with --opf-select dynamic",
        ),
        (
            &[
                "--method",
                "opf",
                "--opf-select",
                "dynamic",
                "--opf-top-n",
                "1",
                "--opf-per-round",
                "2",
            ],
            "--opf-per-round 2 is out of range",
        ),
        (&["--method", "opf", "--opf-top-n", "0"], "--opf-top-n"),
        (
            &[
                "--method",
                "opf",
                "--opf-top-n",
                "1",
                "--opf-select",
                "sometimes",
            ],
            "--opf-select",
        ),
        (
            &[
                "--method",
                "opf",
                "--opf-top-n",
                "1",
                "--opf-score",
                "guess",
            ],
            "--opf-score",
        ),
    ];
    for (extra, needle) in cases {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        a.extend(["--out", never.to_str().unwrap()]);
        assert_clean_error(&mpolm(&a), needle);
        assert!(!never.exists(), "{extra:?} created the output directory");
    }
    // An MPO checkpoint is not what OPF decomposes.
    let mpo = d.path().join("mpo");
    mpolm_ok(&["compress", ms, "--out", mpo.to_str().unwrap()]);
    let mut a = base.to_vec();
    a[1] = mpo.to_str().unwrap();
    a.extend([
        "--method",
        "opf",
        "--opf-top-n",
        "1",
        "--out",
        never.to_str().unwrap(),
    ]);
    assert_clean_error(&mpolm(&a), "MPO checkpoint");
}

#[test]
fn mpobert_builds_a_checkpoint_every_command_loads_and_refuses_bad_options() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("bert");
    models::testing::write_tiny_bert(&b).unwrap();
    let bs = b.to_str().unwrap();
    let out = d.path().join("mb");
    let o = mpolm_ok(&[
        "mpobert",
        bs,
        "--share",
        "groups:2",
        "--depth",
        "4",
        "--adapter-rank",
        "2",
        "--central-from",
        "layer:1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("2 group(s) of 2 layers"), "{text}");
    let mb = out.to_str().unwrap();
    let o = mpolm_ok(&["inspect", mb]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("layers 4") && text.contains("shared across layers"),
        "{text}"
    );
    let tsv = d.path().join("sst.tsv");
    std::fs::write(
        &tsv,
        "sentence\tlabel\na good film\t1\na bad film\t0\nso good\t1\nso bad\t0\n",
    )
    .unwrap();
    let tuned = d.path().join("tuned");
    mpolm_ok(&[
        "finetune",
        mb,
        "--task",
        "sst2",
        "--data",
        tsv.to_str().unwrap(),
        "--batch",
        "2",
        "--out",
        tuned.to_str().unwrap(),
    ]);
    assert!(tuned.join("mpobert_manifest.json").exists());
    mpolm_ok(&[
        "eval",
        tuned.to_str().unwrap(),
        "--task",
        "sst2",
        "--limit",
        "4",
    ]);
    let dense = d.path().join("dense");
    mpolm_ok(&["export", mb, "--dense", "--out", dense.to_str().unwrap()]);
    let cfg = read_json(dense.join("config.json"));
    assert_eq!(cfg["num_hidden_layers"], 4);
    let bad = |args: &[&str], needle: &str| {
        let mut v = vec!["mpobert", bs];
        v.extend_from_slice(args);
        let o = d.path().join(format!("bad{}", needle.len()));
        v.extend_from_slice(&["--out", o.to_str().unwrap()]);
        assert_clean_error(&mpolm(&v), needle);
        assert!(!o.exists(), "nothing written for {args:?}");
    };
    bad(&["--depth", "1"], "--depth 1 is out of range");
    bad(
        &["--depth", "4", "--share", "groups:3"],
        "3 groups do not divide the 4 layers",
    );
    bad(
        &["--depth", "2", "--adapter-rank", "33"],
        "--adapter-rank 33",
    );
    bad(
        &["--depth", "2", "--central-from", "layer:2"],
        "--central-from layer 2",
    );
    bad(&["--depth", "2", "--share", "groups:x"], "groups:G");
    let l = d.path().join("llama");
    models::testing::write_tiny_llama(&l, false).unwrap();
    let o = mpolm(&[
        "mpobert",
        l.to_str().unwrap(),
        "--depth",
        "2",
        "--out",
        d.path().join("x").to_str().unwrap(),
    ]);
    assert_clean_error(&o, "built from a BERT encoder");
}

/// `compress --calib`: SVD-LLM (svd shapes, Cholesky whitening) measures the output error it
/// predicts, the global allocation meets its budget, ASVD and calibrated MPO run and load, and
/// every inconsistent flag combination is one error line before any work.
#[test]
fn compress_calibrated_end_to_end_and_bad_inputs() {
    let (d, m) = tiny_llama();
    let text = d.path().join("calib.txt");
    let t: String = (0..200)
        .map(|i| format!("the cat {i} sat on the mat and then the dog ran in the hall. "))
        .collect();
    std::fs::write(&text, t).unwrap();
    let short = d.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let (ms, ts) = (m.to_str().unwrap(), text.to_str().unwrap());
    let rep = d.path().join("rep.json");
    let calib = ["--calib", ts, "--nsamples", "4", "--seqlen", "32"];
    let run = |out: &str, extra: &[&str]| -> serde_json::Value {
        let o = d.path().join(out);
        let mut a = vec!["compress", ms, "--out", o.to_str().unwrap()];
        a.extend(extra);
        a.extend(["--report", rep.to_str().unwrap()]);
        mpolm_ok(&a);
        // the checkpoint loads and generates
        mpolm_ok(&[
            "generate",
            o.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--max-new-tokens",
            "2",
        ]);
        read_json(&rep)
    };
    let mut a = vec!["--shapes", "svd", "--params-ratio", "0.5"];
    a.extend(calib);
    let v = run("svdllm", &a);
    let c = &v["calibrated"];
    assert_eq!(c["whiten"], "cholesky");
    assert_eq!(c["matrices"].as_array().unwrap().len(), 14);
    for x in c["matrices"].as_array().unwrap() {
        let (p, o) = (
            x["pred_rel_error"].as_f64().unwrap(),
            x["rel_output_error"].as_f64().unwrap(),
        );
        assert!((p - o).abs() <= 1e-6 * o, "{x}");
        assert_eq!(x["bonds"].as_array().unwrap().len(), 3);
    }
    assert_eq!(v["calibration"]["nsamples"], 4);
    let mut a = vec![
        "--shapes",
        "svd",
        "--params-ratio",
        "0.5",
        "--allocate",
        "global",
    ];
    a.extend(calib);
    let v = run("global", &a);
    let c = &v["calibrated"];
    let (target, got) = (
        c["target_params"].as_u64().unwrap(),
        c["mpo_params"].as_u64().unwrap(),
    );
    assert!(got <= target, "{got} > {target}");
    assert!(c["by_module"]["down_proj"]["kept_ratio"].as_f64().is_some());
    assert!(c["by_layer"]["001"]["matrices"] == 7);
    let mut a = vec!["--n", "3", "--params-ratio", "0.6", "--whiten", "diag"];
    a.extend(calib);
    let v = run("asvd", &a);
    assert!(v["calibrated"]["matrices"][0]["rel_diag_error"]
        .as_f64()
        .is_some());
    let mut a = vec!["--n", "3", "--params-ratio", "0.6"];
    a.extend(calib);
    run("mpo", &a);
    // global allocation without calibration: plain spectra
    let v = run(
        "plainglobal",
        &[
            "--params-ratio",
            "0.7",
            "--allocate",
            "global",
            "--matrices",
            "layers.",
        ],
    );
    assert_eq!(v["calibrated"]["whiten"], "none");
    assert!(v["calibrated"]["matrices"][0]["rel_output_error"].is_null());

    let bad = |extra: &[&str], needle: &str| {
        let o = d.path().join("bad");
        let mut a = vec!["compress", ms, "--out", o.to_str().unwrap()];
        a.extend(extra);
        assert_clean_error(&mpolm(&a), needle);
        assert!(!o.exists(), "{extra:?} left output behind");
    };
    bad(&["--params-ratio", "0"], "(0, 1]");
    bad(&["--params-ratio", "1.5"], "(0, 1]");
    bad(
        &["--allocate", "global"],
        "--allocate global spreads a parameter budget",
    );
    bad(
        &["--allocate", "global", "--bond", "2"],
        "--bond fixes every bond",
    );
    bad(
        &["--params-ratio", "0.5", "--whiten", "cholesky"],
        "--whiten needs calibration text",
    );
    bad(
        &["--params-ratio", "0.5", "--nsamples", "4"],
        "--nsamples needs calibration text",
    );
    bad(&["--bond", "2", "--calib", ts], "--bond fixes every bond");
    bad(
        &["--shapes", "svd", "--n", "5"],
        "--shapes svd always has 2 sites",
    );
    bad(
        &["--params-ratio", "0.5", "--calib", ts, "--alpha", "0.3"],
        "--alpha only applies",
    );
    bad(
        &[
            "--params-ratio",
            "0.5",
            "--calib",
            short.to_str().unwrap(),
            "--seqlen",
            "64",
        ],
        "fewer than --seqlen 64",
    );
    bad(
        &["--params-ratio", "0.5", "--calib", "/nonexistent/calib.txt"],
        "calibration file /nonexistent/calib.txt",
    );
    bad(
        &[
            "--params-ratio",
            "0.5",
            "--calib",
            ts,
            "--matrices",
            "embed",
        ],
        "not inside a decoder layer",
    );
    let b = d.path().join("bert");
    models::testing::write_tiny_bert(&b).unwrap();
    let o = d.path().join("bad");
    assert_clean_error(
        &mpolm(&[
            "compress",
            b.to_str().unwrap(),
            "--params-ratio",
            "0.5",
            "--calib",
            ts,
            "--out",
            o.to_str().unwrap(),
        ]),
        "is an encoder",
    );
    assert!(!o.exists());
}
