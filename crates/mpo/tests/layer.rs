//! candle layers: the rebuild and contract paths agree, gradients reach every core and match
//! finite differences, trainable flags freeze cores, embeddings and the tied head.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use common::{dense_linear, gaussian, rel_diff, shape_strategy};
use mpo::{
    DecomposeOptions, ForwardMode, Mpo, MpoCores, MpoEmbedding, MpoLinear, MpoShape, Truncation,
};
use proptest::prelude::*;

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn decomposed(shape: &MpoShape, seed: u64, max_bond: usize) -> (Vec<f64>, Mpo<f64>) {
    let w = gaussian(shape.orig_rows * shape.orig_cols, seed);
    let m = Mpo::decompose_with(
        &w,
        shape,
        &DecomposeOptions::truncated(Truncation::MaxBond(max_bond)),
    )
    .unwrap();
    (w, m)
}

proptest! {
    #![proptest_config(common::config(32))]

    /// f32: y = xWᵀ + b by rebuilding W and by contracting x through the cores agree to 1e-5
    /// relative, and both match the dense product with the reconstructed matrix.
    #[test]
    fn forward_paths_agree_f32(shape in shape_strategy(4096), seed in 0u64..1000, d in 1usize..8, batch in 1usize..6) {
        let (_, m) = decomposed(&shape, seed, d);
        let what = m.to_matrix().unwrap();
        let bias = gaussian(shape.orig_rows, seed + 1);
        let b32: Vec<f32> = bias.iter().map(|&x| x as f32).collect();
        let dev = Device::Cpu;
        let layer = MpoLinear::from_mpo(&m.cast::<f32>(), Some(&b32), &dev).unwrap();
        let x = gaussian(batch * 2 * shape.orig_cols, seed + 2);
        let xt = Tensor::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), (batch, 2, shape.orig_cols), &dev).unwrap();
        let yr = layer.forward_with(&xt, ForwardMode::Rebuild).unwrap();
        let yc = layer.forward_with(&xt, ForwardMode::Contract).unwrap();
        let ya = layer.forward(&xt).unwrap();
        prop_assert_eq!(yr.dims(), &[batch, 2, shape.orig_rows][..]);
        prop_assert_eq!(yc.dims(), yr.dims());
        let (vr, vc, va) = (to_vec(&yr), to_vec(&yc), to_vec(&ya));
        prop_assert!(rel_diff(&vc, &vr) < 1e-5, "contract vs rebuild: {}", rel_diff(&vc, &vr));
        prop_assert!(rel_diff(&va, &vr) < 1e-5);
        let reference = dense_linear(&x, &what, Some(&bias), batch * 2, shape.orig_cols, shape.orig_rows);
        prop_assert!(rel_diff(&vr, &reference) < 1e-5, "rebuild vs dense: {}", rel_diff(&vr, &reference));
    }

    /// Gradients reach every core through both paths, and the two paths give the same ones.
    #[test]
    fn gradients_reach_every_core(shape in shape_strategy(4096), seed in 0u64..1000, d in 1usize..6) {
        let (_, m) = decomposed(&shape, seed, d);
        let dev = Device::Cpu;
        let layer = MpoLinear::from_mpo(&m, None, &dev).unwrap();
        let x = Tensor::from_vec(gaussian(3 * shape.orig_cols, seed + 5), (3, shape.orig_cols), &dev).unwrap();
        let r = Tensor::from_vec(gaussian(3 * shape.orig_rows, seed + 6), (3, shape.orig_rows), &dev).unwrap();
        let mut grads = Vec::new();
        for mode in [ForwardMode::Rebuild, ForwardMode::Contract] {
            let loss = (layer.forward_with(&x, mode).unwrap() * &r).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let per_core: Vec<Vec<f64>> = layer.cores().vars().iter().map(|v| {
                to_vec(g.get(v.as_tensor()).expect("every core gets a gradient"))
            }).collect();
            grads.push(per_core);
        }
        for (a, b) in grads[0].iter().zip(&grads[1]) {
            prop_assert_eq!(a.len(), b.len());
            let scale = a.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
            prop_assert!(diff / scale < 1e-9, "gradient paths differ: {}", diff / scale);
        }
    }
}

