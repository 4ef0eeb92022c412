//! The fine-tuning engine on tiny synthetic models: every method learns, freezes what it must,
//! saves a loadable result, resumes with the identical loss curve, and rejects bad input.

use methods::finetune::{self, FinetuneOptions, Method, RunControl, Task};
use methods::mpop::MpoLayer;
use models::CausalLm;
use models::Model;
use std::path::{Path, PathBuf};

fn tiny_bert(dir: &Path) -> Model {
    models::testing::write_tiny_bert(dir).unwrap();
    Model::load(dir.to_str().unwrap(), false).unwrap()
}

fn tiny_llama(dir: &Path) -> Model {
    models::testing::write_tiny_llama(dir, false).unwrap();
    Model::load(dir.to_str().unwrap(), false).unwrap()
}

/// A separable toy sentiment set: label 1 sentences mention "good", label 0 "bad".
fn write_sst(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let words = [
        "movie", "plot", "actor", "scene", "story", "film", "music", "end",
    ];
    let mut tr = String::from("sentence\tlabel\n");
    for i in 0..n {
        let (adj, l) = if i % 2 == 0 { ("good", 1) } else { ("bad", 0) };
        tr += &format!(
            "the {} was {adj} and {}\t{l}\n",
            words[i % 8],
            words[(i / 3) % 8]
        );
    }
    std::fs::write(dir.join("train.tsv"), &tr).unwrap();
    std::fs::write(dir.join("dev.tsv"), tr).unwrap();
    dir.to_path_buf()
}

fn opts(task: Task, method: Method, data: &Path) -> FinetuneOptions {
    FinetuneOptions {
        model: "tiny".into(),
        task,
        method,
        data: data.to_path_buf(),
        lr: 3e-3,
        epochs: 6,
        batch: 4,
        max_len: 32,
        warmup_ratio: 0.1,
        seed: 7,
        eval_batch: 8,
        ..Default::default()
    }
}

fn quiet() -> RunControl {
    RunControl::default()
}

fn mean(v: &[finetune::StepLog]) -> f64 {
    v.iter().map(|s| s.loss).sum::<f64>() / v.len() as f64
}

#[test]
fn full_finetune_learns_and_saves_a_loadable_classifier() {
    let t = tempfile::tempdir().unwrap();
    let mut m = tiny_bert(&t.path().join("m"));
    let data = write_sst(&t.path().join("sst"), 16);
    let out = t.path().join("out");
    let r = finetune::finetune(
        &mut m,
        &opts(Task::Sst2, Method::Full, &data),
        &out,
        &quiet(),
    )
    .unwrap();
    assert!(r.finished);
    assert_eq!(r.tuned_params, r.total_params);
    let log: finetune::FinetuneLog =
        serde_json::from_str(&std::fs::read_to_string(out.join(finetune::LOG_FILE)).unwrap())
            .unwrap();
    assert_eq!(log.steps.len(), 24);
    let (first, last) = (mean(&log.steps[..4]), mean(&log.steps[20..]));
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(log.evals.len(), 6, "one evaluation per epoch");
    let acc = log.evals.last().unwrap().value;
    assert!(acc >= 0.9, "train-set accuracy {acc}");
    // The saved directory is a plain HF classifier that reloads with the same accuracy.
    let mut back = Model::load(out.to_str().unwrap(), false).unwrap();
    let spec = finetune::data::Spec {
        data: &data,
        eval: None,
        max_len: 32,
        limit: None,
        eval_limit: None,
    };
    let ds = finetune::data::load_classification(&spec, &back.tokenizer).unwrap();
    let (_, acc2, _) = finetune::evaluate(&mut back, &ds.eval, 8).unwrap();
    assert!((acc2 - acc).abs() < 1e-9, "{acc} vs reloaded {acc2}");
}

