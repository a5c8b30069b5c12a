/*
 * A static-attention KV-cache manager in plain C11: see static_attention_manager.h for
 * what it does, and tests/fixtures/static_attention/README.md for the layout it follows.
 *
 * The vtable contract (include/etllm.h, etllm_io_manager): the runner calls load once,
 * then for each step prepare_* followed by update_*, with reset, rewind, save_state and
 * restore_state between steps, all on the thread that called into the runner. Every buffer handed to the runner in a
 * step (method name, input views, the data they point to) stays valid until the matching
 * update returns; here they live as long as the manager.
 */
#include "static_attention_manager.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Indices into the 5 entries of `{method}_input_specs`. */
enum { SLOT_TOKENS, SLOT_MASK, SLOT_COS, SLOT_SIN, SLOT_LAST_VALID, NUM_SLOTS };
/* Columns of a `{method}_kv_cache_specs` row (the fifth is the cache length). */
enum { K_IN, K_OUT, V_IN, V_OUT, KV_COLUMNS = 5 };

/* Value of a hidden mask entry: it is added to the attention scores. */
#define HIDDEN (-INFINITY)

/* Layout and buffers of one method: `forward` (decode) or `prefill`. */
typedef struct method_io {
  const char *name;
  int64_t len; /* tokens per call (L) */
  size_t num_inputs, num_outputs;
  int64_t slot[NUM_SLOTS];  /* input index of tokens, mask, cos, sin, last_valid_token_pos */
  int64_t (*kv)[4];         /* per layer: k_in, k_out, v_in, v_out */
  etllm_dtype tokens_dtype; /* I32 or I64 */
  etllm_dtype last_valid_dtype;
  void *tokens;             /* [1, L] */
  float *mask;              /* [1, L, C + L]: cache columns first, then the call's tokens */
  float *cos, *sin;         /* [L, head_dim / 2] */
  union {
    int64_t i64;
    int32_t i32;
  } last_valid;             /* [1] */
  etllm_tensor_view *inputs; /* num_inputs views, built once in load */
} method_io;

typedef struct manager {
  bool loaded;
  int64_t cache_len, head_dim, half, heads;
  int64_t rope_rows; /* rows of the RoPE tables: the most positions a sequence reaches */
  float *freqs_cos, *freqs_sin;
  size_t num_layers;
  float **k_caches, **v_caches; /* per layer, [1, heads, cache_len, head_dim], zeroed */
  method_io decode, prefill;
  bool has_prefill;
  int64_t pos;          /* positions in the cache */
  method_io *pending;   /* the method of the step prepared last, until its update */
  int64_t pending_n;    /* its real tokens */
} manager;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
/* Explains the error about to be returned (etllm_set_error_message copies the text). */
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

#define UNSUPPORTED ETLLM_ERR_UNSUPPORTED_MODEL
#define OUT_OF_MEMORY() fail(ETLLM_ERR_IO_MANAGER, "static-attention manager: out of memory")

/* ---- Reading the layout -------------------------------------------------------------- */

/* The integers of constant method `name` (else `fallback`, when not NULL), in a new array. */
static etllm_status read_ints(const etllm_model_info *model, const char *name,
                              const char *fallback, int64_t **out, size_t *out_count) {
  const char *used = name;
  size_t n = 0;
  etllm_status s = etllm_model_info_constant_ints(model, name, NULL, 0, &n);
  if (s == ETLLM_ERR_NOT_FOUND && fallback != NULL) {
    used = fallback;
    s = etllm_model_info_constant_ints(model, fallback, NULL, 0, &n);
  }
  if (s != ETLLM_OK) {
    return fail(UNSUPPORTED, "not a static-attention layout: constant method `%s`: %s", name,
                etllm_last_error_message());
  }
  int64_t *values = malloc((n > 0 ? n : 1) * sizeof *values);
  if (values == NULL) return OUT_OF_MEMORY();
  s = etllm_model_info_constant_ints(model, used, values, n, &n);
  if (s != ETLLM_OK) {
    free(values);
    return fail(UNSUPPORTED, "constant method `%s`: %s", used, etllm_last_error_message());
  }
  *out = values;
  *out_count = n;
  return ETLLM_OK;
}

/* Constant method `name`, which must be one positive integer. */
static etllm_status read_positive(const etllm_model_info *model, const char *name,
                                  int64_t *out) {
  int64_t *values = NULL;
  size_t n = 0;
  etllm_status s = read_ints(model, name, NULL, &values, &n);
  if (s != ETLLM_OK) return s;
  const bool ok = n == 1 && values[0] > 0;
  if (ok) *out = values[0];
  free(values);
  if (!ok) {
    return fail(UNSUPPORTED, "constant method `%s` holds %zu value(s); expected one positive "
                "integer", name, n);
  }
  return ETLLM_OK;
}

