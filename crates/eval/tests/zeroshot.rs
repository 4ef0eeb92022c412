//! The zero-shot suite against lm-evaluation-harness 0.4.x's own task code: hand-written items
//! in each dataset's source format (tests/fixtures/zeroshot/data) must give exactly the
//! (context, continuation) requests and gold indices that lm-eval builds for them, and the
//! metrics lm-eval's `process_results` and aggregations give for the same log-likelihoods
//! (tests/fixtures/zeroshot/lmeval.json, written by scripts/make_zeroshot_fixture.py); plus
//! hand-computed metric answers, the suite end to end on a tiny synthetic model against plain
//! forwards, and the error paths.

mod common;

use eval::lm::{Lm, Score};
use eval::tasks::zeroshot::{self, judge, Doc, Task};
use eval::{EvalOptions, TaskSpec};
use models::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/zeroshot")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("lmeval.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn opts() -> EvalOptions {
    EvalOptions {
        data_dir: fixtures().join("data"),
        ..Default::default()
    }
}

#[test]
fn requests_and_gold_match_lm_eval() {
    let r = reference();
    for t in Task::ALL {
        let docs = t.load(&fixtures().join("data")).unwrap();
        let want = r["tasks"][t.name()]["docs"].as_array().unwrap();
        assert_eq!(docs.len(), want.len(), "{}: document count", t.name());
        assert!(!docs.is_empty());
        for (k, (d, w)) in docs.iter().zip(want).enumerate() {
            let reqs: Vec<(String, String)> = w["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_str().unwrap().to_string(),
                        p[1].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            assert_eq!(d.requests, reqs, "{} doc {k}: requests", t.name());
            assert_eq!(
                d.gold as u64,
                w["gold"].as_u64().unwrap(),
                "{} doc {k}: gold",
                t.name()
            );
        }
    }
}

fn scores_of(w: &Value) -> Vec<Score> {
    let lls = w["lls"].as_array().unwrap();
    let greedy = w["greedy"].as_array().unwrap();
    lls.iter()
        .zip(greedy)
        .map(|(l, g)| Score {
            logprob: l.as_f64().unwrap(),
            greedy: g.as_bool().unwrap(),
        })
        .collect()
}

#[test]
fn metrics_match_lm_eval_process_results() {
    let r = reference();
    for t in Task::ALL {
        let docs = t.load(&fixtures().join("data")).unwrap();
        let ref_task = &r["tasks"][t.name()];
        let want = ref_task["docs"].as_array().unwrap();
        let scores: Vec<Vec<Score>> = want.iter().map(scores_of).collect();
        if t != Task::LambadaOpenai {
            for (k, (d, w)) in docs.iter().zip(want).enumerate() {
                let lls: Vec<f64> = scores[k].iter().map(|s| s.logprob).collect();
                let j = judge(d, &lls);
                let pr = &w["process_results"];
                assert_eq!(
                    j.acc,
                    pr["acc"].as_f64().unwrap(),
                    "{} doc {k} acc",
                    t.name()
                );
                if let Some(n) = pr.get("acc_norm") {
                    assert_eq!(
                        j.acc_norm,
                        n.as_f64().unwrap(),
                        "{} doc {k} acc_norm",
                        t.name()
                    );
                }
            }
        }
        let ms = zeroshot::metrics(t, &docs, &scores);
        let agg = ref_task["aggregated"].as_object().unwrap();
        assert_eq!(ms.len(), agg.len(), "{}: metric set {agg:?}", t.name());
        for m in &ms {
            let w = agg[&m.name].as_f64().unwrap();
            assert!(
                (m.value - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{} {}: mpolm {} lm-eval {w}",
                t.name(),
                m.name,
                m.value
            );
        }
    }
}

#[test]
fn metric_known_answers() {
    // acc_norm divides by characters of the choice (Python's len), not bytes: "éé" is 2
    // characters and 4 bytes. Per character: -3/2 = -1.5 beats -5/2 = -2.5 (choice 0); per byte
    // it would be -1.5 vs -1.25 (choice 1).
    let d = Doc::choice("Q".into(), vec!["ab".into(), "éé".into()], 0);
    assert_eq!(d.requests[1], ("Q".to_string(), " éé".to_string()));
    let j = judge(&d, &[-3.0, -5.0]);
    assert_eq!((j.pred, j.pred_norm, j.acc, j.acc_norm), (0, 0, 1.0, 1.0));
    // Length matters: "a" (1 char) at -2.0 loses to "bbbb" (4 chars) at -4.0 only after
    // normalisation (-2.0 vs -1.0); gold 1 → acc 0, acc_norm 1.
    let d = Doc::choice("Q".into(), vec!["a".into(), "bbbb".into()], 1);
    let j = judge(&d, &[-2.0, -4.0]);
    assert_eq!((j.pred, j.pred_norm, j.acc, j.acc_norm), (0, 1, 0.0, 1.0));
    // Ties go to the first choice (numpy's argmax).
    assert_eq!(judge(&d, &[-4.0, -4.0]).pred, 0);

    let s = |l: f64, g: bool| {
        vec![Score {
            logprob: l,
            greedy: g,
        }]
    };
    let lam = |c: &str| Doc {
        requests: vec![("x".into(), format!(" {c}"))],
        choices: vec![c.into()],
        gold: 0,
    };
    // LAMBADA: perplexity = exp(-(−1 − 3)/2) = e², acc = 1/2 (document-level, not per token).
    let m = zeroshot::metrics(
        Task::LambadaOpenai,
        &[lam("a"), lam("b")],
        &[s(-1.0, true), s(-3.0, false)],
    );
    assert_eq!(m[0].name, "perplexity");
    assert!((m[0].value - 2f64.exp()).abs() < 1e-12, "{}", m[0].value);
    assert!(!m[0].higher_is_better);
    assert_eq!((m[1].name.as_str(), m[1].value), ("acc", 0.5));
    // WinoGrande and BoolQ report acc only; ARC acc and acc_norm.
    let two = vec![
        Score {
            logprob: -1.0,
            greedy: false,
        };
        2
    ];
    let wd = Doc::choice("c".into(), vec!["x".into(), "y".into()], 0);
    assert_eq!(
        zeroshot::metrics(Task::Winogrande, &[wd.clone()], &[two.clone()]).len(),
        1
    );
    assert_eq!(zeroshot::metrics(Task::ArcEasy, &[wd], &[two]).len(), 2);
}

/// log p(continuation | context) from one plain forward of lm-eval's encoding.
fn naive(lm: &Lm, ctx: &str, cont: &str) -> f64 {
    let (ce, xe) = lm.encode_pair(ctx, cont).unwrap();
    common::naive(lm, &lm.pair_row(&ce, &xe))
}

#[test]
fn suite_end_to_end_on_tiny_model() {
    let d = tempfile::tempdir().unwrap();
    models::testing::write_tiny_llama(d.path(), false).unwrap();
    let m = Model::load(d.path().to_str().unwrap(), false).unwrap();
    let specs = eval::parse_tasks("zeroshot").unwrap();
    assert_eq!(specs.len(), 1);
    let o = EvalOptions {
        batch_size: 3,
        log_samples: true,
        ..opts()
    };
    let out = eval::run_task(&m, &specs[0], &o).unwrap();
    assert_eq!(out.task, "zeroshot");
    assert_eq!(out.results.len(), 1 + Task::ALL.len());
    let group = &out.results[0];
    assert_eq!(group.name, "zeroshot");
    assert_eq!(group.subtasks.len(), 8);

    let lm = Lm::new(m.llama().unwrap(), &m.tokenizer, 1, 2048, false);
    let mut accs = Vec::new();
    for (t, r) in Task::ALL.iter().zip(&out.results[1..]) {
        assert_eq!(r.name, t.name());
        let docs = t.load(&fixtures().join("data")).unwrap();
        assert_eq!(r.n_samples, Some((docs.len(), docs.len())));
        // Independent scores: one plain forward per request.
        let scores: Vec<Vec<f64>> = docs
            .iter()
            .map(|d| d.requests.iter().map(|(c, x)| naive(&lm, c, x)).collect())
            .collect();
        let acc = if *t == Task::LambadaOpenai {
            let ll: Vec<f64> = scores.iter().map(|s| s[0]).collect();
            let ppl = (-ll.iter().sum::<f64>() / ll.len() as f64).exp();
            let got = r.metric("perplexity").unwrap();
            assert!((got - ppl).abs() < 1e-3 * ppl, "perplexity {got} vs {ppl}");
            r.metric("acc").unwrap()
        } else {
            let js: Vec<_> = docs.iter().zip(&scores).map(|(d, s)| judge(d, s)).collect();
            let acc = js.iter().map(|j| j.acc).sum::<f64>() / js.len() as f64;
            assert_eq!(r.metric("acc"), Some(acc), "{}", t.name());
            if t.has_acc_norm() {
                let an = js.iter().map(|j| j.acc_norm).sum::<f64>() / js.len() as f64;
                assert_eq!(r.metric("acc_norm"), Some(an), "{}", t.name());
            } else {
                assert_eq!(r.metric("acc_norm"), None);
            }
            acc
        };
        accs.push(acc);
    }
    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
    assert!((group.metric("acc").unwrap() - mean).abs() < 1e-12);
    let n_req: usize = Task::ALL
        .iter()
        .map(|t| t.load(&fixtures().join("data")).unwrap().len())
        .sum();
    assert_eq!(out.samples.len(), n_req);

    // --limit takes the first N documents of each task; a single task has no group entry.
    let one = eval::parse_tasks("winogrande").unwrap();
    let lim = eval::run_task(
        &m,
        &one[0],
        &EvalOptions {
            limit: Some(2),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(lim.results.len(), 1);
    assert_eq!(lim.results[0].n_samples, Some((3, 2)));
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn bad_data_gives_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = Task::Hellaswag.load(d.path()).unwrap_err().to_string();
    assert!(e.contains("hellaswag_val.jsonl: not found"), "{e}");
    assert_eq!(e.lines().count(), 1);

    write(d.path(), "winogrande/dev.jsonl", "{\"sentence\": \"a _ b\", \"option1\": \"x\", \"option2\": \"y\", \"answer\": \"1\"}\n{\"sentence\": \"no blank\", \"option1\": \"x\", \"option2\": \"y\", \"answer\": \"1\"}\n");
    let e = Task::Winogrande.load(d.path()).unwrap_err().to_string();
    assert!(e.contains("dev.jsonl:2: 'sentence' has no blank"), "{e}");

    write(
        d.path(),
        "piqa/valid.jsonl",
        "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n",
    );
    write(d.path(), "piqa/valid-labels.lst", "0\n1\n");
    let e = Task::Piqa.load(d.path()).unwrap_err().to_string();
    assert!(e.contains("2 labels for 1 questions"), "{e}");
    write(d.path(), "piqa/valid-labels.lst", "2\n");
    let e = Task::Piqa.load(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("valid-labels.lst:1: label must be 0 or 1"),
        "{e}"
    );

    write(d.path(), "arc/ARC-Easy-Test.jsonl", "{\"id\": \"x\", \"question\": {\"stem\": \"s\", \"choices\": [{\"text\": \"a\", \"label\": \"A\"}, {\"text\": \"b\", \"label\": \"B\"}]}, \"answerKey\": \"E\"}\n");
    let e = Task::ArcEasy.load(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("ARC-Easy-Test.jsonl:1: answerKey 'E' is not one of"),
        "{e}"
    );

    write(d.path(), "hellaswag/hellaswag_val.jsonl", "{\"activity_label\": \"a\", \"ctx_a\": \"b\", \"ctx_b\": \"c\", \"endings\": [\"x\", \"y\"], \"label\": 2}\n");
    let e = Task::Hellaswag.load(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("hellaswag_val.jsonl:1: 'label' 2 is out of range"),
        "{e}"
    );

    write(
        d.path(),
        "boolq/dev.jsonl",
        "{\"question\": \"q\", \"passage\": \"p\"}\n",
    );
    let e = Task::Boolq.load(d.path()).unwrap_err().to_string();
    assert!(e.contains("dev.jsonl:1: missing 'label'"), "{e}");

    // The suite is zero-shot: asking for shots is refused before any model work.
    let dm = tempfile::tempdir().unwrap();
    models::testing::write_tiny_llama(dm.path(), false).unwrap();
    let m = Model::load(dm.path().to_str().unwrap(), false).unwrap();
    let spec = TaskSpec::ZeroShot {
        tasks: vec![Task::Boolq],
        group: false,
    };
    let e = eval::run_task(
        &m,
        &spec,
        &EvalOptions {
            shots: Some(2),
            ..opts()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("0 shots"), "{e}");
}