#[test]
fn mpo_aux_trains_auxiliaries_only() {
    let t = tempfile::tempdir().unwrap();
    let mut m = tiny_bert(&t.path().join("m"));
    let data = write_sst(&t.path().join("sst"), 16);
    let o = FinetuneOptions {
        mpo_lr: Some(1e-2),
        ..opts(Task::Sst2, Method::MpoAux, &data)
    };
    let mut tr = finetune::Trainer::new(&mut m, &o, false).unwrap();
    // Centrals frozen: not in the optimizer; every auxiliary core is.
    let names: Vec<String> = tr.opt.slots.iter().map(|s| s.name.clone()).collect();
    assert!(names.iter().any(|n| n.ends_with(".mpo.core_0")));
    assert!(
        !names.iter().any(|n| n.ends_with(".mpo.core_2")),
        "central core_2 must be frozen (n = 5)"
    );
    assert!(names.iter().any(|n| n == "classifier.weight"));
    assert!(names.iter().any(|n| n.contains("LayerNorm")));
    let snapshot = |m: &Model| -> Vec<(String, Vec<Vec<f32>>)> {
        m.linears()
            .iter()
            .filter_map(|(n, l)| {
                let mp = l.inner().as_any().downcast_ref::<MpoLayer>()?;
                Some((
                    n.clone(),
                    mp.cores()
                        .tensors()
                        .iter()
                        .map(|c| c.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                        .collect(),
                ))
            })
            .collect()
    };
    let before = snapshot(tr.model);
    assert!(!before.is_empty(), "the dense model was decomposed");
    let mut losses = Vec::new();
    for s in 0..12 {
        losses.push(tr.train_step(s).unwrap());
    }
    let after = snapshot(tr.model);
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        assert_eq!(b[2], a[2], "{name}: central tensor changed");
        assert_ne!(b[0], a[0], "{name}: auxiliary tensor did not change");
    }
    assert!(
        mean(&losses[8..]) < mean(&losses[..4]),
        "loss did not drop: {losses:?}"
    );
}

#[test]
fn lora_freezes_the_base_and_saves_a_reloadable_adapter() {
    let t = tempfile::tempdir().unwrap();
    let mdir = t.path().join("m");
    let mut m = tiny_llama(&mdir);
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(60);
    let data = t.path().join("train.txt");
    std::fs::write(&data, text).unwrap();
    let o = FinetuneOptions {
        model: mdir.to_str().unwrap().into(),
        lr: 1e-2,
        epochs: 2,
        max_len: 16,
        ..opts(Task::Lm, Method::Lora, &data)
    };
    let base_q = m.linears()[1].1.weight().unwrap().to_vec2::<f32>().unwrap();
    let out = t.path().join("out");
    let r = finetune::finetune(&mut m, &o, &out, &quiet()).unwrap();
    assert!(r.tuned_params < r.total_params / 4);
    let lin = &m.linears()[1].1;
    assert!(lin.kind().starts_with("lora"), "{}", lin.kind());
    let lora = lin
        .inner()
        .as_any()
        .downcast_ref::<methods::lora::LoraLinear>()
        .unwrap();
    assert_eq!(
        lora.base().weight().unwrap().to_vec2::<f32>().unwrap(),
        base_q,
        "base weight changed"
    );
    let log: finetune::FinetuneLog =
        serde_json::from_str(&std::fs::read_to_string(out.join(finetune::LOG_FILE)).unwrap())
            .unwrap();
    let n = log.steps.len();
    assert!(mean(&log.steps[n - 3..]) < mean(&log.steps[..3]));
    // Reload: base + adapter reproduces the trained model's logits.
    assert!(
        out.join("adapter_config.json").exists() && out.join("adapter_model.safetensors").exists()
    );
    let ids = candle_core::Tensor::new(&[[3u32, 9, 4, 17, 5]], &candle_core::Device::Cpu).unwrap();
    let want = m.llama().unwrap().forward(&ids, None).unwrap();
    let mut back = tiny_llama(&mdir);
    methods::lora::load_peft(&mut back, &out).unwrap();
    let got = back.llama().unwrap().forward(&ids, None).unwrap();
    assert!(models::testing::max_abs_diff(&want, &got) < 1e-5);
}

