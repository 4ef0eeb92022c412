//! The harness on tiny synthetic models and the small fixture data in tests/fixtures/eval:
//! perplexity against a hand computation, batched/prefix-shared scoring against naive
//! forwards, generation against models::generate, golden prompts, every task end to end,
//! and the error paths (JSONL line numbers, missing data).

mod common;

use candle_core::{Device, Tensor};
use common::naive;
use eval::lm::{rolling_rows, GenRequest, Lm, Row};
use eval::tasks::{self, gsm8k, jsonl, mmlu, sst2, wikitext};
use eval::{EvalOptions, TaskSpec};
use models::CausalLm;
use models::{Arch, Model};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval")
}

fn tiny() -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    models::testing::write_tiny_llama(d.path(), false).unwrap();
    let m = Model::load(d.path().to_str().unwrap(), false).unwrap();
    (d, m)
}

fn opts() -> EvalOptions {
    EvalOptions {
        data_dir: fixtures().join("data"),
        ..Default::default()
    }
}

#[test]
fn perplexity_matches_hand_computation() {
    let (_d, m) = tiny();
    let llama = m.llama().unwrap();
    let text = "the cat sat on the mat. then the end";
    let toks = m.tokenizer.encode(text, false).unwrap();
    let lm = Lm::new(llama, &m.tokenizer, 1, 128, false);
    let prefix = lm.prefix_token().unwrap();
    assert_eq!(
        Some(prefix),
        m.tokenizer.eos_ids.first().copied(),
        "tiny tokenizer has no BOS: EOS starts the text"
    );

    // By hand: one forward over [prefix] + tokens, log-softmax at each position.
    let ids: Vec<u32> = std::iter::once(prefix)
        .chain(toks.iter().copied())
        .collect();
    let x = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = llama
        .forward(&x, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut ll = 0.0f64;
    for (i, row) in logits.iter().enumerate() {
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        ll += (row[toks[i] as usize] as f64) - z.ln();
    }
    let (p, windows, used) = wikitext::perplexity(&lm, text, 128, None).unwrap();
    assert_eq!((windows, used, p.tokens), (1, 1, toks.len()));
    assert!(
        (p.loglikelihood - ll).abs() < 1e-3,
        "{} vs {ll}",
        p.loglikelihood
    );
    let words = 9.0; // len(re.split(r"\s+", text))
    let bytes = text.len() as f64;
    let rel = |a: f64, b: f64| ((a - b) / b).abs();
    assert!(rel(p.token_perplexity, (-ll / toks.len() as f64).exp()) < 1e-4);
    assert!(rel(p.word_perplexity, (-ll / words).exp()) < 1e-4);
    assert!(rel(p.byte_perplexity, (-ll / bytes).exp()) < 1e-4);
    assert!(rel(p.bits_per_byte, -ll / bytes / std::f64::consts::LN_2) < 1e-4);

    // Short windows with a stride: each window scored by hand with its own context.
    let lm8 = Lm::new(llama, &m.tokenizer, 2, 8, false);
    let rows = rolling_rows(&toks, prefix, 8, 3);
    assert!(rows.len() > 3);
    let hand: f64 = rows.iter().map(|r| naive(&lm8, r)).sum();
    let (p8, w8, _) = wikitext::perplexity(&lm8, text, 3, None).unwrap();
    assert_eq!(w8, rows.len());
    assert!(
        (p8.loglikelihood - hand).abs() < 1e-3,
        "{} vs {hand}",
        p8.loglikelihood
    );
    // --limit: only the first windows, counts cover their text.
    let (pl, _, used) = wikitext::perplexity(&lm8, text, 3, Some(2)).unwrap();
    assert_eq!(used, 2);
    assert_eq!(pl.tokens, 8 + 3);
}

#[test]
fn batched_prefix_shared_scores_equal_naive_forwards() {
    let (_d, m) = tiny();
    let llama = m.llama().unwrap();
    let tok = &m.tokenizer;
    let shared = "The following are questions about things that matter.\n\n";
    let mut pairs = vec![];
    for q in [
        "Q: first?\nAnswer:",
        "Q: a second, longer question here?\nAnswer:",
        "Q: x\nAnswer:",
    ] {
        for c in [" A", " B", " yes indeed", " no", "A", "B"] {
            pairs.push((format!("{shared}{q}"), c.to_string()));
        }
    }
    pairs.push(("unrelated short".into(), " text".into()));
    pairs.push(("".into(), "empty context".into()));
    let base = Lm::new(llama, tok, 1, 128, false);
    let rows: Vec<Row> = pairs
        .iter()
        .map(|(c, x)| {
            let (ce, xe) = base.encode_pair(c, x).unwrap();
            base.pair_row(&ce, &xe)
        })
        .collect();
    let want: Vec<f64> = rows.iter().map(|r| naive(&base, r)).collect();
    for b in [1, 3, 8] {
        let lm = Lm::new(llama, tok, b, 128, false);
        let got = lm.loglikelihood(&pairs, "test").unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g.logprob - w).abs() < 2e-3,
                "batch {b} row {i}: {} vs {w}",
                g.logprob
            );
        }
    }
    // Per-document choices: the same numbers with each context tokenised once.
    let docs: Vec<(String, Vec<String>)> = pairs
        .iter()
        .map(|(c, x)| (c.clone(), vec![x.clone(), " extra".into()]))
        .collect();
    let got = base.loglikelihood_choices(&docs, "test").unwrap();
    for (i, w) in want.iter().enumerate() {
        assert!((got[i][0].logprob - w).abs() < 2e-3, "choices row {i}");
    }
    assert!(got.iter().all(|g| g.len() == 2));
    // Context whitespace moves to the continuation, as lm-eval's _encode_pair.
    let (c1, x1) = base.encode_pair("Answer: ", "yes").unwrap();
    let (c2, x2) = base.encode_pair("Answer:", " yes").unwrap();
    assert_eq!((c1, x1), (c2, x2));
    // Truncation keeps the last max_length + 1 tokens.
    let short = Lm::new(llama, tok, 1, 10, false);
    let r = short.pair_row(&(0..30).collect::<Vec<u32>>(), &[40, 41]);
    assert_eq!(r.input, (21..30).chain([40]).collect::<Vec<u32>>());
}

