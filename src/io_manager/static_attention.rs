//! The manager for static-attention exports, whose KV caches are explicit method inputs
//! and outputs (upstream's `static_attention.py` modules), as written by our fixture
//! script and by upstream's `examples/apple/coreml/llama/export_static_llm_coreml.py`.

use crate::error::{Error, Result};
use crate::io_manager::state::{self, Reader};
use crate::io_manager::{fill_integers, integer_input, logits_row, IoManager, StepInputs};
use crate::model::ModelInfo;
use crate::tensor::{
    bf16, f16, ConstValue, DType, HostData, HostDataMut, HostTensor, TensorView, ValueSpec,
};
use half::slice::HalfFloatSliceExt;

/// Value of a hidden mask entry (added to attention scores).
const HIDDEN: f32 = f32::NEG_INFINITY;

/// Buffers and layout of one method (`forward` for decode, `prefill` for prompts).
#[derive(Debug)]
struct MethodIo {
    name: String,
    /// Tokens per call.
    len: usize,
    tokens: HostTensor,
    /// `[1, len, cache_len + len]`: cache columns first, then the call's own tokens.
    mask: HostTensor,
    cos: HostTensor,
    sin: HostTensor,
    /// Index of the last real token, for exports that return one logits row
    /// (upstream's `generate_full_logits=False`); absent when every row is returned.
    last_valid: Option<HostTensor>,
    /// Input indices of tokens, mask, cos, sin and (when present) last_valid_token_pos.
    io_index: [usize; 4],
    last_valid_index: Option<usize>,
    /// Per layer: input index of the k cache, output index of the new k rows, the same
    /// for v.
    kv_index: Vec<[usize; 4]>,
    /// Per layer: the element types of its k and v cache inputs.
    kv_dtypes: Vec<[DType; 2]>,
    n_inputs: usize,
}

/// Drives static-attention exports, whose KV caches are explicit method inputs and outputs:
/// `forward` decodes (one token per call, or a fixed `input_len` padded with zeros),
/// `prefill` (when present) evaluates prompts in chunks of its fixed length; both take
/// every layer's k and v cache as inputs and return the logits and the new cache rows.
///
/// Two metadata layouts are read (see `method_io`): today's fixture
/// (`{method}_input_specs`, `{method}_kv_cache_specs`, `cache_len`) and upstream's
/// `examples/apple/coreml/llama/export_static_llm_coreml.py` (`_get_metadata`:
/// `kv_cache_specs`/`mask_specs`/`freqs_*_input_index` for a single method, the same with
/// `decode_`/`prefill_` prefixes for `--multifunction`; `head_dim`, `n_heads_per_cache`,
/// `freqs_cos`, `freqs_sin`, `vocab_size`). Every input is built in the dtype the method
/// declares: i64 or i32 tokens and last_valid_token_pos; f32, f16 or bf16 masks, rope rows
/// and caches, each in its own input's type (upstream's script exports f16 by default;
/// f64 and other types are refused). Values are computed in f32 and rounded to nearest
/// into half-precision inputs; new cache rows, which reach the manager as f32 (see
/// [`TensorData`](crate::tensor::TensorData)), are converted back to the cache's type,
/// which for rows the model computed in that type is exact.
///
/// The manager owns the caches, the attention masks and the rope rows, and drives them as
/// upstream's `StaticAttentionIOManager` does in its "smart mask" style: masks hold 0 for
/// visible and -inf for hidden entries, cache columns first (the first `min(pos,
/// cache_len)` visible) and a causal block for the call's own tokens; new rows are written
/// in place into a ring buffer (slot = position mod cache length), so the cache buffers
/// handed to the runtime never move or shift. A chunk shorter than the method's length is
/// padded (token 0, rope rows cos 1 / sin 0); padded rows never reach the cache, and the
/// logits are those of the last real token: the only row of a one-row output (where
/// `last_valid_token_pos` selects it), else row `n - 1`.
///
/// Sliding window: when the conversation grows past the cache length, the oldest
/// positions are overwritten and each token attends only to the last `cache_len`
/// positions (plus the tokens of its own call). Generation goes on up to the rope table's
/// length, but quality degrades like any sliding-window attention: anything older than
/// the window is forgotten, and the output no longer equals full attention.
///
/// Saved state ([`IoManager::save_state`]), all integers little-endian `u64` after the
/// 8-byte header (tag `SATT`, version 1): the number of layers, heads per cache, cache
/// length and head dim; one byte per cache giving its element type (layer 0 k, layer 0
/// v, layer 1 k, ...: 0 f32, 4 f16, 5 bf16, the `etllm_dtype` codes); the position; then
/// the caches in that order, each as its `heads` blocks of the first `min(pos,
/// cache_len)` slots (`head_dim` elements each, little-endian, in the cache's own type).
/// Slots are ring slots (position mod cache length), so a window that has slid past the
/// cache is saved whole. A restore checks the layout against the loaded model's and the
/// data's length before it changes anything; the slots past the saved ones are zeroed.
#[derive(Debug, Default)]
pub struct StaticAttention {
    decode: Option<MethodIo>,
    prefill: Option<MethodIo>,
    k_caches: Vec<HostTensor>,
    v_caches: Vec<HostTensor>,
    cache_len: usize,
    head_dim: usize,
    heads: usize,
    freqs_cos: Vec<f32>,
    freqs_sin: Vec<f32>,
    /// Rows of the rope tables: the most positions a conversation can reach.
    rope_rows: usize,
    pos: usize,
    /// Tokens of the step prepared last, and whether it was a prefill.
    pending: Option<(usize, bool)>,
}

/// Whether the export's constants describe a static-attention layout: today's fixture
/// layout (`forward_kv_cache_specs`, `kv_cache_specs`) or upstream's
/// `export_static_llm_coreml.py` (`kv_cache_specs` for a single method,
/// `decode_kv_cache_specs` with `--multifunction`).
pub(crate) fn is_static_attention(model: &ModelInfo) -> bool {
    [
        "forward_kv_cache_specs",
        "decode_kv_cache_specs",
        "kv_cache_specs",
    ]
    .iter()
    .any(|k| model.constants.contains_key(*k))
}

fn constant<'m>(model: &'m ModelInfo, names: &[&str]) -> Result<&'m ConstValue> {
    names
        .iter()
        .find_map(|n| model.constants.get(*n))
        .ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "static-attention model without a `{}` constant method",
                names[0]
            ))
        })
}

fn ints(model: &ModelInfo, names: &[&str]) -> Result<Vec<i64>> {
    constant(model, names)?.as_ints().ok_or_else(|| {
        Error::UnsupportedModel(format!("constant method `{}` is not integers", names[0]))
    })
}

fn positive_value(name: &str, values: &[i64]) -> Result<usize> {
    match values {
        [v] if *v > 0 => usize::try_from(*v)
            .map_err(|_| Error::UnsupportedModel(format!("constant method `{name}` is too large"))),
        other => Err(Error::UnsupportedModel(format!(
            "constant method `{name}` is {other:?}, expected one positive integer"
        ))),
    }
}

fn positive(model: &ModelInfo, names: &[&str]) -> Result<usize> {
    positive_value(names[0], &ints(model, names)?)
}

/// The names under which a layout constant `key` of `method` may be stored, most specific
/// first: `forward` is upstream's `decode_*` (multifunction) or unprefixed (single
/// method); today's fixture writes `{method}_*`.
fn method_keys(method: &str, key: &str) -> Vec<String> {
    match method {
        "forward" => vec![
            format!("forward_{key}"),
            format!("decode_{key}"),
            key.to_string(),
        ],
        _ => vec![format!("{method}_{key}"), key.to_string()],
    }
}

/// The integers of the first of `method`'s names for `key` that exists, with that name.
fn method_ints(model: &ModelInfo, method: &str, key: &str) -> Result<Option<(String, Vec<i64>)>> {
    for name in method_keys(method, key) {
        if let Some(v) = model.constants.get(&name) {
            let values = v.as_ints().ok_or_else(|| {
                Error::UnsupportedModel(format!("constant method `{name}` is not integers"))
            })?;
            return Ok(Some((name, values)));
        }
    }
    Ok(None)
}

fn index(v: i64, limit: usize, what: &str) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&i| i < limit)
        .ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "{what} index {v} is out of range (the method has {limit})"
            ))
        })
}

