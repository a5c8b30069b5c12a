/* etllm_tokenizer and etllm_text_stream: every format loads, and encode, decode and the
 * stream agree with the reference output recorded by tools/fixtures/make_tokenizers.py in
 * tests/fixtures/tokenizers/reference.json. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_support.h"

static const char *tok_fixture(const char *name) {
  static char path[4][1024];
  static int next;
  char *p = path[next++ % 4];
  snprintf(p, sizeof path[0], "%s", fixture("tokenizers/"));
  strncat(p, name, sizeof path[0] - strlen(p) - 1);
  return p;
}

/* The integer array after `"key": [` in the case whose text is `text`, in `format`'s
 * section of reference.json. Returns the count. */
static size_t ref_ids(const char *format, const char *text, const char *key, uint32_t *ids,
                      size_t max) {
  size_t len = 0;
  char *json = read_file(tok_fixture("reference.json"), &len);
  char needle[256];
  snprintf(needle, sizeof needle, "\"%s\": {", format);
  const char *at = strstr(json, needle);
  CHECK(at != NULL);
  snprintf(needle, sizeof needle, "\"text\": \"%s\"", text);
  at = strstr(at, needle);
  CHECK(at != NULL);
  snprintf(needle, sizeof needle, "\"%s\": [", key);
  at = strstr(at, needle);
  CHECK(at != NULL);
  at += strlen(needle);
  size_t n = 0;
  while (*at != ']') {
    char *end;
    unsigned long v = strtoul(at, &end, 10);
    if (end == at) {
      at++;
      continue;
    }
    CHECK(n < max);
    ids[n++] = (uint32_t)v;
    at = end;
  }
  free(json);
  return n;
}

static etllm_tokenizer *load(const char *name, int preset) {
  etllm_tokenizer *t = NULL;
  CHECK_OK(etllm_tokenizer_load(tok_fixture(name), preset, &t));
  CHECK(t != NULL);
  return t;
}

/* Encoding with one BOS and one EOS gives the reference ids, in every format. */
static void encode_matches_reference(const char *arg) {
  (void)arg;
  static const char *formats[][2] = {{"sentencepiece_bpe", "sp_bpe.model"},
                                     {"sentencepiece_unigram", "sp_unigram.model"},
                                     {"llama2c", "llama2c.bin"},
                                     {"tiktoken", "tiktoken.model"},
                                     {"hf", "hf"}};
  for (size_t f = 0; f < sizeof formats / sizeof formats[0]; f++) {
    etllm_tokenizer *t = load(formats[f][1], ETLLM_PRESET_NONE);
    uint32_t want[256];
    size_t n = ref_ids(formats[f][0], "Hello, world!", "ids_bos_eos", want, 256);
    uint32_t *ids = NULL;
    size_t len = 0;
    CHECK_OK(etllm_tokenizer_encode(t, "Hello, world!", 1, 1, &ids, &len));
    CHECK_MSG(len == n && memcmp(ids, want, n * sizeof *ids) == 0, "%s differs", formats[f][0]);
    etllm_buffer_free(ids);
    etllm_tokenizer_free(t);
  }
}

/* Decoding the reference ids gives the reference text. */
static void decode_matches_reference(const char *arg) {
  (void)arg;
  etllm_tokenizer *t = load("llama2c.bin", ETLLM_PRESET_NONE);
  uint32_t ids[256];
  size_t n = ref_ids("llama2c", "Hello, world!", "ids", ids, 256);
  char *text = NULL;
  size_t len = 0;
  CHECK_OK(etllm_tokenizer_decode(t, ids, n, &text, &len));
  CHECK(len == strlen("Hello, world!") && strcmp(text, "Hello, world!") == 0);
  etllm_buffer_free(text);
  etllm_tokenizer_free(t);
}

