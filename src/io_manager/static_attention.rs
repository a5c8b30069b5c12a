//! The manager for static-attention exports, whose KV caches are explicit method inputs
//! and outputs (upstream's `static_attention.py` modules), as written by our fixture
//! script and by upstream's `examples/apple/coreml/llama/export_static_llm_coreml.py`.

use crate::error::{Error, Result};
use crate::io_manager::{fill_integers, integer_input, logits_row, IoManager, StepInputs};
use crate::model::ModelInfo;
use crate::tensor::{ConstValue, DType, HostData, HostDataMut, HostTensor, TensorView, ValueSpec};

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
/// declares: i64 or i32 tokens and last_valid_token_pos, f32 masks, rope rows and caches
/// (other float types are refused).
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

fn f32_tensor(sizes: Vec<usize>, value: f32) -> HostTensor {
    let n = sizes.iter().product();
    HostTensor::new(sizes, HostData::F32(vec![value; n])).expect("sizes match")
}

fn f32_mut(t: &mut HostTensor) -> &mut [f32] {
    match t.data_mut() {
        HostDataMut::F32(v) => v,
        _ => unreachable!("created as f32"),
    }
}

/// Sizes of a float tensor input or output that must be f32 (the only float type the
/// host tensors have); other float types are refused by name.
fn f32_sizes(spec: Option<&ValueSpec>, what: &str, method: &str) -> Result<Vec<usize>> {
    match spec.and_then(ValueSpec::tensor) {
        Some(t) if t.dtype == DType::F32 => Ok(t.sizes.clone()),
        Some(t) if matches!(t.dtype, DType::F16 | DType::BF16 | DType::F64) => {
            Err(Error::UnsupportedModel(format!(
                "{what} of `{method}` is {:?}; the built-in static-attention manager builds f32 \
                 masks, rope rows and caches only",
                t.dtype
            )))
        }
        Some(t) => Err(Error::UnsupportedModel(format!(
            "{what} of `{method}` is a {:?} tensor; expected f32",
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
        let mask_sizes = f32_sizes(info.inputs.get(mask_i), "the mask input", name)?;
        if mask_sizes != [1, len, width] {
            return Err(Error::UnsupportedModel(format!(
                "the mask input of `{name}` has shape {mask_sizes:?}; expected [1, {len}, {width}]"
            )));
        }
        let half = self.head_dim / 2;
        let mut rope = Vec::new();
        for (i, what) in [(cos_i, "the rope cos input"), (sin_i, "the rope sin input")] {
            let sizes = f32_sizes(info.inputs.get(i), what, name)?;
            if sizes.iter().product::<usize>() != len * half || sizes.last() != Some(&half) {
                return Err(Error::UnsupportedModel(format!(
                    "{what} of `{name}` has shape {sizes:?}; expected [{len}, {half}]"
                )));
            }
            rope.push(sizes);
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
        let logits = f32_sizes(info.outputs.first(), "the logits output", name)?;
        if let (Some(vocab), Some(last)) = (model.constants.get("vocab_size"), logits.last()) {
            if vocab.as_int() != Some(*last as i64) {
                return Err(Error::UnsupportedModel(format!(
                    "`vocab_size` is {vocab:?} but the logits of `{name}` have shape {logits:?}"
                )));
            }
        }
        for [k_in, k_out, v_in, v_out] in &kv_index {
            for (input, output, what) in [(k_in, k_out, "k"), (v_in, v_out, "v")] {
                let cache = f32_sizes(
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
                let rows = f32_sizes(
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
        }

        let mut mask = f32_tensor(vec![1, len, width], HIDDEN);
        // The call's own tokens see themselves and the ones before them.
        let m = f32_mut(&mut mask);
        for row in 0..len {
            for col in 0..=row {
                m[row * width + self.cache_len + col] = 0.0;
            }
        }
        let tokens = crate::io_manager::integer_tensor(tok_dtype, vec![1, len], len);
        Ok(MethodIo {
            name: name.to_string(),
            len,
            tokens,
            mask,
            cos: f32_tensor(rope[0].clone(), 1.0),
            sin: f32_tensor(rope[1].clone(), 0.0),
            last_valid,
            io_index: [tokens_i, mask_i, cos_i, sin_i],
            last_valid_index,
            kv_index,
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
            let width = c + m.len;
            let mask = f32_mut(&mut m.mask);
            for row in 0..m.len {
                let cols = &mut mask[row * width..row * width + c];
                cols[..visible].fill(0.0);
                cols[visible..].fill(HIDDEN);
            }
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
        let (cos, sin) = (f32_mut(&mut m.cos), f32_mut(&mut m.sin));
        cos[..n * half].copy_from_slice(&cos_table[pos * half..(pos + n) * half]);
        sin[..n * half].copy_from_slice(&sin_table[pos * half..(pos + n) * half]);
        cos[n * half..].fill(1.0);
        sin[n * half..].fill(0.0);
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
                            "output {out} of `{}` is not f32 rows [1, {heads}, {len}, {hd}]",
                            m.name
                        ))
                    })?;
                let cache = f32_mut(cache);
                for h in 0..heads {
                    for i in 0..n {
                        let slot = (self.pos + i) % c;
                        let src = (h * len + i) * hd;
                        let dst = (h * c + slot) * hd;
                        cache[dst..dst + hd].copy_from_slice(&rows[src..src + hd]);
                    }
                }
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
        // The tables after the signatures: an f16 export is refused for its inputs' type.
        let table = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            match constant(model, &[name])? {
                ConstValue::FloatTensor { sizes, data } => Ok((sizes.clone(), data.clone())),
                other => Err(Error::UnsupportedModel(format!(
                    "constant method `{name}` is {other:?}, expected an f32 tensor"
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
        let sizes = vec![1, self.heads, self.cache_len, self.head_dim];
        self.k_caches = vec![f32_tensor(sizes.clone(), 0.0); decode.kv_index.len()];
        self.v_caches = vec![f32_tensor(sizes, 0.0); decode.kv_index.len()];
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
        let cache = t(DType::F32, &[1, H, C, D]);
        let rows = t(DType::F32, &[1, H, L, D]);
        let mut inputs = vec![
            t(tokens, &[1, L]),
            t(DType::F32, &[1, L, C + L]),
            t(DType::F32, &[L, D / 2]),
            t(DType::F32, &[L, D / 2]),
        ];
        inputs.extend(vec![cache; 2 * n]);
        let mut outputs = vec![t(DType::F32, &[1, L, V])];
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

    #[test]
    fn an_f16_export_is_refused_for_its_input_type() {
        let mut info = upstream_single(DType::I32);
        for spec in info
            .methods
            .get_mut("forward")
            .unwrap()
            .inputs
            .iter_mut()
            .skip(1)
        {
            if let ValueSpec::Tensor(t) = spec {
                t.dtype = DType::F16;
            }
        }
        for name in ["freqs_cos", "freqs_sin"] {
            info.constants
                .insert(name.into(), ConstValue::Other("F16 tensor".into()));
        }
        match StaticAttention::new().load(&info) {
            Err(Error::UnsupportedModel(msg)) => {
                assert!(msg.contains("mask input of `forward` is F16"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }
}
