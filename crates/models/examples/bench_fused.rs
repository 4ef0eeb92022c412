//! Issue #8 benchmark: each fused kernel (forward + backward) vs candle's composed form, at the
//! shapes of a MiniLM-L6 SST-2 step (batch 32 × 64 tokens) and a SmolLM2-135M LM step (4 × 256).
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p mpolm-models --example bench_fused [-- --reps N]

use candle_core::{Device, Tensor, Var, D};
use models::fused;
use std::time::Instant;

type R<T> = candle_core::Result<T>;

fn best(reps: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    f()?;
    let mut b = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        b = b.min(t.elapsed().as_secs_f64());
    }
    Ok(b)
}

fn var(shape: &[usize]) -> R<Var> {
    Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?)
}

/// Forward + backward time of `f`, with a dense random upstream gradient (as in training; a
/// broadcast ones gradient would time candle's strided copy instead).
fn fwd_bwd(reps: usize, f: impl Fn() -> R<Tensor>) -> R<f64> {
    let y = f()?;
    let r = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu)?;
    best(reps, || {
        let y = f()?;
        let _ = (y * &r)?.sum_all()?.backward()?;
        Ok(())
    })
}

fn row(name: &str, fast: f64, slow: f64) {
    println!(
        "{name:<34} fused {:>8.2} ms   candle {:>8.2} ms   ({:.1}x)",
        fast * 1e3,
        slow * 1e3,
        slow / fast
    );
}

fn main() -> R<()> {
    models::kernels::keep_freed_memory();
    let reps = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // MiniLM-L6: 2048 rows × 384, FFN 1536, 12 heads × 32.
    let x = var(&[32, 64, 384])?;
    let (w, b) = (var(&[384])?, var(&[384])?);
    let ln_slow = || -> R<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-12)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)
    };
    row(
        "layer_norm 2048x384",
        fwd_bwd(reps, || fused::layer_norm(&x, &w, &b, 1e-12))?,
        fwd_bwd(reps, ln_slow)?,
    );
    let i = var(&[32, 64, 1536])?;
    row(
        "gelu_erf 2048x1536",
        fwd_bwd(reps, || fused::gelu_erf(&i))?,
        fwd_bwd(reps, || i.gelu_erf())?,
    );
    let (q, k, v) = (
        var(&[32, 64, 12, 32])?,
        var(&[32, 64, 12, 32])?,
        var(&[32, 64, 12, 32])?,
    );
    let scale = 1.0 / 32f64.sqrt();
    let attn_slow = |q: &Var, k: &Var, v: &Var, causal: bool| -> R<Tensor> {
        let (q, k, v) = (
            q.transpose(1, 2)?.contiguous()?,
            k.transpose(1, 2)?.contiguous()?,
            v.transpose(1, 2)?.contiguous()?,
        );
        let mut s = (q.matmul(&k.t()?)? * scale)?;
        if causal {
            let t = s.dim(2)?;
            let m: Vec<f32> = (0..t * t)
                .map(|e| {
                    if e % t > e / t {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            s = s.broadcast_add(&Tensor::from_vec(m, (t, t), &Device::Cpu)?)?;
        }
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        p.matmul(&v)?.transpose(1, 2)?.contiguous()
    };
    row(
        "attention b32 t64 h12x32",
        fwd_bwd(reps, || fused::attention(&q, &k, &v, false, scale, None))?,
        fwd_bwd(reps, || attn_slow(&q, &k, &v, false))?,
    );
    // SmolLM2-135M: 1024 rows × 576, FFN 1536, 9 heads × 64 (3 KV heads), vocab 49152.
    let x = var(&[4, 256, 576])?;
    let w = var(&[576])?;
    row(
        "rms_norm 1024x576",
        fwd_bwd(reps, || fused::rms_norm(&x, &w, 1e-5))?,
        fwd_bwd(reps, || candle_nn::ops::rms_norm_slow(&x, &w, 1e-5))?,
    );
    let (g, u) = (var(&[4, 256, 1536])?, var(&[4, 256, 1536])?);
    row(
        "silu_mul 1024x1536",
        fwd_bwd(reps, || fused::silu_mul(&g, &u))?,
        fwd_bwd(reps, || g.silu()? * u.as_tensor())?,
    );
    let q = var(&[4, 256, 9, 64])?;
    let (cos, sin) = (
        Tensor::randn(0f32, 1.0, (256, 32), &Device::Cpu)?,
        Tensor::randn(0f32, 1.0, (256, 32), &Device::Cpu)?,
    );
    row(
        "rope 4x256x9x64",
        fwd_bwd(reps, || fused::rope_bthd(&q, &cos, &sin))?,
        fwd_bwd(reps, || {
            candle_nn::rotary_emb::rope_slow(&q.transpose(1, 2)?, &cos, &sin)?.transpose(1, 2)
        })?,
    );
    let (k9, v9) = (var(&[4, 256, 9, 64])?, var(&[4, 256, 9, 64])?);
    row(
        "attention causal b4 t256 h9x64",
        fwd_bwd(reps, || fused::attention(&q, &k9, &v9, true, 0.125, None))?,
        fwd_bwd(reps, || attn_slow(&q, &k9, &v9, true))?,
    );
    let logits = var(&[1020, 49152])?;
    let y = Tensor::from_vec(
        (0..1020u32).map(|i| (i * 7919) % 49152).collect::<Vec<_>>(),
        1020,
        &Device::Cpu,
    )?;
    row(
        "cross_entropy 1020x49152",
        fwd_bwd(reps, || fused::cross_entropy(&logits, &y))?,
        fwd_bwd(reps, || candle_nn::loss::cross_entropy(&logits, &y))?,
    );
    Ok(())
}
