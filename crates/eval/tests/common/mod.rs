//! What the eval test files share: the reference log-likelihood they check the batched,
//! cached scorer against.

use candle_core::{Device, Tensor};
use eval::lm::{Lm, Row};

/// log p(target | input) summed over `row`'s targets, from one plain forward (no cache, no batch).
pub fn naive(lm: &Lm, row: &Row) -> f64 {
    let x = Tensor::new(row.input.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = lm
        .model
        .forward(&x, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let start = row.input.len() - row.targets.len();
    let mut s = 0.0;
    for (k, &t) in row.targets.iter().enumerate() {
        let l = &logits[start + k];
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + l.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        s += l[t as usize] as f64 - lse;
    }
    s
}
