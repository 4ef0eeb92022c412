//! CaliSr (issue 22): the stable rank against the SVD, SRS_D on scripted probe sequences, the
//! switch freezing exactly what lightweight tuning freezes from its step on, the two fixed-switch
//! ends being the plain methods, and resume across a switch.

use methods::calisr::{self, CalisrOptions, CalisrState, Component, Rule};
use methods::finetune::{self, FinetuneOptions, Method, RunControl, Task};
use methods::mpop::MpoLayer;
use models::Model;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| r.random::<f32>() * 2.0 - 1.0)
        .collect()
}

/// Σσ²/σ₁² from the thin SVD: the reference the power iteration is checked against.
fn svd_srank(w: &[f32], rows: usize, cols: usize) -> f64 {
    let a: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let (_, s, _) = mpo::linalg::thin_svd(&a, rows, cols).unwrap();
    s.iter().map(|x| x * x).sum::<f64>() / (s[0] * s[0])
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn stable_rank_matches_the_svd_on_random_and_low_rank_matrices() {
    for (k, &(r, c)) in [(17, 9), (9, 17), (40, 40), (64, 24)].iter().enumerate() {
        let w = random(r, c, k as u64);
        let got = calisr::stable_rank(&w, r, c);
        let want = svd_srank(&w, r, c);
        assert!(got.converged, "{r}x{c}: {got:?}");
        assert!(
            close(got.srank, want, 1e-7),
            "{r}x{c}: {} vs SVD {want}",
            got.srank
        );
        // A random matrix spreads its energy: well above 1.
        assert!(want > 1.5, "{want}");
    }
    // Rank 3 built as U·V with U 30×3, V 3×20 and a dominant first direction.
    let (u, v) = (random(30, 3, 11), random(3, 20, 12));
    let mut w = vec![0f32; 600];
    for i in 0..30 {
        for j in 0..20 {
            w[i * 20 + j] = (0..3)
                .map(|k| u[i * 3 + k] * v[k * 20 + j] * [4.0, 1.0, 0.5][k])
                .sum();
        }
    }
    let got = calisr::stable_rank(&w, 30, 20);
    let want = svd_srank(&w, 30, 20);
    assert!(close(got.srank, want, 1e-7), "{} vs {want}", got.srank);
    assert!(want < 3.0, "rank 3 bounds the stable rank: {want}");
    // Rank 1: exactly 1; the zero matrix: 0 by definition here.
    let r1: Vec<f32> = (0..12)
        .map(|i| ((i / 4) + 1) as f32 * ((i % 4) as f32 - 1.5))
        .collect();
    assert!(close(calisr::stable_rank(&r1, 3, 4).srank, 1.0, 1e-12));
    assert_eq!(calisr::stable_rank(&[0.0; 6], 2, 3).srank, 0.0);
    // The cap is honoured and reported.
    let capped = calisr::stable_rank_with(&random(40, 40, 3), 40, 40, 0.0, 2);
    assert_eq!(capped.iters, 2);
    assert!(!capped.converged);
}

#[test]
fn stable_rank_after_an_update_is_that_of_the_sum() {
    let (r, c) = (25, 12);
    let w = random(r, c, 5);
    // W + ΔW against the SVD of the sum, for an update along W itself (a rescaling, which
    // leaves the stable rank as it was) and for a random one.
    let d: Vec<f32> = w.iter().map(|x| 0.5 * x).collect();
    let after = calisr::stable_rank_after(&w, &d, r, c);
    let sum: Vec<f32> = w.iter().zip(&d).map(|(a, b)| a + b).collect();
    assert!(close(after.srank, svd_srank(&sum, r, c), 1e-7));
    assert!(close(
        after.srank,
        calisr::stable_rank(&w, r, c).srank,
        1e-7
    ));
    let noise = random(r, c, 9);
    let after = calisr::stable_rank_after(&w, &noise, r, c);
    let sum: Vec<f32> = w.iter().zip(&noise).map(|(a, b)| a + b).collect();
    assert!(close(after.srank, svd_srank(&sum, r, c), 1e-7));
}

#[test]
fn srs_d_over_a_scripted_probe_sequence() {
    let (t, f) = (true, false);
    let seq = [f, t, t, f, t, t, t];
    // SRS_D after each probe with n = 3, by hand: none, none, 2/3, 2/3, 2/3, 2/3, 1.
    let want = [
        None,
        None,
        Some(2.0 / 3.0),
        Some(2.0 / 3.0),
        Some(2.0 / 3.0),
        Some(2.0 / 3.0),
        Some(1.0),
    ];
    for i in 0..seq.len() {
        assert_eq!(calisr::srs(&seq[..=i], 3), want[i], "after probe {i}");
    }
    // δ = 0.5 switches at the third probe; δ = 0.7 only at the last; δ = 0.99 at the last too
    // (SRS_D = 1 > δ), and no earlier probe switches.
    let first = |delta: f64| (0..seq.len()).find(|&i| calisr::should_switch(&seq[..=i], 3, delta));
    assert_eq!(first(0.5), Some(2));
    assert_eq!(first(0.7), Some(6));
    assert_eq!(first(0.99), Some(6));
    // With n = 5: [f t t f t] = 0.6, then [t t f t t] = 0.8, [t f t t t] = 0.8.
    assert_eq!(calisr::srs(&seq[..5], 5), Some(0.6));
    assert_eq!(calisr::srs(&seq, 5), Some(0.8));
    let first5 = |delta: f64| (0..seq.len()).find(|&i| calisr::should_switch(&seq[..=i], 5, delta));
    assert_eq!(first5(0.6), Some(5), "0.6 is not above 0.6");
    assert_eq!(first5(0.45), Some(4));
    assert_eq!(first5(0.8), None);
}

fn tiny_bert(dir: &Path) -> Model {
    models::testing::write_tiny_bert(dir).unwrap();
    Model::load(dir.to_str().unwrap(), false).unwrap()
}

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

fn opts(method: Method, data: &Path, c: Option<CalisrOptions>) -> FinetuneOptions {
    FinetuneOptions {
        model: "tiny".into(),
        task: Task::Sst2,
        method,
        data: data.to_path_buf(),
        lr: 3e-3,
        mpo_lr: Some(5e-3),
        epochs: 3,
        batch: 4,
        max_len: 32,
        warmup_ratio: 0.1,
        seed: 7,
        eval_batch: 8,
        calisr: c,
        ..Default::default()
    }
}

fn state(tr: &finetune::Trainer<'_>) -> CalisrState {
    let h = tr.hooks.iter().find(|h| h.name() == "calisr").unwrap();
    serde_json::from_value(h.state()).unwrap()
}

/// Every MPO matrix's central core and one auxiliary core, by name.
fn cores(m: &Model) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    m.linears()
        .iter()
        .filter_map(|(n, l)| {
            let c = l.inner().as_any().downcast_ref::<MpoLayer>()?.cores();
            let v = |k: usize| {
                c.var(k)
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            Some((n.clone(), v(c.central_index()), v(0)))
        })
        .collect()
}

#[test]
fn a_switched_component_stops_changing_its_central_tensors_from_its_step_on() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 16);
    let mut m = tiny_bert(&t.path().join("m"));
    // Probing every step with n = 1 and a low δ: each component switches at its first probe
    // whose lightweight update lowers the stable rank; one that never does keeps training.
    let c = CalisrOptions {
        rule: Rule::S,
        delta: 0.01,
        probes: 1,
        every: 1,
        switch_at: None,
        fft_lr: None,
    };
    let o = opts(Method::MpoAux, &data, Some(c));
    let mut tr = finetune::Trainer::new(&mut m, &o, false).unwrap();
    let steps = 12;
    let mut snaps = vec![cores(tr.model)];
    for s in 0..steps {
        tr.train_step(s).unwrap();
        snaps.push(cores(tr.model));
    }
    let st = state(&tr);
    assert!(!st.switched.is_empty(), "nothing switched: {:?}", st.probes);
    assert!(!st.probes.is_empty());
    for (g, &at) in &st.switched {
        let comp = if g == "attention" {
            Component::Attention
        } else {
            Component::Ffn
        };
        let mut seen = 0;
        for (i, (name, _, _)) in snaps[0].iter().enumerate() {
            if Component::of(name) != comp {
                continue;
            }
            seen += 1;
            // snaps[s] is the state before step s: steps at..steps leave the central alone
            // and keep moving the auxiliaries.
            for s in at..steps {
                assert_eq!(
                    snaps[s][i].1,
                    snaps[s + 1][i].1,
                    "{name}: central changed at step {s} (switched at {at})"
                );
                assert_ne!(
                    snaps[s][i].2,
                    snaps[s + 1][i].2,
                    "{name}: auxiliary frozen at step {s}"
                );
            }
            // Before the switch the central trained (step 0 has a zero warmup lr).
            if at > 1 {
                assert_ne!(
                    snaps[1][i].1, snaps[at][i].1,
                    "{name}: central never trained before {at}"
                );
            }
        }
        assert!(seen > 0, "{g}");
        // The switch step is the step of the probe that decided it.
        assert!(st.probes.iter().any(|p| p.step == at && p.groups[g].lower));
    }
    // A component that did not switch kept its central tensors training.
    for g in ["attention", "ffn"] {
        if st.switched.contains_key(g) {
            continue;
        }
        let comp = if g == "attention" {
            Component::Attention
        } else {
            Component::Ffn
        };
        for (i, (name, _, _)) in snaps[0].iter().enumerate() {
            if Component::of(name) == comp {
                assert_ne!(snaps[steps - 1][i].1, snaps[steps][i].1, "{name}");
            }
        }
    }
    // The central cores of a switched component are marked frozen (fed detached), and the
    // tuned count leaves them out although the optimizer keeps them for checkpoints.
    let mut frozen = 0;
    for (name, l) in tr.model.linears() {
        let Some(mp) = l.inner().as_any().downcast_ref::<MpoLayer>() else {
            continue;
        };
        let c = mp.cores();
        // Matrices outside attention and FFN follow the last of them.
        let switched = match Component::of(&name) {
            Component::Other => st.switched.len() == 2,
            c => st.switched.contains_key(c.name()),
        };
        assert_eq!(c.is_trainable(c.central_index()), !switched, "{name}");
        if switched {
            frozen += c.var(c.central_index()).as_tensor().elem_count();
        }
    }
    let in_opt: usize = tr
        .opt
        .slots
        .iter()
        .map(|s| s.var.as_tensor().elem_count())
        .sum();
    assert!(frozen > 0);
    assert_eq!(tr.log.tuned_params, in_opt - frozen);
}

