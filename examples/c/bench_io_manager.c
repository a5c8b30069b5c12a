/*
 * Decode benchmark: a KV-cache manager written in C (through the etllm_io_manager vtable)
 * against EtLlm's built-in Rust manager, on the same model in the same process.
 *
 *   bench_io_manager MODEL.pte TOKENIZER.json [--manager auto|static|kv] [--runs N]
 *                    [--tokens N] [--prompt-tokens N] [--verbose 1]
 *
 * --manager picks the C manager: `static` (static_attention_manager.c) for static-attention
 * exports, `kv` (kv_in_model_manager.c) for exports that keep the KV cache inside;
 * `auto` (the default) tries `static` and falls back to `kv`. Both runners use one thread
 * (ExecuTorch's pool is process-wide), decode greedily from the same prompt (BOS, then ids
 * 3, 4, ...), EOS ignored, and their tokens are checked equal. Each run opens a fresh pair
 * of runners, C first on even runs and built-in first on odd ones (of two runners on the
 * same model, the one opened first can be several percent slower whatever its manager),
 * warms both up with one untimed generation each, then times one generation each in the
 * same order. The decode rate of a
 * generation is (generated - 1) decode steps over the time from the first token to the
 * end. It prints the median rate of each and their ratio, and the median of the per-run
 * ratios (each run pairs two neighbouring generations, so this one is the least sensitive
 * to a machine whose load changes); --verbose 1 prints every run.
 */
#define _POSIX_C_SOURCE 200809L
#include <etllm.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv_in_model_manager.h"
#include "static_attention_manager.h"

#define MAX_TOKENS 4096

typedef struct run_ids {
  uint32_t ids[MAX_TOKENS];
  size_t n;
} run_ids;

static int32_t collect(void *user_data, const char *piece, size_t len, int64_t token_id) {
  (void)piece;
  (void)len;
  run_ids *r = user_data;
  if (token_id >= 0 && r->n < MAX_TOKENS) r->ids[r->n++] = (uint32_t)token_id;
  return 0;
}

static void die(const char *what, etllm_status status) {
  fprintf(stderr, "%s failed: %s: %s\n", what, etllm_status_name(status),
          etllm_last_error_message());
  exit(1);
}

static etllm_runner *open_runner(const char *model, const char *tokenizer,
                                 const etllm_io_manager *manager, etllm_status *out_status) {
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  options.io_manager = manager;
  etllm_runner *runner = NULL;
  *out_status = etllm_runner_open(model, tokenizer, &options, &runner);
  return runner;
}

/* A runner with the C manager `*which` (static, kv, or auto: static, else kv, after which
 * *which names the one that worked). */
static etllm_runner *open_c_runner(const char *model, const char *tokenizer, const char **which,
                                   const char **out_name) {
  etllm_status s = ETLLM_OK;
  if (strcmp(*which, "static") == 0 || strcmp(*which, "auto") == 0) {
    etllm_io_manager m = example_static_attention_manager();
    etllm_runner *runner = open_runner(model, tokenizer, &m, &s);
    if (s == ETLLM_OK) {
      *which = "static";
      *out_name = "static_attention_manager.c";
      return runner;
    }
    if (strcmp(*which, "static") == 0 || s != ETLLM_ERR_IO_MANAGER) {
      die("etllm_runner_open (C static-attention manager)", s);
    }
  }
  if (strcmp(*which, "kv") != 0 && strcmp(*which, "auto") != 0) {
    fprintf(stderr, "--manager is auto, static or kv\n");
    exit(2);
  }
  etllm_io_manager m = example_kv_in_model_manager();
  etllm_runner *runner = open_runner(model, tokenizer, &m, &s);
  if (s != ETLLM_OK) die("etllm_runner_open (C kv-in-model manager)", s);
  *which = "kv";
  *out_name = "kv_in_model_manager.c";
  return runner;
}

/* One generation from a reset runner; returns the decode rate (steps per second). */
static double decode_rate(etllm_runner *runner, const uint32_t *prompt, size_t n_prompt,
                          int32_t tokens, run_ids *out, double *in_model_share) {
  etllm_generation_config config = etllm_generation_config_default();
  config.echo = false;
  config.temperature = 0.0f;
  config.ignore_eos = true;
  config.max_new_tokens = tokens;
  etllm_stats stats = etllm_stats_default();
  out->n = 0;
  etllm_status s = etllm_runner_reset(runner);
  if (s != ETLLM_OK) die("etllm_runner_reset", s);
  s = etllm_runner_generate_tokens(runner, prompt, n_prompt, &config, collect, NULL, out, &stats);
  if (s != ETLLM_OK) die("etllm_runner_generate_tokens", s);
  const double us = (double)(stats.inference_end_us - stats.first_token_us);
  const double gen_us = (double)(stats.inference_end_us - stats.inference_start_us);
  *in_model_share = gen_us > 0 ? (double)stats.aggregate_model_execution_time_us / gen_us : 0;
  return us > 0 ? (double)(stats.num_generated_tokens - 1) * 1e6 / us : 0.0;
}