/* The floats of constant method `name` (a float tensor, flattened), in a new array. */
static etllm_status read_floats(const etllm_model_info *model, const char *name, float **out,
                                size_t *out_count) {
  size_t n = 0;
  if (etllm_model_info_constant_floats(model, name, NULL, 0, &n) != ETLLM_OK) {
    return fail(UNSUPPORTED, "not a static-attention layout: constant method `%s`: %s", name,
                etllm_last_error_message());
  }
  float *values = malloc((n > 0 ? n : 1) * sizeof *values);
  if (values == NULL) return OUT_OF_MEMORY();
  if (etllm_model_info_constant_floats(model, name, values, n, &n) != ETLLM_OK) {
    free(values);
    return fail(UNSUPPORTED, "constant method `%s`: %s", name, etllm_last_error_message());
  }
  *out = values;
  *out_count = n;
  return ETLLM_OK;
}

static const char *dtype_name(etllm_dtype d) {
  switch (d) {
    case ETLLM_DTYPE_F32: return "f32";
    case ETLLM_DTYPE_I64: return "i64";
    case ETLLM_DTYPE_I32: return "i32";
    default: return "other";
  }
}

/* "f32[1, 2, 64, 16]" */
static const char *describe(const etllm_tensor_view *v, char *buf, size_t size) {
  int at = snprintf(buf, size, "%s[", dtype_name(v->dtype));
  for (uint32_t d = 0; d < v->ndim && d < ETLLM_MAX_DIMS && at > 0 && (size_t)at < size; d++) {
    at += snprintf(buf + at, size - (size_t)at, d ? ", %lld" : "%lld", (long long)v->sizes[d]);
  }
  if (at > 0 && (size_t)at < size) snprintf(buf + at, size - (size_t)at, "]");
  return buf;
}

/* Whether `v` is `dtype` with exactly these sizes. */
static bool is(const etllm_tensor_view *v, etllm_dtype dtype, uint32_t ndim,
               const int64_t *sizes) {
  if (v->dtype != dtype || v->ndim != ndim) return false;
  for (uint32_t d = 0; d < ndim; d++) {
    if (v->sizes[d] != sizes[d]) return false;
  }
  return true;
}

static bool is_integer(const etllm_tensor_view *v) {
  return v->dtype == ETLLM_DTYPE_I32 || v->dtype == ETLLM_DTYPE_I64;
}

/* Describes input `index` of method `m`. */
static etllm_status input_of(const etllm_model_info *model, const method_io *m, int64_t index,
                             etllm_tensor_view *out) {
  if (etllm_model_info_input(model, m->name, (size_t)index, out) != ETLLM_OK) {
    return fail(UNSUPPORTED, "input %lld of `%s`: %s", (long long)index, m->name,
                etllm_last_error_message());
  }
  return ETLLM_OK;
}

static etllm_status output_of(const etllm_model_info *model, const method_io *m, int64_t index,
                              etllm_tensor_view *out) {
  if (etllm_model_info_output(model, m->name, (size_t)index, out) != ETLLM_OK) {
    return fail(UNSUPPORTED, "output %lld of `%s`: %s", (long long)index, m->name,
                etllm_last_error_message());
  }
  return ETLLM_OK;
}

/* Reads and checks the layout of method `name` into `m` (indices, shapes, dtypes) and
 * fills `m->inputs` with the descriptions of its inputs (data still NULL). */
