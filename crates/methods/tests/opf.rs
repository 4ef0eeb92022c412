//! OPF on a tiny llama: each importance score against a brute-force computation (a model
//! loaded with the matrix zeroed; finite differences of the loss), the chain contracting to
//! its own product, the new tensors registered with the optimizer in place of the dense
//! weight, the saved model dense and of the original size, dynamic rounds, and resume across a
//! decomposition with the identical loss curve.

use methods::finetune::{self, data, FinetuneOptions, Method, RunControl, Task};
use methods::mpop::MpoLayer;
use methods::opf::{self, OpfOptions, Score, Select};
use models::linear::Dense;
use models::Model;
use std::path::{Path, PathBuf};

fn text(dir: &Path) -> PathBuf {
    let p = dir.join("train.txt");
    let t: String = (0..60)
        .map(|i| format!("the cat {} sat on the mat while the dog ran. ", i % 7))
        .collect();
    std::fs::write(&p, t).unwrap();
    p
}

fn load(dir: &Path) -> Model {
    Model::load(dir.to_str().unwrap(), false).unwrap()
}

/// Two fixed batches of 16-token blocks from the text.
fn batches(m: &Model, data: &Path) -> Vec<data::Batch> {
    let spec = data::Spec {
        data,
        eval: None,
        max_len: 16,
        limit: Some(8),
        eval_limit: None,
    };
    let ds = data::load_lm(&spec, &m.tokenizer).unwrap();
    ds.train
        .chunks(3)
        .take(2)
        .map(|c| data::make_batch(&c.iter().collect::<Vec<_>>()).unwrap())
        .collect()
}

fn mean_loss(m: &Model, bs: &[data::Batch]) -> f64 {
    bs.iter()
        .map(|b| {
            finetune::batch_loss(m, b)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum::<f64>()
        / bs.len() as f64
}

fn dense<'a>(m: &'a mut Model, name: &str) -> &'a mut Dense {
    m.linears_mut()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
        .inner_mut()
        .as_any_mut()
        .downcast_mut::<Dense>()
        .unwrap()
}

