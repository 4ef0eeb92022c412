//! Issue #8: the fast Linear kernel equals a naive f64 reference (odd sizes, transposed and
//! strided operands, 3-D inputs, every backend), and its hand-written backward matches candle's
//! generic autograd and central finite differences; frozen inputs get no gradient.

use candle_core::{DType, Device, Tensor, Var};
use models::kernels::{self, Backend, View};

type R<T> = candle_core::Result<T>;

fn rnd(shape: &[usize], seed: u64) -> Vec<f32> {
    // xorshift: deterministic, no RNG state shared between tests.
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn t(shape: &[usize], seed: u64) -> R<Tensor> {
    Tensor::from_vec(rnd(shape, seed), shape, &Device::Cpu)
}

/// Naive f64 y = x·Wᵀ + b on 2-D tensors (any layout: read through to_vec2).
fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> R<Vec<Vec<f64>>> {
    let in_f = *x.dims().last().unwrap();
    let x = x.contiguous()?.reshape(((), in_f))?.to_vec2::<f32>()?;
    let w = w.to_vec2::<f32>()?;
    let b = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    Ok(x.iter()
        .map(|xr| {
            w.iter()
                .enumerate()
                .map(|(j, wr)| {
                    let s: f64 = xr.iter().zip(wr).map(|(a, c)| *a as f64 * *c as f64).sum();
                    s + b.as_ref().map_or(0.0, |b| b[j] as f64)
                })
                .collect()
        })
        .collect())
}

fn close(y: &Tensor, r: &[Vec<f64>], k: usize, what: &str) -> R<()> {
    let n = r.first().map_or(0, |v| v.len());
    let y = y.reshape(((), n))?.to_vec2::<f32>()?;
    assert_eq!(y.len(), r.len(), "{what}: rows");
    let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6;
    for (i, (yr, rr)) in y.iter().zip(r).enumerate() {
        for (j, (a, b)) in yr.iter().zip(rr).enumerate() {
            let e = (*a as f64 - b).abs() / (1.0 + b.abs());
            assert!(
                e <= tol,
                "{what}: ({i},{j}) {a} vs {b} (rel err {e:.2e} > {tol:.1e})"
            );
        }
    }
    Ok(())
}

const SHAPES: [(usize, usize, usize); 13] = [
    (1, 1, 1),
    (1, 3, 17),
    (3, 17, 129),
    (7, 300, 301),  // multi-row gemv: a 4-row pass and 3 left, parallel
    (15, 37, 2100), // multi-row gemv: 3 passes + 3, odd k, parallel
    (6, 8, 5),      // multi-row gemv: k of one vector exactly
    (17, 129, 3),
    (129, 17, 5),
    (1, 129, 1030),
    (1, 300, 301), // parallel gemv path
    (2, 64, 64),
    (65, 96, 130), // parallel GEMM path
    (513, 31, 9),  // ≥ 512 rows: the faer path
];

#[test]
fn forward_matches_naive_reference_on_odd_shapes_and_layouts() -> R<()> {
    for (si, &(m, k, n)) in SHAPES.iter().enumerate() {
        let s = si as u64 * 100;
        let x = t(&[m, k], s + 1)?;
        let w = t(&[n, k], s + 2)?;
        let b = t(&[n], s + 3)?;
        let r = reference(&x, &w, None)?;
        let rb = reference(&x, &w, Some(&b))?;
        let tag = format!("{m}x{k}x{n}");
        close(
            &kernels::linear(&x, &w, None)?,
            &r,
            k,
            &format!("{tag} plain"),
        )?;
        close(
            &kernels::linear(&x, &w, Some(&b))?,
            &rb,
            k,
            &format!("{tag} bias"),
        )?;
        // Transposed x (column-major storage) and transposed W view.
        let xt = x.t()?.contiguous()?.t()?;
        let wt = w.t()?.contiguous()?.t()?;
        assert!(!xt.is_contiguous() || m == 1 || k == 1);
        close(
            &kernels::linear(&xt, &w, None)?,
            &r,
            k,
            &format!("{tag} xᵀ"),
        )?;
        close(
            &kernels::linear(&x, &wt, Some(&b))?,
            &rb,
            k,
            &format!("{tag} Wᵀ"),
        )?;
        close(
            &kernels::linear(&xt, &wt, None)?,
            &r,
            k,
            &format!("{tag} xᵀ Wᵀ"),
        )?;
        // Strided: column slices of wider tensors, bias a strided column.
        let xs =
            Tensor::cat(&[&t(&[m, 2], s + 4)?, &x, &t(&[m, 3], s + 5)?], 1)?.narrow(1, 2, k)?;
        let ws = Tensor::cat(&[&w, &t(&[n, 1], s + 6)?], 1)?.narrow(1, 0, k)?;
        let bs = Tensor::stack(&[&b, &b.affine(2.0, 1.0)?], 1)?
            .narrow(1, 0, 1)?
            .squeeze(1)?;
        assert_eq!(bs.stride(), &[2]);
        close(
            &kernels::linear(&xs, &ws, Some(&bs))?,
            &rb,
            k,
            &format!("{tag} strided"),
        )?;
        // 3-D x, contiguous and with leading dims that do not merge.
        let x3 = x
            .reshape((1, m, k))?
            .broadcast_as((2, m, k))?
            .contiguous()?;
        let y3 = kernels::linear(&x3, &w, Some(&b))?;
        assert_eq!(y3.dims(), &[2, m, n]);
        close(&y3.get(1)?, &rb, k, &format!("{tag} 3-D"))?;
        let xp = x3.transpose(0, 1)?.contiguous()?.transpose(0, 1)?; // [2, m, k], strides (k, 2k, 1)
        assert!(!xp.is_contiguous() || m == 1);
        let yp = kernels::linear(&xp, &w, None)?;
        close(&yp.get(0)?, &r, k, &format!("{tag} 3-D permuted"))?;
        close(&yp.get(1)?, &r, k, &format!("{tag} 3-D permuted"))?;
        // 1-D x.
        let y1 = kernels::linear(&x.get(0)?, &w, Some(&b))?;
        assert_eq!(y1.dims(), &[n]);
        close(&y1.unsqueeze(0)?, &rb[..1], k, &format!("{tag} 1-D"))?;
    }
    Ok(())
}

#[test]
fn every_backend_matches_the_reference_with_accumulate() -> R<()> {
    for (si, &(m, k, n)) in SHAPES.iter().enumerate() {
        let s = si as u64 * 100 + 7;
        let x = t(&[m, k], s)?;
        let w = t(&[n, k], s + 1)?;
        let r = reference(&x, &w, None)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        // W stored column-major as well: b = Wᵀ with unit row stride vs unit column stride.
        let wcm = w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let xv = View {
            data: &xs,
            rows: m,
            cols: k,
            rs: k,
            cs: 1,
        };
        let wrow = View {
            data: &ws,
            rows: n,
            cols: k,
            rs: k,
            cs: 1,
        }
        .t();
        let wcol = View {
            data: &wcm,
            rows: n,
            cols: k,
            rs: 1,
            cs: n,
        }
        .t();
        for be in [Backend::Auto, Backend::Gemm, Backend::Faer, Backend::Gemv] {
            for (bv, lay) in [(wrow, "rows"), (wcol, "cols")] {
                let mut dst = vec![1.0f32; m * n];
                kernels::gemm_into(&mut dst, xv, bv, true, be)?;
                let rr: Vec<Vec<f64>> = r
                    .iter()
                    .map(|v| v.iter().map(|a| a + 1.0).collect())
                    .collect();
                let y = Tensor::from_vec(dst, (m, n), &Device::Cpu)?;
                close(
                    &y,
                    &rr,
                    k,
                    &format!("{m}x{k}x{n} {be:?} W {lay} accumulate"),
                )?;
                let mut dst = vec![f32::NAN; m * n];
                kernels::gemm_into(&mut dst, xv, bv, false, be)?;
                let y = Tensor::from_vec(dst, (m, n), &Device::Cpu)?;
                close(&y, &r, k, &format!("{m}x{k}x{n} {be:?} W {lay} overwrite"))?;
            }
        }
    }
    Ok(())
}

fn assert_tensors_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) -> R<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(d <= tol * (1.0 + s), "{what}: max |diff| {d} (scale {s})");
    Ok(())
}

