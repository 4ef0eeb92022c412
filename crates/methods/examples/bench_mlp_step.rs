//! Issue #8 benchmark: one MLP training step, 768 → 3072 (GELU, erf) → 768 with biases,
//! x = 32×128 rows, loss = mean(y²), as mpolm's fine-tuning runs it and as candle alone would.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p mpolm-methods --example bench_mlp_step [-- --reps N] [--path candle|mpolm]
//!
//! Compare with `python3 scripts/bench_torch_kernels.py mlp` (same shapes, torch, 2 threads), or
//! run both in alternating rounds: `python3 scripts/bench_gemm_pair.py --what mlp`.
//! Rows: `candle` = candle's matmul, `gelu_erf` and candle-nn's AdamW (candle ops, a new tensor
//! per update); `mpolm` = `models::kernels::linear` (one GEMM per tracked input), the fused GELU
//! and the in-place AdamW of `methods::finetune::optim`. Columns: forward, backward, one AdamW
//! update, a whole step (forward + backward + AdamW), and forward + backward with W1 frozen.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use methods::finetune::optim::{AdamW, AdamWConfig};
use models::{fused, kernels};
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

enum Opt {
    Candle(candle_nn::AdamW),
    Mpolm(AdamW),
}

impl Opt {
    fn step(&mut self, g: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        match self {
            Opt::Candle(o) => o.step(g),
            Opt::Mpolm(o) => o.step(g, 1.0, 1.0),
        }
    }
}

fn main() -> candle_core::Result<()> {
    kernels::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // One path alone, for profiling it.
    let only = args
        .iter()
        .position(|a| a == "--path")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let dev = Device::Cpu;
    let (rows, d, h) = (32 * 128, 768, 3072);
    println!("MLP {d}→{h}→{d} (GELU erf), {rows} rows, ms (best of {reps})");
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "path", "forward", "backward", "AdamW", "step", "frozen W1 f+b"
    );
    for (name, fast) in [("candle", false), ("mpolm", true)] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let x = Tensor::randn(0f32, 1., (rows, d), &dev)?;
        let w1 = Var::from_tensor(&(Tensor::randn(0f32, 1., (h, d), &dev)? * 0.03)?)?;
        let b1 = Var::from_tensor(&Tensor::zeros(h, DType::F32, &dev)?)?;
        let w2 = Var::from_tensor(&(Tensor::randn(0f32, 1., (d, h), &dev)? * 0.03)?)?;
        let b2 = Var::from_tensor(&Tensor::zeros(d, DType::F32, &dev)?)?;
        let fwd = |w1: &Tensor| -> candle_core::Result<Tensor> {
            let y = if fast {
                let a = kernels::linear(&x, w1, Some(&b1))?;
                kernels::linear(&fused::gelu_erf(&a)?, &w2, Some(&b2))?
            } else {
                let a = kernels::generic_linear(&x, w1, Some(&b1))?.gelu_erf()?;
                kernels::generic_linear(&a, &w2, Some(&b2))?
            };
            y.sqr()?.mean_all()
        };
        let vars = [&w1, &b1, &w2, &b2];
        // Same hyper-parameters as the torch script: lr 1e-3, weight decay 0.01.
        let mut opt = if fast {
            Opt::Mpolm(AdamW::new(
                AdamWConfig::default(),
                vars.iter()
                    .enumerate()
                    .map(|(i, v)| (format!("p{i}"), (*v).clone(), 1e-3, 0.01))
                    .collect(),
            ))
        } else {
            Opt::Candle(candle_nn::AdamW::new(
                vars.iter().map(|v| (*v).clone()).collect(),
                candle_nn::ParamsAdamW {
                    lr: 1e-3,
                    weight_decay: 0.01,
                    ..Default::default()
                },
            )?)
        };
        let t_f = best(reps, || {
            fwd(&w1).unwrap();
        });
        let loss = fwd(&w1)?;
        let t_b = best(reps, || {
            loss.backward().unwrap();
        });
        let grads = loss.backward()?;
        let t_o = best(reps, || opt.step(&grads).unwrap());
        let t_s = best(reps, || {
            let l = fwd(&w1).unwrap();
            let g = l.backward().unwrap();
            opt.step(&g).unwrap();
        });
        // W1 frozen (a plain tensor): its weight-gradient GEMM should disappear.
        let w1c = w1.as_tensor().detach();
        let t_fr = best(reps, || {
            let l = fwd(&w1c).unwrap();
            l.backward().unwrap();
        });
        println!(
            "{:>10} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>14.0}",
            name,
            t_f * 1e3,
            t_b * 1e3,
            t_o * 1e3,
            t_s * 1e3,
            t_fr * 1e3
        );
    }
    Ok(())
}
