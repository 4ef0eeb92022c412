//! Aggregations with lm-evaluation-harness definitions.

/// Arithmetic mean (0 for no items).
pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// Standard error of the mean: sample standard deviation (ddof = 1) / √n, as lm-eval's
/// `mean_stderr`. None for fewer than two items.
pub fn stderr(x: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 {
        return None;
    }
    let m = mean(x);
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

/// lm-eval's word count for perplexity weights: `len(re.split(r"\s+", text))` — the number of
/// pieces between whitespace runs, counting empty pieces at either end.
pub fn count_words(text: &str) -> usize {
    let mut n = 1;
    let mut in_ws = false;
    for c in text.chars() {
        let ws = c.is_whitespace();
        if ws && !in_ws {
            n += 1;
        }
        in_ws = ws;
    }
    n
}

/// Perplexity-family numbers from a summed log-likelihood (natural log).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Perplexity {
    pub loglikelihood: f64,
    pub tokens: usize,
    pub words: usize,
    pub bytes: usize,
    pub token_perplexity: f64,
    pub word_perplexity: f64,
    pub byte_perplexity: f64,
    pub bits_per_byte: f64,
}

impl Perplexity {
    pub fn new(loglikelihood: f64, tokens: usize, text: &str) -> Self {
        let words = count_words(text);
        let bytes = text.len();
        Perplexity {
            loglikelihood,
            tokens,
            words,
            bytes,
            token_perplexity: (-loglikelihood / tokens.max(1) as f64).exp(),
            word_perplexity: (-loglikelihood / words.max(1) as f64).exp(),
            byte_perplexity: (-loglikelihood / bytes.max(1) as f64).exp(),
            bits_per_byte: -loglikelihood / bytes.max(1) as f64 / std::f64::consts::LN_2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_stderr_words() {
        assert_eq!(mean(&[1.0, 0.0, 1.0, 0.0]), 0.5);
        // sample sd of [1,0,1,0] = sqrt(1/3); / sqrt(4)
        assert!(
            (stderr(&[1.0, 0.0, 1.0, 0.0]).unwrap() - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12
        );
        assert_eq!(stderr(&[1.0]), None);
        // Python: len(re.split(r"\s+", " = A b = \n")) == 6 (empty pieces at both ends)
        assert_eq!(count_words(" = A b = \n"), 6);
        assert_eq!(count_words("a  b\tc"), 3);
        assert_eq!(count_words(""), 1);
        let p = Perplexity::new(-10.0, 5, "ab cd");
        assert!((p.token_perplexity - 2f64.exp()).abs() < 1e-12);
        assert!((p.word_perplexity - 5f64.exp()).abs() < 1e-12);
        assert!((p.bits_per_byte - 2.0 / std::f64::consts::LN_2).abs() < 1e-12);
    }
}
