//! Issue #8 benchmark: the Linear kernel vs candle's generic matmul, side by side in one run.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p mpolm-models --example bench_kernels [-- gemm|decode] [--reps N]
//!
//! Compare with `python3 scripts/bench_torch_kernels.py` (same shapes, torch, 2 threads).
//! GEMM: y[m, n] = x[m, k] · W[n, k]ᵀ, best of N, GFLOP/s = 2mkn / t.
//! The MLP training step is `cargo run --release -p mpolm-methods --example bench_mlp_step`.

use candle_core::{Device, Tensor};
use models::kernels::{self, Backend, View};
use std::time::Instant;

fn best<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f(); // warm-up
    let mut b = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

fn gemm_bench(reps: usize) -> candle_core::Result<()> {
    let shapes = [
        (4096, 768, 3072),
        (4096, 3072, 768),
        (2048, 576, 1536),
        (2048, 384, 1536),
        (128, 576, 1536),
        (128, 1536, 576),
        (128, 576, 192),
        (16, 576, 1536),
        (16, 1536, 576),
        (8, 576, 1536),
        (8, 1536, 576),
        (8, 576, 49152),
        (4, 576, 1536),
        (4, 576, 49152),
        (1, 576, 1536),
        (1, 576, 49152),
        (1, 1536, 576),
        (1, 576, 192),
    ];
    println!(
        "GEMM GFLOP/s (best of {reps}, {} threads)  y[m,n] = x[m,k]·W[n,k]ᵀ",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:>20} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "m×k×n", "candle", "gemm", "faer", "gemv", "linear()"
    );
    for (m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?;
        let flop = 2.0 * (m * k * n) as f64;
        let r = if m < 16 { reps * 10 } else { reps };
        // Decode (m = 1, or a few rows of batched decoding) reads W from memory, not cache:
        // cycle over copies (>= 128 MB in all).
        let copies = if m < 16 {
            ((128 << 20) / (4 * n * k)).max(1)
        } else {
            1
        };
        let wc: Vec<Tensor> = (0..copies)
            .map(|_| w.copy())
            .collect::<candle_core::Result<_>>()?;
        let wsl: Vec<Vec<f32>> = wc
            .iter()
            .map(|w| w.flatten_all().and_then(|w| w.to_vec1::<f32>()))
            .collect::<candle_core::Result<_>>()?;
        let it = std::cell::Cell::new(0usize);
        let next = || {
            it.set(it.get() + 1);
            it.get() % copies
        };
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let xv = View {
            data: &xs,
            rows: m,
            cols: k,
            rs: k,
            cs: 1,
        };
        let mut dst = vec![0f32; m * n];
        // The variants take turns within each repetition so machine noise hits them alike.
        let mut t = [f64::INFINITY; 5];
        for rep in 0..=r {
            for (vi, tv) in t.iter_mut().enumerate() {
                if vi == 3 && m >= 16 {
                    continue;
                }
                let i = next();
                let st = Instant::now();
                match vi {
                    0 => {
                        kernels::generic_linear(&x, &wc[i], None)?;
                    }
                    4 => {
                        kernels::linear(&x, &wc[i], None)?;
                    }
                    _ => {
                        let wt = View {
                            data: &wsl[i],
                            rows: n,
                            cols: k,
                            rs: k,
                            cs: 1,
                        }
                        .t();
                        let be = [Backend::Gemm, Backend::Faer, Backend::Gemv][vi - 1];
                        kernels::gemm_into(&mut dst, xv, wt, false, be)?;
                    }
                }
                if rep > 0 {
                    *tv = tv.min(st.elapsed().as_secs_f64());
                }
            }
        }
        let [t_candle, t_gemm, t_faer, t_gemv, t_lin] = t;
        let g = |t: f64| flop / t / 1e9;
        println!(
            "{:>20} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            format!("{m}×{k}×{n}"),
            g(t_candle),
            g(t_gemm),
            g(t_faer),
            g(t_gemv),
            g(t_lin)
        );
    }
    // The backward products of the first shape, each one GEMM on strided views.
    let (m, k, n) = (4096, 768, 3072);
    let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?;
    let gr = Tensor::randn(0f32, 1., (m, n), &Device::Cpu)?;
    let flop = 2.0 * (m * k * n) as f64 / 1e9;
    let c_gx = best(reps, || {
        gr.matmul(&w).unwrap();
    });
    let n_gx = best(reps, || {
        kernels::mm(&gr, &w).unwrap();
    });
    let c_gw = best(reps, || {
        gr.t().unwrap().matmul(&x).unwrap();
    });
    let n_gw = best(reps, || {
        kernels::mm(&gr.t().unwrap(), &x).unwrap();
    });
    println!(
        "{:>20} {:>10.1} {:>10} {:>10} {:>10} {:>10.1}",
        "grad_x g·W",
        flop / c_gx,
        "",
        "",
        "",
        flop / n_gx
    );
    println!(
        "{:>20} {:>10.1} {:>10} {:>10} {:>10} {:>10.1}",
        "grad_W gᵀ·x",
        flop / c_gw,
        "",
        "",
        "",
        flop / n_gw
    );
    Ok(())
}