static etllm_status parse_method(manager *sa, const etllm_model_info *model, const char *name,
                                 method_io *m) {
  char key[96], shape[160];
  etllm_status s;
  int64_t *specs = NULL, *kv = NULL;
  size_t n_specs = 0, n_kv = 0;
  unsigned char *covered = NULL;
  etllm_tensor_view v;

  m->name = name;
  if (etllm_model_info_method(model, name, &m->num_inputs, &m->num_outputs) != ETLLM_OK) {
    return fail(UNSUPPORTED, "method `%s`: %s", name, etllm_last_error_message());
  }
  m->inputs = calloc(m->num_inputs > 0 ? m->num_inputs : 1, sizeof *m->inputs);
  covered = calloc(m->num_inputs > 0 ? m->num_inputs : 1, 1);
  if (m->inputs == NULL || covered == NULL) {
    s = OUT_OF_MEMORY();
    goto done;
  }
  const int64_t n_in = (int64_t)m->num_inputs, n_out = (int64_t)m->num_outputs;

  /* [tokens, mask, cos, sin, last_valid_token_pos] */
  snprintf(key, sizeof key, "%s_input_specs", name);
  if ((s = read_ints(model, key, "input_specs", &specs, &n_specs)) != ETLLM_OK) goto done;
  if (n_specs != NUM_SLOTS) {
    s = fail(UNSUPPORTED, "`%s` has %zu entries; expected 5: [tokens, mask, cos, sin, "
             "last_valid_token_pos]", key, n_specs);
    goto done;
  }
  for (int i = 0; i < NUM_SLOTS; i++) {
    if (specs[i] < 0 || specs[i] >= n_in || covered[specs[i]]) {
      s = fail(UNSUPPORTED, "`%s` entry %d is input %lld, which `%s` (%zu inputs) does not "
               "have or which is used twice", key, i, (long long)specs[i], name, m->num_inputs);
      goto done;
    }
    covered[specs[i]] = 1;
    m->slot[i] = specs[i];
  }

  /* Rows of [k_in, k_out, v_in, v_out, cache_len], one per layer. */
  snprintf(key, sizeof key, "%s_kv_cache_specs", name);
  if ((s = read_ints(model, key, "kv_cache_specs", &kv, &n_kv)) != ETLLM_OK) goto done;
  if (n_kv == 0 || n_kv % KV_COLUMNS != 0) {
    s = fail(UNSUPPORTED, "`%s` holds %zu values; expected rows of [k_in, k_out, v_in, v_out, "
             "cache_len]", key, n_kv);
    goto done;
  }
  const size_t layers = n_kv / KV_COLUMNS;
  if (sa->num_layers == 0) sa->num_layers = layers;
  if (layers != sa->num_layers) {
    s = fail(UNSUPPORTED, "`%s` describes %zu layers, `forward` %zu", key, layers,
             sa->num_layers);
    goto done;
  }
  m->kv = calloc(layers, sizeof *m->kv);
  if (m->kv == NULL) {
    s = OUT_OF_MEMORY();
    goto done;
  }
  for (size_t l = 0; l < layers; l++) {
    const int64_t *row = &kv[l * KV_COLUMNS];
    if (row[4] != sa->cache_len) {
      s = fail(UNSUPPORTED, "layer %zu of `%s` has a cache of length %lld; `cache_len` is %lld "
               "(this manager needs one cache length)", l, name, (long long)row[4],
               (long long)sa->cache_len);
      goto done;
    }
    for (int c = 0; c < 4; c++) {
      const bool is_input = c == K_IN || c == V_IN;
      const int64_t limit = is_input ? n_in : n_out;
      if (row[c] < 0 || row[c] >= limit || (is_input && covered[row[c]])) {
        s = fail(UNSUPPORTED, "`%s` row %zu names %s %lld, which `%s` does not have or which "
                 "is used twice", key, l, is_input ? "input" : "output", (long long)row[c],
                 name);
        goto done;
      }
      if (is_input) covered[row[c]] = 1;
      m->kv[l][c] = row[c];
    }
  }
  for (size_t i = 0; i < m->num_inputs; i++) {
    if (!covered[i]) {
      s = fail(UNSUPPORTED, "input %zu of `%s` is neither in `%s_input_specs` nor in "
               "`%s_kv_cache_specs`", i, name, name, name);
      goto done;
    }
  }

  /* Every input's shape, now that the roles are known. */
  for (size_t i = 0; i < m->num_inputs; i++) {
    if ((s = input_of(model, m, (int64_t)i, &m->inputs[i])) != ETLLM_OK) goto done;
  }
  const etllm_tensor_view *tokens = &m->inputs[m->slot[SLOT_TOKENS]];
  if (!is_integer(tokens) || tokens->ndim != 2 || tokens->sizes[0] != 1 || tokens->sizes[1] < 1) {
    s = fail(UNSUPPORTED, "the tokens input of `%s` is %s; expected i32 or i64 [1, L]", name,
             describe(tokens, shape, sizeof shape));
    goto done;
  }
  m->len = tokens->sizes[1];
  m->tokens_dtype = tokens->dtype;
  const int64_t c = sa->cache_len, len = m->len;
  const int64_t mask_sizes[3] = {1, len, c + len};
  const int64_t rope_sizes[2] = {len, sa->half};
  const etllm_tensor_view *mask = &m->inputs[m->slot[SLOT_MASK]];
  if (!is(mask, ETLLM_DTYPE_F32, 3, mask_sizes)) {
    s = fail(UNSUPPORTED, "the mask input of `%s` is %s; expected f32[1, %lld, %lld]", name,
             describe(mask, shape, sizeof shape), (long long)len, (long long)(c + len));
    goto done;
  }
  for (int r = SLOT_COS; r <= SLOT_SIN; r++) {
    const etllm_tensor_view *rope = &m->inputs[m->slot[r]];
    if (!is(rope, ETLLM_DTYPE_F32, 2, rope_sizes)) {
      s = fail(UNSUPPORTED, "the rope %s input of `%s` is %s; expected f32[%lld, %lld]",
               r == SLOT_COS ? "cos" : "sin", name, describe(rope, shape, sizeof shape),
               (long long)len, (long long)sa->half);
      goto done;
    }
  }
  const etllm_tensor_view *last = &m->inputs[m->slot[SLOT_LAST_VALID]];
  if (!is_integer(last) || last->nbytes != (last->dtype == ETLLM_DTYPE_I64 ? 8u : 4u)) {
    s = fail(UNSUPPORTED, "the last_valid_token_pos input of `%s` is %s; expected one i32 or "
             "i64", name, describe(last, shape, sizeof shape));
    goto done;
  }
  m->last_valid_dtype = last->dtype;
  for (size_t l = 0; l < layers; l++) {
    for (int k = 0; k < 2; k++) {
      const int64_t in = m->kv[l][k ? V_IN : K_IN], out = m->kv[l][k ? V_OUT : K_OUT];
      etllm_tensor_view *cache = &m->inputs[in];
      if (sa->heads == 0 && cache->dtype == ETLLM_DTYPE_F32 && cache->ndim == 4 &&
          cache->sizes[1] > 0) {
        sa->heads = cache->sizes[1]; /* the first cache input sets the head count */
      }
      const int64_t want_cache[4] = {1, sa->heads, c, sa->head_dim};
      if (!is(cache, ETLLM_DTYPE_F32, 4, want_cache)) {
        s = fail(UNSUPPORTED, "%s cache input %lld of `%s` (layer %zu) is %s; expected "
                 "f32[1, heads, %lld, %lld] like the others", k ? "v" : "k", (long long)in,
                 name, l, describe(cache, shape, sizeof shape), (long long)c,
                 (long long)sa->head_dim);
        goto done;
      }
      const int64_t want_rows[4] = {1, sa->heads, len, sa->head_dim};
      if ((s = output_of(model, m, out, &v)) != ETLLM_OK) goto done;
      if (!is(&v, ETLLM_DTYPE_F32, 4, want_rows)) {
        s = fail(UNSUPPORTED, "new %s rows output %lld of `%s` (layer %zu) is %s; expected "
                 "f32[1, %lld, %lld, %lld]", k ? "v" : "k", (long long)out, name, l,
                 describe(&v, shape, sizeof shape), (long long)sa->heads, (long long)len,
                 (long long)sa->head_dim);
        goto done;
      }
    }
  }
  if ((s = output_of(model, m, 0, &v)) != ETLLM_OK) goto done;
  if (v.dtype != ETLLM_DTYPE_F32 || v.ndim < 1) {
    s = fail(UNSUPPORTED, "the logits output (0) of `%s` is %s; expected f32", name,
             describe(&v, shape, sizeof shape));
    goto done;
  }
  s = ETLLM_OK;
done:
  free(specs);
  free(kv);
  free(covered);
  return s;
}