#[test]
fn generation_matches_models_generate_and_stops() {
    let (_d, m) = tiny();
    let llama = m.llama().unwrap();
    let tok = &m.tokenizer;
    let lm = Lm::new(llama, tok, 1, 128, false);
    let prefix = "A long shared few-shot prefix for every request goes here.\n\n";
    // Contexts of different lengths and budgets, one without the shared prefix, so batched
    // decoding pads, drops finished rows and mixes prefix groups.
    let mut prompts: Vec<String> = ["Q: one", "Q: two two two two", "Q: three", "Q: 4"]
        .iter()
        .map(|q| format!("{prefix}{q}\nA:"))
        .collect();
    prompts.push("Unrelated short prompt".into());
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .zip([6, 9, 3, 7, 5])
        .map(|(p, n)| GenRequest {
            context: tok.encode(p, false).unwrap(),
            until: vec![],
            max_new_tokens: n,
        })
        .collect();
    let outs = lm.generate_until(&reqs, "gen", |_, _| {}).unwrap();
    for batch in [2, 3, 8] {
        let batched = Lm::new(llama, tok, batch, 128, false)
            .generate_until(&reqs, "gen", |_, _| {})
            .unwrap();
        for (i, (a, b)) in outs.iter().zip(&batched).enumerate() {
            assert_eq!(
                (&a.text, a.new_tokens, &a.stopped_by),
                (&b.text, b.new_tokens, &b.stopped_by),
                "request {i} at batch {batch}"
            );
        }
    }
    for (r, o) in reqs.iter().zip(&outs) {
        let p = models::generate::SamplingParams {
            max_new_tokens: r.max_new_tokens,
            stop_ids: tok.eos_ids.clone(),
            ..Default::default()
        };
        let (ids, _) = models::generate::generate(llama, &r.context, &p, |_| {}).unwrap();
        let ids: Vec<u32> = ids
            .into_iter()
            .filter(|i| !tok.eos_ids.contains(i))
            .collect();
        assert_eq!(o.text, tok.decode(&ids, false).unwrap());
        assert_eq!(o.new_tokens, ids.len());
    }
    // A stop string cuts the text before it.
    let full = &outs[0].text;
    if let Some(ch) = full.chars().nth(2) {
        let stop = ch.to_string();
        let cut = lm
            .generate_until(
                &[GenRequest {
                    until: vec![stop.clone()],
                    ..reqs[0].clone()
                }],
                "gen",
                |_, _| {},
            )
            .unwrap();
        assert_eq!(cut[0].text, full[..full.find(&stop).unwrap()]);
        assert_eq!(cut[0].stopped_by, "stop_string");
    }
}

