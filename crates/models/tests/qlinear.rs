//! The quantized GGUF Linear (`QLinear`) against an f64 product with the dequantized weights,
//! for every block type it accepts, on both of its paths and at decode and batch sizes; the
//! block-wise q/k row permutation against the f32 one; and whole models loaded with
//! `GgufWeights::Quantized` against the same files dequantized to f32.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, IndexOp, Tensor};
use models::qlinear::{unpermute_rows, QLinear, QPath};
use models::CausalLm;
use models::{GgufWeights, LinearLayer, Model};
use rand::{Rng, SeedableRng};

const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The types with an int8 kernel in `models::qdot` (blocks of 32, any multiple of 32 columns).
fn qdot_types() -> impl Iterator<Item = GgmlDType> {
    [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
    ]
    .into_iter()
}

fn randn(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    // Sum of uniforms: cheap, roughly normal, with a few larger entries per block.
    (0..n)
        .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 1.7)
        .collect()
}

/// Block width of the activation quantization candle's int8 dot product uses for `t`
/// (Q8_0/Q8_1 blocks of 32 for the legacy types, Q8_K blocks of 256 for the K types).
fn act_block(t: GgmlDType) -> usize {
    use GgmlDType::*;
    match t {
        Q2K | Q3K | Q4K | Q5K | Q6K => 256,
        _ => 32,
    }
}

/// Checks y (m×n) against x·wdᵀ in f64. `ab`: the int8 path rounds each activation
/// block to int8 with step amax/127 (Q8_K: amax/128), so |Δy_i| ≤ Σ_blocks step/2 · Σ_blk |w_ij|
/// — a per-output bound, plus f32 summation slack. Without it (tiled path) only the slack.
fn check(y: &[f32], x: &[f32], wd: &[f32], m: usize, n: usize, k: usize, ab: Option<usize>) {
    let mut err2 = 0f64;
    let mut ref2 = 0f64;
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for i in 0..n {
            let wr = &wd[i * k..(i + 1) * k];
            let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = xr
                .iter()
                .zip(wr)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let mut bound = 1e-5 * mag + 1e-5;
            if let Some(bs) = ab {
                for (xb, wb) in xr.chunks(bs).zip(wr.chunks(bs)) {
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                    bound += amax / 127.0 / 2.0 * wsum;
                }
            }
            let got = y[r * n + i] as f64;
            assert!(
                (got - exact).abs() <= bound,
                "row {r} out {i}: got {got}, want {exact} (bound {bound})"
            );
            err2 += (got - exact).powi(2);
            ref2 += exact.powi(2);
        }
    }
    // The bound is worst-case; the typical error of int8 activations is far smaller.
    let rel = (err2 / ref2).sqrt();
    eprintln!("  rel rms {rel:.3e}");
    let lim = if ab.is_some() { 0.02 } else { 1e-5 };
    assert!(rel <= lim, "relative rms error {rel} > {lim}");
}

#[test]
fn every_type_both_paths_decode_and_batch() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // 544 = 17 blocks of 32: the eight-block int8 kernel's main loop plus a one-block tail.
    for (t, k) in TYPES
        .into_iter()
        .map(|t| (t, 512))
        .chain(qdot_types().map(|t| (t, 544)))
    {
        let n = 37;
        let w = Tensor::from_vec(randn(&mut rng, n * k), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, t).unwrap();
        let wd: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for m in [1usize, 3, 17, 40] {
            let x = randn(&mut rng, m * k);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            for path in [QPath::Int8, QPath::Candle, QPath::Tiled, QPath::Auto] {
                let l = QLinear::new(QTensor::quantize(&w, t).unwrap(), None)
                    .unwrap()
                    .with_path(path);
                let y: Vec<f32> = l
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let quant_act = match path {
                    QPath::Tiled => false,
                    QPath::Auto => QLinear::prefers_int8(t, m),
                    _ => true,
                };
                let ab = quant_act.then(|| act_block(t));
                eprintln!("{t:?} m={m} {path:?}");
                check(&y, &x, &wd, m, n, k, ab);
            }
        }
    }
}

