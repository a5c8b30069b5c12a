//! EtLlm's float attention kernel (`llama::custom_sdpa` and `sdpa_with_kv_cache`) on
//! random data against a plain float64 computation, for every way the kernel can cut a call
//! into tiles: every head in one pass over the cache with the keys split into ranges that
//! are merged afterwards (decode), tiles of query rows per kv head (prefill), grouped-query
//! heads, head dimensions with and without the AVX2 loops, causal rows that see different
//! numbers of keys, additive masks, batches, and the thread pool.
//!
//! Tolerance: inputs are uniform in [-1, 1). Each score is a float dot product of `dim`
//! terms and each output a weighted mean of up to 2,000 value rows accumulated in float,
//! in an order that depends on the plan (blocks of 64 keys, rescaled as the running max
//! grows, key ranges merged at the end), so outputs differ from the float64 reference by
//! rounding only: float32's epsilon is 1.2e-7 and outputs are below 1 in magnitude; at most
//! 1.3e-7 was observed over every case here. `TOL` = 1e-6 leaves room for other compilers
//! and CPUs (the portable loops without FMA) and stays far below what a real error gives:
//! one key too many or too few moves an output by about (1/keys) x |v - mean| ~ 2e-4 at
//! 2,000 keys, a wrong head or block by 1e-2 or more.
//!
//! The int8 path of `llama::custom_quantized_sdpa` (keys and values dequantized block by
//! block, then the same float loops) is checked the same way, on every plan, against
//! float64 attention over the dequantized values: each dequantized value is one float
//! rounding of an exact product, the same in the kernel and in the test, so the same
//! tolerance applies (values stay within about [-1.2, 1.2]).

use std::f64;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn etllm_llama_ops_test_f32_attention(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        mask: *const f32,
        out: *mut f32,
        batch: i64,
        seq: i64,
        heads: i64,
        kv_heads: i64,
        dim: i64,
        cache_rows: i64,
        start_pos: i64,
        is_causal: bool,
        scale: f32,
        layout: i32,
        key_splits: i64,
        row_block: i64,
        portable: bool,
        threaded: bool,
    ) -> bool;
}

const TOL: f32 = 1e-6;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn etllm_llama_ops_test_q8_attention(
        q: *const f32,
        k: *const i8,
        k_scales: *const f32,
        k_zero_points: *const i8,
        v: *const i8,
        v_scales: *const f32,
        v_zero_points: *const i8,
        mask: *const f32,
        out: *mut f32,
        batch: i64,
        seq: i64,
        heads: i64,
        kv_heads: i64,
        dim: i64,
        cache_rows: i64,
        start_pos: i64,
        is_causal: bool,
        scale: f32,
        layout: i32,
        key_splits: i64,
        row_block: i64,
        portable: bool,
        threaded: bool,
    ) -> bool;
}

/// xorshift64*: uniform floats in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    cache_rows: usize,
    start_pos: usize,
    causal: bool,
}

struct Case {
    shape: Shape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// [seq, cache_rows], added to the scores; -inf masks a key out.
    mask: Option<Vec<f32>>,
    scale: f32,
}

impl Case {
    fn new(shape: Shape, seed: u64) -> Case {
        let mut rng = Rng(seed | 1);
        let s = shape;
        Case {
            q: rng.vec(s.batch * s.seq * s.heads * s.dim),
            k: rng.vec(s.batch * s.cache_rows * s.kv_heads * s.dim),
            v: rng.vec(s.batch * s.cache_rows * s.kv_heads * s.dim),
            mask: None,
            scale: 1.0 / (s.dim as f32).sqrt(),
            shape,
        }
    }

    fn keys_for(&self, i: usize) -> usize {
        let s = self.shape;
        if self.mask.is_some() {
            s.cache_rows
        } else if s.causal {
            s.start_pos + i + 1
        } else {
            s.start_pos + s.seq
        }
    }