/* Allocates the method's own buffers and points its input views at them and at the
 * shared caches. */
static etllm_status alloc_method(manager *sa, method_io *m) {
  const int64_t len = m->len, width = sa->cache_len + len;
  m->tokens = calloc((size_t)len, 8);
  m->mask = malloc((size_t)(len * width) * sizeof(float));
  m->cos = malloc((size_t)(len * sa->half) * sizeof(float));
  m->sin = malloc((size_t)(len * sa->half) * sizeof(float));
  if (m->tokens == NULL || m->mask == NULL || m->cos == NULL || m->sin == NULL) {
    return OUT_OF_MEMORY();
  }
  /* Cache columns hidden (update_masks opens them); the call's own tokens causal. */
  for (int64_t row = 0; row < len; row++) {
    for (int64_t col = 0; col < width; col++) {
      const bool own_visible = col >= sa->cache_len && col - sa->cache_len <= row;
      m->mask[row * width + col] = own_visible ? 0.0f : HIDDEN;
    }
  }
  for (int64_t i = 0; i < len * sa->half; i++) {
    m->cos[i] = 1.0f;
    m->sin[i] = 0.0f;
  }
  m->inputs[m->slot[SLOT_TOKENS]].data = m->tokens;
  m->inputs[m->slot[SLOT_MASK]].data = m->mask;
  m->inputs[m->slot[SLOT_COS]].data = m->cos;
  m->inputs[m->slot[SLOT_SIN]].data = m->sin;
  m->inputs[m->slot[SLOT_LAST_VALID]].data = &m->last_valid;
  for (size_t l = 0; l < sa->num_layers; l++) {
    m->inputs[m->kv[l][K_IN]].data = sa->k_caches[l];
    m->inputs[m->kv[l][V_IN]].data = sa->v_caches[l];
  }
  return ETLLM_OK;
}

static void free_method(method_io *m) {
  free(m->kv);
  free(m->tokens);
  free(m->mask);
  free(m->cos);
  free(m->sin);
  free(m->inputs);
  memset(m, 0, sizeof *m);
}

/* Frees every buffer: back to a new, unloaded manager. */
static void unload(manager *sa) {
  free_method(&sa->decode);
  free_method(&sa->prefill);
  for (size_t l = 0; l < sa->num_layers; l++) {
    if (sa->k_caches != NULL) free(sa->k_caches[l]);
    if (sa->v_caches != NULL) free(sa->v_caches[l]);
  }
  free(sa->k_caches);
  free(sa->v_caches);
  free(sa->freqs_cos);
  free(sa->freqs_sin);
  memset(sa, 0, sizeof *sa);
}

