//! Token sampling: greedy, or temperature sampling with top-k, top-p, min-p and a
//! repetition penalty, from a seeded RNG.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is picked from the logits. The defaults turn every filter off.
///
/// The steps run in this order (as in HF transformers): the repetition penalty,
/// temperature, top-k, top-p, min-p, then a draw from what is left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); above 0 divides the logits by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability adds up to at least
    /// `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Keep only tokens at least `min_p` times as likely as the most likely one; 0 keeps
    /// all.
    pub min_p: f32,
    /// Divide the positive logits (multiply the negative ones) of tokens already in the
    /// sequence by this; 1 changes nothing, above 1 discourages repeats.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

/// Picks the next token from logits.
///
/// Greedy picks the lowest id among the largest logits, as `torch.argmax`, without sorting
/// anything. Sampling draws from a ChaCha8 RNG seeded from `seed`, so the same seed and
/// logits give the same tokens on every platform and through every binding. Nothing sorts
/// the whole vocabulary: top-k selects with a small heap, top-p sorts only the tokens that
/// can be in the nucleus.
///
/// ```
/// use etllm::sampler::{Sampler, SamplingParams};
///
/// let logits = [0.5, 3.0, 2.9, -1.0];
/// assert_eq!(Sampler::new(0.0, 0).sample(&logits, &[]), 1); // temperature 0: greedy
///
/// let params = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
/// let draws = |seed| {
///     let mut s = Sampler::with_params(params, seed);
///     (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
/// };
/// assert_eq!(draws(7), draws(7)); // the same seed, the same tokens
/// assert!(draws(7).iter().all(|&t| t == 1 || t == 2)); // top-k 2
/// ```
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Logits after the repetition penalty (only used when there is one).
    penalized: Vec<f32>,
    /// exp((logit - max) / T) for every token (when no top-k narrows the set first).
    weights: Vec<f32>,
    /// Sums of `weights` by blocks of `BLOCK`, to find a draw without a full walk.
    block_sums: Vec<f64>,
    /// Candidate tokens with their unnormalized probabilities, when a filter applies.
    candidates: Vec<(u32, f32)>,
}

/// Tokens per block of `Sampler::block_sums`.
const BLOCK: usize = 256;

/// What the filters left to draw from.
enum Pool {
    /// Every token, with the weights in `Sampler::weights`.
    All,
    /// The tokens in `Sampler::candidates`.
    Candidates,
    /// A single token (no finite logit: greedy fallback).
    One(u32),
}

impl Sampler {
    /// A plain temperature sampler (no other filter) seeded with `seed`.
    pub fn new(temperature: f32, seed: u64) -> Self {
        Self::with_params(
            SamplingParams {
                temperature,
                ..Default::default()
            },
            seed,
        )
    }

    /// A sampler with every parameter, seeded with `seed`.
    pub fn with_params(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            penalized: Vec::new(),
            weights: Vec::new(),
            block_sums: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// The next token id, given the logits and the tokens already in the sequence (used by
    /// the repetition penalty). `logits` must not be empty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = self.params;
        let logits = penalize(&mut self.penalized, p.repetition_penalty, logits, history);
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        match filter(logits, &p, &mut self.weights, &mut self.candidates) {
            Pool::One(id) => id,
            Pool::Candidates => {
                let total: f64 = self.candidates.iter().map(|&(_, w)| w as f64).sum();
                let r = self.rng.random::<f64>() * total;
                let mut acc = 0.0f64;
                for &(id, w) in &self.candidates {
                    acc += w as f64;
                    if r < acc {
                        return id;
                    }
                }
                // Rounding left r at the very top: the last candidate with any weight.
                self.candidates
                    .iter()
                    .rev()
                    .find(|&&(_, w)| w > 0.0)
                    .or(self.candidates.first())
                    .map_or_else(|| argmax(logits), |&(id, _)| id)
            }
            Pool::All => {
                self.block_sums.clear();
                self.block_sums
                    .extend(self.weights.chunks(BLOCK).map(|b| sum_of(b) as f64));
                let total: f64 = self.block_sums.iter().sum();
                let r = self.rng.random::<f64>() * total;
                let mut acc = 0.0f64;
                for (b, &sum) in self.block_sums.iter().enumerate() {
                    if r < acc + sum {
                        let start = b * BLOCK;
                        for (i, &w) in self.weights[start..].iter().take(BLOCK).enumerate() {
                            acc += w as f64;
                            if r < acc {
                                return (start + i) as u32;
                            }
                        }
                    } else {
                        acc += sum;
                    }
                }
                self.weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
            }
        }
    }