#[test]
fn lora_switch_freezes_the_base_weights_and_keeps_the_adapters_training() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 16);
    let mut m = tiny_bert(&t.path().join("m"));
    let c = CalisrOptions {
        rule: Rule::D,
        switch_at: Some(0.5),
        every: 2,
        ..Default::default()
    };
    let o = opts(Method::Lora, &data, Some(c));
    let mut tr = finetune::Trainer::new(&mut m, &o, false).unwrap();
    let total = tr.log.total_steps;
    let at = (0.5 * total as f64).round() as usize;
    let base = |m: &Model| -> Vec<(String, Vec<f32>, Vec<f32>)> {
        m.linears()
            .iter()
            .filter_map(|(n, l)| {
                let ll = l
                    .inner()
                    .as_any()
                    .downcast_ref::<methods::lora::LoraLinear>()?;
                let v = |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1().unwrap();
                Some((
                    n.clone(),
                    v(ll.base().weight().unwrap()),
                    v(ll.b().as_tensor().clone()),
                ))
            })
            .collect()
    };
    let mut snaps = vec![base(tr.model)];
    for s in 0..total {
        tr.train_step(s).unwrap();
        snaps.push(base(tr.model));
    }
    assert_eq!(state(&tr).switched["model"], at);
    assert!(!snaps[0].is_empty());
    for (i, (name, _, _)) in snaps[0].iter().enumerate() {
        assert_ne!(
            snaps[1][i].1, snaps[at][i].1,
            "{name}: base weight never trained"
        );
        for s in at..total {
            assert_eq!(
                snaps[s][i].1,
                snaps[s + 1][i].1,
                "{name}: base changed at step {s}"
            );
            assert_ne!(
                snaps[s][i].2,
                snaps[s + 1][i].2,
                "{name}: lora_B frozen at step {s}"
            );
        }
    }
    // Probes stop with the switch: none after it.
    assert!(state(&tr).probes.iter().all(|p| p.step < at));
}