/* Opens the first min(pos, cache_len) cache columns of every mask row, hides the rest. */
static void update_masks(manager *sa) {
  const int64_t c = sa->cache_len, visible = sa->pos < c ? sa->pos : c;
  method_io *methods[2] = {&sa->decode, sa->has_prefill ? &sa->prefill : NULL};
  for (int k = 0; k < 2; k++) {
    method_io *m = methods[k];
    if (m == NULL || m->mask == NULL) continue;
    const int64_t width = c + m->len;
    for (int64_t row = 0; row < m->len; row++) {
      float *cols = &m->mask[row * width];
      for (int64_t s = 0; s < c; s++) cols[s] = s < visible ? 0.0f : HIDDEN;
    }
  }
}

/* ---- The vtable functions ------------------------------------------------------------- */

static etllm_status sa_load(void *user_data, const etllm_model_info *model,
                            int64_t *out_max_prefill_chunk, int64_t *out_max_context) {
  manager *sa = user_data;
  if (sa == NULL) return OUT_OF_MEMORY(); /* the constructor's allocation failed */
  unload(sa); /* a load may be retried after a failure */
  etllm_status s;
  size_t n_cos = 0, n_sin = 0, n = 0, unused_inputs, unused_outputs;
  if (etllm_model_info_method(model, "forward", &unused_inputs, &unused_outputs) != ETLLM_OK) {
    return fail(UNSUPPORTED, "the model has no `forward` (decode) method");
  }
  if ((s = read_positive(model, "cache_len", &sa->cache_len)) != ETLLM_OK) goto fail;
  if ((s = read_positive(model, "head_dim", &sa->head_dim)) != ETLLM_OK) goto fail;
  if (sa->head_dim % 2 != 0) {
    s = fail(UNSUPPORTED, "head_dim %lld is odd; RoPE rotates pairs", (long long)sa->head_dim);
    goto fail;
  }
  sa->half = sa->head_dim / 2;
  if ((s = read_floats(model, "freqs_cos", &sa->freqs_cos, &n_cos)) != ETLLM_OK) goto fail;
  if ((s = read_floats(model, "freqs_sin", &sa->freqs_sin, &n_sin)) != ETLLM_OK) goto fail;
  /* etllm_model_info_constant_floats gives the values flattened: the tables are
   * [positions, head_dim / 2], so their size must be a multiple of head_dim / 2. */
  if (n_cos != n_sin || n_cos == 0 || n_cos % (size_t)sa->half != 0) {
    s = fail(UNSUPPORTED, "the RoPE tables hold %zu and %zu values; expected the same number "
             "of rows of %lld", n_cos, n_sin, (long long)sa->half);
    goto fail;
  }
  sa->rope_rows = (int64_t)(n_cos / (size_t)sa->half);

  if ((s = parse_method(sa, model, "forward", &sa->decode)) != ETLLM_OK) goto fail;
  sa->has_prefill = etllm_model_info_method(model, "prefill", &unused_inputs,
                                            &unused_outputs) == ETLLM_OK;
  if (sa->has_prefill && (s = parse_method(sa, model, "prefill", &sa->prefill)) != ETLLM_OK) {
    goto fail;
  }

  /* One k and one v cache per layer, shared by both methods. Zeroed: a hidden slot gets
   * attention weight 0, and 0 * NaN would still be NaN. */
  n = (size_t)(sa->heads * sa->cache_len * sa->head_dim);
  sa->k_caches = calloc(sa->num_layers, sizeof *sa->k_caches);
  sa->v_caches = calloc(sa->num_layers, sizeof *sa->v_caches);
  if (sa->k_caches == NULL || sa->v_caches == NULL) {
    s = OUT_OF_MEMORY();
    goto fail;
  }
  for (size_t l = 0; l < sa->num_layers; l++) {
    sa->k_caches[l] = calloc(n, sizeof(float));
    sa->v_caches[l] = calloc(n, sizeof(float));
    if (sa->k_caches[l] == NULL || sa->v_caches[l] == NULL) {
      s = OUT_OF_MEMORY();
      goto fail;
    }
  }
  if ((s = alloc_method(sa, &sa->decode)) != ETLLM_OK) goto fail;
  if (sa->has_prefill && (s = alloc_method(sa, &sa->prefill)) != ETLLM_OK) goto fail;

  sa->loaded = true;
  sa->pos = 0;
  sa->pending = NULL;
  update_masks(sa);
  *out_max_prefill_chunk = sa->has_prefill ? sa->prefill.len : sa->decode.len;
  *out_max_context = sa->rope_rows;
  return ETLLM_OK;
fail:
  unload(sa);
  return s;
}

static etllm_status sa_reset(void *user_data) {
  manager *sa = user_data;
  if (sa == NULL) return OUT_OF_MEMORY();
  sa->pos = 0;
  sa->pending = NULL;
  update_masks(sa);
  return ETLLM_OK;
}