    /// softmax(q k^T * scale + mask) v in float64, one query row and head at a time.
    fn reference(&self) -> Vec<f32> {
        let s = self.shape;
        let group = s.heads / s.kv_heads;
        let mut out = vec![0f32; s.batch * s.seq * s.heads * s.dim];
        for b in 0..s.batch {
            for i in 0..s.seq {
                for h in 0..s.heads {
                    let kh = h / group;
                    let q = &self.q[((b * s.seq + i) * s.heads + h) * s.dim..][..s.dim];
                    let row = |t: &[f32], j: usize| -> Vec<f64> {
                        t[((b * s.cache_rows + j) * s.kv_heads + kh) * s.dim..][..s.dim]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    };
                    let keys = self.keys_for(i);
                    let scores: Vec<f64> = (0..keys)
                        .map(|j| {
                            let dot: f64 = q
                                .iter()
                                .zip(row(&self.k, j))
                                .map(|(&a, b)| a as f64 * b)
                                .sum();
                            let m = self.mask.as_ref().map_or(0.0, |m| m[i * s.cache_rows + j]);
                            dot * self.scale as f64 + m as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let o = &mut out[((b * s.seq + i) * s.heads + h) * s.dim..][..s.dim];
                    if max == f64::NEG_INFINITY {
                        o.fill(f32::NAN);
                        continue;
                    }
                    let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for (d, od) in o.iter_mut().enumerate() {
                        let sum: f64 = (0..keys).map(|j| weights[j] * row(&self.v, j)[d]).sum();
                        *od = (sum / total) as f32;
                    }
                }
            }
        }
        out
    }

    /// The kernel's output with the plan forced (`layout` 0: the automatic plan).
    fn run(
        &self,
        layout: i32,
        key_splits: i64,
        row_block: i64,
        portable: bool,
        threaded: bool,
    ) -> Vec<f32> {
        let s = self.shape;
        let mut out = vec![f32::from_bits(0x7fc0_dead); s.batch * s.seq * s.heads * s.dim];
        // Safety: every pointer covers the dense array its dimensions describe; the mask
        // is [seq, cache_rows] or null.
        let ok = unsafe {
            etllm_llama_ops_test_f32_attention(
                self.q.as_ptr(),
                self.k.as_ptr(),
                self.v.as_ptr(),
                self.mask.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
                out.as_mut_ptr(),
                s.batch as i64,
                s.seq as i64,
                s.heads as i64,
                s.kv_heads as i64,
                s.dim as i64,
                s.cache_rows as i64,
                s.start_pos as i64,
                s.causal,
                self.scale,
                layout,
                key_splits,
                row_block,
                portable,
                threaded,
            )
        };
        assert!(ok, "{s:?}: rejected");
        out
    }

    /// Runs every plan in `plans` (layout, key splits, row block), with and without the
    /// AVX2 loops, inline and on the thread pool, and checks each against the reference.
    fn check(&self, plans: &[(i32, i64, i64)]) {
        self.check_runs(plans, |layout, splits, rows, portable, threaded| {
            self.run(layout, splits, rows, portable, threaded)
        });
    }

    /// `check` for the kernel run by `run(layout, key splits, row block, portable,
    /// threaded)`.
    fn check_runs(
        &self,
        plans: &[(i32, i64, i64)],
        run: impl Fn(i32, i64, i64, bool, bool) -> Vec<f32>,
    ) {
        let want = self.reference();
        for &(layout, splits, rows) in plans {
            for portable in [false, true] {
                for threaded in [false, true] {
                    let got = run(layout, splits, rows, portable, threaded);
                    let what = format!(
                        "{:?} layout {layout} splits {splits} rows {rows} portable {portable} \
                         threaded {threaded}",
                        self.shape
                    );
                    compare(&got, &want, &what);
                }
            }
        }
    }
}

fn compare(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(
                g.is_nan(),
                "{what}: element {n} is {g}, want NaN (every key masked out)"
            );
        } else {
            assert!(
                (g - w).abs() <= TOL,
                "{what}: element {n} is {g}, want {w} (diff {})",
                (g - w).abs()
            );
        }
    }
}

/// Plans for a decode-like call: automatic, every head with 1, 2, 3 and 7 key ranges
/// (7 does not divide the blocks evenly), one row per kv-head tile.
const DECODE_PLANS: &[(i32, i64, i64)] = &[
    (0, 1, 1),
    (1, 1, 1),
    (1, 2, 1),
    (1, 3, 1),
    (1, 7, 1),
    (2, 1, 1),
];

fn decode(heads: usize, kv_heads: usize, dim: usize, keys: usize) -> Shape {
    Shape {
        batch: 1,
        seq: 1,
        heads,
        kv_heads,
        dim,
        cache_rows: 2048,
        start_pos: keys - 1,
        causal: true,
    }
}

#[test]
fn decode_multi_head_at_480_and_2000_keys_with_every_key_split() {
    // The benchmark model's attention: 6 heads of 48.
    for (keys, seed) in [(480, 1), (2000, 2), (1, 3), (65, 4)] {
        Case::new(decode(6, 6, 48, keys), seed).check(DECODE_PLANS);
    }
}

#[test]
fn decode_grouped_query_heads_share_one_pass_over_their_kv_head() {
    for (heads, kv_heads, dim, keys, seed) in [
        (6, 2, 48, 700, 5),
        (8, 1, 64, 333, 6),
        (32, 8, 128, 260, 7),
        (4, 2, 16, 130, 8),
    ] {
        Case::new(decode(heads, kv_heads, dim, keys), seed).check(DECODE_PLANS);
    }
}