fn weight(m: &Model, name: &str) -> Vec<f32> {
    let (_, l) = m.linears().into_iter().find(|(n, _)| n == name).unwrap();
    l.weight()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// ∂(loss of batch b)/∂W by central differences, entry by entry.
fn fd_grad(m: &mut Model, name: &str, b: &data::Batch) -> Vec<f64> {
    let w0 = dense(m, name).weight.clone();
    let shape = w0.dims().to_vec();
    let v: Vec<f32> = w0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-2f32;
    let mut g = Vec::with_capacity(v.len());
    for k in 0..v.len() {
        let mut at = |d: f32| {
            let mut x = v.clone();
            x[k] += d;
            dense(m, name).weight =
                candle_core::Tensor::from_vec(x, shape.as_slice(), &candle_core::Device::Cpu)
                    .unwrap();
            mean_loss(m, std::slice::from_ref(b))
        };
        let (p, q) = (at(eps), at(-eps));
        g.push((p - q) / (2.0 * eps as f64));
    }
    dense(m, name).weight = w0;
    g
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

#[test]
fn ablation_score_equals_the_loss_of_a_model_saved_with_the_matrix_zeroed() {
    let t = tempfile::tempdir().unwrap();
    let mdir = t.path().join("m");
    models::testing::write_tiny_llama(&mdir, false).unwrap();
    let data = text(t.path());
    let mut m = load(&mdir);
    let bs = batches(&m, &data);
    let names: Vec<String> = opf::candidates(&m).into_iter().map(|(n, _)| n).collect();
    // 2 layers × (q, k, v, o, gate, up, down).
    assert_eq!(names.len(), 14);
    let got = opf::scores(&mut m, &bs, Score::Ablation, &names).unwrap();
    let base = mean_loss(&load(&mdir), &bs);
    let file = mdir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    for (name, s) in names.iter().zip(&got) {
        let z = t.path().join(format!("z-{name}"));
        models::testing::write_tiny_llama(&z, false).unwrap();
        let mut ts = tensors.clone();
        let key = format!("{name}.weight");
        let w = ts[&key].zeros_like().unwrap();
        ts.insert(key, w);
        candle_core::safetensors::save(&ts, z.join("model.safetensors")).unwrap();
        let want = (base - mean_loss(&load(&z), &bs)).abs();
        assert!(
            (s - want).abs() <= 1e-5 * want.max(1e-3),
            "{name}: {s} vs {want}"
        );
    }
    // Scoring leaves the model as it was.
    assert_eq!(mean_loss(&m, &bs), base);
}

#[test]
fn taylor_and_fisher_scores_match_finite_differences() {
    let t = tempfile::tempdir().unwrap();
    let mdir = t.path().join("m");
    models::testing::write_tiny_llama(&mdir, false).unwrap();
    let data = text(t.path());
    let mut m = load(&mdir);
    let bs = batches(&m, &data);
    let names = [
        "model.layers.0.self_attn.k_proj".to_string(),
        "model.layers.1.self_attn.v_proj".to_string(),
    ];
    let taylor = opf::scores(&mut m, &bs, Score::Taylor, &names).unwrap();
    let fisher = opf::scores(&mut m, &bs, Score::Fisher, &names).unwrap();
    let mut fresh = load(&mdir);
    for (k, name) in names.iter().enumerate() {
        let w: Vec<f64> = weight(&fresh, name).iter().map(|&x| x as f64).collect();
        let gs: Vec<Vec<f64>> = bs.iter().map(|b| fd_grad(&mut fresh, name, b)).collect();
        let n = w.len() as f64;
        // Σ|ḡ ⊙ W| with ḡ the gradient of the mean loss; Σ_b mean(g_b²).
        let want_t: f64 = (0..w.len())
            .map(|i| (gs.iter().map(|g| g[i]).sum::<f64>() / gs.len() as f64 * w[i]).abs())
            .sum();
        let want_f: f64 = gs
            .iter()
            .map(|g| g.iter().map(|x| x * x).sum::<f64>() / n)
            .sum();
        assert!(
            rel(taylor[k], want_t) < 0.03,
            "{name}: taylor {} vs {want_t}",
            taylor[k]
        );
        assert!(
            rel(fisher[k], want_f) < 0.05,
            "{name}: fisher {} vs {want_f}",
            fisher[k]
        );
        assert!(want_t > 0.0 && want_f > 0.0);
    }
}

/// W[r, c] as the product of the d×d slices of the cores (i_1, j_1 most significant).
fn chain_product(cores: &[Vec<f64>], dims: &[[usize; 4]], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let (mut rr, mut cc) = (r, c);
            let mut idx = vec![(0, 0); dims.len()];
            for k in (0..dims.len()).rev() {
                idx[k] = (rr % dims[k][1], cc % dims[k][2]);
                rr /= dims[k][1];
                cc /= dims[k][2];
            }
            let mut v = vec![1.0];
            for (k, [dl, i, j, dr]) in dims.iter().copied().enumerate() {
                let mut nv = vec![0.0; dr];
                for a in 0..dl {
                    for b in 0..dr {
                        nv[b] += v[a] * cores[k][((a * i + idx[k].0) * j + idx[k].1) * dr + b];
                    }
                }
                v = nv;
            }
            out[r * cols + c] = v[0];
        }
    }
    out
}