/// A float element type the manager builds inputs in (the one each input declares): f32,
/// f16 or bf16. Values are computed in f32 and rounded to nearest on the way in; for f32
/// every conversion is the identity and compiles to plain copies and fills.
trait Float: Copy {
    fn from_f32(v: f32) -> Self;
    /// `dst[i] = from_f32(src[i])`; the lengths are equal.
    fn convert(dst: &mut [Self], src: &[f32]);
}

impl Float for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn convert(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }
}

impl Float for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn convert(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Float for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn convert(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
}

/// Calls `$body` with `$v` bound to the elements of a float host tensor, whatever their
/// type (the manager creates only f32, f16 and bf16 float tensors).
macro_rules! with_floats {
    ($tensor:expr, $v:ident => $body:expr) => {
        match $tensor.data_mut() {
            HostDataMut::F32($v) => $body,
            HostDataMut::F16($v) => $body,
            HostDataMut::BF16($v) => $body,
            _ => unreachable!("created as a float tensor"),
        }
    };
}

/// The bytes of float elements. Sound because [`Float`] is implemented only for f32, f16
/// and bf16: plain numbers without padding, valid for every bit pattern.
fn float_bytes<T: Float>(v: &[T]) -> &[u8] {
    // Safety: see above; the length is the slice's own size in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn float_bytes_mut<T: Float>(v: &mut [T]) -> &mut [u8] {
    // Safety: as `float_bytes`; any bytes written are a valid value of T.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Puts little-endian element bytes in native order, or back (the same swap both ways).
fn swap_to_le<T: Float>(bytes: &mut [u8]) {
    if cfg!(target_endian = "big") {
        for e in bytes.chunks_exact_mut(std::mem::size_of::<T>()) {
            e.reverse();
        }
    }
}

/// Appends, for each of `heads`, the first `valid` slots of a `[1, heads, c, hd]` cache:
/// one bulk copy per head.
fn save_cache(out: &mut Vec<u8>, cache: &HostTensor, [heads, c, hd, valid]: [usize; 4]) {
    fn go<T: Float>(out: &mut Vec<u8>, v: &[T], [heads, c, hd, valid]: [usize; 4]) {
        for h in 0..heads {
            let start = out.len();
            out.extend_from_slice(float_bytes(&v[h * c * hd..(h * c + valid) * hd]));
            swap_to_le::<T>(&mut out[start..]);
        }
    }
    match cache.data() {
        HostData::F32(v) => go(out, v, [heads, c, hd, valid]),
        HostData::F16(v) => go(out, v, [heads, c, hd, valid]),
        HostData::BF16(v) => go(out, v, [heads, c, hd, valid]),
        _ => unreachable!("created as a float tensor"),
    }
}

/// The inverse of `save_cache` (`bytes` has exactly the length it wrote); the slots past
/// `valid` are zeroed.
fn restore_cache(cache: &mut HostTensor, bytes: &[u8], dims: [usize; 4]) {
    fn go<T: Float>(v: &mut [T], bytes: &[u8], [heads, c, hd, valid]: [usize; 4]) {
        let per_head = valid * hd * std::mem::size_of::<T>();
        for (h, src) in bytes.chunks_exact(per_head.max(1)).take(heads).enumerate() {
            let dst = float_bytes_mut(&mut v[h * c * hd..(h * c + valid) * hd]);
            dst.copy_from_slice(src);
            swap_to_le::<T>(dst);
        }
        for h in 0..heads {
            v[(h * c + valid) * hd..(h + 1) * c * hd].fill(T::from_f32(0.0));
        }
    }
    with_floats!(cache, v => go(v, bytes, dims))
}

/// The code of a cache's element type in a saved state (`etllm_dtype`'s).
fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 4,
        DType::BF16 => 5,
        _ => 255,
    }
}

/// A `dtype` tensor (f32, f16 or bf16, checked by `float_spec`) filled with `value`.
fn float_tensor(dtype: DType, sizes: Vec<usize>, value: f32) -> HostTensor {
    let n = sizes.iter().product();
    let data = HostData::float_zeros(dtype, n).expect("a float type");
    let mut t = HostTensor::new(sizes, data).expect("sizes match");
    if value != 0.0 {
        fill(&mut t, 0..n, value);
    }
    t
}

fn fill(t: &mut HostTensor, range: std::ops::Range<usize>, value: f32) {
    fn go<T: Float>(v: &mut [T], range: std::ops::Range<usize>, value: f32) {
        v[range].fill(T::from_f32(value));
    }
    with_floats!(t, v => go(v, range, value))
}

/// Element type and sizes of a float tensor input or output: f32, f16 or bf16 (the float
/// types the host tensors have); other float types are refused by name. Outputs of any of
/// the three reach the manager as f32 (the runner widens them).
fn float_spec(spec: Option<&ValueSpec>, what: &str, method: &str) -> Result<(DType, Vec<usize>)> {
    match spec.and_then(ValueSpec::tensor) {
        Some(t) if matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) => {
            Ok((t.dtype, t.sizes.clone()))
        }
        Some(t) if t.dtype == DType::F64 => Err(Error::UnsupportedModel(format!(
            "{what} of `{method}` is {:?}; the built-in static-attention manager builds f32, \
             f16 and bf16 masks, rope rows and caches only",
            t.dtype
        ))),
        Some(t) => Err(Error::UnsupportedModel(format!(
            "{what} of `{method}` is a {:?} tensor; expected f32, f16 or bf16",
            t.dtype
        ))),
        None => Err(Error::UnsupportedModel(format!(
            "{what} of `{method}` is missing or not a tensor"
        ))),
    }
}

/// Undoes a slip in upstream's `_get_metadata` (`export_static_llm_coreml.py`, executorch
/// 1.5.1) that `kv_cache_specs` of models with 11 or more layers carry: it lists the layers
/// in the string order of their cache names (`l0,h0`, `l1,h0`, `l10,h0`, `l2,h0`, ...),
/// with each row's correct input indices, but numbers the outputs `1 + row` (k) and
/// `1 + n + row` (v) as if the rows were in layer order, while the method returns them
/// in layer order. Upstream's own runners (`run_static_llm*.py`) never read these
/// columns: they pair outputs with caches in layer order. When the rows have exactly that
/// fingerprint (inputs of layer `order[r]` in row `r`, outputs `1 + r` / `1 + n + r`),
/// the outputs are re-paired by layer as upstream's runners do; any other table is kept.
/// Returns whether it changed anything.
fn repair_sorted_layer_names(rows: &mut [[i64; 5]]) -> bool {
    let n = rows.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| format!("l{i},h0"));
    if order.iter().enumerate().all(|(r, &l)| r == l) {
        return false;
    }
    let first = |col: usize| rows.iter().map(|r| r[col]).min().unwrap_or(0);
    let (k0, v0) = (first(0), first(2));
    let n64 = n as i64;
    let fingerprint = rows.iter().zip(&order).enumerate().all(|(r, (row, &l))| {
        let (r, l) = (r as i64, l as i64);
        row[0] == k0 + l && row[2] == v0 + l && row[1] == 1 + r && row[3] == 1 + n64 + r
    });
    if !fingerprint {
        return false;
    }
    for (row, &l) in rows.iter_mut().zip(&order) {
        row[1] = 1 + l as i64;
        row[3] = 1 + n64 + l as i64;
    }
    true
}

/// Which input of a method plays which role; each input exactly one.
struct Claims<'a> {
    method: &'a str,
    roles: Vec<Option<String>>,
}

impl<'a> Claims<'a> {
    fn new(method: &'a str, n_inputs: usize) -> Self {
        Self {
            method,
            roles: vec![None; n_inputs],
        }
    }

    fn claim(&mut self, v: i64, what: &str) -> Result<usize> {
        let i = index(
            v,
            self.roles.len(),
            &format!("`{}` input ({what})", self.method),
        )?;
        if let Some(other) = &self.roles[i] {
            return Err(Error::UnsupportedModel(format!(
                "input {i} of `{}` is described as both {other} and {what}",
                self.method
            )));
        }
        self.roles[i] = Some(what.to_string());
        Ok(i)
    }

    fn unclaimed(&self) -> Vec<usize> {
        (0..self.roles.len())
            .filter(|&i| self.roles[i].is_none())
            .collect()
    }
}