fn curve(d: &Path) -> (Vec<f64>, finetune::FinetuneLog) {
    let l: finetune::FinetuneLog =
        serde_json::from_str(&std::fs::read_to_string(d.join(finetune::LOG_FILE)).unwrap())
            .unwrap();
    (l.steps.iter().map(|s| s.loss).collect(), l)
}

/// Switching at 0% is the lightweight method from the start and at 100% full (all-core)
/// tuning throughout: the loss curves are those of `mpo-aux` and `mpo-all`, bit for bit (so the
/// probes change nothing by themselves).
#[test]
fn fixed_switch_at_the_ends_is_the_plain_methods() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 12);
    let mdir = t.path().join("m");
    models::testing::write_tiny_bert(&mdir).unwrap();
    let run = |o: &FinetuneOptions, name: &str| {
        let out = t.path().join(name);
        let mut m = Model::load(mdir.to_str().unwrap(), false).unwrap();
        finetune::finetune(&mut m, o, &out, &RunControl::default()).unwrap();
        curve(&out)
    };
    let fixed = |f: f64| CalisrOptions {
        rule: Rule::S,
        every: 2,
        switch_at: Some(f),
        ..Default::default()
    };
    let (aux, _) = run(&opts(Method::MpoAux, &data, None), "aux");
    let (all, _) = run(&opts(Method::MpoAll, &data, None), "all");
    let (at0, l0) = run(&opts(Method::MpoAux, &data, Some(fixed(0.0))), "at0");
    let (at1, l1) = run(&opts(Method::MpoAux, &data, Some(fixed(1.0))), "at1");
    assert_eq!(at0, aux);
    assert_eq!(at1, all);
    assert_ne!(aux, all);
    let st = |l: &finetune::FinetuneLog| -> CalisrState {
        serde_json::from_value(l.hooks["calisr"].clone()).unwrap()
    };
    assert_eq!(
        st(&l0).switched.values().copied().collect::<Vec<_>>(),
        [0, 0]
    );
    assert!(st(&l0).probes.is_empty());
    assert!(st(&l1).switched.is_empty());
    assert_eq!(st(&l1).probes.len(), l1.total_steps / 2);
}