static etllm_status sa_rewind(void *user_data, int64_t pos) {
  manager *sa = user_data;
  if (sa == NULL) return OUT_OF_MEMORY();
  sa->pending = NULL;
  if (pos < 0 || pos > sa->pos) {
    return fail(ETLLM_ERR_INVALID_ARGUMENT, "cannot rewind to %lld from %lld", (long long)pos,
                (long long)sa->pos);
  }
  if (sa->pos > sa->cache_len && pos < sa->pos) {
    return fail(ETLLM_ERR_INVALID_ARGUMENT, "cannot rewind to %lld: the sliding window has "
                "moved past the cache length %lld and the older entries are gone",
                (long long)pos, (long long)sa->cache_len);
  }
  sa->pos = pos;
  update_masks(sa);
  return ETLLM_OK;
}

/* Fills the inputs of a step of `n` tokens at `start_pos` through `prefill` (when asked and
 * the model has it) or `forward`. */
static etllm_status prepare(manager *sa, const uint64_t *tokens, size_t n, int64_t start_pos,
                            bool prefill, etllm_step *out_step) {
  if (sa == NULL || !sa->loaded) return fail(ETLLM_ERR_IO_MANAGER, "the manager is not loaded");
  if (start_pos != sa->pos) {
    return fail(ETLLM_ERR_IO_MANAGER, "step at position %lld, but the cache is at %lld",
                (long long)start_pos, (long long)sa->pos);
  }
  if ((int64_t)n > sa->rope_rows - sa->pos) {
    return fail(ETLLM_ERR_IO_MANAGER, "positions %lld..%lld exceed the model's %lld RoPE "
                "positions", (long long)sa->pos, (long long)(sa->pos + (int64_t)n),
                (long long)sa->rope_rows);
  }
  method_io *m = prefill && sa->has_prefill ? &sa->prefill : &sa->decode;
  if (n == 0 || (int64_t)n > m->len) {
    return fail(ETLLM_ERR_IO_MANAGER, "`%s` takes 1 to %lld tokens per call, got %zu", m->name,
                (long long)m->len, n);
  }
  /* Tokens, padded with 0. */
  for (int64_t i = 0; i < m->len; i++) {
    const uint64_t t = (size_t)i < n ? tokens[i] : 0;
    if (m->tokens_dtype == ETLLM_DTYPE_I32) {
      if (t > INT32_MAX) return fail(ETLLM_ERR_IO_MANAGER, "token %llu does not fit an i32 "
                                     "input", (unsigned long long)t);
      ((int32_t *)m->tokens)[i] = (int32_t)t;
    } else {
      ((int64_t *)m->tokens)[i] = (int64_t)t;
    }
  }
  /* RoPE rows of the real tokens, copied from the model's tables; identity for padding. */
  const size_t half = (size_t)sa->half, real = n * half;
  memcpy(m->cos, sa->freqs_cos + (size_t)sa->pos * half, real * sizeof(float));
  memcpy(m->sin, sa->freqs_sin + (size_t)sa->pos * half, real * sizeof(float));
  for (size_t i = real; i < (size_t)m->len * half; i++) {
    m->cos[i] = 1.0f;
    m->sin[i] = 0.0f;
  }
  if (m->last_valid_dtype == ETLLM_DTYPE_I32) {
    m->last_valid.i32 = (int32_t)n - 1;
  } else {
    m->last_valid.i64 = (int64_t)n - 1;
  }
  sa->pending = m;
  sa->pending_n = (int64_t)n;
  out_step->method = m->name;
  out_step->inputs = m->inputs;
  out_step->num_inputs = m->num_inputs;
  return ETLLM_OK;
}

/* Copies the new cache rows of the real tokens into their ring slots, advances the
 * position, and points at the logits of the last real token. */
