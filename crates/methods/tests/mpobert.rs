//! MPOBERT on a tiny synthetic BERT (2 layers): sharing makes one parameter (one optimizer slot,
//! one update per step seen by every layer, stored once, counted once), `share none` + `copy`
//! reproduces the source, the (2L)^(−1/4) rule, the adapter's zero start, bad options, and the
//! masked-LM masking and training.

use candle_core::{Device, Tensor};
use methods::finetune::{self, FinetuneOptions, Method, RunControl, Task};
use methods::mpobert::{self, CentralFrom, Init, MpoBertLinear, MpoBertOptions, Share};
use models::{LinearLayer, Model};
use std::path::Path;

fn tiny_bert(dir: &Path) -> Model {
    models::testing::write_tiny_bert(dir).unwrap();
    Model::load(dir.to_str().unwrap(), false).unwrap()
}

fn opts(share: Share, depth: usize, init: Init, adapter_rank: usize) -> MpoBertOptions {
    MpoBertOptions {
        share,
        depth,
        adapter_rank,
        init,
        central_from: CentralFrom::Joint,
        share_norms: false,
        seed: 3,
    }
}

fn hidden(m: &Model) -> Tensor {
    let ids = Tensor::new(
        &[[5u32, 17, 42, 99, 3, 250, 11], [7, 8, 9, 10, 11, 12, 13]],
        &Device::Cpu,
    )
    .unwrap();
    m.encoder().unwrap().forward(&ids, None, None).unwrap()
}

/// The MPOBERT matrix `layer`.`t` of `m`.
fn mb<'a>(m: &'a Model, layer: usize, t: &str) -> &'a MpoBertLinear {
    let name = format!("encoder.layer.{layer}.{t}");
    m.linears()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
        .inner()
        .as_any()
        .downcast_ref::<MpoBertLinear>()
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn share_none_with_copy_at_the_source_depth_reproduces_the_encoder() {
    let d = tempfile::tempdir().unwrap();
    let src = tiny_bert(&d.path().join("b"));
    let want = hidden(&src);
    let (m, r) = mpobert::build(src, &opts(Share::None, 2, Init::Copy, 0), false).unwrap();
    assert!(
        r.errors.iter().all(|e| e.rel_error < 1e-6),
        "{:?}",
        r.errors
    );
    let got = hidden(&m);
    let diff = models::testing::max_abs_diff(&want, &got);
    assert!(diff < 1e-4, "max |Δ| = {diff}");
    // Same for the saved and reloaded checkpoint.
    let out = d.path().join("mb");
    mpobert::save(&m, &out, None).unwrap();
    let back = methods::open(out.to_str().unwrap(), &Default::default()).unwrap();
    assert!(models::testing::max_abs_diff(&want, &hidden(&back)) < 1e-4);
}

