//! MPOE and sparse upcycling on a tiny synthetic llama: a freshly upcycled model computes the
//! dense model, the shared central tensor gets the summed gradient of its experts, the
//! router's balance loss enters the training loss only, the central-tensor mask at p_b = 0
//! and 1, and checkpoints round-trip.

use candle_core::{Device, Tensor, Var};
use methods::finetune::{self, FinetuneOptions, Method, RunControl, Task};
use methods::mpoe::{self, UpcycleOptions};
use methods::mpop::MpoLayer;
use models::moe::Router;
use models::Model;
use std::path::Path;

fn tiny(dir: &Path) -> Model {
    models::testing::write_tiny_llama(dir, false).unwrap();
    Model::load(dir.to_str().unwrap(), false).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(
        &[[5u32, 17, 40, 3, 99, 12, 7], [1, 2, 3, 4, 5, 6, 7]],
        &Device::Cpu,
    )
    .unwrap()
}

fn logits(m: &Model) -> Tensor {
    m.causal().unwrap().forward(&ids(), None).unwrap()
}

fn up(router: Router, experts: usize, mpo: bool) -> UpcycleOptions {
    UpcycleOptions {
        experts,
        router,
        mpo,
        sites: 5,
        ..Default::default()
    }
}

#[test]
fn fresh_upcycled_models_compute_the_dense_model() {
    let d = tempfile::tempdir().unwrap();
    let dense = tiny(&d.path().join("m"));
    let want = logits(&dense);
    let cases = [
        (Router::Top1, 2, false, 5),
        (Router::Top1, 8, true, 5),
        (Router::Top2, 2, true, 3),
        (Router::Top2, 3, false, 5),
        (Router::Top2, 8, true, 7),
    ];
    for (k, (router, e, mpo, sites)) in cases.into_iter().enumerate() {
        let mut m = tiny(&d.path().join(format!("m{k}")));
        let mut o = up(router, e, mpo);
        o.sites = sites;
        // Dropping on, with room for every token: nothing is dropped.
        o.drop_tokens = true;
        o.capacity_factor = Some(e as f64);
        let r = mpoe::upcycle(&mut m, &o).unwrap();
        assert_eq!(r.layers, vec![0, 1]);
        let diff = models::testing::max_abs_diff(&logits(&m), &want);
        assert!(diff < 1e-4, "{router:?} E={e} mpo={mpo}: max |Δ| {diff}");
        // The experts differ from the dense FFN only by the router, so some routing must
        // happen: every token went to k experts in each of the two layers.
        let s = r.summary;
        assert_eq!(s.experts, e);
        if mpo {
            assert!(s.shared_params > 0 && s.expert_kind == "mpo", "{s:?}");
        } else {
            assert_eq!(s.shared_params, 0);
        }
        // Saved and loaded, the checkpoint computes the same.
        let out = d.path().join(format!("ck{k}"));
        mpoe::save(&m, &out, false).unwrap();
        let back = methods::open(out.to_str().unwrap(), &Default::default()).unwrap();
        assert!(models::testing::max_abs_diff(&logits(&back), &want) < 1e-4);
        assert_eq!(back.total_params(), m.total_params());
        // Contracted to dense experts: same function, no sharing left.
        let dense_out = d.path().join(format!("dense{k}"));
        mpoe::save(&back, &dense_out, true).unwrap();
        let flat = methods::open(dense_out.to_str().unwrap(), &Default::default()).unwrap();
        assert!(models::testing::max_abs_diff(&logits(&flat), &want) < 1e-4);
        assert_eq!(mpoe::summary(&flat).unwrap().shared_params, 0);
    }
    // Tight capacity with dropping does change the output (the check above can fail).
    let mut m = tiny(&d.path().join("drop"));
    let mut o = up(Router::Top1, 4, false);
    o.drop_tokens = true;
    o.capacity_factor = Some(0.25);
    mpoe::upcycle(&mut m, &o).unwrap();
    assert!(models::testing::max_abs_diff(&logits(&m), &want) > 1e-3);
}