#[test]
fn head_dims_that_are_not_a_multiple_of_eight_use_the_portable_loops() {
    for (dim, seed) in [(20, 9), (4, 10), (1, 11), (13, 12)] {
        Case::new(decode(4, 2, dim, 150), seed).check(DECODE_PLANS);
    }
}

#[test]
fn prefill_rows_see_different_numbers_of_keys() {
    // Causal rows 50..86 of a cache: row i sees 51 + i keys, so blocks of 64 keys are
    // partly visible to some rows and invisible to others.
    let shape = Shape {
        batch: 1,
        seq: 37,
        heads: 6,
        kv_heads: 2,
        dim: 24,
        cache_rows: 128,
        start_pos: 50,
        causal: true,
    };
    let plans = [
        (0, 1, 1),
        (2, 1, 1),
        (2, 1, 4),
        (2, 1, 5),
        (2, 1, 64),
        (1, 1, 1),
        (1, 3, 1),
    ];
    Case::new(shape, 13).check(&plans);
    // From position 0, as a first prompt chunk, and a single row per tile.
    Case::new(
        Shape {
            start_pos: 0,
            seq: 70,
            ..shape
        },
        14,
    )
    .check(&plans);
}

#[test]
fn non_causal_rows_all_see_every_key_up_to_the_last_row() {
    let shape = Shape {
        batch: 1,
        seq: 5,
        heads: 4,
        kv_heads: 4,
        dim: 32,
        cache_rows: 300,
        start_pos: 200,
        causal: false,
    };
    Case::new(shape, 15).check(&[(0, 1, 1), (1, 1, 1), (1, 4, 1), (2, 1, 2)]);
}

#[test]
fn masked_keys_blocks_and_rows() {
    let shape = Shape {
        batch: 1,
        seq: 4,
        heads: 4,
        kv_heads: 2,
        dim: 16,
        cache_rows: 200,
        start_pos: 0,
        causal: false,
    };
    let mut case = Case::new(shape, 16);
    let mut rng = Rng(17);
    let mut mask = vec![0f32; shape.seq * shape.cache_rows];
    for (n, m) in mask.iter_mut().enumerate() {
        let (i, j) = (n / shape.cache_rows, n % shape.cache_rows);
        *m = match i {
            // Row 0: everything but the last block masked out, so the first blocks and
            // key ranges contribute nothing.
            0 if j < 140 => f32::NEG_INFINITY,
            // Row 1: every key masked out: NaN, as torch.
            1 => f32::NEG_INFINITY,
            // Row 2: scattered masked keys and finite offsets.
            2 if j % 3 == 0 => f32::NEG_INFINITY,
            _ => rng.next() * 4.0,
        };
    }
    case.mask = Some(mask);
    case.check(&[
        (0, 1, 1),
        (1, 1, 1),
        (1, 2, 1),
        (1, 4, 1),
        (2, 1, 1),
        (2, 1, 3),
    ]);
}

#[test]
fn more_key_ranges_than_blocks_and_batches() {
    // 100 keys are two blocks: key ranges 3 to 5 are empty and must merge as nothing.
    Case::new(decode(6, 3, 40, 100), 18).check(&[(1, 5, 1), (1, 2, 1)]);
    let shape = Shape {
        batch: 3,
        seq: 2,
        heads: 4,
        kv_heads: 2,
        dim: 8,
        cache_rows: 400,
        start_pos: 300,
        causal: true,
    };
    Case::new(shape, 19).check(&[(0, 1, 1), (1, 1, 1), (1, 3, 1), (2, 1, 1), (2, 1, 2)]);
}

/// Int8 rows [batch, rows, heads, dim] with one scale and zero point per (batch, row, head),
/// as `llama::custom_quantized_sdpa` reads its key and value caches.
struct Q8 {
    data: Vec<i8>,
    scales: Vec<f32>,
    zero_points: Vec<i8>,
}

impl Q8 {
    /// Random int8 rows whose values (x - zero point) * scale lie within about [-1.2, 1.2],
    /// as per-token quantization of activations of that size gives.
    fn random(rng: &mut Rng, rows: usize, dim: usize) -> Q8 {
        let byte = |rng: &mut Rng| (rng.next() * 128.0).floor().clamp(-128.0, 127.0) as i8;
        let data = (0..rows * dim).map(|_| byte(rng)).collect();
        let scales = (0..rows)
            .map(|_| (0.75 + 0.25 * rng.next()) / 128.0)
            .collect();
        let zero_points = (0..rows)
            .map(|_| (rng.next() * 20.0).round() as i8)
            .collect();
        Q8 {
            data,
            scales,
            zero_points,
        }
    }

    /// (x - zero point) * scale in float: one rounding of an exact product, so the same
    /// values the kernel computes.
    fn dequantize(&self, dim: usize) -> Vec<f32> {
        self.data
            .iter()
            .enumerate()
            .map(|(n, &x)| {
                let r = n / dim;
                (x as i32 - self.zero_points[r] as i32) as f32 * self.scales[r]
            })
            .collect()
    }
}