impl StaticAttention {
    /// A manager to be loaded with [`IoManager::load`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads and checks the layout of `name` against its signature and builds its buffers.
    ///
    /// Two layouts are read. Today's fixture names every role in `{name}_input_specs`
    /// (`[tokens, mask, cos, sin, last_valid_token_pos]`). Upstream's
    /// `export_static_llm_coreml.py` (`_get_metadata`) names the mask (`*_mask_specs`,
    /// rows `[mask_idx, cache_len]`) and the rope rows (`*_freqs_cos_input_index`,
    /// `*_freqs_sin_input_index`) only; the tokens are then the first input not described
    /// (input 0, the head of upstream's `(tokens, options)` pytree) and
    /// `last_valid_token_pos`, which only multifunction exports take, the other one.
    fn method_io(&self, model: &ModelInfo, name: &str) -> Result<MethodIo> {
        let info = model
            .methods
            .get(name)
            .ok_or_else(|| Error::UnsupportedModel(format!("no `{name}` method")))?;
        let n_inputs = info.inputs.len();
        let n_outputs = info.outputs.len();
        let mut claims = Claims::new(name, n_inputs);

        // Caches.
        let (kv_name, kv) = method_ints(model, name, "kv_cache_specs")?.ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "static-attention model without `{}` (the cache layout of `{name}`)",
                method_keys(name, "kv_cache_specs")[0]
            ))
        })?;
        if kv.is_empty() || kv.len() % 5 != 0 {
            return Err(Error::UnsupportedModel(format!(
                "`{kv_name}` must hold rows of [k_in, k_out, v_in, v_out, cache_len]"
            )));
        }
        let mut rows: Vec<[i64; 5]> = kv
            .chunks(5)
            .map(|r| [r[0], r[1], r[2], r[3], r[4]])
            .collect();
        if method_ints(model, name, "input_specs")?.is_none() {
            repair_sorted_layer_names(&mut rows);
        }
        let mut kv_index = Vec::new();
        let mut outs_seen = vec![false; n_outputs];
        for row in &rows {
            if row[4] != self.cache_len as i64 {
                return Err(Error::UnsupportedModel(format!(
                    "`{kv_name}` gives a cache of length {}, the model {}; EtLlm needs one cache \
                     length for every layer",
                    row[4], self.cache_len
                )));
            }
            let layer = kv_index.len();
            let k_in = claims.claim(row[0], &format!("k cache {layer}"))?;
            let v_in = claims.claim(row[2], &format!("v cache {layer}"))?;
            let mut out = |v: i64, what: &str| -> Result<usize> {
                let o = index(v, n_outputs, &format!("`{name}` output ({what})"))?;
                if o == 0 || outs_seen[o] {
                    return Err(Error::UnsupportedModel(format!(
                        "`{kv_name}` names output {o} of `{name}` for {what}, which is the \
                         logits or another cache's rows"
                    )));
                }
                outs_seen[o] = true;
                Ok(o)
            };
            let k_out = out(row[1], &format!("k rows {layer}"))?;
            let v_out = out(row[3], &format!("v rows {layer}"))?;
            kv_index.push([k_in, k_out, v_in, v_out]);
        }

        // Mask and rope rows, then tokens and last_valid_token_pos.
        let specs = method_ints(model, name, "input_specs")?;
        let masks = method_ints(model, name, "mask_specs")?;
        let (tokens_i, mask_i, cos_i, sin_i, last_valid_index) = match specs {
            Some((specs_name, specs)) => {
                if specs.len() != 5 {
                    return Err(Error::UnsupportedModel(format!(
                        "`{specs_name}` has {} entries; expected [tokens, mask, cos, sin, \
                         last_valid_token_pos]",
                        specs.len()
                    )));
                }
                let mask = claims.claim(specs[1], "the mask")?;
                if let Some((mask_name, rows)) = &masks {
                    if rows.first() != Some(&specs[1]) {
                        return Err(Error::UnsupportedModel(format!(
                            "`{mask_name}` and `{specs_name}` disagree on the mask input"
                        )));
                    }
                }
                (
                    claims.claim(specs[0], "the tokens")?,
                    mask,
                    claims.claim(specs[2], "rope cos")?,
                    claims.claim(specs[3], "rope sin")?,
                    Some(claims.claim(specs[4], "last_valid_token_pos")?),
                )
            }
            None => {
                let (mask_name, rows) = masks.ok_or_else(|| {
                    Error::UnsupportedModel(format!(
                        "static-attention model without `{}` (the mask input of `{name}`)",
                        method_keys(name, "mask_specs")[0]
                    ))
                })?;
                let mask_v = match rows.as_slice() {
                    [idx, c] if *c == self.cache_len as i64 => *idx,
                    [_, c] => {
                        return Err(Error::UnsupportedModel(format!(
                            "`{mask_name}` gives a mask for cache length {c}, the caches have {}",
                            self.cache_len
                        )))
                    }
                    _ => {
                        return Err(Error::UnsupportedModel(format!(
                            "`{mask_name}` is {rows:?}; EtLlm needs exactly one row \
                             [mask_idx, cache_len] (one cache length for every layer)"
                        )))
                    }
                };
                let mut one = |key: &str, what: &str| -> Result<usize> {
                    let (n, v) = method_ints(model, name, key)?.ok_or_else(|| {
                        Error::UnsupportedModel(format!(
                            "static-attention model without `{}`",
                            method_keys(name, key)[0]
                        ))
                    })?;
                    match v.as_slice() {
                        [i] => claims.claim(*i, what),
                        _ => Err(Error::UnsupportedModel(format!(
                            "`{n}` is {v:?}, expected one input index"
                        ))),
                    }
                };
                let cos = one("freqs_cos_input_index", "rope cos")?;
                let sin = one("freqs_sin_input_index", "rope sin")?;
                let mask = claims.claim(mask_v, "the mask")?;
                let rest = claims.unclaimed();
                let (tokens, last_valid) = match rest.as_slice() {
                    [t] => (*t, None),
                    [t, l] => (*t, Some(*l)),
                    _ => {
                        return Err(Error::UnsupportedModel(format!(
                        "`{name}` has {} inputs that its metadata does not describe ({rest:?}); \
                             expected the tokens and at most last_valid_token_pos",
                        rest.len()
                    )))
                    }
                };
                claims.claim(tokens as i64, "the tokens")?;
                if let Some(l) = last_valid {
                    claims.claim(l as i64, "last_valid_token_pos")?;
                }
                (tokens, mask, cos, sin, last_valid)
            }
        };
        if let Some(i) = claims.unclaimed().first() {
            return Err(Error::UnsupportedModel(format!(
                "input {i} of `{name}` is not described by its metadata"
            )));
        }

        let (tok_dtype, tok_sizes) = integer_input(&info.inputs[tokens_i], "the tokens", name)?;
        let len = match tok_sizes.as_slice() {
            [1, l] if *l > 0 => *l,
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "the tokens input of `{name}` has shape {other:?}; expected [1, len]"
                )))
            }
        };
        if let Some((n, v)) = method_ints(model, name, "input_len")? {
            if positive_value(&n, &v)? != len {
                return Err(Error::UnsupportedModel(format!(
                    "`{n}` is {v:?} but `{name}` takes {len} tokens per call"
                )));
            }
        }
        let width = self.cache_len + len;
        let (mask_dtype, mask_sizes) = float_spec(info.inputs.get(mask_i), "the mask input", name)?;
        if mask_sizes != [1, len, width] {
            return Err(Error::UnsupportedModel(format!(
                "the mask input of `{name}` has shape {mask_sizes:?}; expected [1, {len}, {width}]"
            )));
        }
        let half = self.head_dim / 2;
        let mut rope = Vec::new();
        for (i, what) in [(cos_i, "the rope cos input"), (sin_i, "the rope sin input")] {
            let (dtype, sizes) = float_spec(info.inputs.get(i), what, name)?;
            if sizes.iter().product::<usize>() != len * half || sizes.last() != Some(&half) {
                return Err(Error::UnsupportedModel(format!(
                    "{what} of `{name}` has shape {sizes:?}; expected [{len}, {half}]"
                )));
            }
            rope.push((dtype, sizes));
        }
        let last_valid = match last_valid_index {
            Some(i) => {
                let (dtype, sizes) = integer_input(&info.inputs[i], "last_valid_token_pos", name)?;
                if sizes.iter().product::<usize>() != 1 {
                    return Err(Error::UnsupportedModel(format!(
                        "the last_valid_token_pos input of `{name}` has shape {sizes:?}; \
                         expected one element"
                    )));
                }
                Some(crate::io_manager::integer_tensor(dtype, sizes, 1))
            }
            None => None,
        };
        let (_, logits) = float_spec(info.outputs.first(), "the logits output", name)?;
        if let (Some(vocab), Some(last)) = (model.constants.get("vocab_size"), logits.last()) {
            if vocab.as_int() != Some(*last as i64) {
                return Err(Error::UnsupportedModel(format!(
                    "`vocab_size` is {vocab:?} but the logits of `{name}` have shape {logits:?}"
                )));
            }
        }
        let mut kv_dtypes = Vec::new();
        for [k_in, k_out, v_in, v_out] in &kv_index {
            let mut dtypes = [DType::F32; 2];
            for (j, (input, output, what)) in [(k_in, k_out, "k"), (v_in, v_out, "v")]
                .into_iter()
                .enumerate()
            {
                let (dtype, cache) = float_spec(
                    info.inputs.get(*input),
                    &format!("{what} cache input {input}"),
                    name,
                )?;
                match cache.as_slice() {
                    [1, h, c, d]
                        if *h == self.heads && *c == self.cache_len && *d == self.head_dim => {}
                    _ => {
                        return Err(Error::UnsupportedModel(format!(
                            "{what} cache input {input} of `{name}` has shape {cache:?}; expected \
                             [1, {}, {}, {}]",
                            self.heads, self.cache_len, self.head_dim
                        )))
                    }
                }
                dtypes[j] = dtype;
                let (_, rows) = float_spec(
                    info.outputs.get(*output),
                    &format!("{what} rows output {output}"),
                    name,
                )?;
                if rows != [1, self.heads, len, self.head_dim] {
                    return Err(Error::UnsupportedModel(format!(
                        "{what} rows output {output} of `{name}` has shape {rows:?}; expected \
                         [1, {}, {len}, {}]",
                        self.heads, self.head_dim
                    )));
                }
            }
            kv_dtypes.push(dtypes);
        }

        let mut mask = float_tensor(mask_dtype, vec![1, len, width], HIDDEN);
        // The call's own tokens see themselves and the ones before them.
        for row in 0..len {
            let start = row * width + self.cache_len;
            fill(&mut mask, start..start + row + 1, 0.0);
        }
        let tokens = crate::io_manager::integer_tensor(tok_dtype, vec![1, len], len);
        Ok(MethodIo {
            name: name.to_string(),
            len,
            tokens,
            mask,
            cos: float_tensor(rope[0].0, rope[0].1.clone(), 1.0),
            sin: float_tensor(rope[1].0, rope[1].1.clone(), 0.0),
            last_valid,
            io_index: [tokens_i, mask_i, cos_i, sin_i],
            last_valid_index,
            kv_index,
            kv_dtypes,
            n_inputs,
        })
    }

    /// Makes the first `min(pos, cache_len)` cache columns of every mask row visible and
    /// the others hidden.
    fn update_masks(&mut self) {
        let visible = self.pos.min(self.cache_len);
        let c = self.cache_len;
        for m in [self.decode.as_mut(), self.prefill.as_mut()]
            .into_iter()
            .flatten()
        {
            fn go<T: Float>(mask: &mut [T], rows: usize, c: usize, visible: usize) {
                let (shown, hidden) = (T::from_f32(0.0), T::from_f32(HIDDEN));
                for row in mask.chunks_exact_mut(mask.len() / rows) {
                    row[..visible].fill(shown);
                    row[visible..c].fill(hidden);
                }
            }
            let rows = m.len;
            with_floats!(m.mask, v => go(v, rows, c, visible));
        }
    }

    fn prepare(
        &mut self,
        tokens: &[u64],
        start_pos: usize,
        prefill: bool,
    ) -> Result<StepInputs<'_>> {
        if start_pos != self.pos {
            return Err(Error::IoManager(format!(
                "step at position {start_pos}, but the cache is at {}",
                self.pos
            )));
        }
        let n = tokens.len();
        if self.pos + n > self.rope_rows {
            return Err(Error::IoManager(format!(
                "positions {}..{} exceed the model's {} rope positions",
                self.pos,
                self.pos + n,
                self.rope_rows
            )));
        }
        let half = self.head_dim / 2;
        let use_prefill = prefill && self.prefill.is_some();
        let (pos, cos_table, sin_table) = (self.pos, &self.freqs_cos, &self.freqs_sin);
        let m = match use_prefill {
            true => self.prefill.as_mut().expect("checked"),
            false => self
                .decode
                .as_mut()
                .ok_or_else(|| Error::IoManager("not loaded".into()))?,
        };
        if n == 0 || n > m.len {
            return Err(Error::IoManager(format!(
                "`{}` takes 1 to {} tokens per call, got {n}",
                m.name, m.len
            )));
        }
        let padded = tokens
            .iter()
            .copied()
            .chain(std::iter::repeat(0))
            .take(m.len);
        fill_integers(&mut m.tokens, &[1, m.len], padded)?;
        let rows = pos * half..(pos + n) * half;
        for (t, table, pad) in [(&mut m.cos, cos_table, 1.0), (&mut m.sin, sin_table, 0.0)] {
            fn go<T: Float>(v: &mut [T], rows: &[f32], pad: f32) {
                T::convert(&mut v[..rows.len()], rows);
                v[rows.len()..].fill(T::from_f32(pad));
            }
            with_floats!(t, v => go(v, &table[rows.clone()], pad));
        }
        if let Some(last_valid) = m.last_valid.as_mut() {
            let sizes = last_valid.sizes().to_vec();
            fill_integers(last_valid, &sizes, std::iter::once(n as u64 - 1))?;
        }

        let m = &*m;
        let mut inputs: Vec<Option<TensorView<'_>>> = vec![None; m.n_inputs];
        let own = [&m.tokens, &m.mask, &m.cos, &m.sin];
        for (&i, t) in m.io_index.iter().zip(own) {
            inputs[i] = Some(t.view());
        }
        if let (Some(i), Some(t)) = (m.last_valid_index, &m.last_valid) {
            inputs[i] = Some(t.view());
        }
        for (layer, [k_in, _, v_in, _]) in m.kv_index.iter().enumerate() {
            inputs[*k_in] = Some(self.k_caches[layer].view());
            inputs[*v_in] = Some(self.v_caches[layer].view());
        }
        let inputs = inputs
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.ok_or_else(|| {
                    Error::UnsupportedModel(format!("input {i} of `{}` is not described", m.name))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.pending = Some((n, use_prefill));
        Ok(StepInputs {
            method: &m.name,
            inputs,
        })
    }

    fn update<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        let (n, prefill) = self
            .pending
            .take()
            .ok_or_else(|| Error::IoManager("update without a prepared step".into()))?;
        let m = if prefill { &self.prefill } else { &self.decode };
        let m = m.as_ref().expect("prepared");
        let (c, hd, heads, len) = (self.cache_len, self.head_dim, self.heads, m.len);
        for (layer, [_, k_out, _, v_out]) in m.kv_index.iter().enumerate() {
            for (out, cache) in [
                (*k_out, &mut self.k_caches[layer]),
                (*v_out, &mut self.v_caches[layer]),
            ] {
                let rows = outputs
                    .get(out)
                    .and_then(|t| t.as_f32())
                    .filter(|r| r.len() == heads * len * hd)
                    .ok_or_else(|| {
                        Error::UnsupportedModel(format!(
                            "output {out} of `{}` is not float rows [1, {heads}, {len}, {hd}]",
                            m.name
                        ))
                    })?;
                // The rows arrive as f32 (half-precision outputs are widened by the
                // runner); they go into the cache in its own type.
                fn go<T: Float>(
                    cache: &mut [T],
                    rows: &[f32],
                    pos: usize,
                    n: usize,
                    dims: [usize; 4],
                ) {
                    let [c, hd, heads, len] = dims;
                    for h in 0..heads {
                        for i in 0..n {
                            let slot = (pos + i) % c;
                            let src = (h * len + i) * hd;
                            let dst = (h * c + slot) * hd;
                            T::convert(&mut cache[dst..dst + hd], &rows[src..src + hd]);
                        }
                    }
                }
                with_floats!(cache, v => go(v, rows, self.pos, n, [c, hd, heads, len]));
            }
        }
        let logits = outputs
            .first()
            .ok_or_else(|| Error::UnsupportedModel("no logits output".into()))?;
        // One logits row (of the last real token), or one row per token of the call.
        let rows = logits.sizes.iter().rev().nth(1).copied().unwrap_or(1);
        let row = if rows == len && len > 1 {
            n - 1
        } else {
            rows.max(1) - 1
        };
        let logits = logits_row(logits, row)?;
        self.pos += n;
        self.update_masks();
        Ok(logits)
    }
}