#[test]
fn resume_across_a_switch_gives_the_identical_loss_curve() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 12);
    let mdir = t.path().join("m");
    models::testing::write_tiny_bert(&mdir).unwrap();
    let load = || Model::load(mdir.to_str().unwrap(), false).unwrap();
    for (method, c) in [
        (
            Method::MpoAux,
            CalisrOptions {
                rule: Rule::S,
                delta: 0.01,
                probes: 2,
                every: 1,
                switch_at: None,
                fft_lr: None,
            },
        ),
        (
            Method::Lora,
            CalisrOptions {
                rule: Rule::D,
                every: 1,
                switch_at: Some(0.5),
                fft_lr: Some(1e-3),
                ..Default::default()
            },
        ),
    ] {
        // No warmup: the central tensors and base weights train from step 0, so a resume that
        // lost their full-phase values would show.
        let o = FinetuneOptions {
            warmup_steps: Some(0),
            ..opts(method, &data, Some(c))
        };
        let whole = t.path().join(format!("whole-{method:?}"));
        finetune::finetune(&mut load(), &o, &whole, &RunControl::default()).unwrap();
        let (want, wl) = curve(&whole);
        let ws: CalisrState = serde_json::from_value(wl.hooks["calisr"].clone()).unwrap();
        let first = *ws.switched.values().min().expect("a switch happened");
        // Split before the switch and after it.
        for stop in [first.saturating_sub(1).max(1), first + 2] {
            let split = t.path().join(format!("split-{method:?}-{stop}"));
            let ctl = RunControl {
                stop_after: Some(stop),
                ..Default::default()
            };
            let r = finetune::finetune(&mut load(), &o, &split, &ctl).unwrap();
            assert!(!r.finished);
            let ctl = RunControl {
                resume: true,
                ..Default::default()
            };
            finetune::finetune(&mut load(), &o, &split, &ctl).unwrap();
            let (got, gl) = curve(&split);
            let gs: CalisrState = serde_json::from_value(gl.hooks["calisr"].clone()).unwrap();
            assert_eq!(got, want, "{method:?} split at {stop}");
            assert_eq!(gs.switched, ws.switched);
            let lows = |s: &CalisrState| -> Vec<(usize, Vec<bool>)> {
                s.probes
                    .iter()
                    .map(|p| (p.step, p.groups.values().map(|g| g.lower).collect()))
                    .collect()
            };
            assert_eq!(lows(&gs), lows(&ws));
        }
    }
}

