//! GSM8K chain of thought, as lm-eval's `gsm8k_cot`: the 8 exemplars of Wei et al. (2022) as
//! "Q: {question}\nA: {reasoning} The answer is N." joined by "\n\n", then "Q: {question}\nA:";
//! greedy generation until "Q:", "</s>", "<|im_end|>" or EOS (gsm8k-cot.yaml v3.0 of lm-eval 0.4.x;
//! versions before 3.0 also stopped at "\n\n"); answers extracted with the
//! strict ("The answer is N") and flexible (last number) filters; exact match after removing
//! ",", "$", everything up to "#### " and a final ".", ignoring case.

use crate::data;
use crate::lm::{GenRequest, Lm};
use crate::metrics::{mean, stderr};
use crate::{Error, EvalOptions, Metric, Result, TaskOutput, TaskResult};
use regex::Regex;
use serde_json::json;
use std::sync::OnceLock;

/// Wei et al.'s 8 chain-of-thought exemplars (question, answer), as in lm-eval's gsm8k-cot.
pub const EXEMPLARS: [(&str, &str); 8] = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
];

pub const UNTIL: [&str; 3] = ["Q:", "</s>", "<|im_end|>"];
pub const DEFAULT_MAX_GEN: usize = 256;
pub const INVALID: &str = "[invalid]";

/// The prompt for `question` after the first `k` exemplars.
pub fn prompt(question: &str, k: usize) -> String {
    let mut s = String::new();
    for (q, a) in EXEMPLARS.iter().take(k) {
        s.push_str(&format!("Q: {q}\nA: {a}\n\n"));
    }
    s.push_str(&format!("Q: {question}\nA:"));
    s
}

/// The reference answer: text after the last "####", trimmed.
pub fn target(answer: &str) -> String {
    answer
        .rsplit("####")
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

fn re(cell: &'static OnceLock<Regex>, pat: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pat).expect("valid regex"))
}

/// strict-match: the first "The answer is N." (lm-eval's pattern, "." = any character).
pub fn extract_strict(resp: &str) -> String {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"The answer is (-?[0-9.,]+).")
        .captures(resp)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().trim().to_string())
        .unwrap_or_else(|| INVALID.into())
}

/// flexible-extract: the last number-like match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`.
pub fn extract_flexible(resp: &str) -> String {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
        .captures_iter(resp)
        .last()
        .and_then(|c| c.get(1).or_else(|| c.get(2)))
        .map(|m| m.as_str().trim().to_string())
        .unwrap_or_else(|| INVALID.into())
}

/// lm-eval's exact_match normalisation for gsm8k (regexes_to_ignore, ignore_case).
pub fn normalize(s: &str) -> String {
    static R: OnceLock<[Regex; 4]> = OnceLock::new();
    let rs = R.get_or_init(|| {
        [",", r"\$", r"(?s).*#### ", r"\.$"].map(|p| Regex::new(p).expect("valid regex"))
    });
    let mut s = s.to_string();
    for r in rs {
        s = r.replace_all(&s, "").into_owned();
    }
    s.to_lowercase()
}

pub fn exact_match(pred: &str, gold: &str) -> bool {
    normalize(pred) == normalize(gold)
}