    /// The tokens the filters keep for `logits`, with their probabilities (summing to 1),
    /// in the order a draw walks them. For inspecting and testing the filters.
    pub fn candidates(&mut self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        let p = self.params;
        let logits = penalize(&mut self.penalized, p.repetition_penalty, logits, history).to_vec();
        let kept: Vec<(u32, f32)> =
            match filter(&logits, &p, &mut self.weights, &mut self.candidates) {
                Pool::One(id) => vec![(id, 1.0)],
                Pool::Candidates => self.candidates.clone(),
                Pool::All => self
                    .weights
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| (i as u32, w))
                    .collect(),
            };
        let total: f32 = kept.iter().map(|&(_, w)| w).sum();
        kept.into_iter().map(|(id, w)| (id, w / total)).collect()
    }
}

/// The logits with the repetition penalty applied, in `scratch` (the input itself when
/// there is no penalty).
fn penalize<'a>(
    scratch: &'a mut Vec<f32>,
    penalty: f32,
    logits: &'a [f32],
    history: &[u32],
) -> &'a [f32] {
    if penalty == 1.0 || history.is_empty() {
        return logits;
    }
    scratch.clear();
    scratch.extend_from_slice(logits);
    // Each distinct token once: penalizing twice would compound.
    let mut seen: Vec<u32> = history.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if let Some(l) = scratch.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
    scratch
}

/// Applies temperature, top-k, top-p and min-p. Without a filter the weights of every
/// token go to `weights`; with one, the kept tokens and their weights go to `cands`.
/// Weights are unnormalized probabilities exp((l - max) / T), 1 for the most likely token.
fn filter(
    logits: &[f32],
    p: &SamplingParams,
    weights: &mut Vec<f32>,
    cands: &mut Vec<(u32, f32)>,
) -> Pool {
    let max = max_of(logits);
    if !max.is_finite() {
        return Pool::One(argmax(logits));
    }
    let inv_t = 1.0 / p.temperature;
    let n = logits.len();
    if p.top_k > 0 && p.top_k < n {
        top_k(logits, p.top_k, cands);
        for c in cands.iter_mut() {
            c.1 = exp_nonpositive((c.1 - max) * inv_t);
        }
        if p.top_p < 1.0 {
            top_p(cands, p.top_p);
        }
    } else {
        weights.clear();
        weights.extend(logits.iter().map(|&l| exp_nonpositive((l - max) * inv_t)));
        if p.top_p >= 1.0 && p.min_p <= 0.0 {
            return Pool::All;
        }
        cands.clear();
        if p.top_p < 1.0 {
            // A token below (1 - top_p) / (n - 1) of the total is never in the nucleus:
            // all the others together would already exceed top_p.
            let total: f64 = weights.chunks(BLOCK).map(|b| sum_of(b) as f64).sum();
            let cutoff = ((1.0 - p.top_p as f64) / (n.max(2) - 1) as f64 * total) as f32;
            cands.extend(
                weights
                    .iter()
                    .enumerate()
                    .filter(|&(_, &w)| w >= cutoff)
                    .map(|(i, &w)| (i as u32, w)),
            );
            let target = p.top_p as f64 * total;
            if cands.len() <= SORT_MAX {
                nucleus(cands, target);
            } else {
                large_nucleus(cands, target);
            }
        } else {
            cands.extend(weights.iter().enumerate().map(|(i, &w)| (i as u32, w)));
        }
    }
    if p.min_p > 0.0 {
        // Relative to the most likely token, whose weight is exp(0) = 1.
        cands.retain(|&(_, w)| w >= p.min_p);
    }
    Pool::Candidates
}