/// Gradients of loss = Σ r ⊙ y² (and of mean(y)) w.r.t. x, W, b: fast op vs candle's autograd.
#[test]
fn gradients_match_candle_autograd() -> R<()> {
    for (si, &(m, k, n)) in [
        (1, 3, 17),
        (5, 17, 129),
        (33, 64, 7),
        (65, 96, 130),
        (520, 24, 10),
    ]
    .iter()
    .enumerate()
    {
        let s = si as u64 * 10 + 1000;
        for three_d in [false, true] {
            let xshape: Vec<usize> = if three_d { vec![2, m, k] } else { vec![m, k] };
            let x = Var::from_tensor(&t(&xshape, s)?)?;
            let w = Var::from_tensor(&t(&[n, k], s + 1)?)?;
            let b = Var::from_tensor(&t(&[n], s + 2)?)?;
            let mut yshape = xshape.clone();
            *yshape.last_mut().unwrap() = n;
            let r = t(&yshape, s + 3)?;
            for bias in [false, true] {
                let bb = bias.then_some(b.as_tensor());
                let run = |fast: bool, mean: bool| -> R<Vec<Option<Tensor>>> {
                    // x reaches the op through a transposed view (non-contiguous input).
                    let xin = if three_d {
                        x.as_tensor().clone()
                    } else {
                        x.t()?.t()?
                    };
                    let y = if fast {
                        kernels::linear(&xin, &w, bb)?
                    } else {
                        kernels::generic_linear(&xin, &w, bb)?
                    };
                    let loss = if mean {
                        y.mean_all()?
                    } else {
                        (y.sqr()? * &r)?.sum_all()?
                    };
                    let g = loss.backward()?;
                    Ok(vec![
                        g.get(&x).cloned(),
                        g.get(&w).cloned(),
                        if bias { g.get(&b).cloned() } else { None },
                    ])
                };
                for mean in [false, true] {
                    let a = run(true, mean)?;
                    let c = run(false, mean)?;
                    for (i, name) in ["x", "W", "b"].iter().enumerate() {
                        let what =
                            format!("{m}x{k}x{n} 3d={three_d} bias={bias} mean={mean} d{name}");
                        match (&a[i], &c[i]) {
                            (Some(a), Some(c)) => assert_tensors_close(a, c, 1e-4, &what)?,
                            (None, None) => assert!(i == 2 && !bias, "{what}: missing"),
                            _ => panic!("{what}: one side has no gradient"),
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Central finite differences in f64 arithmetic on the loss Σ r ⊙ y² (exact for a quadratic up to
/// rounding), for a few coordinates of each of x, W, b.
#[test]
fn gradients_match_finite_differences() -> R<()> {
    let (m, k, n) = (4, 9, 6);
    let xs = t(&[m, k], 1)?;
    let ws = t(&[n, k], 2)?;
    let bs = t(&[n], 3)?;
    let r = t(&[m, n], 4)?;
    let x = Var::from_tensor(&xs)?;
    let w = Var::from_tensor(&ws)?;
    let b = Var::from_tensor(&bs)?;
    let y = kernels::linear(&x, &w, Some(&b))?;
    let g = (y.sqr()? * &r)?.sum_all()?.backward()?;
    let loss64 = |x: &Tensor, w: &Tensor, b: &Tensor| -> R<f64> {
        let (x, w, b, r) = (
            x.to_dtype(DType::F64)?,
            w.to_dtype(DType::F64)?,
            b.to_dtype(DType::F64)?,
            r.to_dtype(DType::F64)?,
        );
        // f64 goes through the generic path: the reference arithmetic.
        let y = kernels::linear(&x, &w, Some(&b))?;
        (y.sqr()? * r)?.sum_all()?.to_scalar::<f64>()
    };
    let eps = 1e-3f64;
    let which: [(&str, &Tensor, &Var); 3] = [("x", &xs, &x), ("W", &ws, &w), ("b", &bs, &b)];
    for (name, base, var) in which {
        let grad = g
            .get(var)
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let flat = base.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for idx in [0, flat.len() / 2, flat.len() - 1] {
            let at = |d: f64| -> R<Tensor> {
                let mut v = flat.clone();
                v[idx] += d;
                Tensor::from_vec(v, base.dims(), &Device::Cpu)
            };
            let args = |p: Tensor| -> [Tensor; 3] {
                match name {
                    "x" => [p, ws.clone(), bs.clone()],
                    "W" => [xs.clone(), p, bs.clone()],
                    _ => [xs.clone(), ws.clone(), p],
                }
            };
            let [a1, a2, a3] = args(at(eps)?);
            let [c1, c2, c3] = args(at(-eps)?);
            let fd = (loss64(&a1, &a2, &a3)? - loss64(&c1, &c2, &c3)?) / (2.0 * eps);
            let an = grad[idx] as f64;
            assert!(
                (fd - an).abs() <= 1e-4 * (1.0 + fd.abs()),
                "d{name}[{idx}]: analytic {an} vs finite difference {fd}"
            );
        }
    }
    Ok(())
}

#[test]
fn frozen_inputs_get_no_gradient() -> R<()> {
    let x = Var::from_tensor(&t(&[2, 5, 8], 11)?)?;
    let w_frozen = t(&[6, 8], 12)?;
    let b = Var::from_tensor(&t(&[6], 13)?)?;
    // Frozen W: no weight gradient, x and b still get theirs (equal to the generic path's).
    let y = kernels::linear(&x, &w_frozen, Some(&b))?;
    let g = y.sqr()?.sum_all()?.backward()?;
    assert!(
        g.get(&w_frozen).is_none(),
        "frozen W must not get a gradient"
    );
    let gx = g.get(&x).expect("x gradient");
    assert!(g.get(&b).is_some());
    let yc = kernels::generic_linear(&x, &w_frozen, Some(&b))?;
    let gc = yc.sqr()?.sum_all()?.backward()?;
    assert_tensors_close(gx, gc.get(&x).unwrap(), 1e-5, "dx with frozen W")?;
    assert_tensors_close(
        g.get(&b).unwrap(),
        gc.get(&b).unwrap(),
        1e-5,
        "db with frozen W",
    )?;
    // Constant input, trainable W (a first layer): no gradient for x, one for W.
    let xc = t(&[3, 8], 14)?;
    let w = Var::from_tensor(&w_frozen)?;
    let g = kernels::linear(&xc, &w, None)?.sum_all()?.backward()?;
    assert!(g.get(&xc).is_none());
    assert!(g.get(&w).is_some());
    // Frozen bias: no bias gradient.
    let bf = t(&[6], 15)?;
    let g = kernels::linear(&x, &w, Some(&bf))?.sum_all()?.backward()?;
    assert!(g.get(&bf).is_none());
    assert!(g.get(&w).is_some() && g.get(&x).is_some());
    // W computed from a trainable tensor (as MPO / LoRA merges do) is tracked through.
    let base = Var::from_tensor(&t(&[8, 6], 16)?)?;
    let wd = base.t()?; // transposed view as weight
    let g = kernels::linear(&xc, &wd, None)?
        .sqr()?
        .sum_all()?
        .backward()?;
    let gc = kernels::generic_linear(&xc, &wd, None)?
        .sqr()?
        .sum_all()?
        .backward()?;
    assert_tensors_close(
        g.get(&base).unwrap(),
        gc.get(&base).unwrap(),
        1e-5,
        "d base",
    )?;
    Ok(())
}

#[test]
fn non_f32_takes_the_generic_path() -> R<()> {
    let x = t(&[3, 5], 21)?.to_dtype(DType::F64)?;
    let w = t(&[4, 5], 22)?.to_dtype(DType::F64)?;
    let y = kernels::linear(&x, &w, None)?;
    assert_eq!(y.dtype(), DType::F64);
    let r = reference(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, None)?;
    close(&y.to_dtype(DType::F32)?, &r, 5, "f64")?;
    // Dense and matmul_t go through the kernel for f32.
    let x = t(&[2, 3, 5], 23)?;
    let w = t(&[4, 5], 24)?;
    let b = t(&[4], 25)?;
    let lin = models::Linear::dense(w.clone(), Some(b.clone()));
    let y = candle_core::Module::forward(&lin, &x)?;
    close(&y, &reference(&x, &w, Some(&b))?, 5, "Dense")?;
    close(
        &models::linear::matmul_t(&x, &w)?,
        &reference(&x, &w, None)?,
        5,
        "matmul_t",
    )?;
    Ok(())
}

/// The f16 Linear equals the f32 Linear of the same (f16-rounded) weights: forward at decode
/// (gemv) and prefill (converted tiles, several tiles) sizes, the input gradient, and embedding
/// rows.
#[test]
fn half_linear_matches_the_f32_layer_of_its_weights() -> R<()> {
    use models::half::HalfDense;
    use models::LinearLayer;
    // 700 rows × 400 columns: 280 000 elements, more than one 256 Ki-element tile.
    let (n, k) = (700, 400);
    let w = t(&[n, k], 91)?.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    let b = t(&[n], 92)?;
    let h = HalfDense::new(&w, Some(b.clone()))?;
    assert_eq!(h.storage_bytes(), 2 * n * k + 4 * n);
    assert_eq!(h.weight()?.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
    // A wrong input width is refused in one line naming the layer kind and both sizes.
    let e = h.forward(&t(&[3, k + 1], 90)?).unwrap_err().to_string();
    // (candle appends a backtrace when RUST_BACKTRACE is set)
    let e = e.lines().next().unwrap_or_default();
    assert_eq!(
        e,
        format!(
            "f16 linear: input [3, {}] does not end in {k} features",
            k + 1
        )
    );
    for m in [1, 5, 15, 40] {
        let x = t(&[m, k], 93 + m as u64)?;
        let r = reference(&x, &w, Some(&b))?;
        close(&h.forward(&x)?, &r, k, &format!("f16 linear m={m}"))?;
        // Input gradient of sum(y ⊙ c) against the f32 layer under candle's autograd.
        let c = t(&[m, n], 97)?;
        let xv = Var::from_tensor(&x)?;
        let gh = h.forward(xv.as_tensor())?.mul(&c)?.sum_all()?.backward()?;
        let xv2 = Var::from_tensor(&x)?;
        let gd = kernels::generic_linear(xv2.as_tensor(), &w, Some(&b))?
            .mul(&c)?
            .sum_all()?
            .backward()?;
        assert_tensors_close(
            gh.get(&xv).unwrap(),
            gd.get(&xv2).unwrap(),
            1e-4,
            &format!("f16 linear grad m={m}"),
        )?;
    }
    let ids = Tensor::new(&[0u32, 699, 3, 3], &Device::Cpu)?;
    assert_eq!(
        h.embed(&ids)?.to_vec2::<f32>()?,
        w.index_select(&ids, 0)?.to_vec2::<f32>()?
    );
    assert!(h.embed(&Tensor::new(&[700u32], &Device::Cpu)?).is_err());
    Ok(())
}