impl IoManager for StaticAttention {
    fn load(&mut self, model: &ModelInfo) -> Result<()> {
        let forward = model
            .methods
            .get("forward")
            .ok_or_else(|| Error::UnsupportedModel("no `forward` (decode) method".into()))?;
        self.head_dim = positive(model, &["head_dim"])?;
        // One cache length for every layer: today's fixture records it as `cache_len`,
        // upstream only in the rows of the cache and mask specs (checked per method).
        let (kv_name, kv) = method_ints(model, "forward", "kv_cache_specs")?.ok_or_else(|| {
            Error::UnsupportedModel("static-attention model without `kv_cache_specs`".into())
        })?;
        self.cache_len = match model.constants.get("cache_len") {
            Some(_) => positive(model, &["cache_len"])?,
            None => kv
                .get(4)
                .and_then(|&c| usize::try_from(c).ok())
                .filter(|&c| c > 0)
                .ok_or_else(|| {
                    Error::UnsupportedModel(format!(
                        "`{kv_name}` is {kv:?}; expected rows [k_in, k_out, v_in, v_out, cache_len]"
                    ))
                })?,
        };
        // Heads per cache: upstream's `n_heads_per_cache`, else the first k cache's shape.
        let first_cache = kv
            .first()
            .and_then(|&i| usize::try_from(i).ok())
            .and_then(|i| forward.inputs.get(i))
            .and_then(ValueSpec::tensor)
            .map(|t| t.sizes.clone())
            .unwrap_or_default();
        self.heads = match model.constants.get("n_heads_per_cache") {
            Some(_) => positive(model, &["n_heads_per_cache"])?,
            None => match first_cache.as_slice() {
                [1, h, _, _] if *h > 0 => *h,
                other => {
                    return Err(Error::UnsupportedModel(format!(
                        "the first k cache input of `forward` has shape {other:?}; expected \
                         [1, heads, cache_len, head_dim]"
                    )))
                }
            },
        };
        let decode = self.method_io(model, "forward")?;
        let prefill = match model.methods.contains_key("prefill") {
            true => Some(self.method_io(model, "prefill")?),
            false => None,
        };
        // The tables after the signatures (f16 and bf16 tables are read widened to f32).
        let table = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            match constant(model, &[name])? {
                ConstValue::FloatTensor { sizes, data } => Ok((sizes.clone(), data.clone())),
                other => Err(Error::UnsupportedModel(format!(
                    "constant method `{name}` is {other:?}, expected a float tensor"
                ))),
            }
        };
        let (cos_sizes, cos) = table("freqs_cos")?;
        let (sin_sizes, sin) = table("freqs_sin")?;
        let half = self.head_dim / 2;
        if cos_sizes.len() != 2 || cos_sizes[1] != half || cos_sizes != sin_sizes {
            return Err(Error::UnsupportedModel(format!(
                "rope tables have shapes {cos_sizes:?} and {sin_sizes:?}; expected [positions, {half}]"
            )));
        }
        self.rope_rows = cos_sizes[0];
        self.freqs_cos = cos;
        self.freqs_sin = sin;