#[test]
fn a_shared_central_is_one_parameter_trained_once_and_stored_once() {
    let d = tempfile::tempdir().unwrap();
    let src = tiny_bert(&d.path().join("b"));
    let (mut m, _) = mpobert::build(src, &opts(Share::All, 4, Init::Scaled, 2), false).unwrap();
    let c = 2; // the central core of five sites
    let q = "attention.self.query";
    let id = |m: &Model, l: usize| mb(m, l, q).mpo.inner.cores().var(c).as_tensor().id();
    assert!(
        (1..4).all(|l| id(&m, l) == id(&m, 0)),
        "one central for all layers"
    );
    assert_ne!(
        mb(&m, 0, q).mpo.inner.cores().var(0).as_tensor().id(),
        mb(&m, 1, q).mpo.inner.cores().var(0).as_tensor().id(),
        "auxiliaries are per layer"
    );
    // Counted once: the total equals the sum over distinct tensors.
    let mut seen = std::collections::HashMap::new();
    for (_, l) in m.linears() {
        for (i, n) in l.inner().param_ids() {
            seen.insert(i, n);
        }
    }
    for (_, t) in m.other_tensors() {
        seen.insert(t.id(), t.elem_count());
    }
    assert_eq!(m.total_params(), seen.values().sum::<usize>());
    let s = mpobert::summary(&m);
    let central_elems = mb(&m, 0, q)
        .mpo
        .inner
        .cores()
        .var(c)
        .as_tensor()
        .elem_count();
    assert_eq!(s.shared_tensors, 6);
    assert!(s.shared >= central_elems);
    assert_eq!(s.total, m.total_params());

    // One optimizer slot, one update, seen by every layer.
    let data = d.path().join("sst");
    std::fs::create_dir_all(&data).unwrap();
    let mut tsv = String::from("sentence\tlabel\n");
    for i in 0..16 {
        tsv += &format!(
            "the film was {} {i}\t{}\n",
            if i % 2 == 0 { "good" } else { "bad" },
            1 - i % 2
        );
    }
    std::fs::write(data.join("train.tsv"), &tsv).unwrap();
    let o = FinetuneOptions {
        model: "tiny".into(),
        task: Task::Sst2,
        method: Method::Full,
        data: data.clone(),
        lr: 1e-2,
        warmup_ratio: 0.0,
        batch: 4,
        max_len: 32,
        seed: 1,
        ..Default::default()
    };
    let mut tr = finetune::Trainer::new(&mut m, &o, false).unwrap();
    let central_id = id(tr.model, 0);
    let slots = tr
        .opt
        .slots
        .iter()
        .filter(|s| s.var.as_tensor().id() == central_id)
        .count();
    assert_eq!(slots, 1);
    let before = values(mb(tr.model, 3, q).mpo.inner.cores().var(c).as_tensor());
    tr.train_step(0).unwrap();
    let after0 = values(mb(tr.model, 0, q).mpo.inner.cores().var(c).as_tensor());
    let after3 = values(mb(tr.model, 3, q).mpo.inner.cores().var(c).as_tensor());
    assert_ne!(before, after3, "the step changed the central");
    assert_eq!(after0, after3, "every layer holds the updated central");
    // Adam's first step moves every coordinate by at most lr: one update, not four.
    let max_step = before
        .iter()
        .zip(&after3)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_step <= 1.01e-2, "{max_step}");

    // Stored once, and shared again after loading.
    let out = d.path().join("mb");
    mpobert::save(tr.model, &out, None).unwrap();
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let centrals = st.keys().filter(|k| k.ends_with("mpo.core_2")).count();
    assert_eq!(centrals, 6, "one stored central per matrix type");
    let back = methods::open(out.to_str().unwrap(), &Default::default()).unwrap();
    assert!((1..4).all(|l| id(&back, l) == id(&back, 0)));
    assert_eq!(back.total_params(), tr.model.total_params());
    let a = hidden(tr.model);
    assert!(models::testing::max_abs_diff(&a, &hidden(&back)) < 1e-5);
}

#[test]
fn new_layers_get_auxiliaries_scaled_by_2l_to_the_minus_quarter() {
    let d = tempfile::tempdir().unwrap();
    let depth = 4;
    let (copy, _) = mpobert::build(
        tiny_bert(&d.path().join("a")),
        &opts(Share::None, depth, Init::Copy, 0),
        false,
    )
    .unwrap();
    let (scaled, r) = mpobert::build(
        tiny_bert(&d.path().join("b")),
        &opts(Share::None, depth, Init::Scaled, 0),
        false,
    )
    .unwrap();
    let s = (2.0 * depth as f64).powf(-0.25);
    assert!((r.new_layer_aux_scale - s).abs() < 1e-12);
    for t in mpobert::MATRICES {
        for l in 0..depth {
            let (a, b) = (mb(&copy, l, t), mb(&scaled, l, t));
            for k in 0..5 {
                let x = values(a.mpo.inner.cores().var(k).as_tensor());
                let y = values(b.mpo.inner.cores().var(k).as_tensor());
                let f = if l >= 2 && k != 2 { s } else { 1.0 };
                for (x, y) in x.iter().zip(&y) {
                    assert!((*x as f64 * f - *y as f64).abs() <= 1e-6 * (1.0 + x.abs() as f64));
                }
            }
            // Four scaled auxiliaries scale the layer's matrix by (2L)^(−1).
            if l >= 2 {
                let wa = values(&a.mpo.weight().unwrap());
                let wb = values(&b.mpo.weight().unwrap());
                let f = 1.0 / (2.0 * depth as f64);
                for (x, y) in wa.iter().zip(&wb) {
                    assert!((*x as f64 * f - *y as f64).abs() <= 1e-5);
                }
            }
        }
    }
}

