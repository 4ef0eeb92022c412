//! Decode (one activation row) throughput of the int8 block kernels in `models::qdot`, per
//! GGUF type and shape, in GB/s of weight bytes read. Times are process CPU time, so that
//! a busy machine (another job time-slicing the cores) does not inflate them:
//!   RAYON_NUM_THREADS=1 cargo run --release -p mpolm-models --example bench_qdot
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

fn cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    // On a pool worker, as the CLI runs: parallel calls start inline instead of waking the pool.
    rayon::ThreadPoolBuilder::new()
        .build()
        .unwrap()
        .install(run)
}

fn run() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let shapes = [(1536usize, 576usize), (576, 1536), (49152, 576)];
    let types = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
    ];
    for (n, k) in shapes {
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for t in types {
            let q = QTensor::quantize(&w, t).unwrap();
            let data = q.data().unwrap();
            let mut y = vec![0f32; n];
            let reps = (200_000_000 / (n * k)).clamp(3, 2000);
            let mut best = f64::MAX;
            for _ in 0..7 {
                let t0 = cpu_secs();
                for _ in 0..reps {
                    models::qdot::matmul(t, &data, n, k, &x, &mut y).unwrap();
                }
                best = best.min((cpu_secs() - t0) / reps as f64);
            }
            println!(
                "{n:>6}x{k:<5} {:<5} {:>8.1} us  {:>6.2} GB/s",
                format!("{t:?}"),
                best * 1e6,
                data.len() as f64 / best / 1e9
            );
        }
    }
}
