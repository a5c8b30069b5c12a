/*
 * A KV-in-model KV-cache manager in plain C11: see kv_in_model_manager.h.
 */
#include "kv_in_model_manager.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct kv_manager {
  bool loaded;
  bool positions_vector; /* input 1 is cache_positions[seq] rather than input_pos[1] */
  int64_t max_chunk;     /* most tokens per call: the tokens input's (upper-bound) length */
  int64_t max_context;
  etllm_tensor_view inputs[2]; /* tokens, positions: sizes set per step */
  void *tokens;                /* max_chunk integers */
  void *positions;             /* max(max_chunk, 1) integers */
} kv_manager;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static etllm_status
fail(etllm_status status, const char *fmt, ...) {
  char message[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(message, sizeof message, fmt, ap);
  va_end(ap);
  etllm_set_error_message(message);
  return status;
}

static bool is_integer(const etllm_tensor_view *v) {
  return v->dtype == ETLLM_DTYPE_I32 || v->dtype == ETLLM_DTYPE_I64;
}

static size_t elem_size(etllm_dtype d) { return d == ETLLM_DTYPE_I32 ? 4 : 8; }

static void unload(kv_manager *kv) {
  free(kv->tokens);
  free(kv->positions);
  memset(kv, 0, sizeof *kv);
}

static etllm_status kv_load(void *user_data, const etllm_model_info *model,
                            int64_t *out_max_prefill_chunk, int64_t *out_max_context) {
  kv_manager *kv = user_data;
  if (kv == NULL) return fail(ETLLM_ERR_IO_MANAGER, "kv-in-model manager: out of memory");
  unload(kv);
  size_t n_in = 0, n_out = 0;
  if (etllm_model_info_method(model, "forward", &n_in, &n_out) != ETLLM_OK) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "%s", etllm_last_error_message());
  }
  if (n_in != 2 || n_out < 1) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "`forward` takes %zu inputs and returns %zu "
                "outputs; this manager drives forward(tokens, input_pos) -> logits", n_in, n_out);
  }
  etllm_tensor_view tokens, pos;
  if (etllm_model_info_input(model, "forward", 0, &tokens) != ETLLM_OK ||
      etllm_model_info_input(model, "forward", 1, &pos) != ETLLM_OK) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "%s", etllm_last_error_message());
  }
  if (!is_integer(&tokens) || tokens.ndim != 2 || tokens.sizes[0] != 1 || tokens.sizes[1] < 1) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "the tokens input of `forward` is not an integer "
                "[1, seq] tensor");
  }
  etllm_model_metadata meta;
  memset(&meta, 0, sizeof meta);
  meta.struct_size = sizeof meta;
  if (etllm_model_info_metadata(model, &meta) != ETLLM_OK) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "%s", etllm_last_error_message());
  }
  const int64_t seq = tokens.sizes[1];
  if (seq > 1 && !meta.enable_dynamic_shape) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "`forward` takes exactly %lld tokens per call "
                "(static shape); this manager needs dynamic shape or one token per call",
                (long long)seq);
  }
  if (!is_integer(&pos) || pos.ndim != 1 || pos.sizes[0] < 1 ||
      (pos.sizes[0] > 1 && pos.sizes[0] < seq)) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "the position input of `forward` is not an "
                "integer [1] or [seq] tensor");
  }
  if (meta.max_context_len < 1) {
    return fail(ETLLM_ERR_UNSUPPORTED_MODEL, "the model does not say its max context length");
  }
  kv->positions_vector = pos.sizes[0] > 1;
  kv->max_chunk = seq;
  kv->max_context = meta.max_context_len;
  kv->tokens = calloc((size_t)seq, 8);
  kv->positions = calloc((size_t)pos.sizes[0], 8);
  if (kv->tokens == NULL || kv->positions == NULL) {
    unload(kv);
    return fail(ETLLM_ERR_IO_MANAGER, "kv-in-model manager: out of memory");
  }
  kv->inputs[0] = tokens;
  kv->inputs[0].data = kv->tokens;
  kv->inputs[1] = pos;
  kv->inputs[1].data = kv->positions;
  kv->loaded = true;
  *out_max_prefill_chunk = kv->max_chunk;
  *out_max_context = kv->max_context;
  return ETLLM_OK;
}

static etllm_status kv_reset(void *user_data) {
  (void)user_data; /* the cache lives in the model; positions past 0 are masked */
  return ETLLM_OK;
}

static etllm_status kv_rewind(void *user_data, int64_t pos) {
  kv_manager *kv = user_data;
  if (kv == NULL || pos < 0 || pos > kv->max_context) {
    return fail(ETLLM_ERR_INVALID_ARGUMENT, "cannot rewind to %lld", (long long)pos);
  }
  return ETLLM_OK;
}

/* Writes `value` as element `i` of an integer buffer of type `dtype`. */
static bool put(void *buf, etllm_dtype dtype, size_t i, uint64_t value) {
  if (dtype == ETLLM_DTYPE_I32) {
    if (value > INT32_MAX) return false;
    ((int32_t *)buf)[i] = (int32_t)value;
  } else {
    ((int64_t *)buf)[i] = (int64_t)value;
  }
  return true;
}

