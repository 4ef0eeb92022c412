//! IFEval: each prompt as a user message through the model's chat template, greedy generation
//! until EOS / end-of-turn (lm-eval's max_gen_toks 1280 by default), then every instruction is
//! checked strictly and loosely ([`crate::ifeval`]). Metrics as lm-eval: prompt_level_strict_acc,
//! inst_level_strict_acc, prompt_level_loose_acc, inst_level_loose_acc.

use crate::data;
use crate::ifeval::evaluate;
use crate::lm::{GenRequest, Lm};
use crate::metrics::{mean, stderr};
use crate::{Error, EvalOptions, Metric, Result, TaskOutput, TaskResult};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const DEFAULT_MAX_GEN: usize = 1280;

pub struct Doc {
    pub key: i64,
    pub prompt: String,
    pub ids: Vec<String>,
    pub kwargs: Vec<Value>,
}

pub fn load(path: &std::path::Path) -> Result<Vec<Doc>> {
    let mut out = Vec::new();
    for (line, v) in data::read_jsonl(path)? {
        let prompt = v["prompt"]
            .as_str()
            .ok_or_else(|| Error::parse(path, line, "missing string 'prompt'"))?
            .to_string();
        let ids: Vec<String> = v["instruction_id_list"]
            .as_array()
            .ok_or_else(|| Error::parse(path, line, "missing list 'instruction_id_list'"))?
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| Error::parse(path, line, "instruction ids must be strings"))
            })
            .collect::<Result<_>>()?;
        let kwargs = v["kwargs"].as_array().cloned().unwrap_or_default();
        if kwargs.len() != ids.len() {
            return Err(Error::parse(
                path,
                line,
                format!("{} instruction ids but {} kwargs", ids.len(), kwargs.len()),
            ));
        }
        for id in &ids {
            if !crate::ifeval::INSTRUCTIONS.contains(&id.as_str()) {
                return Err(Error::parse(
                    path,
                    line,
                    format!("unknown instruction '{id}'"),
                ));
            }
        }
        out.push(Doc {
            key: v["key"].as_i64().unwrap_or(line as i64),
            prompt,
            ids,
            kwargs,
        });
    }
    Ok(out)
}

pub fn run(lm: &Lm, opts: &EvalOptions) -> Result<TaskOutput> {
    if lm.tok.chat_template.is_none() {
        return Err(Error::unsupported(
            "ifeval",
            "the model has no chat template",
        ));
    }
    let path = opts.data_dir.join("ifeval").join("input_data.jsonl");
    let all = load(&path)?;
    let n = all.len();
    let docs = super::limit(all, opts.limit);
    let max_new = opts.max_gen_tokens.unwrap_or(DEFAULT_MAX_GEN);
    let mut until: Vec<String> = Vec::new();
    for &e in &lm.tok.eos_ids {
        until.push(lm.tok.decode(&[e], false)?);
    }
    // The architecture's end-of-turn markers, as stop strings when in the vocabulary.
    for &s in lm.model.end_of_turn_tokens() {
        if lm.tok.token_to_id(s).is_some() && !until.iter().any(|u| u == s) {
            until.push(s.to_string());
        }
    }
    let mut reqs = Vec::new();
    for d in &docs {
        let text = lm
            .tok
            .apply_chat_template(&json!([{"role": "user", "content": d.prompt}]), true)?;
        reqs.push(GenRequest {
            context: lm.encode(&text)?,
            until: until.clone(),
            max_new_tokens: max_new,
        });
    }
    let outs = lm.generate_until(&reqs, "ifeval", |_, _| {})?;
    let (mut ps, mut pl, mut is, mut il) = (vec![], vec![], vec![], vec![]);
    let mut per: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new(); // id → (n, strict, loose)
    let mut samples = Vec::new();
    for (d, o) in docs.iter().zip(&outs) {
        let (s, l) = evaluate(&d.ids, &d.kwargs, &o.text)
            .map_err(|e| Error::Msg(format!("ifeval key {}: {e}", d.key)))?;
        ps.push(s.iter().all(|&x| x) as u8 as f64);
        pl.push(l.iter().all(|&x| x) as u8 as f64);
        is.extend(s.iter().map(|&x| x as u8 as f64));
        il.extend(l.iter().map(|&x| x as u8 as f64));
        for (k, id) in d.ids.iter().enumerate() {
            let e = per.entry(id.clone()).or_default();
            e.0 += 1;
            e.1 += s[k] as usize;
            e.2 += l[k] as usize;
        }
        if opts.log_samples {
            samples.push(json!({"key": d.key, "prompt": d.prompt, "response": o.text, "stopped_by": o.stopped_by,
                "instruction_id_list": d.ids, "strict": s, "loose": l}));
        }
    }
    let mut r = TaskResult::new("ifeval", "ifeval");
    r.metrics.push(Metric::new(
        "prompt_level_strict_acc",
        mean(&ps),
        stderr(&ps),
    ));
    r.metrics
        .push(Metric::new("inst_level_strict_acc", mean(&is), stderr(&is)));
    r.metrics.push(Metric::new(
        "prompt_level_loose_acc",
        mean(&pl),
        stderr(&pl),
    ));
    r.metrics
        .push(Metric::new("inst_level_loose_acc", mean(&il), stderr(&il)));
    r.n_shot = Some(0);
    r.n_samples = Some((n, docs.len()));
    let per_inst: serde_json::Map<String, Value> = per
        .into_iter()
        .map(|(k, (n, s, l))| (k, json!({"n": n, "strict_acc": s as f64 / n as f64, "loose_acc": l as f64 / n as f64})))
        .collect();
    Ok(TaskOutput {
        task: "ifeval".into(),
        results: vec![r],
        seconds: 0.0,
        config: json!({"file": path, "chat_template": true, "until": until, "max_gen_tokens": max_new,
                       "decoding": "greedy", "per_instruction": per_inst, "generation_batch_size": lm.gen_batch}),
        samples,
    })
}