/// One decode token's dense products of smollm2-135m (30 layers: q, k, v, o, gate, up, down, then
/// the 49152-row head; 540 MB of f32 weights, so they stream from memory), each backend in turn
/// per token so machine noise hits them alike; best and median ms per token.
fn decode_bench(reps: usize) -> candle_core::Result<()> {
    let (h, kv, ff, vocab, layers) = (576, 192, 1536, 49152, 30);
    let mut mats: Vec<(usize, usize)> = Vec::new();
    for _ in 0..layers {
        mats.extend([(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)]);
    }
    mats.push((vocab, h));
    let ws: Vec<Tensor> = mats
        .iter()
        .map(|&(n, k)| Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let wv: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| w.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let xs: Vec<Tensor> = [h, ff]
        .iter()
        .map(|&k| Tensor::randn(0f32, 1., (1, k), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let xv: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| x.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let xi = |k: usize| if k == h { 0 } else { 1 };
    let names = ["candle", "gemm", "gemv×1", "gemv×2", "linear()"];
    let mut times = vec![Vec::new(); names.len()];
    let mut cpu = vec![0f64; names.len()];
    for _ in 0..reps + 1 {
        for (bi, t) in times.iter_mut().enumerate() {
            let st = Instant::now();
            let c0 = thread_cpu_s();
            for (i, &(n, k)) in mats.iter().enumerate() {
                match bi {
                    0 => {
                        kernels::generic_linear(&xs[xi(k)], &ws[i], None)?;
                    }
                    1..=3 => {
                        let mut y = vec![0f32; n];
                        if bi == 1 {
                            let a = View {
                                data: &xv[xi(k)],
                                rows: 1,
                                cols: k,
                                rs: k,
                                cs: 1,
                            };
                            let b = View {
                                data: &wv[i],
                                rows: n,
                                cols: k,
                                rs: k,
                                cs: 1,
                            }
                            .t();
                            kernels::gemm_into(&mut y, a, b, false, Backend::Gemm)?;
                        } else {
                            kernels::gemv_rows_with(
                                &mut y,
                                &xv[xi(k)],
                                &wv[i],
                                k,
                                n,
                                k,
                                false,
                                bi - 1,
                            );
                        }
                    }
                    _ => {
                        kernels::linear(&xs[xi(k)], &ws[i], None)?;
                    }
                }
            }
            t.push(st.elapsed().as_secs_f64() * 1e3);
            cpu[bi] += thread_cpu_s() - c0;
        }
    }
    println!("decode products of smollm2-135m, ms/token over {reps} tokens (540 MB f32 weights)");
    for ((name, t), c) in names.iter().zip(times.iter_mut()).zip(&cpu) {
        t.remove(0);
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{:>10} best {:7.2}  median {:7.2}  main-thread CPU {:7.2}",
            name,
            t[0],
            t[t.len() / 2],
            c * 1e3 / (reps + 1) as f64
        );
    }
    Ok(())
}

/// CPU seconds of the calling thread (utime + stime from /proc, 10 ms ticks): for the
/// single-threaded variants this is what contention from other processes does not inflate.
fn thread_cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn main() -> candle_core::Result<()> {
    // As the CLI does: temporaries are recycled instead of page-faulted in again per call.
    kernels::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let what = args.first().map(String::as_str).unwrap_or("all");
    if what == "gemm" || what == "all" || what.starts_with("--") {
        gemm_bench(reps)?;
    }
    if what == "decode" {
        decode_bench(reps)?;
    }
    Ok(())
}
