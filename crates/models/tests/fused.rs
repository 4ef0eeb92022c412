//! Issue #8: each fused kernel (LayerNorm, RMSNorm, GELU, SiLU·up, RoPE, attention,
//! cross-entropy) equals candle's composed form forward, its hand-written backward equals candle's
//! generic autograd through that composed form, and two of them are checked against central
//! finite differences. Odd sizes, grouped KV heads, causal offsets and key padding included.

use candle_core::{DType, Device, Tensor, Var, D};
use models::fused;

type R<T> = candle_core::Result<T>;

fn rnd(shape: &[usize], seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

fn var(shape: &[usize], seed: u64, scale: f32) -> R<Var> {
    Var::from_vec(rnd(shape, seed, scale), shape, &Device::Cpu)
}

fn max_rel(a: &Tensor, b: &Tensor) -> R<f32> {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    Ok(a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale)
}

/// Forward and gradients (for a fixed random upstream gradient) of `fast` vs `slow` agree.
fn same_grads(
    what: &str,
    vars: &[&Var],
    fast: impl Fn() -> R<Tensor>,
    slow: impl Fn() -> R<Tensor>,
    tol: f32,
) -> R<()> {
    let (yf, ys) = (fast()?, slow()?);
    let e = max_rel(&yf, &ys)?;
    assert!(e < tol, "{what}: forward differs by {e:.2e}");
    let g = Tensor::from_vec(rnd(ys.dims(), 99, 1.0), ys.dims(), &Device::Cpu)?;
    let gf = (yf * &g)?.sum_all()?.backward()?;
    let gs = (ys * &g)?.sum_all()?.backward()?;
    for (i, v) in vars.iter().enumerate() {
        let a = gf.get(v.as_tensor()).expect("fast grad");
        let b = gs.get(v.as_tensor()).expect("slow grad");
        let e = max_rel(a, b)?;
        assert!(e < tol, "{what}: gradient of input {i} differs by {e:.2e}");
    }
    Ok(())
}

fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> R<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

#[test]
fn layer_norm_and_rms_norm_match_composed_forms() -> R<()> {
    for (rows, h) in [(1, 7), (37, 33), (130, 384)] {
        let x = var(&[rows, h], 1, 2.0)?;
        let w = var(&[h], 2, 1.0)?;
        let b = var(&[h], 3, 1.0)?;
        same_grads(
            &format!("layer_norm {rows}x{h}"),
            &[&x, &w, &b],
            || fused::layer_norm(&x, &w, &b, 1e-12),
            || composed_layer_norm(&x, &w, &b, 1e-12),
            2e-5,
        )?;
        same_grads(
            &format!("rms_norm {rows}x{h}"),
            &[&x, &w],
            || fused::rms_norm(&x, &w, 1e-5),
            || candle_nn::ops::rms_norm_slow(&x, &w, 1e-5),
            2e-5,
        )?;
    }
    // 3-D input, frozen weights: only x gets a gradient.
    let x = var(&[2, 5, 16], 4, 1.0)?;
    let w = Tensor::from_vec(rnd(&[16], 5, 1.0), 16, &Device::Cpu)?;
    let b = Tensor::from_vec(rnd(&[16], 6, 1.0), 16, &Device::Cpu)?;
    let y = fused::layer_norm(&x, &w, &b, 1e-5)?;
    let grads = y.sum_all()?.backward()?;
    assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[2, 5, 16]);
    Ok(())
}

#[test]
fn gelu_and_silu_mul_match_candle() -> R<()> {
    // Wide range so both branches of the erf approximation and the tails are hit.
    let x = var(&[3, 1001], 7, 6.0)?;
    same_grads(
        "gelu_erf",
        &[&x],
        || fused::gelu_erf(&x),
        || x.gelu_erf(),
        2e-6,
    )?;
    let g = var(&[5, 77], 8, 8.0)?;
    let u = var(&[5, 77], 9, 2.0)?;
    same_grads(
        "silu_mul",
        &[&g, &u],
        || fused::silu_mul(&g, &u),
        || g.silu()? * u.as_tensor(),
        2e-6,
    )
}

#[test]
fn rope_matches_candle_rope_slow() -> R<()> {
    let (b, t, nh, hd) = (2, 5, 3, 8);
    let x = var(&[b, t, nh, hd], 10, 1.0)?;
    let cos = Tensor::from_vec(rnd(&[t, hd / 2], 11, 1.0), (t, hd / 2), &Device::Cpu)?;
    let sin = Tensor::from_vec(rnd(&[t, hd / 2], 12, 1.0), (t, hd / 2), &Device::Cpu)?;
    same_grads(
        "rope",
        &[&x],
        || fused::rope_bthd(&x, &cos, &sin),
        || {
            candle_nn::rotary_emb::rope_slow(&x.transpose(1, 2)?, &cos, &sin)?
                .transpose(1, 2)?
                .contiguous()
        },
        1e-6,
    )
}

