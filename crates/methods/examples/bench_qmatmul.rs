//! Issue #8 item 3: per-matmul timings of a GPTQ layer, side by side in one run: the dense f32
//! Linear (`models::kernels::linear`), the legacy path (whole layer dequantized, then matmul),
//! the int8 kernel and the dequantized-tile kernel.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p mpolm-methods --example bench_qmatmul [-- --reps N]
//!
//! y[m, n] = x[m, k] · W[n, k]ᵀ; median of N interleaved repetitions (each repetition runs every
//! variant once, so machine noise hits them alike). One-row products cycle over enough copies of
//! the weights (≥ 64 MiB quantized, ≥ 128 MiB f32) that they stream from memory, as in decoding.

use candle_core::{Device, Tensor};
use methods::quant::{pack, QuantLinear};
use models::LinearLayer;
use std::time::Instant;

fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s >> 33
    }
}

fn layer(bits: u32, k: usize, n: usize, group: usize, seed: u64) -> QuantLinear {
    let mut r = lcg(seed);
    let lim = 1u64 << bits;
    let q: Vec<u32> = (0..k * n).map(|_| (r() % lim) as u32).collect();
    let groups = k / group;
    let zm1: Vec<u32> = (0..groups * n).map(|_| (r() % lim) as u32).collect();
    let scales: Vec<f32> = (0..groups * n)
        .map(|_| 0.002 + (r() % 1000) as f32 * 2e-5)
        .collect();
    let g_idx: Vec<u32> = (0..k).map(|i| (i / group) as u32).collect();
    QuantLinear::from_packed(
        bits,
        k,
        n,
        pack::pack_rows(&q, k, n, bits).unwrap(),
        pack::pack_cols(&zm1, groups, n, bits).unwrap(),
        scales,
        g_idx,
        None,
    )
    .unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(7);
    let group = 64; // AutoGPTQ's usual 128 does not divide 576
    println!(
        "quantized matmul, ms per product (median of {reps} interleaved reps, {} threads), group {group}",
        rayon::current_num_threads()
    );
    println!(
        "{:>16} {:>4} {:>9} {:>9} {:>9} {:>9}   {:>8} {:>8}",
        "m×k×n", "bits", "f32", "legacy", "int8", "tiles", "int8 ×f32", "GB/s int8"
    );
    for (m, k, n) in [
        (1usize, 576usize, 1536usize),
        (1, 1536, 576),
        (1, 576, 49152),
        (64, 576, 1536),
        (64, 1536, 576),
        (64, 576, 49152),
    ] {
        for bits in [4u32, 8] {
            let qbytes = k * n * bits as usize / 8;
            let (qc, fc) = if m == 1 {
                (
                    ((64 << 20) / qbytes).max(1),
                    ((128 << 20) / (4 * k * n)).max(1),
                )
            } else {
                (1, 1)
            };
            let qs: Vec<QuantLinear> = (0..qc)
                .map(|c| layer(bits, k, n, group, c as u64))
                .collect();
            let legacy = qs[0].without_kernel();
            let ws: Vec<Tensor> = (0..fc)
                .map(|_| Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu))
                .collect::<candle_core::Result<_>>()?;
            let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; m * n];
            let (mut tf, mut tl, mut ti, mut tt) = (vec![], vec![], vec![], vec![]);
            // Decode products are timed over a batch of calls (one per copy, round robin).
            let calls = if m == 1 { 20 * qc.max(fc) } else { 1 };
            for rep in 0..=reps {
                let t = Instant::now();
                for c in 0..calls {
                    std::hint::black_box(models::kernels::linear(&x, &ws[c % fc], None)?);
                }
                let f = t.elapsed().as_secs_f64() / calls as f64;
                // The legacy path dequantizes the whole layer each call: a few calls suffice.
                let lc = calls.min(3);
                let t = Instant::now();
                for _ in 0..lc {
                    std::hint::black_box(legacy.forward(&x)?);
                }
                let l = t.elapsed().as_secs_f64() / lc as f64;
                let t = Instant::now();
                for c in 0..calls {
                    qs[c % qc].kernel().unwrap().matmul_int8(&xs, m, &mut y);
                }
                let i = t.elapsed().as_secs_f64() / calls as f64;
                let t = Instant::now();
                for c in 0..calls {
                    qs[c % qc].kernel().unwrap().matmul_tiles(&xs, m, &mut y)?;
                }
                let ti_ = t.elapsed().as_secs_f64() / calls as f64;
                if rep > 0 {
                    tf.push(f);
                    tl.push(l);
                    ti.push(i);
                    tt.push(ti_);
                }
            }
            let (f, l, i, t) = (median(tf), median(tl), median(ti), median(tt));
            println!(
                "{:>16} {:>4} {:>9.3} {:>9.3} {:>9.3} {:>9.3}   {:>8.2}x {:>8.1}",
                format!("{m}×{k}×{n}"),
                bits,
                f * 1e3,
                l * 1e3,
                i * 1e3,
                t * 1e3,
                f / i,
                qs[0].kernel().unwrap().bytes() as f64 / i / 1e9
            );
        }
    }
    Ok(())
}