#[test]
fn bias_leading_dims_and_bytes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (n, k) = (24, 256);
    let w = Tensor::from_vec(randn(&mut rng, n * k), (n, k), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(randn(&mut rng, n), n, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
    let wd = q.dequantize(&Device::Cpu).unwrap();
    let l = QLinear::new(q, Some(b.clone()))
        .unwrap()
        .with_path(QPath::Tiled);
    let x = Tensor::from_vec(randn(&mut rng, 2 * 9 * k), (2, 9, k), &Device::Cpu).unwrap();
    let y = l.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 9, n]);
    let want = x
        .broadcast_matmul(&wd.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let d = models::testing::max_abs_diff(&y, &want);
    assert!(d < 1e-4, "max |Δ| = {d}");
    // Q4_0: 18 bytes per 32 weights, plus the f32 bias.
    assert_eq!(l.storage_bytes(), n * k / 32 * 18 + 4 * n);
    assert_eq!(l.kind(), "gguf-q4_0");
    // Embedding rows are the dequantized rows.
    let ids = Tensor::new(&[3u32, 0, 23], &Device::Cpu).unwrap();
    let e = l.embed(&ids).unwrap();
    let want = wd.index_select(&ids, 0).unwrap();
    assert_eq!(models::testing::max_abs_diff(&e, &want), 0.0);
}

#[test]
fn row_unpermute_matches_f32_unpermute() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // 3 heads of dim 8 (q) and a K type with 256-wide blocks.
    for (t, heads, k) in [(GgmlDType::Q4_1, 3, 64), (GgmlDType::Q6K, 2, 256)] {
        let rows = heads * 8;
        let w = Tensor::from_vec(randn(&mut rng, rows * k), (rows, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, t).unwrap();
        let want = models::gguf::unpermute(&q.dequantize(&Device::Cpu).unwrap(), heads).unwrap();
        let got = unpermute_rows(&q, heads)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(models::testing::max_abs_diff(&got, &want), 0.0, "{t:?}");
        // And it is not the identity (so the check above is not vacuous).
        assert!(models::testing::max_abs_diff(&got, &q.dequantize(&Device::Cpu).unwrap()) > 0.1);
    }
}