#[test]
fn parameter_counts_share_the_central_tensor_once() {
    let d = tempfile::tempdir().unwrap();
    let dense = tiny(&d.path().join("a"));
    let base = dense.total_params();
    let mut plain = tiny(&d.path().join("b"));
    let r = mpoe::upcycle(&mut plain, &up(Router::Top2, 4, false)).unwrap();
    // 2 layers × 3 matrices of 64×32 per extra expert, plus a 4×32 router per layer.
    let ffn = 2 * 3 * 64 * 32;
    assert_eq!(r.summary.total_params, base + 3 * ffn + 2 * 4 * 32);
    // Top-2 of 4: two experts' worth of FFN are inactive per token.
    assert_eq!(r.summary.active_params, r.summary.total_params - 2 * ffn);
    let mut mp = tiny(&d.path().join("c"));
    let r = mpoe::upcycle(&mut mp, &up(Router::Top2, 4, true)).unwrap();
    let s = r.summary;
    // Each expert's own tensors plus the shared ones, counted once: the model's total.
    assert_eq!(
        s.total_params,
        base - ffn + s.shared_params + s.per_expert_params + s.router_params
    );
    assert!(s.total_params < base + 3 * ffn + 2 * 4 * 32);
}

/// The central variable of layer 0's `gate_proj` in each expert.
fn centrals(m: &Model, mat: &str) -> Vec<Var> {
    let mut v = Vec::new();
    for (name, l) in m.linears() {
        if name.starts_with("model.layers.0.mlp.experts.") && name.ends_with(mat) {
            let p = l.inner().as_any().downcast_ref::<MpoLayer>().unwrap();
            v.push(p.cores().var(p.cores().central_index()).clone());
        }
    }
    v
}