        if let Some(p) = &prefill {
            if p.kv_index.len() != decode.kv_index.len() {
                return Err(Error::UnsupportedModel(format!(
                    "`prefill` has {} layers of caches, `forward` {}; they must share them",
                    p.kv_index.len(),
                    decode.kv_index.len()
                )));
            }
        }
        // Caches: one buffer per layer for k and v, shared by every method (method_io
        // checked that every cache input has this shape). Zero-filled: the model multiplies
        // hidden entries by 0, so they must be finite.
        // Each layer's buffers are in the type `forward` declares; `prefill` must agree.
        if let Some(p) = &prefill {
            if let Some(layer) =
                (0..p.kv_dtypes.len()).find(|&l| p.kv_dtypes[l] != decode.kv_dtypes[l])
            {
                return Err(Error::UnsupportedModel(format!(
                    "the k/v caches of layer {layer} are {:?} in `prefill` but {:?} in `forward`; \
                     the methods share them",
                    p.kv_dtypes[layer], decode.kv_dtypes[layer]
                )));
            }
        }
        let sizes = vec![1, self.heads, self.cache_len, self.head_dim];
        let cache = |dtype| float_tensor(dtype, sizes.clone(), 0.0);
        self.k_caches = decode.kv_dtypes.iter().map(|[k, _]| cache(*k)).collect();
        self.v_caches = decode.kv_dtypes.iter().map(|[_, v]| cache(*v)).collect();
        self.prefill = prefill;
        self.decode = Some(decode);
        self.pos = 0;
        self.pending = None;
        self.update_masks();
        Ok(())
    }

    fn max_prefill_chunk(&self) -> usize {
        self.prefill
            .as_ref()
            .or(self.decode.as_ref())
            .map_or(1, |m| m.len)
    }

    fn max_context(&self) -> usize {
        self.rope_rows
    }

    fn reset(&mut self) -> Result<()> {
        self.pos = 0;
        self.pending = None;
        self.update_masks();
        Ok(())
    }

    fn rewind(&mut self, pos: usize) -> Result<()> {
        self.pending = None;
        if pos > self.pos {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind forward to {pos} from {}",
                self.pos
            )));
        }
        if self.pos > self.cache_len && pos < self.pos {
            return Err(Error::InvalidArgument(format!(
                "cannot rewind to {pos}: the sliding window has moved past the cache length {} \
                 and the older entries are gone",
                self.cache_len
            )));
        }
        self.pos = pos;
        self.update_masks();
        Ok(())
    }

    fn prepare_prefill(&mut self, tokens: &[u64], start_pos: usize) -> Result<StepInputs<'_>> {
        self.prepare(tokens, start_pos, true)
    }

    fn update_prefill<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        self.update(outputs)
    }

    fn prepare_decode(&mut self, token: u64, pos: usize) -> Result<StepInputs<'_>> {
        self.prepare(&[token], pos, false)
    }

    fn update_decode<'o>(&mut self, outputs: &[TensorView<'o>]) -> Result<&'o [f32]> {
        self.update(outputs)
    }

    fn save_state(&mut self, out: &mut Vec<u8>) -> Result<()> {
        if self.decode.is_none() {
            return Err(Error::IoManager("the manager is not loaded".into()));
        }
        // A step prepared but not updated is not in the caches: the state ends at `pos`.
        let valid = self.pos.min(self.cache_len);
        let dims = [self.heads, self.cache_len, self.head_dim, valid];
        let caches = || {
            self.k_caches
                .iter()
                .zip(&self.v_caches)
                .flat_map(|(k, v)| [k, v])
        };
        let data: usize = caches()
            .map(|c| self.heads * valid * self.head_dim * c.dtype().size())
            .sum();
        out.reserve(state::HEADER_LEN + 8 * 5 + 2 * self.k_caches.len() + data);
        state::write_header(out, state::STATIC_ATTENTION);
        for v in [
            self.k_caches.len(),
            self.heads,
            self.cache_len,
            self.head_dim,
        ] {
            out.extend_from_slice(&(v as u64).to_le_bytes());
        }
        out.extend(caches().map(|c| dtype_code(c.dtype())));
        out.extend_from_slice(&(self.pos as u64).to_le_bytes());
        for cache in caches() {
            save_cache(out, cache, dims);
        }
        Ok(())
    }

    fn restore_state(&mut self, saved: &[u8]) -> Result<()> {
        if self.decode.is_none() {
            return Err(Error::IoManager("the manager is not loaded".into()));
        }
        let mut r = Reader::new(saved, state::STATIC_ATTENTION)?;
        let layers = r.size("the layer count")?;
        let heads = r.size("the head count")?;
        let cache_len = r.size("the cache length")?;
        let head_dim = r.size("the head dim")?;
        let ours = [
            self.k_caches.len(),
            self.heads,
            self.cache_len,
            self.head_dim,
        ];
        if [layers, heads, cache_len, head_dim] != ours {
            return Err(Error::IoManager(format!(
                "the StaticAttention state is of {layers} layers of caches [1, {heads}, \
                 {cache_len}, {head_dim}]; this model has {} layers of [1, {}, {}, {}]",
                ours[0], ours[1], ours[2], ours[3]
            )));
        }
        let caches: Vec<&HostTensor> = self
            .k_caches
            .iter()
            .zip(&self.v_caches)
            .flat_map(|(k, v)| [k, v])
            .collect();
        let codes = r.bytes(caches.len(), "the cache element types")?;
        if let Some(i) = (0..caches.len()).find(|&i| codes[i] != dtype_code(caches[i].dtype())) {
            return Err(Error::IoManager(format!(
                "the StaticAttention state's {} cache of layer {} has element type code {}; \
                 this model's is {:?} (code {})",
                ["k", "v"][i % 2],
                i / 2,
                codes[i],
                caches[i].dtype(),
                dtype_code(caches[i].dtype())
            )));
        }
        let pos = r.size("the position")?;
        if pos > self.rope_rows {
            return Err(Error::IoManager(format!(
                "the StaticAttention state is at position {pos}; this model has {} rope \
                 positions",
                self.rope_rows
            )));
        }
        let valid = pos.min(cache_len);
        let sizes: Vec<usize> = caches
            .iter()
            .map(|c| heads * valid * head_dim * c.dtype().size())
            .collect();
        let expected: usize = sizes.iter().sum();
        if r.remaining() != expected {
            return Err(Error::IoManager(format!(
                "the StaticAttention state holds {} bytes of caches; at position {pos} they \
                 take {expected}",
                r.remaining()
            )));
        }
        let data = r.bytes(expected, "the caches")?;
        r.finish()?;
        // Checked: from here on nothing fails.
        let dims = [heads, cache_len, head_dim, valid];
        let mut at = 0;
        let mut sizes = sizes.into_iter();
        for (k, v) in self.k_caches.iter_mut().zip(&mut self.v_caches) {
            for cache in [k, v] {
                let n = sizes.next().expect("one size per cache");
                restore_cache(cache, &data[at..at + n], dims);
                at += n;
            }
        }
        self.pos = pos;
        self.pending = None;
        self.update_masks();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The layout reader and the buffers on a synthetic model description in upstream's
    //! single-method layout (`export_static_llm_coreml.py` without `--multifunction`).
    use super::*;
    use crate::model::ModelMetadata;
    use crate::tensor::{MethodInfo, TensorData, TensorSpec};
    use std::collections::BTreeMap;

    const L: usize = 4; // tokens per call
    const C: usize = 8; // cache length
    const H: usize = 2; // heads per cache
    const D: usize = 4; // head dim
    const V: usize = 5; // vocab
    const ROPE: usize = 16; // rope rows

    fn t(dtype: DType, sizes: &[usize]) -> ValueSpec {
        ValueSpec::Tensor(TensorSpec {
            dtype,
            sizes: sizes.to_vec(),
        })
    }

    fn ints(sizes: Vec<usize>, data: Vec<i64>) -> ConstValue {
        ConstValue::IntTensor { sizes, data }
    }

    /// Inputs: tokens, mask, cos, sin, k0, k1, v0, v1; outputs: logits, k0, k1, v0, v1.
    fn upstream_single(tokens: DType) -> ModelInfo {
        upstream_layers(tokens, 2)
    }

    /// Inputs: tokens, mask, cos, sin, the k caches, the v caches (layer order); outputs:
    /// logits, the k rows, the v rows.
    fn upstream_layers(tokens: DType, n: usize) -> ModelInfo {
        upstream_typed(tokens, n, DType::F32)
    }

    /// `upstream_layers` with every float input and output of type `float`.
    fn upstream_typed(tokens: DType, n: usize, float: DType) -> ModelInfo {
        let cache = t(float, &[1, H, C, D]);
        let rows = t(float, &[1, H, L, D]);
        let mut inputs = vec![
            t(tokens, &[1, L]),
            t(float, &[1, L, C + L]),
            t(float, &[L, D / 2]),
            t(float, &[L, D / 2]),
        ];
        inputs.extend(vec![cache; 2 * n]);
        let mut outputs = vec![t(float, &[1, L, V])];
        outputs.extend(vec![rows; 2 * n]);
        let forward = MethodInfo {
            name: "forward".into(),
            inputs,
            outputs,
        };
        let specs: Vec<i64> = (0..n as i64)
            .flat_map(|l| [4 + l, 1 + l, 4 + n as i64 + l, 1 + n as i64 + l, C as i64])
            .collect();
        let table = |offset: f32| ConstValue::FloatTensor {
            sizes: vec![ROPE, D / 2],
            data: (0..ROPE * D / 2).map(|i| offset + i as f32).collect(),
        };
        let constants = BTreeMap::from([
            ("vocab_size".to_string(), ConstValue::Int(V as i64)),
            ("head_dim".to_string(), ConstValue::Int(D as i64)),
            ("n_heads_per_cache".to_string(), ConstValue::Int(H as i64)),
            ("freqs_cos".to_string(), table(1000.0)),
            ("freqs_sin".to_string(), table(2000.0)),
            ("freqs_cos_input_index".to_string(), ints(vec![1], vec![2])),
            ("freqs_sin_input_index".to_string(), ints(vec![1], vec![3])),
            (
                "mask_specs".to_string(),
                ints(vec![1, 2], vec![1, C as i64]),
            ),
            ("kv_cache_specs".to_string(), ints(vec![n, 5], specs)),
            ("forward_input_len".to_string(), ConstValue::Int(L as i64)),
        ]);
        ModelInfo {
            metadata: ModelMetadata {
                max_seq_len: 128,
                max_context_len: 128,
                vocab_size: None,
                bos_id: None,
                eos_ids: vec![],
                use_kv_cache: true,
                enable_dynamic_shape: false,
                raw: BTreeMap::new(),
            },
            methods: BTreeMap::from([("forward".to_string(), forward)]),
            constants,
        }
    }

    fn f32s<'a>(v: &TensorView<'a>) -> &'a [f32] {
        v.as_f32().expect("f32")
    }

    #[test]
    fn upstream_names_are_recognised_as_static_attention() {
        let mut info = upstream_single(DType::I32);
        assert!(is_static_attention(&info));
        let specs = info.constants.remove("kv_cache_specs").unwrap();
        assert!(!is_static_attention(&info));
        info.constants.insert("decode_kv_cache_specs".into(), specs);
        assert!(is_static_attention(&info));
    }

    #[test]
    fn prefill_inputs_are_padded_with_token_zero_and_the_rope_rows_of_their_positions() {
        let mut m = StaticAttention::new();
        m.load(&upstream_single(DType::I32)).unwrap();
        assert_eq!(m.max_prefill_chunk(), L);
        let step = m.prepare_prefill(&[7, 8, 9], 0).unwrap();
        assert_eq!(step.method, "forward");
        assert_eq!(step.inputs.len(), 8);
        match step.inputs[0].data {
            TensorData::I32(v) => assert_eq!(v, [7, 8, 9, 0]),
            other => panic!("tokens are {other:?}"),
        }
        // Rows 0..3 of the tables for the real tokens, cos 1 / sin 0 for the padding.
        let cos = f32s(&step.inputs[2]);
        assert_eq!(cos[..6], [1000.0, 1001.0, 1002.0, 1003.0, 1004.0, 1005.0]);
        assert_eq!(cos[6..], [1.0, 1.0]);
        assert_eq!(f32s(&step.inputs[3])[..2], [2000.0, 2001.0]);
        assert_eq!(f32s(&step.inputs[3])[6..], [0.0, 0.0]);
        // Empty cache: no cache column visible; causal within the call.
        let mask = f32s(&step.inputs[1]);
        let row = |r: usize| &mask[r * (C + L)..(r + 1) * (C + L)];
        assert!(row(0)[..C].iter().all(|&x| x == f32::NEG_INFINITY));
        assert_eq!(
            row(1)[C..],
            [0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
        );
    }

    #[test]
    fn i64_tokens_are_built_as_i64() {
        let mut m = StaticAttention::new();
        m.load(&upstream_single(DType::I64)).unwrap();
        let step = m.prepare_decode(5, 0).unwrap();
        match step.inputs[0].data {
            TensorData::I64(v) => assert_eq!(v, [5, 0, 0, 0]),
            other => panic!("tokens are {other:?}"),
        }
    }

    #[test]
    fn new_rows_go_to_their_positions_and_become_visible() {
        let mut m = StaticAttention::new();
        m.load(&upstream_single(DType::I32)).unwrap();
        m.prepare_prefill(&[7, 8, 9], 0).unwrap();
        // Logits row r holds r; new k rows of layer 0: head h, token i holds 10 h + i.
        let logits: Vec<f32> = (0..L * V).map(|i| (i / V) as f32).collect();
        let k0: Vec<f32> = (0..H * L * D)
            .map(|i| (10 * (i / (L * D)) + (i / D) % L) as f32)
            .collect();
        let other = vec![0.5; H * L * D];
        fn view<'a>(sizes: &[usize], data: &'a [f32]) -> TensorView<'a> {
            TensorView {
                sizes: sizes.to_vec(),
                data: TensorData::F32(data),
            }
        }
        let rows = [1, H, L, D];
        let outputs = [
            view(&[1, L, V], &logits),
            view(&rows, &k0),
            view(&rows, &other),
            view(&rows, &other),
            view(&rows, &other),
        ];
        // Every row returned: the one of the last real token (row 2).
        assert_eq!(m.update_prefill(&outputs).unwrap(), [2.0; V]);
        let step = m.prepare_decode(1, 3).unwrap();
        let cache = f32s(&step.inputs[4]);
        for h in 0..H {
            for slot in 0..C {
                let want = if slot < 3 {
                    (10 * h + slot) as f32
                } else {
                    0.0
                };
                assert_eq!(cache[(h * C + slot) * D], want, "head {h} slot {slot}");
            }
        }
        let mask = f32s(&step.inputs[1]);
        assert_eq!(mask[..4], [0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        // Rewind to 1: only slot 0 stays visible.
        m.rewind(1).unwrap();
        let step = m.prepare_decode(8, 1).unwrap();
        assert_eq!(f32s(&step.inputs[1])[..2], [0.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn an_input_the_metadata_does_not_describe_is_an_error() {
        let mut info = upstream_single(DType::I32);
        let forward = info.methods.get_mut("forward").unwrap();
        forward.inputs.push(t(DType::F32, &[1]));
        forward.inputs.push(t(DType::F32, &[1]));
        match StaticAttention::new().load(&info) {
            Err(Error::UnsupportedModel(msg)) => assert!(msg.contains("[0, 8, 9]"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn input_len_that_disagrees_with_the_tokens_shape_is_an_error() {
        let mut info = upstream_single(DType::I32);
        info.constants
            .insert("forward_input_len".into(), ConstValue::Int(L as i64 + 1));
        match StaticAttention::new().load(&info) {
            Err(Error::UnsupportedModel(msg)) => {
                assert!(msg.contains("forward_input_len"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// `kv_cache_specs` as upstream's `_get_metadata` writes it for a 12-layer model (printed
    /// by executorch 1.5.1 for `_create_example_inputs(n_layers=12)`), cache length column
    /// dropped: rows in the string order l0, l1, l10, l11, l2, ..., outputs numbered by row.
    const UPSTREAM_12_LAYERS: [[i64; 4]; 12] = [
        [4, 1, 16, 13],
        [5, 2, 17, 14],
        [14, 3, 26, 15],
        [15, 4, 27, 16],
        [6, 5, 18, 17],
        [7, 6, 19, 18],
        [8, 7, 20, 19],
        [9, 8, 21, 20],
        [10, 9, 22, 21],
        [11, 10, 23, 22],
        [12, 11, 24, 23],
        [13, 12, 25, 24],
    ];

    #[test]
    fn upstream_specs_of_a_12_layer_model_are_paired_by_layer() {
        let mut info = upstream_layers(DType::I32, 12);
        let specs = UPSTREAM_12_LAYERS
            .iter()
            .flat_map(|r| [r[0], r[1], r[2], r[3], C as i64])
            .collect();
        info.constants
            .insert("kv_cache_specs".into(), ints(vec![12, 5], specs));
        let mut m = StaticAttention::new();
        m.load(&info).unwrap();
        m.prepare_prefill(&[1], 0).unwrap();
        // Output j holds the value j everywhere.
        let data: Vec<Vec<f32>> = (0..25)
            .map(|j| vec![j as f32; if j == 0 { L * V } else { H * L * D }])
            .collect();
        let outputs: Vec<TensorView<'_>> = data
            .iter()
            .map(|d| TensorView {
                sizes: vec![d.len()],
                data: TensorData::F32(d),
            })
            .collect();
        m.update_prefill(&outputs).unwrap();
        let step = m.prepare_decode(2, 1).unwrap();
        for layer in 0..12 {
            // Layer l's caches (inputs 4 + l and 16 + l) hold its own rows (outputs 1 + l
            // and 13 + l), not those of the layer whose name sorts at its place.
            assert_eq!(f32s(&step.inputs[4 + layer])[0], (1 + layer) as f32);
            assert_eq!(f32s(&step.inputs[16 + layer])[0], (13 + layer) as f32);
        }
    }

    #[test]
    fn specs_without_upstreams_string_order_are_kept() {
        // Layer order (what the fixtures and the 2-layer exports have): unchanged.
        let mut rows: Vec<[i64; 5]> = (0..12)
            .map(|l| [4 + l, 1 + l, 16 + l, 13 + l, C as i64])
            .collect();
        let before = rows.clone();
        assert!(!repair_sorted_layer_names(&mut rows));
        assert_eq!(rows, before);
        // Upstream's string order, but with outputs that are not numbered by row: kept.
        let mut rows: Vec<[i64; 5]> = UPSTREAM_12_LAYERS
            .iter()
            .map(|r| [r[0], r[1] + 100, r[2], r[3], C as i64])
            .collect();
        let before = rows.clone();
        assert!(!repair_sorted_layer_names(&mut rows));
        assert_eq!(rows, before);
    }

    /// The elements of a float input as f32 (exact for f16 and bf16).
    fn widened(v: &TensorView<'_>) -> Vec<f32> {
        match v.data {
            TensorData::F32(x) => x.to_vec(),
            TensorData::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
            TensorData::BF16(x) => x.iter().map(|v| v.to_f32()).collect(),
            other => panic!("not a float input: {other:?}"),
        }
    }

    #[test]
    fn half_precision_exports_get_inputs_and_caches_of_their_own_type() {
        for float in [DType::F16, DType::BF16] {
            let round = |v: f32| match float {
                DType::F16 => f16::from_f32(v).to_f32(),
                _ => bf16::from_f32(v).to_f32(),
            };
            let mut m = StaticAttention::new();
            m.load(&upstream_typed(DType::I32, 2, float)).unwrap();
            let step = m.prepare_prefill(&[7, 8, 9], 0).unwrap();
            for (i, input) in step.inputs.iter().enumerate().skip(1) {
                assert_eq!(input.dtype(), float, "input {i}");
            }
            // The rope rows of positions 0..3 (rounded), then the padding's cos 1 / sin 0.
            let cos = widened(&step.inputs[2]);
            let want: Vec<f32> = (0..6).map(|i| round(1000.0 + i as f32)).collect();
            assert_eq!(cos[..6], want[..], "{float:?}");
            assert_eq!(cos[6..], [1.0, 1.0]);
            assert_eq!(widened(&step.inputs[3])[6..], [0.0, 0.0]);
            let mask = widened(&step.inputs[1]);
            assert!(mask[..C].iter().all(|&x| x == f32::NEG_INFINITY));
            assert_eq!(
                mask[C + L..2 * (C + L)][C..],
                [0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
            );

            // New rows arrive as f32 (the runner widens half-precision outputs) and are
            // stored rounded to the cache's type.
            let logits = vec![0.0; L * V];
            let rows: Vec<f32> = (0..H * L * D).map(|i| 0.1 + i as f32).collect();
            let outputs: Vec<TensorView<'_>> = std::iter::once(&logits)
                .chain(std::iter::repeat_n(&rows, 4))
                .map(|d| TensorView {
                    sizes: vec![d.len()],
                    data: TensorData::F32(d),
                })
                .collect();
            m.update_prefill(&outputs).unwrap();
            let step = m.prepare_decode(1, 3).unwrap();
            let cache = widened(&step.inputs[4]);
            for h in 0..H {
                for slot in 0..C {
                    for d in 0..D {
                        let want = match slot < 3 {
                            true => round(rows[(h * L + slot) * D + d]),
                            false => 0.0,
                        };
                        assert_eq!(cache[(h * C + slot) * D + d], want, "{float:?}");
                    }
                }
            }
            assert_eq!(
                widened(&step.inputs[1])[..4],
                [0.0, 0.0, 0.0, f32::NEG_INFINITY]
            );
        }
    }

    #[test]
    fn an_f64_export_is_refused_for_its_input_type() {
        let info = upstream_typed(DType::I32, 2, DType::F64);
        match StaticAttention::new().load(&info) {
            Err(Error::UnsupportedModel(msg)) => {
                assert!(msg.contains("mask input of `forward` is F64"), "{msg}");
                assert!(msg.contains("f32, f16 and bf16"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn caches_of_another_type_in_prefill_are_refused() {
        // `forward` with f16 caches, `prefill` (the same signature) with f32 caches.
        let mut info = upstream_typed(DType::I32, 2, DType::F16);
        let mut prefill = upstream_single(DType::I32).methods["forward"].clone();
        prefill.name = "prefill".into();
        info.methods.insert("prefill".into(), prefill);
        match StaticAttention::new().load(&info) {
            Err(Error::UnsupportedModel(msg)) => {
                assert!(msg.contains("layer 0") && msg.contains("share"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }

    // ---- Saved states ------------------------------------------------------------------

    /// Feeds `tokens` at the manager's position as one prefill step whose new rows hold
    /// values derived from `seed`, so that each step leaves its own cache contents.
    fn feed(m: &mut StaticAttention, tokens: &[u64], seed: f32) {
        let pos = m.pos;
        m.prepare_prefill(tokens, pos).unwrap();
        let logits = vec![0.0; L * V];
        let rows: Vec<f32> = (0..H * L * D).map(|i| seed + i as f32 * 0.25).collect();
        let outputs: Vec<TensorView<'_>> = std::iter::once(&logits)
            .chain(std::iter::repeat_n(&rows, 4))
            .map(|d| TensorView {
                sizes: vec![d.len()],
                data: TensorData::F32(d),
            })
            .collect();
        m.update_prefill(&outputs).unwrap();
    }

    /// Every input of a decode step at the manager's position (widened to f32): what the
    /// model would see next. The step is then dropped.
    fn next_inputs(m: &mut StaticAttention) -> (usize, Vec<Vec<f32>>) {
        let pos = m.pos;
        let step = m.prepare_decode(3, pos).unwrap();
        let inputs = step
            .inputs
            .iter()
            .map(|i| match i.data {
                TensorData::I32(x) => x.iter().map(|&v| v as f32).collect(),
                _ => widened(i),
            })
            .collect();
        m.rewind(pos).unwrap();
        (pos, inputs)
    }

    fn loaded(info: &ModelInfo) -> StaticAttention {
        let mut m = StaticAttention::new();
        m.load(info).unwrap();
        m
    }

    fn saved(m: &mut StaticAttention) -> Vec<u8> {
        let mut out = Vec::new();
        m.save_state(&mut out).unwrap();
        out
    }

    fn refusal(m: &mut StaticAttention, state: &[u8]) -> String {
        match m.restore_state(state) {
            Err(Error::IoManager(msg)) => msg,
            other => panic!("restoring {} bytes: {other:?}", state.len()),
        }
    }

    #[test]
    fn a_restored_state_gives_the_next_step_the_inputs_it_had_when_saved() {
        let mut m = loaded(&upstream_single(DType::I32));
        feed(&mut m, &[7, 8, 9], 1.0);
        feed(&mut m, &[4], 2.0);
        let want = next_inputs(&mut m);
        let state = saved(&mut m);
        // Another conversation takes the caches over.
        m.reset().unwrap();
        feed(&mut m, &[1, 2, 3, 4], 50.0);
        feed(&mut m, &[5, 6], 60.0);
        assert_ne!(next_inputs(&mut m), want);
        m.restore_state(&state).unwrap();
        assert_eq!(next_inputs(&mut m), want);
        // The same state restores into a fresh manager of the same model.
        let mut fresh = loaded(&upstream_single(DType::I32));
        fresh.restore_state(&state).unwrap();
        assert_eq!(next_inputs(&mut fresh), want);
    }

    #[test]
    fn a_window_that_slid_past_the_cache_is_saved_whole() {
        let mut m = loaded(&upstream_single(DType::I32));
        for (i, chunk) in [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
            .iter()
            .enumerate()
        {
            feed(&mut m, chunk, 10.0 * i as f32);
        }
        assert!(m.pos > C);
        let want = next_inputs(&mut m);
        let state = saved(&mut m);
        m.reset().unwrap();
        feed(&mut m, &[1], 99.0);
        m.restore_state(&state).unwrap();
        assert_eq!(next_inputs(&mut m), want);
    }

    #[test]
    fn half_precision_caches_round_trip_bit_for_bit() {
        for float in [DType::F16, DType::BF16] {
            let mut m = loaded(&upstream_typed(DType::I32, 2, float));
            feed(&mut m, &[7, 8, 9], 0.1);
            let want = next_inputs(&mut m);
            let state = saved(&mut m);
            m.reset().unwrap();
            feed(&mut m, &[1, 2], 7.7);
            m.restore_state(&state).unwrap();
            assert_eq!(next_inputs(&mut m), want, "{float:?}");
        }
    }

    #[test]
    fn the_state_holds_only_the_filled_slots() {
        let mut m = loaded(&upstream_single(DType::I32));
        let empty = saved(&mut m).len();
        feed(&mut m, &[7, 8, 9], 1.0);
        // 2 layers, k and v, H heads of 3 slots of D f32 each.
        assert_eq!(saved(&mut m).len(), empty + 2 * 2 * H * 3 * D * 4);
    }

    #[test]
    fn truncated_garbage_and_foreign_states_are_refused_and_change_nothing() {
        let mut m = loaded(&upstream_single(DType::I32));
        feed(&mut m, &[7, 8, 9], 1.0);
        let state = saved(&mut m);
        m.reset().unwrap();
        feed(&mut m, &[1, 2], 5.0);
        let before = next_inputs(&mut m);
        for n in [0, 3, 8, 20, 47, state.len() - 1] {
            let msg = refusal(&mut m, &state[..n]);
            assert!(
                msg.contains("truncated")
                    || msg.contains("shorter than")
                    || msg.contains("bytes of caches"),
                "{n}: {msg}"
            );
        }
        let mut longer = state.clone();
        longer.push(0);
        assert!(refusal(&mut m, &longer).contains("bytes of caches"));
        assert!(refusal(&mut m, b"\x89PNG\r\n\x1a\n and so on").contains("not a saved"));
        let mut other = Vec::new();
        crate::io_manager::KvCacheInModel::new()
            .save_state(&mut other)
            .unwrap();
        assert!(refusal(&mut m, &other).contains("saved by a KvCacheInModel manager"));
        let mut newer = state.clone();
        newer[4] = 2;
        assert!(refusal(&mut m, &newer).contains("format version 2"));
        // A position past the rope table.
        let pos_at = state::HEADER_LEN + 4 * 8 + 2 * 2;
        let mut far = state.clone();
        far[pos_at..pos_at + 8].copy_from_slice(&(ROPE as u64 + 1).to_le_bytes());
        assert!(refusal(&mut m, &far).contains("rope positions"));
        assert_eq!(next_inputs(&mut m), before);
    }

    #[test]
    fn any_corrupted_header_byte_is_refused_and_data_bytes_are_only_data() {
        let mut m = loaded(&upstream_single(DType::I32));
        feed(&mut m, &[7, 8, 9], 1.0);
        let state = saved(&mut m);
        let header = state::HEADER_LEN + 4 * 8 + 2 * 2 + 8;
        let want = next_inputs(&mut m);
        for i in 0..state.len() {
            let mut bad = state.clone();
            bad[i] ^= 0xff;
            let restored = m.restore_state(&bad);
            assert_eq!(restored.is_err(), i < header, "byte {i}: {restored:?}");
            m.restore_state(&state).unwrap();
        }
        assert_eq!(next_inputs(&mut m), want);
    }

    #[test]
    fn a_state_of_another_cache_layout_is_refused_by_its_shape_or_type() {
        let mut two = loaded(&upstream_layers(DType::I32, 2));
        let mut three = loaded(&upstream_layers(DType::I32, 3));
        let msg = refusal(&mut three, &saved(&mut two));
        assert!(msg.contains("2 layers of caches [1, 2, 8, 4]"), "{msg}");
        assert!(msg.contains("this model has 3 layers"), "{msg}");
        let mut half = loaded(&upstream_typed(DType::I32, 2, DType::F16));
        let msg = refusal(&mut half, &saved(&mut two));
        assert!(
            msg.contains("k cache of layer 0 has element type code 0"),
            "{msg}"
        );
        assert!(msg.contains("F16"), "{msg}");
    }

    #[test]
    fn an_unloaded_manager_neither_saves_nor_restores() {
        let mut m = StaticAttention::new();
        assert!(m.save_state(&mut Vec::new()).is_err());
        let state = saved(&mut loaded(&upstream_single(DType::I32)));
        assert!(m.restore_state(&state).is_err());
    }
}