#[test]
fn a_trained_chain_contracts_to_its_own_product() {
    let t = tempfile::tempdir().unwrap();
    let mdir = t.path().join("m");
    models::testing::write_tiny_llama(&mdir, false).unwrap();
    let mut m = load(&mdir);
    let name = "model.layers.1.mlp.down_proj".to_string();
    let before = weight(&m, &name);
    let dense_total = m.total_params();
    let added = opf::decompose(&mut m, std::slice::from_ref(&name), 5).unwrap();
    assert!(added > 0);
    assert_eq!(m.total_params(), dense_total + added);
    // The exact chain reproduces W before any training.
    let exact = weight(&m, &name);
    let worst = before
        .iter()
        .zip(&exact)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-5, "{worst}");
    // Move every core away from the decomposition, as training does.
    let (cores, dims) = {
        let (_, l) = m.linears().into_iter().find(|(n, _)| *n == name).unwrap();
        let mp = l.inner().as_any().downcast_ref::<MpoLayer>().unwrap();
        let c = mp.cores();
        let mut cores = Vec::new();
        let mut dims = Vec::new();
        for (k, v) in c.vars().iter().enumerate() {
            let x = v.as_tensor();
            let noise = (x.randn_like(0.0, 0.05).unwrap() + x).unwrap();
            v.set(&noise).unwrap();
            cores.push(
                noise
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&y| y as f64)
                    .collect::<Vec<_>>(),
            );
            dims.push(c.shape().core_shape(&c.bonds(), k));
        }
        (cores, dims)
    };
    finetune::refresh(&mut m);
    opf::contract(&mut m, std::slice::from_ref(&name)).unwrap();
    assert_eq!(m.total_params(), dense_total);
    let (rows, cols) = (32, 64);
    let want = chain_product(&cores, &dims, rows, cols);
    let got = weight(&m, &name);
    let worst = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "{worst}");
    assert!(got.iter().zip(&before).any(|(a, b)| (a - b).abs() > 1e-3));
}

fn opf_opts(data: &Path, p: OpfOptions) -> FinetuneOptions {
    FinetuneOptions {
        model: "tiny".into(),
        task: Task::Lm,
        method: Method::Opf,
        data: data.to_path_buf(),
        lr: 3e-3,
        epochs: 0,
        max_steps: Some(6),
        batch: 2,
        max_len: 16,
        warmup_ratio: 0.0,
        seed: 3,
        eval_batch: 4,
        opf: Some(p),
        ..Default::default()
    }
}

fn log(d: &Path) -> finetune::FinetuneLog {
    serde_json::from_str(&std::fs::read_to_string(d.join(finetune::LOG_FILE)).unwrap()).unwrap()
}

#[test]
fn static_opf_trains_the_chains_not_the_replaced_weights_and_saves_a_dense_model() {
    let t = tempfile::tempdir().unwrap();
    let mdir = t.path().join("m");
    models::testing::write_tiny_llama(&mdir, false).unwrap();
    let data = text(t.path());
    let orig = load(&mdir);
    let o = opf_opts(
        &data,
        OpfOptions {
            score: Score::Taylor,
            top_n: 1,
            sites: 4,
            ..Default::default()
        },
    );
    let out = t.path().join("ft");
    let stop = RunControl {
        stop_after: Some(3),
        ..Default::default()
    };
    finetune::finetune(&mut load(&mdir), &o, &out, &stop).unwrap();
    let st: opf::OpfState = serde_json::from_value(log(&out).hooks["opf"].clone()).unwrap();
    assert_eq!(st.rounds.len(), 1);
    let chosen = &st.rounds[0].chosen;
    // One per group, each from its group.
    assert_eq!(chosen.len(), 6);
    for (g, n) in opf::GROUPS.iter().zip(chosen) {
        assert_eq!(opf::group_of(n), Some(*g), "{n}");
    }
    // The checkpoint's trainable set: each chosen matrix as its cores, never its dense weight.
    let params = candle_core::safetensors::load(
        out.join(finetune::CHECKPOINT_DIR)
            .join("params.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for n in chosen {
        assert!(
            !params.contains_key(&format!("{n}.weight")),
            "{n} trained twice"
        );
        let w: Vec<f32> = weight(&orig, n);
        let (_, l) = orig.linears().into_iter().find(|(x, _)| x == n).unwrap();
        let shape = mpo::MpoShape::opf_chain(l.out_features(), l.in_features(), 4).unwrap();
        let start = mpo::Mpo::<f32>::decompose(&w, &shape).unwrap();
        for k in 0..4 {
            let c = &params[&format!("{n}.mpo.core_{k}")];
            let trained: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(trained.len(), start.cores[k].len());
            let moved = trained
                .iter()
                .zip(&start.cores[k])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(moved > 1e-5, "{n} core {k} did not train ({moved})");
        }
    }
    // Matrices not chosen train dense, as in full fine-tuning.
    assert!(
        params.contains_key("model.layers.0.mlp.gate_proj.weight")
            || params.contains_key("model.layers.1.mlp.gate_proj.weight")
    );
    let resume = RunControl {
        resume: true,
        ..Default::default()
    };
    let r = finetune::finetune(&mut load(&mdir), &o, &out, &resume).unwrap();
    assert!(r.finished);
    let st: opf::OpfState = serde_json::from_value(r.hooks["opf"].clone()).unwrap();
    assert_eq!(st.deploy_params, orig.total_params());
    assert!(st.train_params > st.deploy_params);
    assert_eq!(r.total_params, orig.total_params());
    // The saved model is a plain dense directory of the original size ...
    assert!(!out.join(methods::mpop::MANIFEST).exists());
    let saved = load(&out);
    assert_eq!(saved.total_params(), orig.total_params());
    assert!(saved
        .linears()
        .iter()
        .all(|(_, l)| l.inner().as_any().is::<Dense>()));
    for n in chosen {
        let (a, b) = (weight(&saved, n), weight(&orig, n));
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4), "{n}");
    }
    // ... whose loss is the trained chains' (the last evaluation ran with the chains).
    let l = log(&out);
    let e = l.evals.last().unwrap();
    let spec = data::Spec {
        data: &data,
        eval: None,
        max_len: 16,
        limit: None,
        eval_limit: None,
    };
    let ds = data::load_lm(&spec, &saved.tokenizer).unwrap();
    let mut saved = saved;
    let (loss, _, _) = finetune::evaluate(&mut saved, &ds.eval, 4).unwrap();
    assert!((loss - e.loss).abs() < 1e-4, "{loss} vs {}", e.loss);
}