/* Pushing ids one at a time yields only complete UTF-8, adding up to the whole decode. */
static void stream_yields_complete_utf8(const char *arg) {
  (void)arg;
  etllm_tokenizer *t = load("tiktoken.model", ETLLM_PRESET_NONE);
  uint32_t ids[256];
  const char *text = "Emoji: \xF0\x9F\x98\x80\xF0\x9F\x9A\x80\xF0\x9F\x8C\x8D";
  uint32_t *enc = NULL;
  size_t n = 0;
  CHECK_OK(etllm_tokenizer_encode(t, text, 0, 0, &enc, &n));
  CHECK(n <= 256);
  memcpy(ids, enc, n * sizeof *ids);
  etllm_buffer_free(enc);
  etllm_text_stream *s = NULL;
  CHECK_OK(etllm_text_stream_new(t, &s));
  etllm_tokenizer_free(t); /* the stream keeps what it needs */
  char out[1024] = {0};
  size_t out_len = 0;
  for (size_t i = 0; i <= n; i++) {
    const char *piece = NULL;
    size_t len = 0;
    if (i < n) {
      CHECK_OK(etllm_text_stream_push(s, ids[i], &piece, &len));
    } else {
      CHECK_OK(etllm_text_stream_flush(s, &piece, &len));
    }
    CHECK(utf8_valid(piece, len));
    CHECK(out_len + len < sizeof out);
    memcpy(out + out_len, piece, len);
    out_len += len;
  }
  CHECK(out_len == strlen(text) && memcmp(out, text, out_len) == 0);
  etllm_text_stream_free(s);
}

/* Vocabulary size, BOS and EOS; the llama preset adds <|eot_id|> to Llama 3's EOS. */
static void ids_and_llama_preset(const char *arg) {
  (void)arg;
  etllm_tokenizer *t = load("sp_bpe.model", ETLLM_PRESET_NONE);
  size_t vocab = 0;
  CHECK_OK(etllm_tokenizer_vocab_size(t, &vocab));
  CHECK(vocab == 600);
  uint32_t bos = 0;
  CHECK_OK(etllm_tokenizer_bos_id(t, &bos));
  CHECK(bos == 1);
  etllm_tokenizer_free(t);

  t = load("tiktoken.model", ETLLM_PRESET_LLAMA);
  const uint32_t *eos = NULL;
  size_t n = 0;
  CHECK_OK(etllm_tokenizer_eos_ids(t, &eos, &n));
  CHECK(n == 2);
  char *piece = NULL;
  size_t len = 0;
  CHECK_OK(etllm_tokenizer_token_to_piece(t, eos[1], &piece, &len));
  CHECK(strcmp(piece, "<|eot_id|>") == 0 && len == strlen(piece));
  etllm_buffer_free(piece);
  etllm_tokenizer_free(t);
}

/* Bad input: a file of no known format, NULL arguments, an unknown preset, a bad id. */
static void errors_are_reported(const char *arg) {
  (void)arg;
  etllm_tokenizer *t = (etllm_tokenizer *)1;
  CHECK_ERR(etllm_tokenizer_load(tok_fixture("README.md"), 0, &t), ETLLM_ERR_INVALID_TOKENIZER);
  CHECK(t == NULL);
  CHECK(strstr(etllm_last_error_message(), "tried") != NULL);
  CHECK_ERR(etllm_tokenizer_load(NULL, 0, &t), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_tokenizer_load(tok_fixture("sp_bpe.model"), 7, &t), ETLLM_ERR_INVALID_ARGUMENT);
  uint32_t *ids = NULL;
  size_t n = 0;
  CHECK_ERR(etllm_tokenizer_encode(NULL, "x", 0, 0, &ids, &n), ETLLM_ERR_NULL_ARGUMENT);
  t = load("sp_bpe.model", ETLLM_PRESET_NONE);
  uint32_t bad = 100000;
  char *text = NULL;
  CHECK_ERR(etllm_tokenizer_decode(t, &bad, 1, &text, &n), ETLLM_ERR_TOKENIZER);
  CHECK(text == NULL);
  etllm_tokenizer_free(t);
  etllm_tokenizer_free(NULL);
  etllm_text_stream_free(NULL);
  etllm_buffer_free(NULL);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"encode_matches_reference", encode_matches_reference},
      {"decode_matches_reference", decode_matches_reference},
      {"stream_yields_complete_utf8", stream_yields_complete_utf8},
      {"ids_and_llama_preset", ids_and_llama_preset},
      {"errors_are_reported", errors_are_reported},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