#[test]
fn length_grouping_permutes_within_mega_batches_and_cuts_padding() {
    use finetune::data::{epoch_order, grouped_epoch_order};
    // Lengths with no relation to position, as in a shuffled corpus.
    let lens: Vec<usize> = (0..1000).map(|i| 3 + (i * 7919) % 61).collect();
    let (batch, seed) = (8, 5);
    let plain = epoch_order(lens.len(), seed, 1);
    let grouped = grouped_epoch_order(&lens, batch, seed, 1);
    assert_eq!(grouped, grouped_epoch_order(&lens, batch, seed, 1));
    assert_ne!(grouped, grouped_epoch_order(&lens, batch, seed, 2));
    // Mega-batches of min(n / 4b, 50) = 31 batches hold the same examples, longest first.
    let mega = 31 * batch;
    for (p, g) in plain.chunks(mega).zip(grouped.chunks(mega)) {
        let (mut p, mut gs) = (p.to_vec(), g.to_vec());
        p.sort_unstable();
        gs.sort_unstable();
        assert_eq!(p, gs);
        assert!(g.windows(2).all(|w| lens[w[0]] >= lens[w[1]]));
    }
    let padded = |order: &[usize]| -> usize {
        order
            .chunks(batch)
            .map(|c| c.len() * c.iter().map(|&i| lens[i]).max().unwrap())
            .sum()
    };
    let real: usize = lens.iter().sum();
    assert!(padded(&plain) as f64 > 1.5 * real as f64);
    assert!((padded(&grouped) as f64) < 1.1 * real as f64);
}

#[test]
fn resume_continues_with_the_identical_loss_curve() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 12);
    let mdir = t.path().join("m");
    models::testing::write_tiny_bert(&mdir).unwrap();
    let load = || Model::load(mdir.to_str().unwrap(), false).unwrap();
    // Length-grouped batches, so that their order is also checked to be a function of the seed.
    let o = FinetuneOptions {
        epochs: 2,
        group_by_length: true,
        ..opts(Task::Sst2, Method::MpoAux, &data)
    };
    let whole = t.path().join("whole");
    finetune::finetune(&mut load(), &o, &whole, &quiet()).unwrap();
    let split = t.path().join("split");
    let stop = RunControl {
        stop_after: Some(4),
        ..quiet()
    };
    let r = finetune::finetune(&mut load(), &o, &split, &stop).unwrap();
    assert!(!r.finished && split.join(finetune::CHECKPOINT_DIR).exists());
    // Another run's options cannot resume here, and nothing is touched by the attempt.
    let other = FinetuneOptions {
        lr: 1e-3,
        ..o.clone()
    };
    let resume = RunControl {
        resume: true,
        ..quiet()
    };
    let e = finetune::finetune(&mut load(), &other, &split, &resume)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different run") && e.contains("lr"), "{e}");
    // Starting over in a used directory without `resume` is refused.
    let e = finetune::finetune(&mut load(), &o, &split, &quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("pass `resume`"), "{e}");
    finetune::finetune(&mut load(), &o, &split, &resume).unwrap();
    let curve = |d: &Path| -> Vec<f64> {
        let l: finetune::FinetuneLog =
            serde_json::from_str(&std::fs::read_to_string(d.join(finetune::LOG_FILE)).unwrap())
                .unwrap();
        l.steps.iter().map(|s| s.loss).collect()
    };
    let (a, b) = (curve(&whole), curve(&split));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "resumed curve differs");
}