/// softmax(Q·Kᵀ·scale + mask)·V with candle's generic ops, in [b, heads, t, hd] layout.
fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
    key_mask: Option<&Tensor>,
) -> R<Tensor> {
    let (b, t, nh, _) = q.dims4()?;
    let (_, tk, nkv, _) = k.dims4()?;
    let rep = |x: &Tensor| -> R<Tensor> {
        // Repeat each KV head for its query group: [b, T, nkv, hd] → [b, nh, T, hd].
        let xs: Vec<Tensor> = (0..nh)
            .map(|h| x.narrow(2, h / (nh / nkv), 1))
            .collect::<R<_>>()?;
        Tensor::cat(&xs, 2)?.transpose(1, 2)?.contiguous()
    };
    let q = q.transpose(1, 2)?.contiguous()?;
    let (k, v) = (rep(k)?, rep(v)?);
    let mut s = (q.matmul(&k.t()?)? * scale)?;
    let off = tk - t;
    let mut add = vec![0f32; b * t * tk];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..tk {
                if causal && j > i + off {
                    add[(bi * t + i) * tk + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let mut add = Tensor::from_vec(add, (b, 1, t, tk), &Device::Cpu)?;
    if let Some(m) = key_mask {
        add = add.broadcast_add(&m.reshape((b, 1, 1, tk))?)?;
    }
    s = s.broadcast_add(&add)?;
    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

#[test]
fn attention_matches_composed_softmax_attention() -> R<()> {
    // (b, t, T, heads, kv heads, head dim, causal, padded)
    let cases = [
        (2, 7, 7, 4, 4, 8, false, true),  // BERT-like with key padding
        (3, 9, 9, 6, 2, 16, true, false), // llama-like, GQA groups of 3
        (1, 3, 8, 2, 1, 5, true, false),  // queries after a 5-token prefix
        (2, 1, 1, 3, 3, 4, true, true),
        // Several query blocks of the forward, the last one partial, after a prefix.
        (1, 150, 163, 2, 1, 8, true, true),
        (1, 130, 130, 2, 2, 4, false, true),
    ];
    for (ci, &(b, t, tk, nh, nkv, hd, causal, padded)) in cases.iter().enumerate() {
        let q = var(&[b, t, nh, hd], 20 + ci as u64, 1.5)?;
        let k = var(&[b, tk, nkv, hd], 30 + ci as u64, 1.5)?;
        let v = var(&[b, tk, nkv, hd], 40 + ci as u64, 1.0)?;
        let mask = padded.then(|| {
            // Last key of every second row dropped, as a tokenizer's padding would.
            let m: Vec<f32> = (0..b * tk)
                .map(|i| {
                    if i % tk == tk - 1 && (i / tk) % 2 == 1 {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_vec(m, (b, tk), &Device::Cpu).unwrap()
        });
        let scale = 1.0 / (hd as f64).sqrt();
        same_grads(
            &format!("attention case {ci}"),
            &[&q, &k, &v],
            || fused::attention(&q, &k, &v, causal, scale, mask.as_ref()),
            || composed_attention(&q, &k, &v, causal, scale, mask.as_ref()),
            2e-5,
        )?;
    }
    Ok(())
}

#[test]
fn cross_entropy_matches_candle_nn() -> R<()> {
    let x = var(&[9, 13], 50, 4.0)?;
    let y = Tensor::from_vec(
        (0..9u32).map(|i| (i * 5) % 13).collect::<Vec<_>>(),
        9,
        &Device::Cpu,
    )?;
    same_grads(
        "cross_entropy",
        &[&x],
        || fused::cross_entropy(&x, &y),
        || candle_nn::loss::cross_entropy(&x, &y),
        1e-5,
    )?;
    let bad = Tensor::from_vec(vec![13u32; 9], 9, &Device::Cpu)?;
    let e = fused::cross_entropy(&x, &bad).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
    Ok(())
}

/// Central differences of a scalar loss w.r.t. a few entries of one input, in f32 with a
/// step large enough to be above round-off.
fn finite_diff(
    what: &str,
    inputs: &[Vec<f32>],
    shapes: &[&[usize]],
    which: usize,
    loss: impl Fn(&[Tensor]) -> R<Tensor>,
) -> R<()> {
    let mk = |vals: &[Vec<f32>]| -> R<Vec<Tensor>> {
        vals.iter()
            .zip(shapes)
            .map(|(v, s)| Tensor::from_vec(v.clone(), *s, &Device::Cpu))
            .collect()
    };
    let vars: Vec<Var> = inputs
        .iter()
        .zip(shapes)
        .map(|(v, s)| Var::from_vec(v.clone(), *s, &Device::Cpu))
        .collect::<R<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&ts)?.backward()?;
    let g = grads
        .get(&ts[which])
        .unwrap()
        .flatten_all()?
        .to_vec1::<f32>()?;
    let eps = 1e-2f32;
    for idx in (0..inputs[which].len()).step_by(inputs[which].len() / 7 + 1) {
        let mut up = inputs.to_vec();
        up[which][idx] += eps;
        let mut dn = inputs.to_vec();
        dn[which][idx] -= eps;
        let lu = loss(&mk(&up)?)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let ld = loss(&mk(&dn)?)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let fd = (lu - ld) / (2.0 * eps as f64);
        let err = (fd - g[idx] as f64).abs();
        assert!(
            err < 2e-3 * (1.0 + fd.abs()),
            "{what}: d/dx[{idx}] analytic {} vs finite difference {fd}",
            g[idx]
        );
    }
    Ok(())
}

#[test]
fn attention_and_layer_norm_gradients_match_finite_differences() -> R<()> {
    let (b, t, nh, hd) = (1, 4, 2, 3);
    let shape: &[usize] = &[b, t, nh, hd];
    let inputs = vec![
        rnd(shape, 60, 1.0),
        rnd(shape, 61, 1.0),
        rnd(shape, 62, 1.0),
    ];
    let weights = Tensor::from_vec(rnd(&[b * t * nh * hd], 63, 1.0), shape, &Device::Cpu)?;
    for which in 0..3 {
        finite_diff("attention", &inputs, &[shape; 3], which, |x| {
            (fused::attention(&x[0], &x[1], &x[2], true, 0.7, None)? * &weights)?.sum_all()
        })?;
    }
    let ln_in = vec![
        rnd(&[3, 6], 64, 2.0),
        rnd(&[6], 65, 1.0),
        rnd(&[6], 66, 1.0),
    ];
    let wl = Tensor::from_vec(rnd(&[18], 67, 1.0), (3, 6), &Device::Cpu)?;
    for which in 0..3 {
        finite_diff("layer_norm", &ln_in, &[&[3, 6], &[6], &[6]], which, |x| {
            (fused::layer_norm(&x[0], &x[1], &x[2], 1e-5)? * &wl)?.sum_all()
        })?;
    }
    Ok(())
}

/// The chunked head + cross-entropy equals head then cross-entropy: loss and h's gradient,
/// with more rows than one chunk (and a partial last chunk), a scaled upstream gradient, and a
/// trained W falling back to the unfused path (so W gets its gradient too).
#[test]
fn linear_cross_entropy_matches_head_then_cross_entropy() -> R<()> {
    let (n, d, v) = (300, 24, 517);
    let h = var(&[n, d], 61, 1.0)?;
    let w = Tensor::from_vec(rnd(&[v, d], 62, 0.5), (v, d), &Device::Cpu)?;
    let y = Tensor::from_vec(
        (0..n as u32)
            .map(|i| (i * 37 + 5) % v as u32)
            .collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    let fast = fused::linear_cross_entropy(h.as_tensor(), &w, &y)?;
    let slow = fused::cross_entropy(&h.as_tensor().matmul(&w.t()?)?, &y)?;
    let (lf, ls) = (fast.to_scalar::<f32>()?, slow.to_scalar::<f32>()?);
    assert!((lf - ls).abs() <= 1e-5 * ls.abs(), "loss {lf} vs {ls}");
    let gf = (fast * 3.0)?.backward()?;
    let gs = (slow * 3.0)?.backward()?;
    let e = max_rel(
        gf.get(h.as_tensor()).expect("fast grad"),
        gs.get(h.as_tensor()).expect("slow grad"),
    )?;
    assert!(e < 1e-5, "gradient of h differs by {e:.2e}");
    // A trained head: same loss, and both inputs get gradients.
    let wv = Var::from_tensor(&w)?;
    let lt = fused::linear_cross_entropy(h.as_tensor(), wv.as_tensor(), &y)?;
    assert!((lt.to_scalar::<f32>()? - ls).abs() <= 1e-5 * ls.abs());
    let g = lt.backward()?;
    assert!(g.get(wv.as_tensor()).is_some() && g.get(h.as_tensor()).is_some());
    // Without a tracked input there is nothing to keep, and the loss is the same.
    let ld = fused::linear_cross_entropy(&h.as_tensor().detach(), &w, &y)?;
    assert!((ld.to_scalar::<f32>()? - ls).abs() <= 1e-5 * ls.abs());
    let bad = Tensor::from_vec(vec![v as u32; n], n, &Device::Cpu)?;
    let err = fused::linear_cross_entropy(h.as_tensor(), &w, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range"), "{err}");
    Ok(())
}