static etllm_status update(manager *sa, const etllm_tensor_view *outputs, size_t num_outputs,
                           const float **out_logits, size_t *out_vocab) {
  if (sa == NULL || sa->pending == NULL) {
    return fail(ETLLM_ERR_IO_MANAGER, "update without a prepared step");
  }
  method_io *m = sa->pending;
  const int64_t n = sa->pending_n, len = m->len, c = sa->cache_len, hd = sa->head_dim;
  sa->pending = NULL;
  if (num_outputs != m->num_outputs) {
    return fail(ETLLM_ERR_IO_MANAGER, "`%s` returned %zu outputs; its layout has %zu", m->name,
                num_outputs, m->num_outputs);
  }
  /* Check everything before writing anything, so that a failed step leaves the caches as
   * they were. */
  const size_t rows_bytes = (size_t)(sa->heads * len * hd) * sizeof(float);
  for (size_t l = 0; l < sa->num_layers; l++) {
    for (int k = 0; k < 2; k++) {
      const etllm_tensor_view *rows = &outputs[m->kv[l][k ? V_OUT : K_OUT]];
      if (rows->dtype != ETLLM_DTYPE_F32 || rows->nbytes != rows_bytes || rows->data == NULL) {
        return fail(ETLLM_ERR_IO_MANAGER, "output %lld of `%s` is not f32 rows [1, %lld, %lld, "
                    "%lld]", (long long)m->kv[l][k ? V_OUT : K_OUT], m->name,
                    (long long)sa->heads, (long long)len, (long long)hd);
      }
    }
  }
  const etllm_tensor_view *logits = &outputs[0];
  if (logits->dtype != ETLLM_DTYPE_F32 || logits->ndim < 1 || logits->data == NULL) {
    return fail(ETLLM_ERR_IO_MANAGER, "the logits output of `%s` is not f32", m->name);
  }
  /* One logits row (of the last real token), or one row per token of the call. */
  const int64_t vocab = logits->sizes[logits->ndim - 1];
  const int64_t rows = logits->ndim >= 2 ? logits->sizes[logits->ndim - 2] : 1;
  const int64_t row = rows == len && len > 1 ? n - 1 : (rows > 0 ? rows - 1 : 0);
  if (vocab < 1 || (size_t)((row + 1) * vocab) * sizeof(float) > logits->nbytes) {
    return fail(ETLLM_ERR_IO_MANAGER, "the logits output of `%s` has no row %lld",
                m->name, (long long)row);
  }

  for (size_t l = 0; l < sa->num_layers; l++) {
    for (int k = 0; k < 2; k++) {
      const float *src = outputs[m->kv[l][k ? V_OUT : K_OUT]].data;
      float *cache = k ? sa->v_caches[l] : sa->k_caches[l];
      for (int64_t h = 0; h < sa->heads; h++) {
        for (int64_t i = 0; i < n; i++) {
          const int64_t slot = (sa->pos + i) % c;
          memcpy(&cache[(h * c + slot) * hd], &src[(h * len + i) * hd],
                 (size_t)hd * sizeof(float));
        }
      }
    }
  }
  sa->pos += n;
  update_masks(sa);
  *out_logits = (const float *)logits->data + row * vocab;
  *out_vocab = (size_t)vocab;
  return ETLLM_OK;
}

static etllm_status sa_prepare_prefill(void *user_data, const uint64_t *tokens, size_t num_tokens,
                                       int64_t start_pos, etllm_step *out_step) {
  return prepare(user_data, tokens, num_tokens, start_pos, true, out_step);
}

static etllm_status sa_update_prefill(void *user_data, const etllm_tensor_view *outputs,
                                      size_t num_outputs, const float **out_logits,
                                      size_t *out_vocab) {
  return update(user_data, outputs, num_outputs, out_logits, out_vocab);
}

static etllm_status sa_prepare_decode(void *user_data, uint64_t token, int64_t pos,
                                      etllm_step *out_step) {
  return prepare(user_data, &token, 1, pos, false, out_step);
}

static etllm_status sa_update_decode(void *user_data, const etllm_tensor_view *outputs,
                                     size_t num_outputs, const float **out_logits,
                                     size_t *out_vocab) {
  return update(user_data, outputs, num_outputs, out_logits, out_vocab);
}

/* ---- Saved states ----------------------------------------------------------------------
 * What a conversation leaves in the manager is its position and the cache slots filled so
 * far; save_state writes them, restore_state puts them back, so that several conversations
 * can share one model (EtLlm's sessions) and a conversation can be stored and resumed.
 *
 * Layout, in this machine's byte order: state_header (the tag "exSA", the format version,
 * then the cache layout the data depends on and the position), then for each layer its k
 * cache and its v cache, each as `heads` blocks of the first min(pos, cache_len) slots
 * (head_dim floats a slot). Slots are ring slots, so a window that has slid is saved whole.
 * restore_state checks the tag, the version, the layout and the length before it changes
 * anything: a foreign or truncated state leaves the manager as it was. */

#define STATE_VERSION 1u
static const char STATE_TAG[4] = {'e', 'x', 'S', 'A'};

typedef struct state_header {
  char tag[4];
  uint32_t version;
  int64_t num_layers, heads, cache_len, head_dim;
  int64_t pos;
} state_header;

/* Bytes of one saved block: the first `valid` slots of one head. */
static size_t state_block(const manager *sa, int64_t valid) {
  return (size_t)(valid * sa->head_dim) * sizeof(float);
}