#[test]
fn bad_input_is_reported_with_its_line() {
    let t = tempfile::tempdir().unwrap();
    let mut m = tiny_bert(&t.path().join("m"));
    let bad = t.path().join("bad.tsv");
    std::fs::write(
        &bad,
        "sentence\tlabel\na fine film\t1\nno label here\tpositive\n",
    )
    .unwrap();
    let out = t.path().join("out");
    let e = finetune::finetune(
        &mut m,
        &opts(Task::Sst2, Method::Full, &bad),
        &out,
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad.tsv:3") && e.contains("label"), "{e}");
    assert!(!out.exists(), "nothing may be written for bad data");
    let bad = t.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"sentence\": \"ok\", \"label\": 1}\n{\"sentence\": 5}\n",
    )
    .unwrap();
    let e = finetune::finetune(
        &mut m,
        &opts(Task::Sst2, Method::Full, &bad),
        &out,
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad.jsonl:2"), "{e}");
    // Task and architecture must fit.
    let e = finetune::finetune(&mut m, &opts(Task::Lm, Method::Full, &bad), &out, &quiet())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`task` sst2"), "{e}");
    // Resume without a checkpoint.
    let resume = RunControl {
        resume: true,
        ..quiet()
    };
    let data = write_sst(&t.path().join("sst"), 8);
    let e = finetune::finetune(
        &mut m,
        &opts(Task::Sst2, Method::Full, &data),
        &out,
        &resume,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

#[test]
fn squeezing_cuts_bonds_and_keeps_the_loss_within_delta() {
    let t = tempfile::tempdir().unwrap();
    let mut m = tiny_bert(&t.path().join("m"));
    let data = write_sst(&t.path().join("sst"), 16);
    let sq = methods::squeeze::SqueezeOptions {
        target_params: 0.5,
        delta: 0.2,
        max_iters: 6,
        recover_steps: 4,
        cut_fraction: 0.05,
        ..Default::default()
    };
    let o = FinetuneOptions {
        mpo_lr: Some(1e-2),
        squeeze: Some(sq.clone()),
        ..opts(Task::Sst2, Method::MpoAux, &data)
    };
    let out = t.path().join("out");
    let r = finetune::finetune(&mut m, &o, &out, &quiet()).unwrap();
    let log: finetune::FinetuneLog =
        serde_json::from_str(&std::fs::read_to_string(out.join(finetune::LOG_FILE)).unwrap())
            .unwrap();
    let s = log.squeeze.expect("squeeze report");
    let iters = s["iters"].as_array().unwrap();
    assert!(!iters.is_empty());
    let p = s["reference_loss"].as_f64().unwrap();
    let start = s["start_params"].as_u64().unwrap() as usize;
    // Every accepted iteration shrank the model and kept the eval loss within Δ of p.
    let mut last = start;
    for it in iters.iter().filter(|i| i["accepted"].as_bool().unwrap()) {
        let params = it["params"].as_u64().unwrap() as usize;
        assert!(params < last, "{it}");
        last = params;
        assert!(
            (it["eval_loss"].as_f64().unwrap() - p).abs() <= sq.delta + 1e-9,
            "{it}"
        );
    }
    assert!(last < start, "no iteration was accepted: {s}");
    assert_eq!(r.total_params, s["final_params"].as_u64().unwrap() as usize);
    assert_eq!(
        r.total_params, last,
        "the saved model is the last accepted one"
    );
    // The squeezed checkpoint reloads with its smaller bonds.
    let back = methods::mpop::load(&out).unwrap();
    assert_eq!(back.total_params(), r.total_params);
}

/// Each squeeze precondition fails before training, with its option named and nothing written.
#[test]
fn squeeze_flags_are_checked_before_training() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 16);
    let sq = methods::squeeze::SqueezeOptions {
        target_params: 0.5,
        ..Default::default()
    };
    let run = |o: FinetuneOptions, name: &str| {
        // A fresh model each time: preparing a method changes the model's layers.
        let mut m = tiny_bert(&t.path().join(format!("m-{name}")));
        let out = t.path().join(name);
        let e = finetune::finetune(&mut m, &o, &out, &quiet())
            .unwrap_err()
            .to_string();
        assert!(!out.exists(), "{name}: output written before the check");
        e
    };
    let e = run(
        FinetuneOptions {
            squeeze: Some(sq.clone()),
            ..opts(Task::Sst2, Method::Lora, &data)
        },
        "lora",
    );
    assert!(e.contains("needs an MPO method"), "{e}");
    for bad in [0.0, 1.5, f64::NAN] {
        let e = run(
            FinetuneOptions {
                squeeze: Some(methods::squeeze::SqueezeOptions {
                    target_params: bad,
                    ..sq.clone()
                }),
                ..opts(Task::Sst2, Method::MpoAux, &data)
            },
            "ratio",
        );
        assert!(e.contains("`target_params` must be in (0, 1]"), "{e}");
    }
    // Training rows only (a TSV file, not a GLUE folder with dev.tsv): no evaluation set.
    let e = run(
        FinetuneOptions {
            squeeze: Some(sq.clone()),
            ..opts(Task::Sst2, Method::MpoAux, &data.join("train.tsv"))
        },
        "noeval",
    );
    assert!(e.contains("give `eval_data`"), "{e}");
}

/// Issue #6's compensation: LoRA trained over frozen packed 4-bit weights, saved as an adapter
/// whose base is the quantized checkpoint, reloaded on top of it.
#[test]
fn lora_over_a_quantized_model() {
    use methods::quant;
    let t = tempfile::tempdir().unwrap();
    let mut m = tiny_llama(&t.path().join("m"));
    let o = quant::QuantOptions {
        method: quant::calib::Method::Rtn,
        bits: 4,
        group_size: 16,
        ..Default::default()
    };
    quant::quantize_model(&mut m, &o, None, false).unwrap();
    let qdir = t.path().join("q4");
    let cfg = quant::QuantizeConfig {
        bits: 4,
        group_size: 16,
        damp_percent: 0.01,
        desc_act: false,
        sym: false,
        true_sequential: true,
        quant_method: "gptq".into(),
        checkpoint_format: "gptq".into(),
        mpolm_method: "rtn".into(),
        mpolm_fp16_modules: vec![],
        mpolm_int8_activations: None,
    };
    quant::save_quantized(&m, &qdir, &cfg).unwrap();
    let mut q = quant::load_quantized(&qdir).unwrap();
    let data = t.path().join("train.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(60),
    )
    .unwrap();
    let fo = FinetuneOptions {
        model: qdir.to_str().unwrap().into(),
        lr: 1e-2,
        epochs: 2,
        max_len: 16,
        lora_targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..opts(Task::Lm, Method::Lora, &data)
    };
    // Full fine-tuning of packed weights is refused with the way out.
    let e = finetune::Trainer::new(
        &mut quant::load_quantized(&qdir).unwrap(),
        &FinetuneOptions {
            method: Method::Full,
            ..fo.clone()
        },
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("`method` lora"), "{e}");
    let codes_before: Vec<Vec<u32>> = q
        .linears()
        .iter()
        .filter_map(|(_, l)| {
            l.inner()
                .as_any()
                .downcast_ref::<quant::layer::QuantLinear>()
                .map(|x| x.codes())
        })
        .collect();
    let out = t.path().join("out");
    finetune::finetune(&mut q, &fo, &out, &quiet()).unwrap();
    let log: finetune::FinetuneLog =
        serde_json::from_str(&std::fs::read_to_string(out.join(finetune::LOG_FILE)).unwrap())
            .unwrap();
    let n = log.steps.len();
    assert!(
        mean(&log.steps[n - 3..]) < mean(&log.steps[..3]),
        "loss did not drop"
    );
    let codes_after: Vec<Vec<u32>> = q
        .linears()
        .iter()
        .filter_map(|(_, l)| {
            let lin = l
                .inner()
                .as_any()
                .downcast_ref::<methods::lora::LoraLinear>()
                .map(|x| x.base())
                .unwrap_or(l.inner());
            lin.as_any()
                .downcast_ref::<quant::layer::QuantLinear>()
                .map(|x| x.codes())
        })
        .collect();
    assert_eq!(codes_before, codes_after, "packed weights must stay frozen");
    let ids = candle_core::Tensor::new(&[[3u32, 9, 4, 17, 5]], &candle_core::Device::Cpu).unwrap();
    let want = q.llama().unwrap().forward(&ids, None).unwrap();
    let mut back = quant::load_quantized(&qdir).unwrap();
    methods::lora::load_peft(&mut back, &out).unwrap();
    let got = back.llama().unwrap().forward(&ids, None).unwrap();
    assert!(models::testing::max_abs_diff(&want, &got) < 1e-5);
}

/// SST-2 is binary: a label of 2 or 7 is a data error naming its line, never a wider head.
#[test]
fn sst2_labels_other_than_0_and_1_name_their_line() {
    let t = tempfile::tempdir().unwrap();
    let mut m = tiny_bert(&t.path().join("m"));
    let out = t.path().join("out");
    let tsv = t.path().join("three.tsv");
    std::fs::write(&tsv, "sentence\tlabel\ngood\t1\nbad\t0\nmeh\t2\n").unwrap();
    let jsonl = t.path().join("seven.jsonl");
    std::fs::write(
        &jsonl,
        "{\"sentence\": \"good\", \"label\": 1}\n{\"sentence\": \"odd\", \"label\": 7}\n",
    )
    .unwrap();
    // 2^32 + 1 would wrap to label 1 if narrowed before the check.
    let wrap = t.path().join("wrap.jsonl");
    std::fs::write(&wrap, "{\"sentence\": \"x\", \"label\": 4294967297}\n").unwrap();
    for (f, needle) in [
        (&tsv, "three.tsv:4: label 2 is not 0"),
        (&jsonl, "seven.jsonl:2: label 7"),
        (&wrap, "wrap.jsonl:1: label 4294967297"),
    ] {
        let e = finetune::finetune(&mut m, &opts(Task::Sst2, Method::Full, f), &out, &quiet())
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
        assert!(!out.exists());
    }
    // A bad label in the evaluation file too.
    let dir = write_sst(&t.path().join("sst"), 8);
    std::fs::write(dir.join("dev.tsv"), "sentence\tlabel\nok\t1\nno\t3\n").unwrap();
    let e = finetune::finetune(
        &mut m,
        &opts(Task::Sst2, Method::Full, &dir),
        &out,
        &quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dev.tsv:3: label 3"), "{e}");
}

/// A run killed between the two renames of a checkpoint rotation (`checkpoint` moved to
/// `checkpoint.old`, the new one not yet in place, its temp directory left behind) resumes
/// from `checkpoint.old` with the identical loss curve and bit-identical tensors, and the
/// leftovers are gone when it finishes.
#[test]
fn a_run_killed_while_rotating_its_checkpoint_resumes() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 12);
    let mdir = t.path().join("m");
    models::testing::write_tiny_bert(&mdir).unwrap();
    let load = || Model::load(mdir.to_str().unwrap(), false).unwrap();
    let o = FinetuneOptions {
        epochs: 2,
        ..opts(Task::Sst2, Method::Lora, &data)
    };
    let whole = t.path().join("whole");
    finetune::finetune(&mut load(), &o, &whole, &quiet()).unwrap();
    let split = t.path().join("split");
    let stop = RunControl {
        stop_after: Some(2),
        save_every: Some(1),
        ..quiet()
    };
    finetune::finetune(&mut load(), &o, &split, &stop).unwrap();
    // The kill: the first rename done, the new checkpoint still under its temp name.
    std::fs::rename(
        split.join(finetune::CHECKPOINT_DIR),
        split.join(finetune::CHECKPOINT_OLD),
    )
    .unwrap();
    let orphan = split.join(format!("{}777-ckpt", models::tmp::PREFIX));
    std::fs::create_dir(&orphan).unwrap();
    std::fs::write(orphan.join("params.safetensors"), b"half").unwrap();
    std::fs::File::open(&orphan)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(600))
        .unwrap();
    let resume = RunControl {
        resume: true,
        save_every: Some(1),
        ..quiet()
    };
    let r = finetune::finetune(&mut load(), &o, &split, &resume).unwrap();
    assert!(r.finished);
    let curve = |d: &Path| -> Vec<f64> {
        let l: finetune::FinetuneLog =
            serde_json::from_str(&std::fs::read_to_string(d.join(finetune::LOG_FILE)).unwrap())
                .unwrap();
        l.steps.iter().map(|s| s.loss).collect()
    };
    assert_eq!(curve(&whole).len(), 6);
    assert_eq!(curve(&whole), curve(&split), "resumed curve differs");
    let tensors = |d: &Path| {
        candle_core::safetensors::load(
            d.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (tensors(&whole), tensors(&split));
    assert_eq!(a.len(), b.len());
    for (k, x) in &a {
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{k} differs"
        );
    }
    let mut left: Vec<String> = std::fs::read_dir(&split)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want: Vec<String> = std::fs::read_dir(&whole)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    want.sort();
    assert_eq!(
        left, want,
        "leftovers or missing files after the resumed run"
    );
}