/// The `k` largest logits as (id, logit), in id order, through a size-k min-heap: most
/// tokens cost one comparison.
fn top_k(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Ordered by logit, then by lower id winning ties (as a stable sort would).
    #[derive(PartialEq)]
    struct Entry(f32, Reverse<u32>);
    impl Eq for Entry {}
    impl PartialOrd for Entry {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Entry {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
        }
    }
    let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if heap.len() < k {
            heap.push(Reverse(Entry(l, Reverse(i as u32))));
        } else if let Some(Reverse(min)) = heap.peek() {
            if l > min.0 {
                heap.pop();
                heap.push(Reverse(Entry(l, Reverse(i as u32))));
            }
        }
    }
    out.clear();
    out.extend(
        heap.into_iter()
            .map(|Reverse(Entry(l, Reverse(id)))| (id, l)),
    );
    out.sort_unstable_by_key(|&(id, _)| id);
}

/// A caller's sampling step, run before the built-in sampler for every generated token:
/// it sees the logits (and may edit them, e.g. to forbid tokens for constrained decoding)
/// and either picks the token itself or lets the built-in sampler pick from the edited
/// logits. Set it with [`Runner::set_sampler_plugin`](crate::Runner::set_sampler_plugin).
///
/// A plugin that forbids one token (constrained decoding in one line):
///
/// ```
/// use std::ops::ControlFlow;
/// use etllm::{sampler::SamplerPlugin, GenerationConfig, Runner, RunnerOptions};
///
/// struct Forbid(u32);
/// impl SamplerPlugin for Forbid {
///     fn apply(&mut self, logits: &mut [f32], _history: &[u32]) -> etllm::Result<Option<u32>> {
///         logits[self.0 as usize] = f32::NEG_INFINITY;
///         Ok(None) // let the built-in sampler pick from the edited logits
///     }
/// }
///
/// let mut runner = Runner::open(
///     "tests/fixtures/dyn_xnnpack/model.pte",
///     "tests/fixtures/tokenizer.json",
///     RunnerOptions::default(),
/// )?;
/// let config = GenerationConfig { max_new_tokens: 12, temperature: 0.0, echo: false, ..Default::default() };
/// let mut tokens = Vec::new();
/// let mut collect = |p: etllm::TokenPiece<'_>| { tokens.extend(p.token); ControlFlow::Continue(()) };
/// runner.generate("Once upon a time", &config, &mut collect, |_| {})?;
/// let banned = tokens[0]; // the first greedy token...
///
/// runner.reset()?;
/// runner.set_sampler_plugin(Some(Box::new(Forbid(banned))));
/// tokens.clear();
/// let mut collect = |p: etllm::TokenPiece<'_>| { tokens.extend(p.token); ControlFlow::Continue(()) };
/// runner.generate("Once upon a time", &config, &mut collect, |_| {})?;
/// assert!(!tokens.contains(&banned)); // ...never comes now
/// # Ok::<(), etllm::Error>(())
/// ```
pub trait SamplerPlugin: Send {
    /// Called when a generate call starts, before its first token.
    fn reset(&mut self) -> crate::Result<()> {
        Ok(())
    }

    /// Sees the next-token logits (a copy the plugin may change) and the tokens of this
    /// call so far (prompt, then generated). Returns `Some(token)` to choose it, or `None`
    /// to let the built-in sampler choose from `logits` as left.
    fn apply(&mut self, logits: &mut [f32], history: &[u32]) -> crate::Result<Option<u32>>;
}

/// Lanes of the hand-split reductions below: floating-point reductions only vectorize
/// when written as independent lanes (the compiler may not reorder them itself).
const LANES: usize = 8;

/// The largest value (NaN never wins; -inf for none).
fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(rest) {
        max = if v > max { v } else { max };
    }
    max
}

/// The sum of `values`, by lanes.
fn sum_of(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (s, &v) in lanes.iter_mut().zip(c) {
            *s += v;
        }
    }
    lanes.iter().chain(rest).sum()
}