#[test]
fn the_shared_central_tensor_gets_the_summed_gradient_of_its_experts() {
    let d = tempfile::tempdir().unwrap();
    let mut m = tiny(&d.path().join("m"));
    mpoe::upcycle(&mut m, &up(Router::Top2, 3, true)).unwrap();
    models::ops::set_training(true);
    let loss = |m: &Model| {
        let l = m.causal().unwrap().forward(&ids(), None).unwrap();
        // A loss that depends on every output, unevenly.
        (l.sqr().unwrap().sum_all().unwrap() * 1e-3).unwrap()
    };
    let shared = centrals(&m, "gate_proj");
    assert_eq!(shared.len(), 3);
    assert!(shared
        .iter()
        .all(|v| v.as_tensor().id() == shared[0].as_tensor().id()));
    let g = loss(&m).backward().unwrap();
    let gs = g.get(shared[0].as_tensor()).unwrap().clone();
    // Reference: the same model with a separate copy of the central tensor per expert.
    for (name, l) in m.linears_mut() {
        if name.starts_with("model.layers.0.mlp.experts.") && name.ends_with("gate_proj") {
            let p = l
                .inner_mut()
                .as_any_mut()
                .downcast_mut::<MpoLayer>()
                .unwrap();
            let cores = p.inner.cores_mut();
            let c = cores.central_index();
            let own = Var::from_tensor(&cores.var(c).as_tensor().copy().unwrap()).unwrap();
            cores.set_var(c, own).unwrap();
        }
    }
    let own = centrals(&m, "gate_proj");
    assert!(own[0].as_tensor().id() != own[1].as_tensor().id());
    let g2 = loss(&m).backward().unwrap();
    let parts: Vec<Tensor> = own
        .iter()
        .map(|v| g2.get(v.as_tensor()).unwrap().clone())
        .collect();
    models::ops::set_training(false);
    let nonzero = parts
        .iter()
        .filter(|p| {
            p.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
        .count();
    assert!(nonzero >= 2, "only {nonzero} experts got tokens");
    let sum = (&parts[0] + &parts[1]).unwrap().add(&parts[2]).unwrap();
    let scale = sum
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = models::testing::max_abs_diff(&gs, &sum);
    assert!(diff <= 1e-5 * scale.max(1e-6), "|Δ| {diff} of {scale}");
    // Not just one expert's share.
    assert!(models::testing::max_abs_diff(&gs, &parts[0]) > 1e-3 * scale);
}

fn write_text(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("train.txt");
    let line = "the quick brown fox jumps over the lazy dog while the cat sleeps. ";
    std::fs::write(&p, line.repeat(40)).unwrap();
    p
}

fn ft_opts(data: &Path, p: Option<f64>) -> FinetuneOptions {
    FinetuneOptions {
        model: "tiny".into(),
        task: Task::Lm,
        method: Method::MpoAll,
        data: data.to_path_buf(),
        lr: 1e-2,
        batch: 2,
        max_len: 16,
        max_steps: Some(3),
        warmup_ratio: 0.0,
        eval_limit: Some(2),
        central_mask_p: p,
        ..Default::default()
    }
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn the_central_mask_freezes_at_one_and_never_masks_at_zero() {
    let d = tempfile::tempdir().unwrap();
    let data = write_text(d.path());
    for p in [1.0, 0.0] {
        let mut m = tiny(&d.path().join(format!("m{p}")));
        mpoe::upcycle(&mut m, &up(Router::Top1, 3, true)).unwrap();
        let c0 = values(&centrals(&m, "up_proj")[0]);
        let aux = |m: &Model| {
            let l = m
                .linears()
                .into_iter()
                .find(|(n, _)| n == "model.layers.0.mlp.experts.0.up_proj")
                .unwrap()
                .1;
            let p = l.inner().as_any().downcast_ref::<MpoLayer>().unwrap();
            values(p.cores().var(0))
        };
        let a0 = aux(&m);
        let out = d.path().join(format!("ft{p}"));
        let r = finetune::finetune(
            &mut m,
            &ft_opts(&data, Some(p)),
            &out,
            &RunControl::default(),
        )
        .unwrap();
        assert!(r.finished);
        let c1 = values(&centrals(&m, "up_proj")[0]);
        assert_ne!(aux(&m), a0, "auxiliary tensors always train");
        if p == 1.0 {
            assert_eq!(c1, c0, "p_b = 1 freezes the central tensor");
        } else {
            assert_ne!(c1, c0, "p_b = 0 never masks");
        }
        let log: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(finetune::LOG_FILE)).unwrap())
                .unwrap();
        let moe = &log["hooks"]["moe"];
        let masked = moe["masked_steps"].as_array().unwrap().len();
        assert_eq!(masked, if p == 1.0 { 3 } else { 0 });
        // Top-1, nothing dropped: each step's counts add up to 2 layers × its tokens.
        for s in moe["steps"].as_array().unwrap() {
            let n: u64 = s["expert_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .sum();
            assert_eq!(n, 2 * 2 * 15, "{s}");
        }
        // The saved checkpoint holds the trained experts and still shares the central tensor.
        let back = methods::open(out.to_str().unwrap(), &Default::default()).unwrap();
        let cb = centrals(&back, "up_proj");
        assert_eq!(values(&cb[0]), c1);
        assert_eq!(cb[0].as_tensor().id(), cb[2].as_tensor().id());
    }
    // A mask probability for a model whose experts share nothing is refused, not ignored.
    let mut m = tiny(&d.path().join("m_mask_on_dense"));
    mpoe::upcycle(&mut m, &up(Router::Top1, 2, false)).unwrap();
    let e = finetune::finetune(
        &mut m,
        &FinetuneOptions {
            method: Method::Full,
            ..ft_opts(&data, Some(0.5))
        },
        &d.path().join("bad"),
        &RunControl::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("central_mask_p"), "{e}");
}

#[test]
fn the_balance_loss_enters_the_training_loss_only() {
    let d = tempfile::tempdir().unwrap();
    let data = write_text(d.path());
    let m0 = tiny(&d.path().join("a"));
    let ds = finetune::data::load_lm(
        &finetune::data::Spec {
            data: &data,
            eval: None,
            max_len: 16,
            limit: Some(2),
            eval_limit: None,
        },
        &m0.tokenizer,
    )
    .unwrap();
    let refs: Vec<&finetune::data::Example> = ds.train.iter().take(2).collect();
    let b = finetune::data::make_batch(&refs).unwrap();
    let loss_with = |w: f64, training: bool| {
        let mut m = tiny(&d.path().join(format!("w{w}{training}")));
        let mut o = up(Router::Top2, 4, false);
        o.aux_loss_weight = w;
        mpoe::upcycle(&mut m, &o).unwrap();
        models::ops::set_training(training);
        let l = finetune::batch_loss(&m, &b)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        models::ops::set_training(false);
        l
    };
    let (l0, l1, l2) = (
        loss_with(0.0, true),
        loss_with(0.5, true),
        loss_with(1.0, true),
    );
    assert!(l1 - l0 > 1e-3, "{l0} {l1}");
    // Linear in its weight: the added term is α × the balance loss.
    assert!(((l2 - l1) - (l1 - l0)).abs() < 1e-5, "{l0} {l1} {l2}");
    // Two layers, each E·Σ f·P ≥ … > 0; evaluation leaves it out.
    assert!((loss_with(1.0, false) - l0).abs() < 1e-6);
}