/// Make layer 1's up_proj hold layer 0's weight tensor itself, or a copy of it.
fn share_up_proj(m: &mut Model, copy: bool) {
    let w = m
        .linears()
        .into_iter()
        .find(|(n, _)| n == "model.layers.0.mlp.up_proj")
        .map(|(_, l)| l.weight().unwrap())
        .unwrap();
    for (name, lin) in m.linears_mut() {
        if name == "model.layers.1.mlp.up_proj" {
            let w = if copy { w.copy().unwrap() } else { w.clone() };
            *lin = models::Linear::dense(w, lin.bias());
        }
    }
}

/// Loss of a fixed sequence and the gradient of each named parameter.
fn grads(m: &Model, ps: &[finetune::Param]) -> std::collections::BTreeMap<String, Vec<f32>> {
    use candle_core::{Device, Tensor};
    let ids: Vec<u32> = vec![5, 77, 12, 200, 3, 9, 41, 8];
    let x = Tensor::new(&ids[..7], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let y = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    let lm = m.causal().unwrap();
    let h = lm
        .forward_hidden(&x, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let loss = lm.head_loss(&h, &y).unwrap();
    let g = loss.backward().unwrap();
    ps.iter()
        .filter(|p| p.name.contains("up_proj"))
        .map(|p| {
            let t = g.get(p.var.as_tensor()).expect("gradient");
            (p.name.clone(), t.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}

#[test]
fn a_tensor_shared_by_two_layers_trains_as_one_parameter() {
    let d = tempfile::tempdir().unwrap();
    let o = opts(Task::Lm, Method::Full, d.path());
    let mut shared = tiny_llama(&d.path().join("a"));
    share_up_proj(&mut shared, false);
    let ps = finetune::prepare(&mut shared, &o, false).unwrap();
    let ups: Vec<&String> = ps
        .iter()
        .map(|p| &p.name)
        .filter(|n| n.ends_with("up_proj.weight"))
        .collect();
    let layers = shared.causal().unwrap().num_layers();
    assert_eq!(ups.len(), layers - 1, "{ups:?}");
    assert!(!ups.contains(&&"model.layers.1.mlp.up_proj.weight".to_string()));
    // Both layers hold the one trainable tensor.
    let ids: Vec<_> = shared
        .linears()
        .into_iter()
        .filter(|(n, _)| n == "model.layers.0.mlp.up_proj" || n == "model.layers.1.mlp.up_proj")
        .map(|(_, l)| {
            l.inner()
                .as_any()
                .downcast_ref::<models::linear::Dense>()
                .unwrap()
                .weight
                .id()
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    // Its gradient is the sum of what the two layers' separate copies receive.
    let g_shared = grads(&shared, &ps);
    let mut apart = tiny_llama(&d.path().join("b"));
    share_up_proj(&mut apart, true);
    let ps2 = finetune::prepare(&mut apart, &o, false).unwrap();
    let g_apart = grads(&apart, &ps2);
    let s = &g_shared["model.layers.0.mlp.up_proj.weight"];
    let a0 = &g_apart["model.layers.0.mlp.up_proj.weight"];
    let a1 = &g_apart["model.layers.1.mlp.up_proj.weight"];
    let worst = s
        .iter()
        .zip(a0.iter().zip(a1))
        .map(|(s, (a, b))| (s - (a + b)).abs())
        .fold(0f32, f32::max);
    let scale = s.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(
        scale > 0.0 && worst <= 1e-5 * scale.max(1.0),
        "{worst} vs {scale}"
    );
}

#[test]
fn a_shared_tensor_is_one_optimizer_slot_and_both_layers_see_its_update() {
    let t = tempfile::tempdir().unwrap();
    let mut m = tiny_llama(&t.path().join("m"));
    share_up_proj(&mut m, false);
    let data = t.path().join("train.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let o = FinetuneOptions {
        max_len: 16,
        ..opts(Task::Lm, Method::Full, &data)
    };
    let before = m.linears()[0].1.num_params();
    let mut tr = finetune::Trainer::new(&mut m, &o, false).unwrap();
    let names: Vec<&str> = tr.opt.slots.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"model.layers.0.mlp.up_proj.weight"));
    // Checkpoints save the optimizer's slots: the shared tensor is saved (and counted) once.
    assert!(
        !names.contains(&"model.layers.1.mlp.up_proj.weight"),
        "{names:?}"
    );
    let w0 = |m: &Model, l: usize| {
        m.linears()
            .into_iter()
            .find(|(n, _)| n == &format!("model.layers.{l}.mlp.up_proj"))
            .unwrap()
            .1
            .weight()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let start = w0(tr.model, 0);
    tr.train_step(1).unwrap();
    let (a, b) = (w0(tr.model, 0), w0(tr.model, 1));
    assert_ne!(a, start, "the step changed the shared weight");
    assert_eq!(a, b, "both layers hold the updated tensor");
    assert_eq!(tr.model.linears()[0].1.num_params(), before);
}