pub fn run(lm: &Lm, opts: &EvalOptions) -> Result<TaskOutput> {
    let k = opts.shots.unwrap_or(8);
    if k > EXEMPLARS.len() {
        return Err(Error::unsupported_option(
            "gsm8k",
            "shots",
            format!(
                "`shots` {k}: gsm8k_cot has {} standard exemplars",
                EXEMPLARS.len()
            ),
        ));
    }
    let path = opts.data_dir.join("gsm8k").join("test.jsonl");
    let rows = data::read_jsonl(&path)?;
    let n = rows.len();
    let mut docs = Vec::new();
    for (line, v) in super::limit(rows, opts.limit) {
        let q = v["question"]
            .as_str()
            .ok_or_else(|| Error::parse(&path, line, "missing string field 'question'"))?;
        let a = v["answer"]
            .as_str()
            .ok_or_else(|| Error::parse(&path, line, "missing string field 'answer'"))?;
        docs.push((q.to_string(), target(a)));
    }
    let max_new = opts.max_gen_tokens.unwrap_or(DEFAULT_MAX_GEN);
    let mut until: Vec<String> = UNTIL.iter().map(|s| s.to_string()).collect();
    for &e in &lm.tok.eos_ids {
        let s = lm.tok.decode(&[e], false)?;
        if !s.is_empty() && !until.contains(&s) {
            until.push(s);
        }
    }
    let prompts: Vec<String> = docs.iter().map(|(q, _)| prompt(q, k)).collect();
    let mut reqs = Vec::new();
    for p in &prompts {
        reqs.push(GenRequest {
            context: lm.encode(p)?,
            until: until.clone(),
            max_new_tokens: max_new,
        });
    }
    let outs = lm.generate_until(&reqs, "gsm8k", |_, _| {})?;
    let (mut strict, mut flex) = (Vec::new(), Vec::new());
    let mut samples = Vec::new();
    let mut gen_tokens = 0usize;
    for (i, o) in outs.iter().enumerate() {
        let gold = &docs[i].1;
        let (s, f) = (extract_strict(&o.text), extract_flexible(&o.text));
        let (ms, mf) = (
            exact_match(&s, gold) as u8 as f64,
            exact_match(&f, gold) as u8 as f64,
        );
        strict.push(ms);
        flex.push(mf);
        gen_tokens += o.new_tokens;
        if opts.log_samples {
            samples.push(json!({"doc": i, "prompt": prompts[i], "response": o.text, "new_tokens": o.new_tokens,
                "stopped_by": o.stopped_by, "target": gold, "strict": s, "flexible": f,
                "exact_match_strict": ms, "exact_match_flexible": mf}));
        }
    }
    let mut r = TaskResult::new("gsm8k", "gsm8k");
    r.metrics.push(Metric::filtered(
        "exact_match",
        "strict-match",
        mean(&strict),
        stderr(&strict),
    ));
    r.metrics.push(Metric::filtered(
        "exact_match",
        "flexible-extract",
        mean(&flex),
        stderr(&flex),
    ));
    r.n_shot = Some(k);
    r.n_samples = Some((n, docs.len()));
    Ok(TaskOutput {
        task: "gsm8k".into(),
        results: vec![r],
        seconds: 0.0,
        config: json!({"file": path, "num_fewshot": k, "until": until, "max_gen_tokens": max_new,
                       "max_length": lm.max_length, "generated_tokens": gen_tokens, "decoding": "greedy",
                       "generation_batch_size": lm.gen_batch}),
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction() {
        assert_eq!(extract_strict(" He has 5 + 4 = 9. The answer is 9."), "9");
        assert_eq!(extract_strict("The answer is 1,234.50 dollars"), "1,234.50");
        assert_eq!(extract_strict("The answer is -3!"), "-3");
        // lm-eval's pattern needs one character after the number.
        assert_eq!(extract_strict("The answer is 9"), INVALID);
        assert_eq!(extract_strict("the answer is 9."), INVALID);
        // As Python: the greedy group keeps the "." when another character follows.
        assert_eq!(
            extract_strict("The answer is 7. Then The answer is 8."),
            "7."
        );
        assert!(exact_match("7.", "7"));
        assert_eq!(extract_flexible("3 + 4 = 7 apples, so $12.50."), "$12.50.");
        assert_eq!(extract_flexible("so 5 and then 6"), "6");
        assert_eq!(extract_flexible("-42 is it"), "-42");
        assert_eq!(extract_flexible("no numbers"), INVALID);
        assert_eq!(target("a\n#### 1,000"), "1,000");
        assert!(exact_match("1000", "1,000"));
        assert!(exact_match("$12.50.", "12.50"));
        assert!(exact_match("18", "18"));
        assert!(!exact_match("18.5", "18"));
        assert!(!exact_match(INVALID, "18"));
        assert!(exact_match("The final #### 72", "72"));
    }

    #[test]
    fn prompt_shape() {
        let p = prompt("How many?", 2);
        assert!(p.starts_with("Q: There are 15 trees"));
        assert!(p.contains("The answer is 6.\n\nQ: If there are 3 cars"));
        assert!(p.ends_with("The answer is 5.\n\nQ: How many?\nA:"));
        assert_eq!(prompt("X", 0), "Q: X\nA:");
    }
}