static int cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, size_t n) {
  qsort(v, n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL.pte TOKENIZER.json [--manager auto|static|kv] [--runs N] "
            "[--tokens N] [--prompt-tokens N]\n", argv[0]);
    return 2;
  }
  const char *model = argv[1], *tokenizer = argv[2], *which = "auto";
  int runs = 9, tokens = 0, prompt_tokens = 16, verbose = 0;
  for (int i = 3; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--manager") == 0) which = argv[i + 1];
    else if (strcmp(argv[i], "--runs") == 0) runs = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--tokens") == 0) tokens = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--prompt-tokens") == 0) prompt_tokens = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--verbose") == 0) verbose = atoi(argv[i + 1]);
    else {
      fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (runs < 1 || prompt_tokens < 1 || prompt_tokens > 1024) {
    fprintf(stderr, "bad --runs or --prompt-tokens\n");
    return 2;
  }

  /* Which C manager: `auto` is resolved by the first open. */
  const char *manager_name = NULL;
  etllm_runner *c_runner = open_c_runner(model, tokenizer, &which, &manager_name);
  int64_t context = 0, vocab = 0;
  etllm_status s;
  if ((s = etllm_runner_max_context_len(c_runner, &context)) != ETLLM_OK) die("context", s);
  if ((s = etllm_runner_vocab_size(c_runner, &vocab)) != ETLLM_OK) die("vocab", s);
  etllm_runner_free(c_runner);
  if (prompt_tokens >= context) prompt_tokens = (int)context / 2;
  if (tokens <= 0) tokens = (int)(context - prompt_tokens < 200 ? context - prompt_tokens : 200);
  if (tokens > MAX_TOKENS) tokens = MAX_TOKENS;
  uint32_t *prompt = malloc((size_t)prompt_tokens * sizeof *prompt);
  if (prompt == NULL) return 1;
  prompt[0] = 1;
  for (int i = 1; i < prompt_tokens; i++) prompt[i] = (uint32_t)((2 + i) % vocab);

  printf("model: %s\nC manager: %s\nprompt: %d tokens, decode: %d tokens, runs: %d, "
         "threads: 1, greedy\n", model, manager_name, prompt_tokens, tokens, runs);

  static run_ids c_ids, b_ids;
  double *rate_c = calloc((size_t)runs, sizeof *rate_c);
  double *rate_b = calloc((size_t)runs, sizeof *rate_b);
  double *share_cs = calloc((size_t)runs, sizeof *share_cs);
  double *share_bs = calloc((size_t)runs, sizeof *share_bs);
  double *ratios = calloc((size_t)runs, sizeof *ratios);
  if (!rate_c || !rate_b || !share_cs || !share_bs || !ratios) return 1;
  for (int r = 0; r < runs; r++) {
    /* A fresh pair of runners per run, opened (and then run) C first on even runs and
     * built-in first on odd ones: the runner opened first of two on the same model can be
     * several percent slower whatever its manager, so the order must alternate. */
    const bool c_first = r % 2 == 0;
    etllm_runner *first, *second;
    if (c_first) {
      first = open_c_runner(model, tokenizer, &which, &manager_name);
      second = open_runner(model, tokenizer, NULL, &s);
    } else {
      first = open_runner(model, tokenizer, NULL, &s);
      if (s != ETLLM_OK) die("etllm_runner_open (built-in manager)", s);
      second = open_c_runner(model, tokenizer, &which, &manager_name);
    }
    if (s != ETLLM_OK) die("etllm_runner_open (built-in manager)", s);
    c_runner = c_first ? first : second;
    etllm_runner *builtin = c_first ? second : first;
    double unused;
    decode_rate(first, prompt, (size_t)prompt_tokens, tokens, &c_ids, &unused); /* warm-up */
    decode_rate(second, prompt, (size_t)prompt_tokens, tokens, &b_ids, &unused);
    if (c_first) {
      rate_c[r] = decode_rate(c_runner, prompt, (size_t)prompt_tokens, tokens, &c_ids, &share_cs[r]);
      rate_b[r] = decode_rate(builtin, prompt, (size_t)prompt_tokens, tokens, &b_ids, &share_bs[r]);
    } else {
      rate_b[r] = decode_rate(builtin, prompt, (size_t)prompt_tokens, tokens, &b_ids, &share_bs[r]);
      rate_c[r] = decode_rate(c_runner, prompt, (size_t)prompt_tokens, tokens, &c_ids, &share_cs[r]);
    }
    etllm_runner_free(first);
    etllm_runner_free(second);
    if (c_ids.n != b_ids.n || memcmp(c_ids.ids, b_ids.ids, c_ids.n * sizeof c_ids.ids[0]) != 0) {
      fprintf(stderr, "run %d: the C manager's tokens differ from the built-in's\n", r);
      return 1;
    }
    ratios[r] = rate_b[r] > 0 ? rate_c[r] / rate_b[r] : 0.0;
    if (verbose) {
      printf("run %2d (%s first): C vtable %9.1f tok/s   built-in %9.1f tok/s\n", r,
             c_first ? "C" : "built-in", rate_c[r], rate_b[r]);
    }
  }
  const double mc = median(rate_c, (size_t)runs), mb = median(rate_b, (size_t)runs);
  const double sc = median(share_cs, (size_t)runs), sb = median(share_bs, (size_t)runs);
  printf("same %zu tokens from both managers in every run\n", c_ids.n);
  printf("median decode: C vtable manager %.1f tok/s (%.1f%% in model), built-in Rust manager "
         "%.1f tok/s (%.1f%% in model)\n", mc, 100 * sc, mb, 100 * sb);
  printf("ratio C / built-in: %.3f (of the medians), %.3f (median of the per-run ratios)\n",
         mb > 0 ? mc / mb : 0.0, median(ratios, (size_t)runs));
  free(rate_c);
  free(rate_b);
  free(share_cs);
  free(share_bs);
  free(ratios);
  free(prompt);
  return 0;
}