#[test]
fn bad_options_are_refused_before_work() {
    let t = tempfile::tempdir().unwrap();
    let data = write_sst(&t.path().join("sst"), 8);
    let ok = CalisrOptions::default();
    let cases = [
        (Method::Full, ok.clone(), "calisr"),
        (Method::MpoAll, ok.clone(), "calisr"),
        (
            Method::MpoAux,
            CalisrOptions {
                delta: 0.0,
                ..ok.clone()
            },
            "calisr_delta",
        ),
        (
            Method::MpoAux,
            CalisrOptions {
                delta: 1.0,
                ..ok.clone()
            },
            "calisr_delta",
        ),
        (
            Method::Lora,
            CalisrOptions {
                delta: f64::NAN,
                ..ok.clone()
            },
            "calisr_delta",
        ),
        (
            Method::MpoAux,
            CalisrOptions {
                probes: 0,
                ..ok.clone()
            },
            "calisr_probes",
        ),
        (
            Method::MpoAux,
            CalisrOptions {
                every: 0,
                ..ok.clone()
            },
            "calisr_every",
        ),
        (
            Method::MpoAux,
            CalisrOptions {
                switch_at: Some(1.5),
                ..ok.clone()
            },
            "calisr_switch_at",
        ),
        (
            Method::Lora,
            CalisrOptions {
                fft_lr: Some(0.0),
                ..ok.clone()
            },
            "calisr_fft_lr",
        ),
    ];
    for (method, c, option) in cases {
        let mut m = tiny_bert(&t.path().join("m"));
        let o = opts(method, &data, Some(c));
        let e = finetune::finetune(&mut m, &o, &t.path().join("out"), &RunControl::default())
            .err()
            .unwrap_or_else(|| panic!("{option}: accepted"));
        assert_eq!(e.invalid_option(), Some(option), "{e}");
        assert!(e.to_string().contains(&format!("`{option}`")), "{e}");
        assert!(!t.path().join("out").exists(), "{option}: work was done");
    }
}