#[test]
fn the_adapter_starts_at_zero_and_then_trains() {
    let d = tempfile::tempdir().unwrap();
    let (plain, _) = mpobert::build(
        tiny_bert(&d.path().join("a")),
        &opts(Share::All, 2, Init::Copy, 0),
        false,
    )
    .unwrap();
    let (mut with, _) = mpobert::build(
        tiny_bert(&d.path().join("b")),
        &opts(Share::All, 2, Init::Copy, 3),
        false,
    )
    .unwrap();
    let a = mb(&with, 1, "intermediate.dense").adapter.clone().unwrap();
    assert_eq!(a.u.as_tensor().dims(), &[64, 3]);
    assert_eq!(a.d.as_tensor().dims(), &[3, 32]);
    assert!(values(a.u.as_tensor()).iter().all(|&v| v == 0.0));
    assert!(values(a.d.as_tensor()).iter().any(|&v| v != 0.0));
    assert_eq!(
        values(&hidden(&plain)),
        values(&hidden(&with)),
        "U = 0: no change"
    );
    let data = d.path().join("sst.tsv");
    std::fs::write(
        &data,
        "sentence\tlabel\nthe film was good\t1\nthe film was bad\t0\n",
    )
    .unwrap();
    let o = FinetuneOptions {
        model: "tiny".into(),
        task: Task::Sst2,
        method: Method::MpoAux,
        data,
        lr: 1e-2,
        warmup_ratio: 0.0,
        batch: 2,
        max_len: 16,
        ..Default::default()
    };
    let mut tr = finetune::Trainer::new(&mut with, &o, false).unwrap();
    tr.train_step(0).unwrap();
    assert!(
        values(a.u.as_tensor()).iter().any(|&v| v != 0.0),
        "U receives gradient"
    );
}

#[test]
fn bad_options_name_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let err = |o: MpoBertOptions| {
        let m = tiny_bert(&d.path().join(format!("b{}", rand_name())));
        mpobert::build(m, &o, false).unwrap_err()
    };
    let e = err(opts(Share::All, 1, Init::Copy, 0));
    assert_eq!(e.invalid_option(), Some("depth"));
    assert!(
        e.to_string().contains("at least the source's 2 layers"),
        "{e}"
    );
    let e = err(opts(Share::Groups(3), 4, Init::Copy, 0));
    assert_eq!(e.invalid_option(), Some("share"));
    assert!(
        e.to_string()
            .contains("3 groups do not divide the 4 layers"),
        "{e}"
    );
    let e = err(opts(Share::All, 2, Init::Copy, 33));
    assert_eq!(e.invalid_option(), Some("adapter_rank"));
    let e = err(MpoBertOptions {
        central_from: CentralFrom::Layer(2),
        ..opts(Share::All, 2, Init::Copy, 0)
    });
    assert_eq!(e.invalid_option(), Some("central_from"));
}

fn rand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn mlm_masking_has_bert_proportions_and_is_seeded() {
    use finetune::data::{mask_tokens, MlmTokens};
    use rand::SeedableRng;
    let t = MlmTokens {
        mask: 3,
        vocab: 1000,
        special: vec![0, 1, 2],
    };
    // Specials at every 10th position must never be chosen.
    let orig: Vec<u32> = (0..200_000u32)
        .map(|i| if i % 10 == 0 { 1 } else { 10 + i % 900 })
        .collect();
    let run = |seed| {
        let mut ids = orig.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let chosen = mask_tokens(&mut ids, &t, &mut rng);
        (ids, chosen)
    };
    let (ids, chosen) = run(5);
    assert_eq!(run(5).0, ids, "same seed, same masks");
    assert_ne!(run(6).0, ids);
    let eligible = orig.iter().filter(|i| !t.special.contains(i)).count() as f64;
    let n = chosen.len() as f64;
    assert!(
        (n / eligible - 0.15).abs() < 0.005,
        "chosen {}",
        n / eligible
    );
    assert!(chosen
        .iter()
        .all(|&(p, o)| orig[p] == o && !t.special.contains(&o)));
    let masked = chosen.iter().filter(|&&(p, _)| ids[p] == t.mask).count() as f64;
    let kept = chosen.iter().filter(|&&(p, o)| ids[p] == o).count() as f64;
    let random = n - masked - kept;
    assert!((masked / n - 0.8).abs() < 0.01, "mask {}", masked / n);
    // A random replacement can draw the original token (1 in 1000 here).
    assert!((kept / n - 0.1).abs() < 0.01, "kept {}", kept / n);
    assert!((random / n - 0.1).abs() < 0.01, "random {}", random / n);
    // Tokens not chosen are untouched.
    let chosen_pos: std::collections::HashSet<usize> = chosen.iter().map(|c| c.0).collect();
    assert!((0..orig.len()).all(|i| chosen_pos.contains(&i) || ids[i] == orig[i]));
}

