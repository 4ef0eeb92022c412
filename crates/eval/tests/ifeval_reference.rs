//! Our IFEval checkers against lm-evaluation-harness's (0.4.13, nltk 3.10.4, langdetect 1.0.9)
//! verdicts on a fixture of responses: tests/fixtures/ifeval/reference_verdicts.jsonl, written
//! by scripts/ifeval_reference_verdicts.py. Every instruction must agree on every response,
//! strict and loose, except:
//! - verdicts the reference itself does not reproduce across random seeds (`unstable`);
//! - the instructions that call langdetect, which we approximate by a heuristic: these must
//!   agree on at least [`LANGDETECT_MIN_AGREEMENT`] of their verdicts.
//!
//! `cargo test --release -p mpolm-eval --test ifeval_reference -- --nocapture` prints the
//! agreement table.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const LANGDETECT_IDS: [&str; 3] = [
    "language:response_language",
    "change_case:english_capital",
    "change_case:english_lowercase",
];
const LANGDETECT_MIN_AGREEMENT: f64 = 0.95;

#[derive(Default)]
struct Tally {
    n: usize,
    strict_agree: usize,
    loose_agree: usize,
    skipped: usize,
}

/// `MPOLM_IFEVAL_FIXTURE` points the test at another fixture (e.g. a held-out one written
/// with `--seed`).
fn fixture() -> Vec<Value> {
    let path = std::env::var_os("MPOLM_IFEVAL_FIXTURE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/ifeval/reference_verdicts.jsonl")
        });
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("fixture line is JSON"))
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .expect("verdict list")
        .iter()
        .map(|x| x.as_bool().expect("bool verdict"))
        .collect()
}

#[test]
fn checkers_agree_with_reference_verdicts() {
    let cases = fixture();
    assert!(cases.len() > 500, "fixture too small: {}", cases.len());
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut lang_misses = Vec::new();
    for (line, case) in cases.iter().enumerate() {
        let ids = strs(&case["instruction_id_list"]);
        let kwargs = case["kwargs"].as_array().expect("kwargs").clone();
        let response = case["response"].as_str().expect("response");
        let unstable = strs(&case["unstable"]);
        let (strict, loose) = eval::ifeval::evaluate(&ids, &kwargs, response)
            .unwrap_or_else(|e| panic!("line {}: {e}", line + 1));
        let (ref_strict, ref_loose) = (bools(&case["strict"]), bools(&case["loose"]));
        for (j, id) in ids.iter().enumerate() {
            let t = tally.entry(id.clone()).or_default();
            if unstable.contains(id) {
                t.skipped += 1;
                continue;
            }
            t.n += 1;
            t.strict_agree += (strict[j] == ref_strict[j]) as usize;
            t.loose_agree += (loose[j] == ref_loose[j]) as usize;
            if strict[j] != ref_strict[j] || loose[j] != ref_loose[j] {
                let list = if LANGDETECT_IDS.contains(&id.as_str()) {
                    &mut lang_misses
                } else {
                    &mut failures
                };
                list.push(format!(
                    "line {} {id} {}: ours strict={} loose={}, reference strict={} loose={}; response {:?}",
                    line + 1,
                    case["kwargs"][j],
                    strict[j],
                    loose[j],
                    ref_strict[j],
                    ref_loose[j],
                    response
                ));
            }
        }
    }
    println!("langdetect disagreements:\n{}", lang_misses.join("\n"));
    let (mut n, mut sa, mut la) = (0, 0, 0);
    println!("instruction | n | strict agree | loose agree | unstable (skipped)");
    for (id, t) in &tally {
        println!(
            "{id} | {} | {:.1}% | {:.1}% | {}",
            t.n,
            100.0 * t.strict_agree as f64 / t.n as f64,
            100.0 * t.loose_agree as f64 / t.n as f64,
            t.skipped
        );
        n += t.n;
        sa += t.strict_agree;
        la += t.loose_agree;
    }
    println!(
        "overall | {n} | {:.2}% | {:.2}%",
        100.0 * sa as f64 / n as f64,
        100.0 * la as f64 / n as f64
    );
    assert_eq!(
        tally.len(),
        eval::ifeval::INSTRUCTIONS.len(),
        "every instruction is covered"
    );
    for (id, t) in &tally {
        assert!(t.n >= 10, "{id}: only {} verdicts in the fixture", t.n);
    }
    for id in LANGDETECT_IDS {
        let t = &tally[id];
        for (what, agree) in [("strict", t.strict_agree), ("loose", t.loose_agree)] {
            let rate = agree as f64 / t.n as f64;
            assert!(
                rate >= LANGDETECT_MIN_AGREEMENT,
                "{id} {what}: agreement {rate:.3} < {LANGDETECT_MIN_AGREEMENT}"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Exact sentence counts and all-capital word counts of the reference on every response.
#[test]
fn punkt_counts_match_nltk() {
    let mut checked = 0;
    for case in fixture() {
        let response = case["response"].as_str().expect("response");
        if let Some(n) = case.get("num_sentences").and_then(Value::as_u64) {
            assert_eq!(
                eval::punkt::count_sentences(response) as u64,
                n,
                "sentences of {response:?}: {:?}",
                eval::punkt::sent_tokenize(response)
            );
            checked += 1;
        }
        if let Some(n) = case.get("capital_words").and_then(Value::as_u64) {
            let words = eval::punkt::word_tokenize(response);
            let ours = words.iter().filter(|w| eval::ifeval::is_upper(w)).count();
            assert_eq!(ours as u64, n, "capital words of {response:?}: {words:?}");
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} count cases");
}