/// A case for the int8 path: `case.k` and `case.v` hold the dequantized `k` and `v`, so
/// `case.reference()` is float64 attention over exactly the values the kernel attends to.
struct Q8Case {
    case: Case,
    k: Q8,
    v: Q8,
}

impl Q8Case {
    fn new(shape: Shape, seed: u64) -> Q8Case {
        let mut case = Case::new(shape, seed);
        let mut rng = Rng(seed.wrapping_mul(31) | 1);
        let rows = shape.batch * shape.cache_rows * shape.kv_heads;
        let k = Q8::random(&mut rng, rows, shape.dim);
        let v = Q8::random(&mut rng, rows, shape.dim);
        case.k = k.dequantize(shape.dim);
        case.v = v.dequantize(shape.dim);
        Q8Case { case, k, v }
    }

    fn run(&self, layout: i32, splits: i64, rows: i64, portable: bool, threaded: bool) -> Vec<f32> {
        let c = &self.case;
        let s = c.shape;
        let mut out = vec![f32::from_bits(0x7fc0_dead); s.batch * s.seq * s.heads * s.dim];
        // Safety: every pointer covers the dense array its dimensions describe (scales and
        // zero points one per key or value row); the mask is [seq, cache_rows] or null.
        let ok = unsafe {
            etllm_llama_ops_test_q8_attention(
                c.q.as_ptr(),
                self.k.data.as_ptr(),
                self.k.scales.as_ptr(),
                self.k.zero_points.as_ptr(),
                self.v.data.as_ptr(),
                self.v.scales.as_ptr(),
                self.v.zero_points.as_ptr(),
                c.mask.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
                out.as_mut_ptr(),
                s.batch as i64,
                s.seq as i64,
                s.heads as i64,
                s.kv_heads as i64,
                s.dim as i64,
                s.cache_rows as i64,
                s.start_pos as i64,
                s.causal,
                c.scale,
                layout,
                splits,
                rows,
                portable,
                threaded,
            )
        };
        assert!(ok, "{s:?}: rejected");
        out
    }

    fn check(&self, plans: &[(i32, i64, i64)]) {
        self.case
            .check_runs(plans, |layout, splits, rows, portable, threaded| {
                self.run(layout, splits, rows, portable, threaded)
            });
    }
}

#[test]
fn int8_decode_attends_to_the_dequantized_cache_with_every_key_split() {
    // Grouped-query and multi-head, one to several blocks of 64 keys.
    for (heads, kv_heads, dim, keys, seed) in [
        (4, 2, 16, 100, 21),
        (6, 6, 48, 480, 22),
        (8, 1, 64, 333, 23),
        (32, 8, 128, 130, 24),
        (4, 2, 16, 1, 25),
    ] {
        Q8Case::new(decode(heads, kv_heads, dim, keys), seed).check(DECODE_PLANS);
    }
}

#[test]
fn int8_prefill_rows_see_their_causal_keys_from_position_0_and_later() {
    let shape = Shape {
        batch: 1,
        seq: 37,
        heads: 4,
        kv_heads: 2,
        dim: 16,
        cache_rows: 128,
        start_pos: 50,
        causal: true,
    };
    let plans = [
        (0, 1, 1),
        (2, 1, 1),
        (2, 1, 4),
        (2, 1, 64),
        (1, 1, 1),
        (1, 3, 1),
    ];
    Q8Case::new(shape, 26).check(&plans);
    Q8Case::new(
        Shape {
            start_pos: 0,
            seq: 70,
            ..shape
        },
        27,
    )
    .check(&plans);
}

#[test]
fn int8_head_dims_that_are_not_a_multiple_of_eight() {
    for (dim, seed) in [(20, 28), (1, 29), (13, 30)] {
        Q8Case::new(decode(4, 2, dim, 150), seed).check(DECODE_PLANS);
    }
}

#[test]
fn int8_masked_keys_and_batches() {
    let shape = Shape {
        batch: 2,
        seq: 3,
        heads: 4,
        kv_heads: 2,
        dim: 16,
        cache_rows: 150,
        start_pos: 0,
        causal: false,
    };
    let mut case = Q8Case::new(shape, 31);
    let mut rng = Rng(32);
    let mask = (0..shape.seq * shape.cache_rows)
        .map(|n| match (n / shape.cache_rows, n % shape.cache_rows) {
            (0, j) if j < 100 => f32::NEG_INFINITY,
            (1, j) if j % 4 == 0 => f32::NEG_INFINITY,
            _ => rng.next() * 4.0,
        })
        .collect();
    case.case.mask = Some(mask);
    case.check(&[(0, 1, 1), (1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 1, 3)]);
}