static etllm_status prepare(kv_manager *kv, const uint64_t *tokens, size_t n, int64_t start_pos,
                            etllm_step *out_step) {
  if (kv == NULL || !kv->loaded) return fail(ETLLM_ERR_IO_MANAGER, "the manager is not loaded");
  if (n == 0 || (int64_t)n > kv->max_chunk) {
    return fail(ETLLM_ERR_IO_MANAGER, "a step takes 1 to %lld tokens, got %zu",
                (long long)kv->max_chunk, n);
  }
  if (start_pos < 0 || start_pos + (int64_t)n > kv->max_context) {
    return fail(ETLLM_ERR_IO_MANAGER, "positions %lld..%lld exceed the context of %lld",
                (long long)start_pos, (long long)(start_pos + (int64_t)n),
                (long long)kv->max_context);
  }
  etllm_tensor_view *tok = &kv->inputs[0], *pos = &kv->inputs[1];
  for (size_t i = 0; i < n; i++) {
    if (!put(kv->tokens, tok->dtype, i, tokens[i])) {
      return fail(ETLLM_ERR_IO_MANAGER, "token %llu does not fit an i32 input",
                  (unsigned long long)tokens[i]);
    }
  }
  tok->sizes[1] = (int64_t)n;
  tok->nbytes = n * elem_size(tok->dtype);
  const size_t n_pos = kv->positions_vector ? n : 1;
  for (size_t i = 0; i < n_pos; i++) {
    if (!put(kv->positions, pos->dtype, i, (uint64_t)start_pos + i)) {
      return fail(ETLLM_ERR_IO_MANAGER, "position does not fit an i32 input");
    }
  }
  pos->sizes[0] = (int64_t)n_pos;
  pos->nbytes = n_pos * elem_size(pos->dtype);
  out_step->method = "forward";
  out_step->inputs = kv->inputs;
  out_step->num_inputs = 2;
  return ETLLM_OK;
}

/* The last logits row of output 0 ([vocab], [1, vocab] or [1, n, vocab]). */
static etllm_status last_logits(const etllm_tensor_view *outputs, size_t num_outputs,
                                const float **out_logits, size_t *out_vocab) {
  if (num_outputs < 1) return fail(ETLLM_ERR_IO_MANAGER, "`forward` returned no output");
  const etllm_tensor_view *t = &outputs[0];
  if (t->dtype != ETLLM_DTYPE_F32 || t->ndim < 1 || t->sizes[t->ndim - 1] < 1) {
    return fail(ETLLM_ERR_IO_MANAGER, "the logits output is not f32 [..., vocab]");
  }
  const size_t vocab = (size_t)t->sizes[t->ndim - 1];
  const size_t rows = t->nbytes / sizeof(float) / vocab;
  if (rows == 0) return fail(ETLLM_ERR_IO_MANAGER, "the logits output is empty");
  *out_logits = (const float *)t->data + (rows - 1) * vocab;
  *out_vocab = vocab;
  return ETLLM_OK;
}

static etllm_status kv_prepare_prefill(void *user_data, const uint64_t *tokens, size_t num_tokens,
                                       int64_t start_pos, etllm_step *out_step) {
  return prepare(user_data, tokens, num_tokens, start_pos, out_step);
}

static etllm_status kv_prepare_decode(void *user_data, uint64_t token, int64_t pos,
                                      etllm_step *out_step) {
  return prepare(user_data, &token, 1, pos, out_step);
}

static etllm_status kv_update(void *user_data, const etllm_tensor_view *outputs,
                              size_t num_outputs, const float **out_logits, size_t *out_vocab) {
  (void)user_data;
  return last_logits(outputs, num_outputs, out_logits, out_vocab);
}

/* Saved states: the cache is the model's (EtLlm saves it with the conversation) and this
 * manager keeps nothing of a conversation between steps, the runner passing every
 * position; its state is only a tag and a version, which restore_state checks so that a
 * state of another manager is refused. */
static const uint8_t STATE[8] = {'e', 'x', 'K', 'V', 1, 0, 0, 0};

static etllm_status kv_save_state(void *user_data, etllm_state_buffer *buffer) {
  (void)user_data;
  return etllm_state_buffer_append(buffer, STATE, sizeof STATE);
}

static etllm_status kv_restore_state(void *user_data, const uint8_t *data, size_t len) {
  (void)user_data;
  if (data == NULL || len != sizeof STATE || memcmp(data, STATE, sizeof STATE) != 0) {
    return fail(ETLLM_ERR_IO_MANAGER, "not a saved state of the kv-in-model manager (%zu bytes; "
                "expected the %zu of \"exKV\" version 1)", len, sizeof STATE);
  }
  return ETLLM_OK;
}

static void kv_destroy(void *user_data) {
  kv_manager *kv = user_data;
  if (kv == NULL) return;
  unload(kv);
  free(kv);
}

etllm_io_manager example_kv_in_model_manager(void) {
  etllm_io_manager vt;
  memset(&vt, 0, sizeof vt);
  vt.struct_size = sizeof vt;
  vt.user_data = calloc(1, sizeof(kv_manager));
  vt.load = kv_load;
  vt.reset = kv_reset;
  vt.rewind = kv_rewind;
  vt.prepare_prefill = kv_prepare_prefill;
  vt.update_prefill = kv_update;
  vt.prepare_decode = kv_prepare_decode;
  vt.update_decode = kv_update;
  vt.destroy = kv_destroy;
  vt.save_state = kv_save_state;
  vt.restore_state = kv_restore_state;
  return vt;
}