static etllm_status sa_save_state(void *user_data, etllm_state_buffer *buffer) {
  manager *sa = user_data;
  if (sa == NULL || !sa->loaded) return fail(ETLLM_ERR_IO_MANAGER, "the manager is not loaded");
  state_header h;
  memset(&h, 0, sizeof h);
  memcpy(h.tag, STATE_TAG, sizeof h.tag);
  h.version = STATE_VERSION;
  h.num_layers = (int64_t)sa->num_layers;
  h.heads = sa->heads;
  h.cache_len = sa->cache_len;
  h.head_dim = sa->head_dim;
  h.pos = sa->pos; /* a step prepared but not updated is not in the caches yet */
  const int64_t c = sa->cache_len, valid = sa->pos < c ? sa->pos : c;
  etllm_status s = etllm_state_buffer_append(buffer, &h, sizeof h);
  for (size_t l = 0; l < sa->num_layers && s == ETLLM_OK; l++) {
    for (int k = 0; k < 2 && s == ETLLM_OK; k++) {
      const float *cache = k ? sa->v_caches[l] : sa->k_caches[l];
      for (int64_t head = 0; head < sa->heads && s == ETLLM_OK; head++) {
        s = etllm_state_buffer_append(buffer, cache + head * c * sa->head_dim,
                                      state_block(sa, valid));
      }
    }
  }
  if (s != ETLLM_OK) return fail(s, "saving the state: %s", etllm_last_error_message());
  return ETLLM_OK;
}

static etllm_status sa_restore_state(void *user_data, const uint8_t *data, size_t len) {
  manager *sa = user_data;
  if (sa == NULL || !sa->loaded) return fail(ETLLM_ERR_IO_MANAGER, "the manager is not loaded");
  state_header h;
  if (data == NULL || len < sizeof h) {
    return fail(ETLLM_ERR_IO_MANAGER, "not a saved static-attention state: %zu bytes, shorter "
                "than its %zu-byte header", len, sizeof h);
  }
  memcpy(&h, data, sizeof h);
  if (memcmp(h.tag, STATE_TAG, sizeof h.tag) != 0) {
    return fail(ETLLM_ERR_IO_MANAGER, "not a saved static-attention state (it does not start "
                "with \"exSA\")");
  }
  if (h.version != STATE_VERSION) {
    return fail(ETLLM_ERR_IO_MANAGER, "the state has format version %u; this manager reads "
                "version %u", (unsigned)h.version, STATE_VERSION);
  }
  if (h.num_layers != (int64_t)sa->num_layers || h.heads != sa->heads ||
      h.cache_len != sa->cache_len || h.head_dim != sa->head_dim) {
    return fail(ETLLM_ERR_IO_MANAGER, "the state is of %lld layers of caches [1, %lld, %lld, "
                "%lld]; this model has %zu layers of [1, %lld, %lld, %lld]",
                (long long)h.num_layers, (long long)h.heads, (long long)h.cache_len,
                (long long)h.head_dim, sa->num_layers, (long long)sa->heads,
                (long long)sa->cache_len, (long long)sa->head_dim);
  }
  if (h.pos < 0 || h.pos > sa->rope_rows) {
    return fail(ETLLM_ERR_IO_MANAGER, "the state is at position %lld; this model has %lld RoPE "
                "positions", (long long)h.pos, (long long)sa->rope_rows);
  }
  const int64_t c = sa->cache_len, hd = sa->head_dim, valid = h.pos < c ? h.pos : c;
  const size_t block = state_block(sa, valid);
  const size_t expected = sizeof h + 2 * sa->num_layers * (size_t)sa->heads * block;
  if (len != expected) {
    return fail(ETLLM_ERR_IO_MANAGER, "the state holds %zu bytes; at position %lld it takes %zu",
                len, (long long)h.pos, expected);
  }
  /* Checked: from here on nothing fails. Slots past the saved ones are zeroed, as in a
   * manager that never saw them. */
  const uint8_t *at = data + sizeof h;
  for (size_t l = 0; l < sa->num_layers; l++) {
    for (int k = 0; k < 2; k++) {
      float *cache = k ? sa->v_caches[l] : sa->k_caches[l];
      for (int64_t head = 0; head < sa->heads; head++) {
        float *dst = cache + head * c * hd;
        memcpy(dst, at, block);
        memset(dst + valid * hd, 0, (size_t)((c - valid) * hd) * sizeof(float));
        at += block;
      }
    }
  }
  sa->pos = h.pos;
  sa->pending = NULL;
  update_masks(sa);
  return ETLLM_OK;
}

static void sa_destroy(void *user_data) {
  manager *sa = user_data;
  if (sa == NULL) return;
  unload(sa);
  free(sa);
}

etllm_io_manager example_static_attention_manager(void) {
  etllm_io_manager vt;
  memset(&vt, 0, sizeof vt); /* fields a newer header adds stay zero */
  vt.struct_size = sizeof vt;
  vt.user_data = calloc(1, sizeof(manager));
  vt.load = sa_load;
  vt.reset = sa_reset;
  vt.rewind = sa_rewind;
  vt.prepare_prefill = sa_prepare_prefill;
  vt.update_prefill = sa_update_prefill;
  vt.prepare_decode = sa_prepare_decode;
  vt.update_decode = sa_update_decode;
  vt.destroy = sa_destroy;
  vt.save_state = sa_save_state;
  vt.restore_state = sa_restore_state;
  return vt;
}
