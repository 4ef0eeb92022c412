//! `mpolm upcycle` end to end on a tiny model (upcycle → inspect → generate → finetune with the
//! central-tensor mask → eval → export --dense and --gguf), and its bad inputs as one-line errors.

use std::path::Path;
use std::process::{Command, Output};

fn mpolm(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mpolm"))
        .args(args)
        .env("MPOLM_CACHE", cache)
        .output()
        .unwrap()
}

fn ok(args: &[&str], cache: &Path) -> String {
    let o = mpolm(args, cache);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn upcycle_finetune_eval_export_from_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("cache");
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let (m, p) = (m.to_str().unwrap(), d.path());
    let up = p.join("up");
    let rep = p.join("up.json");
    let out = ok(
        &[
            "upcycle",
            m,
            "--experts",
            "4",
            "--router",
            "top2",
            "--mpo",
            "--sites",
            "3",
            "--layers",
            "1",
            "--out",
            up.to_str().unwrap(),
            "--report",
            rep.to_str().unwrap(),
        ],
        &c,
    );
    assert!(out.contains("upcycled 1 of 2 layers"), "{out}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    assert_eq!(r["upcycle"]["layers"], serde_json::json!([1]));
    assert!(r["upcycle"]["summary"]["shared_params"].as_u64().unwrap() > 0);
    let up = up.to_str().unwrap();
    let info = ok(&["inspect", up], &c);
    assert!(
        info.contains("experts:      4 mpo experts in layers [1]"),
        "{info}"
    );
    assert!(info.contains("shared by experts"), "{info}");
    ok(
        &["generate", up, "--prompt", "hello", "--max-new-tokens", "3"],
        &c,
    );
    let text = p.join("t.txt");
    std::fs::write(
        &text,
        "a small text about cats and dogs and birds. ".repeat(30),
    )
    .unwrap();
    let ft = p.join("ft");
    let out = ok(
        &[
            "finetune",
            up,
            "--task",
            "lm",
            "--data",
            text.to_str().unwrap(),
            "--method",
            "mpo-all",
            "--central-mask-p",
            "1",
            "--max-steps",
            "2",
            "--batch",
            "2",
            "--max-len",
            "16",
            "--lr",
            "1e-3",
            "--out",
            ft.to_str().unwrap(),
        ],
        &c,
    );
    assert!(out.contains("model written"), "{out}");
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft.join("finetune_log.json")).unwrap())
            .unwrap();
    assert_eq!(
        log["hooks"]["moe"]["masked_steps"],
        serde_json::json!([1, 2])
    );
    let ft = ft.to_str().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval/data");
    ok(
        &[
            "eval",
            ft,
            "--task",
            "wikitext2",
            "--data-dir",
            data.to_str().unwrap(),
            "--no-cache",
        ],
        &c,
    );
    let dense = p.join("dense");
    let out = ok(
        &["export", ft, "--dense", "--out", dense.to_str().unwrap()],
        &c,
    );
    assert!(out.contains("dense experts"), "{out}");
    let info = ok(&["inspect", dense.to_str().unwrap()], &c);
    assert!(info.contains("4 dense experts"), "{info}");
    clean_error(
        &mpolm(
            &[
                "export",
                ft,
                "--gguf",
                "--out",
                p.join("x.gguf").to_str().unwrap(),
            ],
            &c,
        ),
        "every layer",
    );
    // Every layer a mixture of MPO experts: a llama.cpp expert-layout GGUF, experts contracted.
    let all = p.join("all");
    ok(
        &[
            "upcycle",
            m,
            "--experts",
            "4",
            "--router",
            "top2",
            "--mpo",
            "--sites",
            "3",
            "--out",
            all.to_str().unwrap(),
        ],
        &c,
    );
    let g = p.join("all.gguf");
    let rep = p.join("all-gguf.json");
    let args = [
        "export",
        all.to_str().unwrap(),
        "--gguf",
        "--type",
        "q8_0",
        "--out",
    ];
    let mut args = args.to_vec();
    args.extend([g.to_str().unwrap(), "--report", rep.to_str().unwrap()]);
    ok(&args, &c);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    let names: Vec<&str> = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"blk.1.ffn_down_exps.weight"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains(".ffn_down.")), "{names:?}");
}

#[test]
fn upcycle_bad_inputs_give_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("cache");
    let m = d.path().join("m");
    models::testing::write_tiny_llama(&m, false).unwrap();
    let b = d.path().join("bert");
    models::testing::write_tiny_bert(&b).unwrap();
    let (m, p) = (m.to_str().unwrap(), d.path());
    let out = |n: &str| p.join(n).to_str().unwrap().to_string();
    let o1 = out("o1");
    clean_error(
        &mpolm(
            &[
                "upcycle",
                m,
                "--experts",
                "1",
                "--router",
                "top1",
                "--out",
                &o1,
            ],
            &c,
        ),
        "--experts must be in 2..=256",
    );
    clean_error(
        &mpolm(
            &[
                "upcycle",
                m,
                "--experts",
                "2",
                "--router",
                "top2",
                "--capacity-factor",
                "0",
                "--out",
                &o1,
            ],
            &c,
        ),
        "--capacity-factor",
    );
    clean_error(
        &mpolm(
            &[
                "upcycle",
                b.to_str().unwrap(),
                "--experts",
                "4",
                "--router",
                "top1",
                "--mpo",
                "--out",
                &o1,
            ],
            &c,
        ),
        "no decoder FFN matrices",
    );
    clean_error(
        &mpolm(
            &[
                "upcycle",
                m,
                "--experts",
                "4",
                "--router",
                "top1",
                "--mpo",
                "--sites",
                "4",
                "--out",
                &o1,
            ],
            &c,
        ),
        "--sites must be 3, 5, 7 or 9",
    );
    clean_error(
        &mpolm(
            &[
                "upcycle",
                m,
                "--experts",
                "4",
                "--router",
                "top1",
                "--layers",
                "7",
                "--out",
                &o1,
            ],
            &c,
        ),
        "--layers 7 is out of range",
    );
    assert!(!p.join("o1").exists());
    // A checkpoint whose config disagrees with its manifest about the experts.
    let up = out("up");
    ok(
        &[
            "upcycle",
            m,
            "--experts",
            "3",
            "--router",
            "top1",
            "--out",
            &up,
        ],
        &c,
    );
    let cfg = Path::new(&up).join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"num_local_experts\": 3", "\"num_local_experts\": 4"),
    )
    .unwrap();
    clean_error(&mpolm(&["inspect", &up], &c), "num_local_experts is 4");
    // Upcycling a mixture of experts again, and masking a model without shared centrals.
    std::fs::write(&cfg, text).unwrap();
    clean_error(
        &mpolm(
            &[
                "upcycle",
                &up,
                "--experts",
                "2",
                "--router",
                "top1",
                "--out",
                &o1,
            ],
            &c,
        ),
        "already a mixture of experts",
    );
    let t = p.join("t.txt");
    std::fs::write(&t, "some words to train on. ".repeat(40)).unwrap();
    clean_error(
        &mpolm(
            &[
                "finetune",
                &up,
                "--task",
                "lm",
                "--data",
                t.to_str().unwrap(),
                "--central-mask-p",
                "0.5",
                "--max-steps",
                "1",
                "--max-len",
                "8",
                "--out",
                &out("ft"),
            ],
            &c,
        ),
        "--central-mask-p masks the central tensor",
    );
}
