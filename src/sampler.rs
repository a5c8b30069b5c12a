//! Token sampling: greedy and temperature sampling with a seeded RNG.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Picks the next token from logits.
///
/// Temperature 0 takes the most likely token (the lowest id among ties, as
/// `torch.argmax`). Above 0 it draws from softmax(logits / temperature) with a ChaCha8 RNG
/// seeded from `seed`, so the same seed and logits give the same tokens on every platform.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    rng: ChaCha8Rng,
    probs: Vec<f32>,
}

impl Sampler {
    /// A sampler at `temperature` (>= 0) seeded with `seed`.
    pub fn new(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            rng: ChaCha8Rng::seed_from_u64(seed),
            probs: Vec::new(),
        }
    }

    /// The next token id. `logits` must not be empty.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        self.probs.clear();
        let mut sum = 0.0f64;
        for &l in logits {
            let p = ((l - max) * inv_t).exp();
            sum += p as f64;
            self.probs.push(p);
        }
        let r = self.rng.random::<f64>() * sum;
        let mut acc = 0.0f64;
        for (i, &p) in self.probs.iter().enumerate() {
            acc += p as f64;
            if r < acc {
                return i as u32;
            }
        }
        // Rounding left r at the very top: take the last token with any mass.
        self.probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
    }
}

/// Index of the largest value; the first one among ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(0.0, 1);
        assert_eq!(s.sample(&[0.1, 5.0, 4.9]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(1.0, seed);
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn sampling_follows_softmax() {
        // Two tokens with logits differing by ln 3 at temperature 1: probabilities 3/4, 1/4.
        let logits = [3f32.ln(), 0.0];
        let mut s = Sampler::new(1.0, 7);
        let n = 20_000;
        let zeros = (0..n).filter(|_| s.sample(&logits) == 0).count() as f64;
        let p = zeros / n as f64;
        // 5 standard deviations of a binomial(20000, 0.75) proportion is about 0.0153.
        assert!((p - 0.75).abs() < 0.0153, "p = {p}");
    }
}
