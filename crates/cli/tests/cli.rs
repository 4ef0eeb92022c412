//! The binary as a user runs it: reports are written, bad input gives one `error:` line and
//! exit code 2, never a panic.

use std::process::{Command, Output};

fn mpolm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mpolm")).args(args).output().unwrap()
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
    let o = mpolm(&["inspect", m.to_str().unwrap(), "--report", rep.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    let total = v["inspect"]["total_params"].as_u64().unwrap();
    let printed = stdout.lines().find(|l| l.starts_with("total")).unwrap().replace(',', "");
    assert!(printed.contains(&total.to_string()), "{printed} vs {total}");
    assert_eq!(v["inspect"]["architecture"], "llama");

    let rep = d.path().join("gen.json");
    let o = mpolm(&["generate", m.to_str().unwrap(), "--prompt", "the cat", "--max-new-tokens", "4", "--report", rep.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    assert_eq!(v["generate"]["output_ids"].as_array().unwrap().len(), 4);
    assert!(v["generate"]["stats"]["decode_tok_per_s"].as_f64().unwrap() > 0.0);

    let o = mpolm(&["generate", m.to_str().unwrap(), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bad_inputs_give_one_line_errors() {
    assert_clean_error(&mpolm(&["inspect", "no-such-alias"]), "unknown model 'no-such-alias'");
    assert_clean_error(&mpolm(&["inspect", "/nonexistent/dir/"]), "/nonexistent/dir/");
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("bert");
    models::testing::write_tiny_bert(&b).unwrap();
    assert_clean_error(&mpolm(&["generate", b.to_str().unwrap(), "--prompt", "x"]), "is an encoder");
    let l = d.path().join("llama");
    models::testing::write_tiny_llama(&l, false).unwrap();
    assert_clean_error(&mpolm(&["generate", l.to_str().unwrap(), "--prompt", "x", "--top-p", "0"]), "--top-p");
    // A report that cannot be written: the parent is a file.
    let f = d.path().join("file");
    std::fs::write(&f, "x").unwrap();
    let bad = f.join("r.json");
    assert_clean_error(&mpolm(&["inspect", l.to_str().unwrap(), "--report", bad.to_str().unwrap()]), "cannot create directory");
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