/// Autograd against central finite differences (f64), for every core and both paths.
#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let shape = MpoShape::new(vec![2, 3, 2], vec![3, 1, 2], 11, 6).unwrap();
    let (_, m) = decomposed(&shape, 21, 3);
    let x = Tensor::from_vec(gaussian(4 * 6, 22), (4, 6), &dev).unwrap();
    let r = Tensor::from_vec(gaussian(4 * 11, 23), (4, 11), &dev).unwrap();
    let bias = gaussian(11, 24);
    let layer = MpoLinear::from_mpo(&m, Some(&bias), &dev).unwrap();
    for mode in [ForwardMode::Rebuild, ForwardMode::Contract] {
        let loss_of = |l: &MpoLinear| -> f64 {
            (l.forward_with(&x, mode).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let loss = (layer.forward_with(&x, mode).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut vars: Vec<Var> = layer.cores().vars().to_vec();
        vars.push(layer.bias().unwrap().clone());
        for var in &vars {
            let g = to_vec(grads.get(var.as_tensor()).unwrap());
            let base = to_vec(var.as_tensor());
            let dims = var.as_tensor().dims().to_vec();
            for idx in (0..base.len()).step_by((base.len() / 7).max(1)) {
                let h = 1e-6;
                let mut plus = base.clone();
                plus[idx] += h;
                var.set(&Tensor::from_vec(plus, dims.clone(), &dev).unwrap())
                    .unwrap();
                let lp = loss_of(&layer);
                let mut minus = base.clone();
                minus[idx] -= h;
                var.set(&Tensor::from_vec(minus, dims.clone(), &dev).unwrap())
                    .unwrap();
                let lm = loss_of(&layer);
                var.set(&Tensor::from_vec(base.clone(), dims.clone(), &dev).unwrap())
                    .unwrap();
                let fd = (lp - lm) / (2.0 * h);
                assert!(
                    (fd - g[idx]).abs() <= 1e-6 * (1.0 + g[idx].abs()),
                    "{mode:?} {dims:?}[{idx}]: fd {fd} vs autograd {}",
                    g[idx]
                );
            }
        }
    }
}

#[test]
fn trainable_flags_freeze_cores() {
    let dev = Device::Cpu;
    let shape = MpoShape::exact(vec![2, 2, 3, 2, 2], vec![2, 3, 2, 2, 1]).unwrap();
    let (_, m) = decomposed(&shape, 3, 100);
    let mut layer = MpoLinear::from_mpo(&m, Some(&gaussian(48, 4)), &dev).unwrap();
    let x = Tensor::from_vec(gaussian(2 * 24, 5), (2, 24), &dev).unwrap();
    layer.cores_mut().freeze_central();
    assert_eq!(layer.trainable_vars().len(), 4 + 1);
    for mode in [ForwardMode::Rebuild, ForwardMode::Contract] {
        let g = layer
            .forward_with(&x, mode)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (k, v) in layer.cores().vars().iter().enumerate() {
            assert_eq!(g.get(v.as_tensor()).is_some(), k != 2, "{mode:?} core {k}");
        }
        assert!(g.get(layer.bias().unwrap().as_tensor()).is_some());
    }
    layer.cores_mut().train_only_central();
    layer.set_bias_trainable(false);
    assert_eq!(layer.trainable_vars().len(), 1);
    let g = layer
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (k, v) in layer.cores().vars().iter().enumerate() {
        assert_eq!(g.get(v.as_tensor()).is_some(), k == 2);
    }
    assert!(g.get(layer.bias().unwrap().as_tensor()).is_none());
    layer.cores_mut().set_all_trainable(false);
    assert!(layer.trainable_vars().is_empty());
}

#[test]
fn shared_central_tensor_collects_both_gradients() {
    // MPOE: experts share the central tensor, auxiliaries are per expert.
    let dev = Device::Cpu;
    let shape = MpoShape::exact(vec![2, 3, 2], vec![2, 2, 2]).unwrap();
    let (_, m) = decomposed(&shape, 8, 100);
    let e1 = MpoCores::from_mpo(&m, &dev).unwrap();
    let mut e2 = MpoCores::from_mpo(&m, &dev).unwrap();
    e2.set_var(1, e1.var(1).clone()).unwrap();
    let (l1, l2) = (
        MpoLinear::new(e1, None).unwrap(),
        MpoLinear::new(e2, None).unwrap(),
    );
    let x = Tensor::from_vec(gaussian(3 * 8, 9), (3, 8), &dev).unwrap();
    let g1 = l1
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = l2
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let both = (l1.forward(&x).unwrap().sum_all().unwrap()
        + l2.forward(&x).unwrap().sum_all().unwrap())
    .unwrap()
    .backward()
    .unwrap();
    let c = l1.cores().var(1).as_tensor();
    let sum: Vec<f64> = to_vec(g1.get(c).unwrap())
        .iter()
        .zip(to_vec(g2.get(c).unwrap()))
        .map(|(a, b)| a + b)
        .collect();
    assert!(rel_diff(&to_vec(both.get(c).unwrap()), &sum) < 1e-12);
    // a mismatched replacement is rejected
    let mut e3 = MpoCores::from_mpo(&m, &dev).unwrap();
    assert!(e3.set_var(0, l1.cores().var(1).clone()).is_err());
}

#[test]
fn embedding_paths_and_tied_head() {
    let dev = Device::Cpu;
    // 61-row vocabulary (prime) padded by the automatic factorization
    let shape = MpoShape::auto(61, 12, 3).unwrap();
    assert!(shape.is_padded());
    let (_, m) = decomposed(&shape, 12, 6);
    let what = m.to_matrix().unwrap();
    let emb = MpoEmbedding::from_mpo(&m.cast::<f32>(), &dev).unwrap();
    let ids_v: Vec<u32> = vec![0, 5, 60, 17, 17, 33];
    let ids = Tensor::from_vec(ids_v.clone(), (2, 3), &dev).unwrap();
    let rc = emb.forward_with(&ids, ForwardMode::Contract).unwrap();
    let rr = emb.forward_with(&ids, ForwardMode::Rebuild).unwrap();
    let ra = emb.forward(&ids).unwrap();
    assert_eq!(rc.dims(), &[2, 3, 12]);
    let expect: Vec<f64> = ids_v
        .iter()
        .flat_map(|&i| what[i as usize * 12..(i as usize + 1) * 12].to_vec())
        .collect();
    assert!(rel_diff(&to_vec(&rc), &expect) < 1e-5);
    assert!(rel_diff(&to_vec(&rr), &expect) < 1e-5);
    assert!(rel_diff(&to_vec(&ra), &expect) < 1e-5);
    assert!(emb
        .forward(&Tensor::from_vec(vec![61u32], 1, &dev).unwrap())
        .is_err());
    // tied head: logits = x Wᵀ over the 61 rows
    let x = gaussian(4 * 12, 13);
    let xt = Tensor::from_vec(
        x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (4, 12),
        &dev,
    )
    .unwrap();
    let reference = dense_linear(&x, &what, None, 4, 12, 61);
    for mode in [ForwardMode::Rebuild, ForwardMode::Contract] {
        let logits = emb.lm_head(&xt, mode).unwrap();
        assert_eq!(logits.dims(), &[4, 61]);
        assert!(rel_diff(&to_vec(&logits), &reference) < 1e-5);
    }
    // gradients through the contract path reach every core
    let g = emb
        .forward_with(&ids, ForwardMode::Contract)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in emb.cores().vars() {
        assert!(g.get(v.as_tensor()).is_some());
    }
}

#[test]
fn layer_exports_and_dense() {
    let dev = Device::Cpu;
    let shape = mpo::preset("balanced-768x768").unwrap();
    let (w, m) = decomposed(&shape, 30, 10_000);
    let layer = MpoLinear::from_mpo(&m.cast::<f32>(), None, &dev).unwrap();
    let dense = to_vec(&layer.to_dense().unwrap());
    assert!(rel_diff(&dense, &w) < 1e-5);
    let back: Mpo<f32> = layer.cores().to_mpo().unwrap();
    assert_eq!(back.cores, m.cast::<f32>().cores);
    assert_eq!(back.spectra, m.spectra);
    assert_eq!(layer.cores().num_params(), 663_840);
    assert_eq!(layer.cores().bonds(), vec![1, 12, 192, 192, 12, 1]);
    // wrong feature count is an error, not a panic
    let bad = Tensor::zeros((2, 767), DType::F32, &dev).unwrap();
    assert!(layer.forward_with(&bad, ForwardMode::Contract).is_err());
    assert!(layer.forward_with(&bad, ForwardMode::Rebuild).is_err());
}