fn golden(name: &str, actual: &str) {
    let p = fixtures().join("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&p, actual).unwrap();
    }
    let want = std::fs::read_to_string(&p)
        .unwrap_or_else(|_| panic!("{}: missing (run with UPDATE_GOLDEN=1)", p.display()));
    assert_eq!(actual, want, "{name} differs from the golden file");
}

#[test]
fn golden_prompts() {
    let data = fixtures().join("data");
    let dev = mmlu::load(&data, "abstract_algebra", "dev").unwrap();
    let test = mmlu::load(&data, "abstract_algebra", "test").unwrap();
    assert_eq!(dev[1].choices[0], "True, True");
    assert_eq!(dev[4].question, "How many units\ndoes Z_6 have?");
    golden(
        "mmlu_abstract_algebra_5shot.txt",
        &mmlu::context("abstract_algebra", &dev, &test[1]),
    );
    let test = mmlu::load(&data, "anatomy", "test").unwrap();
    golden(
        "mmlu_anatomy_0shot.txt",
        &mmlu::context("anatomy", &[], &test[1]),
    );
    golden(
        "gsm8k_8shot.txt",
        &gsm8k::prompt(
            "Tom has 3 apples and buys 2 more. How many apples does he have?",
            8,
        ),
    );
    let train = sst2::load(&data.join("glue/SST-2/train.tsv")).unwrap();
    let dev = sst2::load(&data.join("glue/SST-2/dev.tsv")).unwrap();
    golden(
        "sst2_2shot.txt",
        &sst2::context(&sst2::draw_shots(&train, 2, 1234), &dev[0].sentence),
    );
}

#[test]
fn every_task_runs_on_tiny_models() {
    let (_d, m) = tiny();
    let mut o = opts();
    o.log_samples = true;

    let specs = tasks::parse_tasks("mmlu_abstract_algebra,mmlu_anatomy,wikitext2,sst2").unwrap();
    o.shots = Some(2);
    let outs: Vec<_> = specs
        .iter()
        .map(|s| tasks::run_task(&m, s, &o).unwrap())
        .collect();
    let j = eval::results_json(&outs);
    let r = &j["results"];
    for k in [
        "mmlu",
        "mmlu_stem",
        "mmlu_abstract_algebra",
        "mmlu_anatomy",
        "sst2",
    ] {
        let acc = r[k]["acc,none"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&acc), "{k}: {}", r[k]);
        assert!(r[k].get("acc_stderr,none").is_some());
    }
    assert_eq!(j["n-samples"]["mmlu_abstract_algebra"]["original"], 3);
    assert_eq!(j["n-shot"]["mmlu_anatomy"], 2);
    assert_eq!(
        j["group_subtasks"]["mmlu_stem"].as_array().unwrap().len(),
        2
    );
    assert!(r["wikitext2"]["word_perplexity,none"].as_f64().unwrap() > 1.0);
    assert!(j["samples"]["mmlu"].as_array().unwrap().len() == 5);
    let table = eval::format_table(&outs);
    assert!(
        table.contains("| mmlu ") && table.contains("word_perplexity"),
        "{table}"
    );

    o.shots = None;
    o.max_gen_tokens = Some(4);
    o.limit = Some(1);
    for spec in [TaskSpec::Gsm8k, TaskSpec::Ifeval] {
        let out = tasks::run_task(&m, &spec, &o).unwrap();
        assert_eq!(out.results[0].n_samples, Some((2, 1)));
        assert_eq!(out.samples.len(), 1);
    }
    let g = tasks::run_task(&m, &TaskSpec::Gsm8k, &o).unwrap();
    assert!(g.results[0].metric("exact_match,strict-match").is_some());
    let i = tasks::run_task(&m, &TaskSpec::Ifeval, &o).unwrap();
    assert!(i.results[0].metric("inst_level_loose_acc").is_some());

    o.limit = None;
    let mc = tasks::run_task(&m, &TaskSpec::Jsonl(fixtures().join("jsonl/mc.jsonl")), &o).unwrap();
    assert_eq!(mc.task, "mc");
    assert!(mc.results[0].metric("acc_norm").is_some());
    let gen =
        tasks::run_task(&m, &TaskSpec::Jsonl(fixtures().join("jsonl/gen.jsonl")), &o).unwrap();
    assert!(gen.results[0].metric("exact_match").is_some());
    o.shots = Some(1);
    tasks::run_task(&m, &TaskSpec::Jsonl(fixtures().join("jsonl/mc.jsonl")), &o).unwrap();
}