/// Orders candidates by weight, largest first, then by id.
fn by_weight_desc(a: (u32, f32), b: (u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the smallest set of most likely candidates whose probability reaches `top_p`
/// (of the candidates' own total), sorted by probability.
fn top_p(cands: &mut Vec<(u32, f32)>, top_p: f32) {
    let total: f64 = cands.iter().map(|&(_, w)| w as f64).sum();
    nucleus(cands, top_p as f64 * total);
}

/// Up to this many candidates, the nucleus is found by sorting them (the usual case:
/// logits of a trained model leave a few hundred); above, by [`large_nucleus`].
const SORT_MAX: usize = 2048;

/// Weight buckets of [`large_nucleus`]: a weight's bits shifted right by 19 keep its
/// exponent and 4 mantissa bits, so a bucket spans a factor of at most 1 + 1/16, and
/// heavier weights fall in higher buckets (weights are in [0, 1], whose bits are ordered
/// like the values). 1.0 is in bucket 2032.
const BUCKET_SHIFT: u32 = 19;
const BUCKETS: usize = (1.0f32.to_bits() >> BUCKET_SHIFT) as usize + 1;

/// Keeps the nucleus of many candidates: the smallest set of the heaviest (ties: lower
/// ids first) whose weights reach `target`, in linear time whatever its size. A histogram
/// of the weight per bucket finds the bucket where the running total from the top
/// reaches `target`; every heavier candidate is in (in id order), and only that bucket's
/// candidates are sorted to find where the nucleus ends. (Sorting every candidate costs
/// milliseconds when flat logits put most of a 32,000-token vocabulary in the nucleus.)
fn large_nucleus(cands: &mut Vec<(u32, f32)>, target: f64) {
    let bucket = |w: f32| ((w.to_bits() >> BUCKET_SHIFT) as usize).min(BUCKETS - 1);
    let mut mass = vec![0.0f64; BUCKETS];
    for &(_, w) in cands.iter() {
        mass[bucket(w)] += w as f64;
    }
    // The bucket where the nucleus ends, and the weight of the buckets above it. When
    // rounding leaves the total short of the target, every candidate is in.
    let mut above = 0.0f64;
    let mut edge = 0;
    for b in (0..BUCKETS).rev() {
        if above + mass[b] >= target {
            edge = b;
            break;
        }
        above += mass[b];
    }
    let mut boundary: Vec<(u32, f32)> = cands
        .iter()
        .copied()
        .filter(|c| bucket(c.1) == edge)
        .collect();
    cands.retain(|c| bucket(c.1) > edge);
    boundary.sort_unstable_by(|a, b| by_weight_desc(*a, *b));
    let mut acc = above;
    for c in boundary {
        cands.push(c);
        acc += c.1 as f64;
        if acc >= target {
            break;
        }
    }
}

/// Sorts the candidates by weight (largest first, then by id) and keeps the shortest
/// prefix whose weights add up to `target`.
fn nucleus(cands: &mut Vec<(u32, f32)>, target: f64) {
    cands.sort_unstable_by(|a, b| by_weight_desc(*a, *b));
    let mut acc = 0.0f64;
    let mut keep = cands.len();
    for (i, &(_, w)) in cands.iter().enumerate() {
        acc += w as f64;
        if acc >= target {
            keep = i + 1;
            break;
        }
    }
    cands.truncate(keep);
}

/// exp(x) for x <= 0, to about 2 ulp, in straight-line code the compiler vectorizes
/// (`f32::exp` calls libm per element and dominates sampling time on large vocabularies).
/// At or below -87.3 (and for -inf, a masked logit) the result is 0.
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and a remainder (Cody-Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by adding and removing 1.5 * 2^23 (SSE2 has no round instruction).
    const ROUNDER: f32 = 12_582_912.0;
    let clamped = if x > -87.3 { x } else { -87.3 };
    let biased = clamped * LOG2E + ROUNDER;
    let n = biased - ROUNDER;
    // n as an integer, read from the mantissa bits (a float-to-int cast would not vectorize).
    let n_int = biased.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // e^r on [-ln2/2, ln2/2], degree-6 Taylor polynomial (error below 2e-7 there).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // Scale by 2^n through the exponent bits; n >= -126 here, so 2^n is a normal number.
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x > -87.3 {
        p * scale
    } else {
        0.0
    }
}

/// Values per block in [`argmax`]'s first pass.
const ARGMAX_BLOCK: usize = 512;

/// Index of the largest value; the first one among ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    // One vectorized pass keeps each block's maximum and the first block that holds the
    // largest; only that block is searched for the position (a full-length search for the
    // position does not vectorize: it stops at the first match).
    let mut best = f32::NEG_INFINITY;
    let mut best_block = 0;
    for (b, block) in values.chunks(ARGMAX_BLOCK).enumerate() {
        let m = max_of(block);
        if m > best {
            best = m;
            best_block = b;
        }
    }
    if best == f32::NEG_INFINITY {
        // Only -inf and NaN: the first -inf, wherever it is (0 when there is none).
        return values.iter().position(|&v| v == best).unwrap_or(0) as u32;
    }
    let start = best_block * ARGMAX_BLOCK;
    let block = &values[start..values.len().min(start + ARGMAX_BLOCK)];
    (start + block.iter().position(|&v| v == best).unwrap_or(0)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::with_params(params, 7)
    }

    fn ids(c: &[(u32, f32)]) -> Vec<u32> {
        let mut v: Vec<u32> = c.iter().map(|&(id, _)| id).collect();
        v.sort_unstable();
        v
    }

    /// Logits whose softmax at temperature 1 is exactly `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn argmax_takes_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }

    /// The blocked argmax gives what a plain first-maximum scan gives: ties across and
    /// within blocks, NaN and infinities anywhere, lengths around the block size.
    #[test]
    fn argmax_matches_a_plain_scan() {
        fn plain(v: &[f32]) -> u32 {
            let mut best: Option<(usize, f32)> = None;
            for (i, &x) in v.iter().enumerate() {
                if x.is_nan() {
                    continue;
                }
                if best.is_none_or(|(_, b)| x > b) {
                    best = Some((i, x));
                }
            }
            best.map_or(0, |(i, _)| i as u32)
        }
        let mut state = 12345u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [1, 7, 511, 512, 513, 1024, 1500, 4099] {
            for case in 0..40 {
                let mut v: Vec<f32> = (0..len).map(|_| (next() % 64) as f32 - 32.0).collect();
                match case % 5 {
                    1 => v.iter_mut().for_each(|x| *x = x.round().min(3.0)), // many ties
                    2 => {
                        let i = next() as usize % len;
                        v[i] = f32::NAN;
                    }
                    3 => v.iter_mut().for_each(|x| {
                        if *x < 0.0 {
                            *x = f32::NEG_INFINITY;
                        }
                    }),
                    4 => {
                        let i = next() as usize % len;
                        v[i] = f32::INFINITY;
                    }
                    _ => {}
                }
                assert_eq!(argmax(&v), plain(&v), "len {len} case {case}");
            }
        }
        let mut all_low = vec![f32::NAN; 1030];
        all_low[700] = f32::NEG_INFINITY;
        all_low[900] = f32::NEG_INFINITY;
        assert_eq!(argmax(&all_low), 700);
        assert_eq!(argmax(&[f32::NAN; 600]), 0);
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(0.0, 1);
        assert_eq!(s.sample(&[0.1, 5.0, 4.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = sampler(SamplingParams {
            temperature: 1.5,
            top_k: 1,
            ..Default::default()
        });
        for k in 0..50u32 {
            let logits: Vec<f32> = (0..100u32)
                .map(|i| ((i * 31 + k * 17) % 97) as f32 * 0.1)
                .collect();
            assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        }
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        });
        let kept = s.candidates(&logits_of(&[0.1, 0.4, 0.2, 0.3]), &[]);
        assert_eq!(ids(&kept), vec![1, 3]);
        let total: f32 = kept.iter().map(|c| c.1).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((kept.iter().find(|c| c.0 == 1).unwrap().1 - 4.0 / 7.0).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let logits = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let kept = |p| {
            ids(&sampler(SamplingParams {
                temperature: 1.0,
                top_p: p,
                ..Default::default()
            })
            .candidates(&logits, &[]))
        };
        assert_eq!(kept(0.4), vec![1]);
        assert_eq!(kept(0.75), vec![1, 3]);
        assert_eq!(kept(0.85), vec![1, 2, 3]);
        assert_eq!(kept(0.97), vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_p_on_ties_keeps_the_lowest_ids() {
        // Ten equally likely tokens: 0.35 needs four of them (three hold only 0.3).
        let kept = ids(&sampler(SamplingParams {
            temperature: 1.0,
            top_p: 0.35,
            ..Default::default()
        })
        .candidates(&[0.0; 10], &[]));
        assert_eq!(kept, vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_p_on_flat_logits_keeps_what_a_full_sort_keeps() {
        // 32,000 flat logits (the nucleus holds most of them), against the definition
        // computed the slow way: sort every token by probability, then take the shortest
        // prefix reaching p.
        let mut x = 0x2545F4914F6CDD1Du64;
        let logits: Vec<f32> = (0..32_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 3.0
            })
            .collect();
        for p in [0.1f32, 0.5, 0.9, 0.99] {
            let mut s = sampler(SamplingParams {
                temperature: 0.8,
                top_p: p,
                ..Default::default()
            });
            let got = ids(&s.candidates(&logits, &[]));
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut all: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, exp_nonpositive((l - max) / 0.8)))
                .collect();
            let total: f64 = all.iter().map(|&(_, w)| w as f64).sum();
            all.sort_by(|a, b| by_weight_desc(*a, *b));
            let mut acc = 0.0f64;
            let n = all
                .iter()
                .position(|&(_, w)| {
                    acc += w as f64;
                    acc >= p as f64 * total
                })
                .unwrap()
                + 1;
            // The kept set is the heaviest tokens, exactly; its size may differ by one at
            // the edge, where sums taken in another order differ in their last bits.
            assert_eq!(got, ids(&all[..got.len()]), "p {p}");
            assert!(got.len().abs_diff(n) <= 1, "p {p}: {} vs {n}", got.len());
        }
    }

    #[test]
    fn min_p_keeps_tokens_at_least_that_fraction_of_the_best() {
        let logits = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let kept = |m| {
            ids(&sampler(SamplingParams {
                temperature: 1.0,
                min_p: m,
                ..Default::default()
            })
            .candidates(&logits, &[]))
        };
        assert_eq!(kept(0.5), vec![1, 3]); // 0.3 / 0.5 = 0.6 >= 0.5
        assert_eq!(kept(0.29), vec![1, 2, 3]); // 0.15 / 0.5 = 0.3
        assert_eq!(kept(0.7), vec![1]);
    }

    #[test]
    fn repetition_penalty_scales_seen_tokens_by_sign() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        // Token 0 (logit 3) halves to 1.5 and loses to token 1 (2.0); token 2 (-1) is seen too.
        assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0, 2, 0]), 1);
        let mut scratch = Vec::new();
        let penalized = penalize(&mut scratch, 2.0, &[3.0, 2.0, -1.0], &[0, 2, 0]);
        assert_eq!(penalized, &[1.5, 2.0, -2.0]);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(1.0, seed);
            (0..64).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn draws_follow_softmax_of_logits_over_temperature() {
        // Chi-square goodness of fit over 8 tokens at T = 0.7; the 0.001 critical value for
        // 7 degrees of freedom is 24.32.
        let logits = [1.0f32, 0.5, 0.0, -0.3, 0.8, 1.2, -1.0, 0.2];
        let t = 0.7f32;
        let weights: Vec<f64> = logits.iter().map(|&l| ((l / t) as f64).exp()).collect();
        let z: f64 = weights.iter().sum();
        let n = 40_000;
        let mut s = Sampler::new(t, 11);
        let mut counts = [0usize; 8];
        for _ in 0..n {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&weights)
            .map(|(&c, &w)| {
                let expected = n as f64 * w / z;
                (c as f64 - expected).powi(2) / expected
            })
            .sum();
        assert!(chi2 < 24.32, "chi-square {chi2}, counts {counts:?}");
    }

    #[test]
    fn fast_exp_matches_std_exp() {
        let mut worst = 0.0f32;
        let mut x = 0.0f32;
        while x > -87.0 {
            let (a, b) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x -= 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(-200.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