#[test]
fn dynamic_rounds_and_a_resume_across_a_decomposition_give_the_identical_curve() {
    let t = tempfile::tempdir().unwrap();
    let mdir = t.path().join("m");
    models::testing::write_tiny_llama(&mdir, false).unwrap();
    let data = text(t.path());
    let o = opf_opts(
        &data,
        OpfOptions {
            select: Select::Dynamic,
            score: Score::Fisher,
            top_n: 2,
            every: Some(2),
            sites: 3,
            score_batches: 2,
            ..Default::default()
        },
    );
    let whole = t.path().join("whole");
    let r = finetune::finetune(&mut load(&mdir), &o, &whole, &RunControl::default()).unwrap();
    let st: opf::OpfState = serde_json::from_value(r.hooks["opf"].clone()).unwrap();
    assert_eq!(st.rounds.iter().map(|r| r.step).collect::<Vec<_>>(), [0, 2]);
    let (a, b) = (&st.rounds[0].chosen, &st.rounds[1].chosen);
    assert_eq!((a.len(), b.len()), (6, 6));
    assert!(a.iter().all(|n| !b.contains(n)));
    // The second round scores only what is still dense.
    assert!(a.iter().all(|n| !st.rounds[1].scores.contains_key(n)));
    let curve = |d: &Path| -> Vec<f64> { log(d).steps.iter().map(|s| s.loss).collect() };
    let full = curve(&whole);
    assert_eq!(full.len(), 6);
    // Stopped before the second round (it runs after the resume), and after it (the resume
    // re-applies both rounds before loading the checkpoint).
    for k in [1, 3] {
        let split = t.path().join(format!("split{k}"));
        let stop = RunControl {
            stop_after: Some(k),
            ..Default::default()
        };
        finetune::finetune(&mut load(&mdir), &o, &split, &stop).unwrap();
        let resume = RunControl {
            resume: true,
            ..Default::default()
        };
        finetune::finetune(&mut load(&mdir), &o, &split, &resume).unwrap();
        assert_eq!(curve(&split), full, "stopped after {k}");
        let s2: opf::OpfState = serde_json::from_value(log(&split).hooks["opf"].clone()).unwrap();
        let names = |s: &opf::OpfState| -> Vec<Vec<String>> {
            s.rounds.iter().map(|r| r.chosen.clone()).collect()
        };
        assert_eq!(names(&s2), names(&st));
    }
}