/// A tiny BERT whose tokenizer has [CLS]/[SEP]/[MASK]/[PAD]: four byte tokens renamed.
fn tiny_bert_with_specials(dir: &Path) -> Model {
    models::testing::write_tiny_bert(dir).unwrap();
    let p = dir.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    for (old, new) in [
        ("{", "[CLS]"),
        ("}", "[SEP]"),
        ("|", "[MASK]"),
        ("~", "[PAD]"),
    ] {
        let id = vocab.remove(old).unwrap();
        vocab.insert(new.into(), id);
    }
    std::fs::write(&p, tok.to_string()).unwrap();
    Model::load(dir.to_str().unwrap(), false).unwrap()
}

#[test]
fn mlm_pretraining_learns_saves_and_resumes_identically() {
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("train.txt");
    std::fs::write(
        &text,
        "the cat sat on the mat and the dog sat on the log. ".repeat(60),
    )
    .unwrap();
    let build = |name: &str| {
        let src = tiny_bert_with_specials(&d.path().join(name));
        mpobert::build(src, &opts(Share::All, 4, Init::Scaled, 2), false)
            .unwrap()
            .0
    };
    let o = FinetuneOptions {
        model: "tiny".into(),
        task: Task::Mlm,
        method: Method::Full,
        data: text,
        lr: 3e-3,
        epochs: 3,
        batch: 4,
        max_len: 24,
        seed: 9,
        ..Default::default()
    };
    let mut m = build("a");
    let out = d.path().join("run");
    let r = finetune::finetune(&mut m, &o, &out, &RunControl::default()).unwrap();
    let log: finetune::FinetuneLog =
        serde_json::from_str(&std::fs::read_to_string(out.join(finetune::LOG_FILE)).unwrap())
            .unwrap();
    let k = log.steps.len() / 3;
    let mean = |s: &[finetune::StepLog]| s.iter().map(|x| x.loss).sum::<f64>() / s.len() as f64;
    assert!(
        mean(&log.steps[2 * k..]) < mean(&log.steps[..k]),
        "loss falls"
    );
    assert_eq!(r.eval.as_ref().unwrap().metric, "perplexity");
    // The saved model is an MPOBERT checkpoint with its (new) MLM head.
    let back = methods::open(out.to_str().unwrap(), &Default::default()).unwrap();
    assert!(back.encoder().unwrap().has_mlm_head());
    assert!(mpobert::is_mpobert(&back));
    // Split in two and resumed: the identical loss curve.
    let mut m2 = build("b");
    let out2 = d.path().join("split");
    let stop = RunControl {
        stop_after: Some(k),
        ..Default::default()
    };
    finetune::finetune(&mut m2, &o, &out2, &stop).unwrap();
    let mut m3 = build("c");
    let resume = RunControl {
        resume: true,
        ..Default::default()
    };
    finetune::finetune(&mut m3, &o, &out2, &resume).unwrap();
    let log2: finetune::FinetuneLog =
        serde_json::from_str(&std::fs::read_to_string(out2.join(finetune::LOG_FILE)).unwrap())
            .unwrap();
    let a: Vec<f64> = log.steps.iter().map(|s| s.loss).collect();
    let b: Vec<f64> = log2.steps.iter().map(|s| s.loss).collect();
    assert_eq!(a, b);
}

#[test]
fn a_damaged_checkpoint_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let (m, _) = mpobert::build(
        tiny_bert(&d.path().join("b")),
        &opts(Share::All, 2, Init::Copy, 0),
        false,
    )
    .unwrap();
    let out = d.path().join("mb");
    mpobert::save(&m, &out, None).unwrap();
    let man = out.join(mpobert::MANIFEST);
    let good = std::fs::read_to_string(&man).unwrap();
    let open = || {
        methods::open(out.to_str().unwrap(), &Default::default())
            .unwrap_err()
            .to_string()
    };
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let (k, _) = v["aliases"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .map(|(k, x)| (k.clone(), x.clone()))
        .unwrap();
    v["aliases"][&k] = "no.such.tensor".into();
    std::fs::write(&man, v.to_string()).unwrap();
    assert!(open().contains("not in model.safetensors"), "{}", open());
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["aliases"]["x"] = k.clone().into();
    v["aliases"]["y"] = "x".into();
    std::fs::write(&man, v.to_string()).unwrap();
    assert!(open().contains("points to another alias"), "{}", open());
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let first = v["layers"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    v["layers"][&first]["bond_dims"][1] = 1_000_000.into();
    std::fs::write(&man, v.to_string()).unwrap();
    assert!(open().contains("out of range"), "{}", open());
}