#[test]
fn sst2_classifier_needs_a_head() {
    let d = tempfile::tempdir().unwrap();
    models::testing::write_tiny_bert(d.path()).unwrap();
    let mut m = Model::load(d.path().to_str().unwrap(), false).unwrap();
    let e = tasks::run_task(&m, &TaskSpec::Sst2, &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no classification head"), "{e}");
    let e = tasks::run_task(&m, &TaskSpec::Wikitext2, &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a causal LM"), "{e}");
    if let Arch::Encoder(b) = &mut m.arch {
        let w = Tensor::new(&[[0.1f32; 32], [-0.1f32; 32]], &Device::Cpu).unwrap();
        b.set_classifier(w, Tensor::new(&[0.0f32, 0.0], &Device::Cpu).unwrap());
    }
    let mut o = opts();
    o.batch_size = 2;
    let out = tasks::run_task(&m, &TaskSpec::Sst2, &o).unwrap();
    assert_eq!(out.results[0].n_samples, Some((3, 3)));
    let acc = out.results[0].metric("acc").unwrap();
    assert!((0.0..=1.0).contains(&acc));
}

#[test]
fn missing_data_gives_one_line_error_naming_the_path() {
    let (_d, m) = tiny();
    let mut o = opts();
    o.data_dir = PathBuf::from("/nonexistent/mpolm-data");
    for (spec, file) in [
        (
            TaskSpec::Wikitext2,
            "/nonexistent/mpolm-data/wikitext2/test.txt",
        ),
        (TaskSpec::Gsm8k, "/nonexistent/mpolm-data/gsm8k/test.jsonl"),
        (
            TaskSpec::Mmlu {
                subjects: vec!["anatomy"],
            },
            "/nonexistent/mpolm-data/mmlu",
        ),
        (TaskSpec::Sst2, "/nonexistent/mpolm-data/glue/SST-2/dev.tsv"),
        (
            TaskSpec::Ifeval,
            "/nonexistent/mpolm-data/ifeval/input_data.jsonl",
        ),
        (
            TaskSpec::Jsonl("/nonexistent/t.jsonl".into()),
            "/nonexistent/t.jsonl",
        ),
    ] {
        let e = tasks::run_task(&m, &spec, &o).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{file}: not found")), "{e}");
        assert!(e.contains("`data_dir`") && !e.contains('\n'), "{e}");
    }
    // A subject file missing inside an existing data dir names that file.
    let e = mmlu::load(&fixtures().join("data"), "virology", "test")
        .unwrap_err()
        .to_string();
    assert!(e.contains("mmlu/test/virology_test.csv: not found"), "{e}");
}

#[test]
fn data_dir_resolution_order_flag_then_env_then_project() {
    use eval::data::{resolve_from, DataOrigin};
    let proj = PathBuf::from("proj/data");
    let env = Some(std::ffi::OsString::from("env/data"));
    assert_eq!(
        resolve_from(Some(Path::new("flag/data")), env.clone(), proj.clone()),
        (PathBuf::from("flag/data"), DataOrigin::Flag)
    );
    assert_eq!(
        resolve_from(None, env, proj.clone()),
        (PathBuf::from("env/data"), DataOrigin::Env)
    );
    // An empty variable counts as unset (as a shell's `MPOLM_DATA= cmd` means).
    assert_eq!(
        resolve_from(None, Some("".into()), proj.clone()),
        (proj.clone(), DataOrigin::Project)
    );
    assert_eq!(
        resolve_from(None, None, proj.clone()),
        (proj, DataOrigin::Project)
    );
}

#[test]
fn project_data_holds_every_default_dataset_with_its_checksums() {
    // What commands read by default must be in the repository itself, not beside it.
    let dir = eval::data::project_data_dir();
    let sums = eval::data::read_checksums(&dir).unwrap();
    for d in eval::data::DATASETS {
        // The source note sits in the dataset's folder or the collection's (glue/).
        let top = d.folder.split('/').next().unwrap();
        assert!(
            dir.join(d.folder).join("SOURCE.md").is_file()
                || dir.join(top).join("SOURCE.md").is_file(),
            "{}: no SOURCE.md",
            d.folder
        );
        for f in d.files {
            let rel = format!("{}/{f}", d.folder);
            assert!(dir.join(&rel).is_file(), "{rel} missing from data/");
            assert!(sums.contains_key(&rel), "{rel} not in data/SHA256SUMS");
        }
    }
    // MMLU: all 57 subjects in each split.
    for split in ["dev", "val", "test"] {
        let n = std::fs::read_dir(dir.join("mmlu").join(split))
            .unwrap()
            .count();
        assert_eq!(n, 57, "mmlu/{split}");
    }
    // Spot-check contents against the recorded checksums (the small files; `mpolm data --verify`
    // checks all).
    for rel in [
        "ifeval/input_data.jsonl",
        "glue/SST-2/dev.tsv",
        "gsm8k/test.jsonl",
    ] {
        assert_eq!(
            eval::cache::hash_file(&dir.join(rel)).unwrap(),
            sums[rel],
            "{rel}"
        );
    }
}

#[test]
fn jsonl_errors_name_file_and_line() {
    let p = Path::new("task.jsonl");
    let err = |text: &str| jsonl::parse(text, p).unwrap_err().to_string();
    let mc = r#"{"context": "a", "choices": ["x", "y"], "gold": 1}"#;
    assert!(err(&format!("{mc}\n{{not json")).starts_with("task.jsonl:2: invalid JSON"));
    assert!(err(&format!(
        "{mc}\n\n{}",
        r#"{"context": "a", "choices": ["x", "y"], "gold": 2}"#
    ))
    .starts_with("task.jsonl:3: 'gold' 2 is out of range for 2 choices"));
    assert!(
        err(&format!("{mc}\n{}", r#"{"prompt": "p", "target": "t"}"#))
            .starts_with("task.jsonl:2: a generation line in a multiple-choice file")
    );
    assert!(err(r#"{"prompt": "p"}"#).starts_with("task.jsonl:1: missing 'target'"));
    assert!(err(r#"{"prompt": "p", "target": "t", "regex": "("}"#)
        .starts_with("task.jsonl:1: invalid 'regex'"));
    assert!(err(r#"{"context": "a", "choices": ["x"], "gold": 0}"#)
        .starts_with("task.jsonl:1: 'choices' needs at least 2"));
    assert!(err(r#"{"context": "a", "choices": ["x", 3], "gold": 0}"#)
        .starts_with("task.jsonl:1: every choice must be a string"));
    assert!(err(r#"{"context": "a", "choices": ["x", "y"]}"#)
        .starts_with("task.jsonl:1: missing 'gold'"));
    assert!(err(r#"{"question": "?"}"#).starts_with("task.jsonl:1: a task line needs either"));
    assert!(err("[1, 2]").starts_with("task.jsonl:1: expected a JSON object"));
    assert!(err("\n\n").starts_with("task.jsonl:1: no records"));
    let docs = jsonl::parse(&format!("{mc}\n{mc}"), p).unwrap();
    assert_eq!(docs.len(), 2);
    let re = regex::Regex::new(r"answer is (\d+)").unwrap();
    assert_eq!(
        jsonl::extract("so the answer is 42.", Some(&re)).as_deref(),
        Some("42")
    );
    assert_eq!(jsonl::extract("nothing", Some(&re)), None);
    assert_eq!(jsonl::extract("  hi \n", None).as_deref(), Some("hi"));
}

/// A run interrupted part-way (the cache stops accepting results, as a killed process would)
/// and then run again gives the report and samples of an uninterrupted run, reusing what the
/// first run recorded.
#[test]
fn interrupted_eval_resumes_from_the_request_cache_with_identical_results() {
    use eval::cache::RequestCache;
    use std::sync::Arc;
    let (_d, m) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let tasks = [
        TaskSpec::Mmlu {
            subjects: vec!["anatomy"],
        },
        TaskSpec::Wikitext2,
        TaskSpec::Gsm8k,
        TaskSpec::Sst2,
    ];
    let base = EvalOptions {
        shots: Some(1),
        limit: Some(6),
        batch_size: 2,
        gen_batch_size: 3,
        max_gen_tokens: Some(6),
        max_length: Some(48),
        log_samples: true,
        ..opts()
    };
    let run_all = |o: &EvalOptions| -> Result<serde_json::Value, String> {
        let mut outs = vec![];
        for t in &tasks {
            outs.push(tasks::run_task(&m, t, o).map_err(|e| e.to_string())?);
        }
        let mut v = eval::results_json(&outs);
        // Wall-clock fields differ between any two runs.
        for o in v["configs"].as_object_mut().unwrap().values_mut() {
            if let Some(c) = o.as_object_mut() {
                c.remove("seconds");
            }
        }
        Ok(v)
    };
    let plain = run_all(&base).unwrap();

    let file = dir.path().join("requests.jsonl");
    let first = Arc::new(RequestCache::open_file(&file).unwrap().stop_after(5));
    let e = run_all(&EvalOptions {
        cache: Some(first.clone()),
        ..base.clone()
    })
    .unwrap_err();
    assert!(e.contains("interrupted"), "{e}");
    let recorded = first.written();
    assert!(recorded >= 5, "{recorded}");

    let second = Arc::new(RequestCache::open_file(&file).unwrap());
    assert_eq!(second.len(), recorded);
    let resumed = run_all(&EvalOptions {
        cache: Some(second.clone()),
        ..base.clone()
    })
    .unwrap();
    assert_eq!(resumed, plain);
    assert!(second.hits() >= recorded, "{} < {recorded}", second.hits());
    assert!(second.written() > 0);

    // A third run computes nothing.
    let third = Arc::new(RequestCache::open_file(&file).unwrap());
    let again = run_all(&EvalOptions {
        cache: Some(third.clone()),
        ..base
    })
    .unwrap();
    assert_eq!(again, plain);
    assert_eq!(third.written(), 0);
}

/// lm-eval's delimiters: a few-shot example is "prompt + target_delimiter + target" followed by
/// the fewshot delimiter, and a choice is scored as "target_delimiter + choice".
#[test]
fn jsonl_delimiters_follow_lm_eval() {
    let (_d, m) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("g.jsonl");
    std::fs::write(
        &gen,
        "{\"prompt\": \"Q: one?\\nA:\", \"target\": \"True\"}\n{\"prompt\": \"Q: two?\\nA:\", \"target\": \"False\", \"fewshot_delimiter\": \"###\"}\n",
    )
    .unwrap();
    let mut o = opts();
    o.shots = Some(1);
    o.log_samples = true;
    o.max_gen_tokens = Some(2);
    let out = tasks::run_task(&m, &TaskSpec::Jsonl(gen.clone()), &o).unwrap();
    assert_eq!(out.samples[0]["prompt"], "Q: two?\nA: False\n\nQ: one?\nA:");
    assert_eq!(out.samples[1]["prompt"], "Q: one?\nA: True###Q: two?\nA:");
    assert_eq!(out.config["target_delimiter"], " ");
    assert_eq!(out.config["output_type"], "generate_until");

    let mc = dir.path().join("mc.jsonl");
    std::fs::write(
        &mc,
        "{\"context\": \"The sky is\", \"choices\": [\"blue\", \"green\"], \"gold\": 0}\n{\"context\": \"Grass is\", \"choices\": [\"green\", \"red\"], \"gold\": 0, \"target_delimiter\": \"\"}\n",
    )
    .unwrap();
    o.shots = Some(0);
    let out = tasks::run_task(&m, &TaskSpec::Jsonl(mc.clone()), &o).unwrap();
    let lm = Lm::new(m.llama().unwrap(), &m.tokenizer, 1, 128, false);
    let want = lm
        .loglikelihood(
            &[
                ("The sky is".into(), " blue".into()),
                ("Grass is".into(), "red".into()),
            ],
            "t",
        )
        .unwrap();
    let got0 = out.samples[0]["loglikelihoods"][0].as_f64().unwrap();
    let got1 = out.samples[1]["loglikelihoods"][1].as_f64().unwrap();
    assert!(
        (got0 - want[0].logprob).abs() < 1e-9,
        "{got0} vs {}",
        want[0].logprob
    );
    assert!(
        (got1 - want[1].logprob).abs() < 1e-9,
        "{got1} vs {}",
        want[1].logprob
    );

    // Choices written for the old verbatim convention are refused, not double-spaced.
    let e = jsonl::parse(
        r#"{"context": "a", "choices": [" x", " y"], "gold": 0}"#,
        Path::new("t.jsonl"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("t.jsonl:1: every choice starts with whitespace"),
        "{e}"
    );
    assert!(jsonl::parse(
        r#"{"context": "a", "choices": [" x", " y"], "gold": 0, "target_delimiter": ""}"#,
        Path::new("t.jsonl"),
    )
    .is_ok());
    let e = jsonl::parse(
        r#"{"prompt": "p", "target": "t", "fewshot_delimiter": 3}"#,
        Path::new("t.jsonl"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("t.jsonl:1: 'fewshot_delimiter' must be a string"),
        "{e}"
    );
}

/// The disjoint protocol: complete windows scored alone, first token of each not predicted;
/// against one plain forward per window.
#[test]
fn disjoint_perplexity_matches_independent_windows() {
    let (_d, m) = tiny();
    let mut o = opts();
    o.ppl_protocol = eval::PplProtocol::Disjoint;
    o.max_length = Some(16);
    o.limit = Some(3);
    let out = tasks::run_task(&m, &TaskSpec::Wikitext2, &o).unwrap();
    let text = std::fs::read_to_string(fixtures().join("data/wikitext2/test.txt")).unwrap();
    let lm = Lm::new(m.llama().unwrap(), &m.tokenizer, 1, 16, false);
    let ids = lm.encode(&text).unwrap();
    let (mut ll, mut n) = (0.0, 0usize);
    for w in ids.chunks_exact(16).take(3) {
        let row = Row {
            input: w[..15].to_vec(),
            targets: w[1..].to_vec(),
        };
        ll += naive(&lm, &row);
        n += 15;
    }
    let want = (-ll / n as f64).exp();
    let got = out.results[0].metric("token_perplexity").unwrap();
    assert!((got - want).abs() / want < 1e-4, "{got} vs {want}");
    assert_eq!(out.results[0].n_samples, Some((ids.len() / 16, 3)));
    // The function `quantize --ppl-windows` calls, two windows per forward here.
    let lm2 = Lm::new(m.llama().unwrap(), &m.tokenizer, 2, 16, false);
    let d = wikitext::disjoint_perplexity(&lm2, &text, Some(3), "perplexity").unwrap();
    assert!((d.ppl - want).abs() / want < 1e-4, "{} vs {want}", d.ppl);
    assert_eq!(
        (d.windows, d.windows_scored, d.tokens_predicted),
        (ids.len() / 16, 3, n)
    );
    let e = wikitext::disjoint_perplexity(&lm, "the cat", None, "perplexity")
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs one window of 16 tokens"), "{e}");
    // The rolling protocol predicts every token, so the two numbers differ on the same text.
    o.ppl_protocol = eval::PplProtocol::Rolling;
    let roll = tasks::run_task(&m, &TaskSpec::Wikitext2, &o).unwrap();
    assert_ne!(roll.results[0].metric("token_perplexity").unwrap(), got);
    assert!(roll.results[0].metric("word_perplexity").is_some());
    assert!(out.results[0].metric("word_perplexity").is_none());
}
