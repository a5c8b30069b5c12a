//! The manager for static-attention exports, whose KV caches are explicit method inputs
//! and outputs (upstream's `static_attention.py` layout).

use crate::error::{Error, Result};
use crate::io_manager::{fill_integers, integer_input, logits_row, IoManager, StepInputs};
use crate::model::ModelInfo;
use crate::tensor::{ConstValue, DType, HostData, HostDataMut, HostTensor, TensorView};

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
    last_valid: HostTensor,
    /// Input indices of tokens, mask, cos, sin and last_valid_token_pos.
    io_index: [usize; 5],
    /// Per layer: input index of the k cache, output index of the new k rows, the same
    /// for v.
    kv_index: Vec<[usize; 4]>,
    n_inputs: usize,
}

/// Drives static-attention exports: `forward` decodes one token, `prefill` (when present)
/// evaluates prompts in fixed-size chunks; both take every layer's k and v cache as inputs
/// and return the new cache rows, the logits of the last real token first.
///
/// The manager owns the caches, the attention masks and the rope rows, reading the layout
/// from the export's constant methods (`cache_len`, `head_dim`, `freqs_cos`, `freqs_sin`,
/// `{method}_input_specs`, `{method}_kv_cache_specs`). New rows are written in place into
/// a ring buffer (slot = position mod cache length), so the cache buffers handed to the
/// runtime never move or shift. The last prefill chunk is padded (token 0, rope rows
/// cos 1 / sin 0) and `last_valid_token_pos` marks its last real token.
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

/// Whether the export's constants describe a static-attention layout.
pub(crate) fn is_static_attention(model: &ModelInfo) -> bool {
    ["forward_kv_cache_specs", "kv_cache_specs"]
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

fn positive(model: &ModelInfo, names: &[&str]) -> Result<usize> {
    match ints(model, names)?.as_slice() {
        [v] if *v > 0 => Ok(*v as usize),
        other => Err(Error::UnsupportedModel(format!(
            "constant method `{}` is {other:?}, expected one positive integer",
            names[0]
        ))),
    }
}

fn index(v: i64, limit: usize, what: &str) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&i| i < limit)
        .ok_or_else(|| Error::UnsupportedModel(format!("{what} index {v} is out of range")))
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

impl StaticAttention {
    /// A manager to be loaded with [`IoManager::load`].
    pub fn new() -> Self {
        Self::default()
    }

    fn method_io(&self, model: &ModelInfo, name: &str) -> Result<MethodIo> {
        let info = &model.methods[name];
        let n_inputs = info.inputs.len();
        let n_outputs = info.outputs.len();
        let specs = ints(model, &[&format!("{name}_input_specs"), "input_specs"])?;
        if specs.len() != 5 {
            return Err(Error::UnsupportedModel(format!(
                "`{name}_input_specs` has {} entries; expected [tokens, mask, cos, sin, \
                 last_valid_token_pos]",
                specs.len()
            )));
        }
        let mut io_index = [0; 5];
        for (slot, &v) in io_index.iter_mut().zip(&specs) {
            *slot = index(v, n_inputs, &format!("`{name}` input"))?;
        }
        let kv = ints(
            model,
            &[&format!("{name}_kv_cache_specs"), "kv_cache_specs"],
        )?;
        if kv.is_empty() || kv.len() % 5 != 0 {
            return Err(Error::UnsupportedModel(format!(
                "`{name}_kv_cache_specs` must hold rows of [k_in, k_out, v_in, v_out, cache_len]"
            )));
        }
        let mut kv_index = Vec::new();
        for row in kv.chunks(5) {
            if row[4] as usize != self.cache_len {
                return Err(Error::UnsupportedModel(format!(
                    "`{name}` has a cache of length {}, others {}; EtLlm needs one cache length",
                    row[4], self.cache_len
                )));
            }
            kv_index.push([
                index(row[0], n_inputs, "k cache input")?,
                index(row[1], n_outputs, "k rows output")?,
                index(row[2], n_inputs, "v cache input")?,
                index(row[3], n_outputs, "v rows output")?,
            ]);
        }
        let (tok_dtype, tok_sizes) = integer_input(&info.inputs[io_index[0]], "the tokens", name)?;
        let len = match tok_sizes.as_slice() {
            [1, l] if *l > 0 => *l,
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "the tokens input of `{name}` has shape {other:?}; expected [1, len]"
                )))
            }
        };
        let half = self.head_dim / 2;
        let mut mask = f32_tensor(vec![1, len, self.cache_len + len], HIDDEN);
        // The call's own tokens see themselves and the ones before them.
        let width = self.cache_len + len;
        let m = f32_mut(&mut mask);
        for row in 0..len {
            for col in 0..=row {
                m[row * width + self.cache_len + col] = 0.0;
            }
        }
        let tokens = crate::io_manager::integer_tensor(tok_dtype, vec![1, len], len);
        let (lvp_dtype, _) =
            integer_input(&info.inputs[io_index[4]], "last_valid_token_pos", name)?;
        Ok(MethodIo {
            name: name.to_string(),
            len,
            tokens,
            mask,
            cos: f32_tensor(vec![len, half], 1.0),
            sin: f32_tensor(vec![len, half], 0.0),
            last_valid: crate::io_manager::integer_tensor(lvp_dtype, vec![1], 1),
            io_index,
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
        fill_integers(&mut m.last_valid, &[1], std::iter::once(n as u64 - 1))?;

        let m = &*m;
        let mut inputs: Vec<Option<TensorView<'_>>> = vec![None; m.n_inputs];
        let own = [&m.tokens, &m.mask, &m.cos, &m.sin, &m.last_valid];
        for (&i, t) in m.io_index.iter().zip(own) {
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
        if !model.methods.contains_key("forward") {
            return Err(Error::UnsupportedModel(
                "no `forward` (decode) method".into(),
            ));
        }
        self.cache_len = positive(model, &["cache_len"])?;
        self.head_dim = positive(model, &["head_dim"])?;
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

        let decode = self.method_io(model, "forward")?;
        // Caches: one buffer per layer for k and v, shared by every method.
        let info = &model.methods["forward"];
        self.k_caches.clear();
        self.v_caches.clear();
        for [k_in, _, v_in, _] in &decode.kv_index {
            for (input, caches) in [(*k_in, &mut self.k_caches), (*v_in, &mut self.v_caches)] {
                let spec = info.inputs[input]
                    .tensor()
                    .filter(|t| t.dtype == DType::F32);
                let sizes = match spec.map(|t| t.sizes.as_slice()) {
                    Some(&[1, h, c, d]) if c == self.cache_len && d == self.head_dim => {
                        vec![1, h, c, d]
                    }
                    _ => {
                        return Err(Error::UnsupportedModel(format!(
                            "cache input {input} of `forward` is not f32 [1, heads, {}, {}]",
                            self.cache_len, self.head_dim
                        )))
                    }
                };
                self.heads = sizes[1];
                // Zero-filled: the model multiplies hidden entries by 0, so they must be finite.
                caches.push(f32_tensor(sizes, 0.0));
            }
        }
        self.prefill = match model.methods.contains_key("prefill") {
            true => Some(self.method_io(model, "prefill")?),
            false => None,
        };
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