#[test]
fn unsupported_types_are_one_line_errors() {
    let w = Tensor::ones((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    for (t, want) in [
        (
            GgmlDType::Q8K,
            "GGUF type Q8_K cannot back a quantized linear layer",
        ),
        (
            GgmlDType::F16,
            "GGUF type F16 cannot back a quantized linear layer",
        ),
    ] {
        let e = QLinear::new(QTensor::quantize(&w, t).unwrap(), None)
            .unwrap_err()
            .to_string();
        // candle appends a backtrace on later lines when RUST_BACKTRACE is set; the message
        // itself must be complete on its first line.
        let first = e.lines().next().unwrap();
        assert!(
            first.starts_with(want) && first.ends_with("load with `gguf_weights` f32"),
            "{e}"
        );
    }
    let b = Tensor::ones(5, candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = QLinear::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(), Some(b))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias has shape [5], want [4]"), "{e}");
}

/// Last-position logits of `ids` with a full forward (prefill: the tiled, exact path), then
/// the logits of one more token through the KV cache (decode: the int8 path).
fn prefill_and_step(m: &Model, ids: &[u32], next: u32) -> (Tensor, Tensor) {
    let l = m.llama().unwrap();
    let mut cache = l.new_cache();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = l.forward_hidden(&x, Some(&mut cache), None).unwrap();
    let a = l.head(&h).unwrap().i((0, ids.len() - 1)).unwrap();
    let x = Tensor::new(&[next], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = l.forward_hidden(&x, Some(&mut cache), None).unwrap();
    let b = l.head(&h).unwrap().i((0, 0)).unwrap();
    (a, b)
}

fn compare_model(alias: &str, decode_tol: f32) {
    let f = Model::load_with(alias, false, GgufWeights::F32).unwrap();
    let q = Model::load_with(alias, false, GgufWeights::Quantized).unwrap();
    // Every block-typed matrix is held quantized, and the model shrinks accordingly.
    let kinds: Vec<String> = q.linears().iter().map(|(_, l)| l.kind()).collect();
    assert!(kinds.iter().all(|k| k.starts_with("gguf-")), "{kinds:?}");
    assert!(
        q.weight_bytes() * 3 < f.weight_bytes(),
        "{} vs {}",
        q.weight_bytes(),
        f.weight_bytes()
    );
    let ids = q
        .tokenizer
        .encode(
            "The capital of France is Paris, and the capital of Germany is",
            true,
        )
        .unwrap();
    assert!(
        ids.len() >= 8,
        "prompt of {} tokens would not take the batch path",
        ids.len()
    );
    let (fa, fb) = prefill_and_step(&f, &ids, 1000);
    let (qa, qb) = prefill_and_step(&q, &ids, 1000);
    let da = models::testing::max_abs_diff(&fa, &qa);
    let db = models::testing::max_abs_diff(&fb, &qb);
    let rel = (fb
        .sub(&qb)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        / fb.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap())
    .sqrt();
    eprintln!("{alias}: decode relative rms {rel:.2e}");
    let am = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    eprintln!("{alias}: prefill max |Δlogit| {da:.2e}, decode step {db:.2e}");
    assert!(da <= 2e-3, "{alias} prefill logits differ by {da}");
    assert!(db <= decode_tol, "{alias} decode logits differ by {db}");
    assert!(
        rel <= 0.08,
        "{alias} decode logits: relative rms difference {rel}"
    );
    assert_eq!(am(&fa), am(&qa));
    assert_eq!(am(&fb), am(&qb));
}

// Prefill takes the tiled path, the exact product with the dequantized weights: logits agree
// to f32 rounding (measured ~2e-5), which pins the weights and the q/k row permutation.
// Decode rounds every projection's input to int8 blocks (as llama.cpp does; each projection
// alone is within the worst-case bound of `check` above, ~0.5% rms): over 30 layers this
// accumulated to max |Δlogit| 0.85 / relative rms 4.7% (smollm2, all Q4_1) and 0.28 / 1.2%
// (qwen). Limits 1.5 and 8% leave headroom for that rounding, not for a wrong weight (a
// swapped or unpermuted matrix changes logits by units and fails the prefill check first).
#[test]
fn smollm2_quantized_matches_dequantized() {
    compare_model("smollm2-135m", 1.5);
}

#[test]
fn qwen_quantized_matches_dequantized() {
    compare_model("qwen2.5-0.5b", 1.5);
}

/// Crossover measurement behind `QLinear::prefers_int8` (prints timings; not a check).
#[test]
#[ignore]
fn time_paths() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for (n, k) in [(1536usize, 576usize), (576, 1536)] {
        let kk = if k % 256 == 0 { k } else { 512 };
        let w = Tensor::from_vec(randn(&mut rng, n * kk), (n, kk), &Device::Cpu).unwrap();
        for t in TYPES {
            let mut line = format!("{n}x{kk} {:<5}", format!("{t:?}"));
            for m in [1usize, 2, 4, 8, 16, 64, 256] {
                let x = Tensor::from_vec(randn(&mut rng, m * kk), (m, kk), &Device::Cpu).unwrap();
                let mut best = [f64::MAX; 2];
                if m > 16 && n < 1000 {
                    continue;
                }
                for (j, path) in [QPath::Int8, QPath::Tiled].into_iter().enumerate() {
                    let l = QLinear::new(QTensor::quantize(&w, t).unwrap(), None)
                        .unwrap()
                        .with_path(path);
                    let reps = (2000 / m).clamp(3, 200);
                    l.forward(&x).unwrap();
                    for _ in 0..3 {
                        let t0 = std::time::Instant::now();
                        for _ in 0..reps {
                            l.forward(&x).unwrap();
                        }
                        best[j] = best[j].min(t0.elapsed().as_secs_f64() / reps as f64);
                    }
                }
                let g = |s: f64| 2.0 * (m * n * kk) as f64 / s / 1e9;
                line += &format!(" | m={m} q {:.1} t {:.1}", g(best[0]), g(best[1]));
            }
            println!("{line}  (GFLOP/s)");
        }
    }
}
