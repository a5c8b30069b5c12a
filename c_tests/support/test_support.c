#include "test_support.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef ETLLM_FIXTURES_DIR
#error "ETLLM_FIXTURES_DIR must be defined"
#endif

void etllm_test_fail(const char *file, int line, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "%s:%d: ", file, line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

void etllm_test_check_ok(etllm_status got, const char *call, const char *file, int line) {
  if (got != ETLLM_OK) {
    etllm_test_fail(file, line, "%s returned %s (%d): %s", call, etllm_status_name((int32_t)got),
                    (int)got, etllm_last_error_message());
  }
  const char *msg = etllm_last_error_message();
  if (msg == NULL || msg[0] != '\0') {
    etllm_test_fail(file, line, "%s succeeded but left the error message \"%s\"", call,
                    msg ? msg : "(NULL)");
  }
}

void etllm_test_check_err(etllm_status got, etllm_status expected, const char *call,
                          const char *file, int line) {
  const char *msg = etllm_last_error_message();
  if (got != expected) {
    etllm_test_fail(file, line, "%s returned %s (%d), expected %s; message: \"%s\"", call,
                    etllm_status_name((int32_t)got), (int)got,
                    etllm_status_name((int32_t)expected), msg ? msg : "(NULL)");
  }
  if (msg == NULL || msg[0] == '\0') {
    etllm_test_fail(file, line, "%s returned %s but etllm_last_error_message() is empty", call,
                    etllm_status_name((int32_t)got));
  }
  if (!utf8_valid(msg, strlen(msg))) {
    etllm_test_fail(file, line, "%s: the error message is not valid UTF-8", call);
  }
}

const char *fixture(const char *rel) {
  static char buffers[8][4096];
  static unsigned next;
  char *buf = buffers[next++ % 8];
  int n = snprintf(buf, sizeof buffers[0], "%s/%s", ETLLM_FIXTURES_DIR, rel);
  CHECK(n > 0 && (size_t)n < sizeof buffers[0]);
  return buf;
}

const char *fixture_model(const char *model) {
  char rel[256];
  int n = snprintf(rel, sizeof rel, "%s/model.pte", model);
  CHECK(n > 0 && (size_t)n < sizeof rel);
  return fixture(rel);
}

etllm_runner *open_runner(const char *model) { return open_runner_case(model, NULL); }

etllm_runner *open_runner_case(const char *model, const etllm_ref_case *ref) {
  etllm_runner *runner = NULL;
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  const char *data[4]; /* fixture() keeps 8 paths alive at a time */
  if (ref != NULL) {
    CHECK(ref->num_data_files <= sizeof data / sizeof data[0]);
    for (size_t i = 0; i < ref->num_data_files; i++) data[i] = fixture(ref->data_files[i]);
    options.data_paths = data;
    options.num_data_paths = ref->num_data_files;
    options.method_name = ref->method;
  }
  CHECK_OK(etllm_runner_open(fixture_model(model), TOKENIZER(), &options, &runner));
  CHECK(runner != NULL);
  return runner;
}

etllm_generation_config greedy_config(int32_t max_new_tokens) {
  etllm_generation_config config = etllm_generation_config_default();
  config.echo = false;
  config.temperature = 0.0f;
  config.ignore_eos = true;
  config.max_new_tokens = max_new_tokens;
  return config;
}

const etllm_ref_model *ref_model(const char *name) {
  CHECK_MSG(name != NULL, "this case needs a model name argument");
  const etllm_ref_model *m = etllm_ref_find_model(name);
  CHECK_MSG(m != NULL, "no reference data for model `%s`", name);
  return m;
}

char *write_temp_file(const void *data, size_t len) {
  const char *dir = getenv("TMPDIR");
  if (dir == NULL || dir[0] == '\0') dir = "/tmp";
  size_t n = strlen(dir) + 32;
  char *path = malloc(n);
  CHECK(path != NULL);
  snprintf(path, n, "%s/etllm-test-XXXXXX", dir);
  int fd = mkstemp(path);
  CHECK_MSG(fd >= 0, "mkstemp(%s): %s", path, strerror(errno));
  const char *p = data;
  while (len > 0) {
    ssize_t w = write(fd, p, len);
    CHECK_MSG(w > 0, "write(%s): %s", path, strerror(errno));
    p += w;
    len -= (size_t)w;
  }
  CHECK(close(fd) == 0);
  return path;
}

void remove_temp_file(char *path) {
  if (path != NULL) {
    unlink(path);
    free(path);
  }
}

void *read_file(const char *path, size_t *out_len) {
  FILE *f = fopen(path, "rb");
  CHECK_MSG(f != NULL, "fopen(%s): %s", path, strerror(errno));
  CHECK(fseek(f, 0, SEEK_END) == 0);
  long size = ftell(f);
  CHECK(size >= 0);
  CHECK(fseek(f, 0, SEEK_SET) == 0);
  void *buf = malloc((size_t)size + 1);
  CHECK(buf != NULL);
  CHECK(fread(buf, 1, (size_t)size, f) == (size_t)size);
  fclose(f);
  *out_len = (size_t)size;
  return buf;
}

bool utf8_valid(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0;
  while (i < len) {
    unsigned char c = s[i];
    size_t n;
    uint32_t cp;
    if (c < 0x80) {
      i++;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false; /* a continuation byte, C0/C1 (overlong) or F5..FF */
    }
    if (len - i - 1 < n) return false; /* truncated */
    for (size_t k = 1; k <= n; k++) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000)) return false; /* overlong */
    if (cp >= 0xD800 && cp <= 0xDFFF) return false;                     /* surrogate */
    if (cp > 0x10FFFF) return false;
    i += n + 1;
  }
  return true;
}

static void append(char *buf, size_t *buf_len, const char *piece, size_t len) {
  CHECK_MSG(*buf_len + len < COLLECT_MAX_TEXT, "collected text too long");
  memcpy(buf + *buf_len, piece, len);
  *buf_len += len;
  buf[*buf_len] = '\0';
}

int32_t collect_token(void *user_data, const char *piece, size_t len, int64_t token_id) {
  collector *c = user_data;
  CHECK(c != NULL);
  CHECK(piece != NULL);
  c->num_pieces++;
  if (len == 0) c->num_empty_pieces++;
  /* `len` bytes, then a NUL that len does not count. A piece may hold a NUL of its own
   * (U+0000 is valid UTF-8, and byte-level tokenizers have a token for it); then strlen
   * stops early, which is why C code must use len. */
  if (piece[len] != '\0') c->num_bad_len++;
  if (memchr(piece, '\0', len) != NULL) {
    c->num_embedded_nul++;
  } else if (strlen(piece) != len) {
    c->num_bad_len++;
  }
  if (!utf8_valid(piece, len)) c->num_bad_utf8++;
  if (token_id < 0) {
    CHECK_MSG(token_id == -1, "token id %lld", (long long)token_id);
    if (c->num_ids == 0) {
      append(c->echo, &c->echo_len, piece, len);
    } else {
      append(c->text, &c->text_len, piece, len);
    }
    return 0;
  }
  CHECK_MSG(c->num_ids < COLLECT_MAX_IDS, "too many tokens");
  c->ids[c->num_ids++] = (uint32_t)token_id;
  append(c->text, &c->text_len, piece, len);
  return (c->stop_at_token != 0 && c->num_ids == c->stop_at_token) ? 1 : 0;
}

void collect_stats(void *user_data, const etllm_stats *stats) {
  collector *c = user_data;
  CHECK(c != NULL && stats != NULL);
  c->num_stats_calls++;
  c->stats = *stats;
}

void check_pieces_well_formed(const collector *c) {
  CHECK_MSG(c->num_bad_utf8 == 0, "%zu of %zu pieces were not complete UTF-8", c->num_bad_utf8,
            c->num_pieces);
  CHECK_MSG(c->num_bad_len == 0, "%zu of %zu pieces had len != strlen(piece)", c->num_bad_len,
            c->num_pieces);
}

etllm_session *open_session(etllm_runner *runner) {
  etllm_session *session = NULL;
  CHECK_OK(etllm_session_new(runner, &session));
  CHECK(session != NULL);
  return session;
}

void session_generate_ids(etllm_session *session, const uint32_t *ids, size_t num_ids,
                          int32_t n, collector *c) {
  memset(c, 0, sizeof *c);
  etllm_generation_config config = greedy_config(n);
  CHECK_OK(etllm_session_generate_tokens(session, ids, num_ids, &config, collect_token, NULL, c,
                                         NULL));
  CHECK_MSG(c->num_ids == (size_t)n, "%zu tokens generated, expected %d", c->num_ids, (int)n);
}

size_t session_tokens(const etllm_session *session, uint32_t *ids, size_t max) {
  size_t count = 0;
  CHECK_OK(etllm_session_tokens(session, ids, max, &count));
  CHECK_MSG(count <= max, "the session holds %zu tokens, more than %zu", count, max);
  return count;
}

void check_ids(const char *what, const uint32_t *got, size_t num_got, const uint32_t *want,
               size_t num_want) {
  size_t n = num_got < num_want ? num_got : num_want;
  for (size_t i = 0; i < n; i++) {
    CHECK_MSG(got[i] == want[i], "%s: token %zu is %u, expected %u", what, i, got[i], want[i]);
  }
  CHECK_MSG(num_got == num_want, "%s: %zu tokens, expected %zu", what, num_got, num_want);
}

/* Where `got` first differs from the first `n` of the `num_want` ids of `want`: an index,
 * min(num_got, n) when only the lengths differ (or `want` is shorter than `n`), or SIZE_MAX
 * when `got` is exactly those `n` ids. */
static size_t first_difference(const uint32_t *got, size_t num_got, const uint32_t *want,
                               size_t num_want, size_t n) {
  const size_t common = num_got < n ? num_got : n;
  for (size_t i = 0; i < common; i++) {
    if (i >= num_want || got[i] != want[i]) return i;
  }
  return num_got == n && num_want >= n ? SIZE_MAX : common;
}

void check_reference_ids(const char *what, const uint32_t *got, size_t num_got,
                         const etllm_ref_case *ref) {
  const size_t n = ref->num_greedy_ids;
  const size_t upstream = first_difference(got, num_got, ref->greedy_ids, n, n);
  if (upstream == SIZE_MAX) return;
  if (ref->fp32_eager_greedy_ids != NULL) {
    const size_t eager = first_difference(got, num_got, ref->fp32_eager_greedy_ids,
                                          ref->num_fp32_eager_greedy_ids, n);
    if (eager == SIZE_MAX) return;
    etllm_test_fail(__FILE__, __LINE__,
                    "%s: %zu tokens (expected %zu); they differ from greedy_ids at token %zu "
                    "and from fp32_eager_greedy_ids at token %zu",
                    what, num_got, n, upstream, eager);
  }
  if (upstream < num_got && upstream < n) {
    etllm_test_fail(__FILE__, __LINE__, "%s: token %zu is %u, the reference gave %u", what,
                    upstream, got[upstream], ref->greedy_ids[upstream]);
  }
  etllm_test_fail(__FILE__, __LINE__, "%s: %zu tokens, expected %zu", what, num_got, n);
}

int run_test_case(int argc, char **argv, const test_case *cases, size_t num_cases) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: %s CASE [ARG]\ncases:", argv[0]);
    for (size_t i = 0; i < num_cases; i++) fprintf(stderr, " %s", cases[i].name);
    fputc('\n', stderr);
    return 2;
  }
  for (size_t i = 0; i < num_cases; i++) {
    if (strcmp(cases[i].name, argv[1]) == 0) {
      cases[i].run(argc == 3 ? argv[2] : NULL);
      return 0;
    }
  }
  fprintf(stderr, "%s: no case called `%s`\n", argv[0], argv[1]);
  return 2;
}

size_t cli_token_ids(const char *cmd, uint32_t *ids, size_t max) {
  FILE *p = popen(cmd, "r");
  CHECK(p != NULL);
  char line[8192];
  size_t n = 0;
  while (fgets(line, sizeof line, p) != NULL) {
    const char *id = strstr(line, "\"id\":");
    if (id == NULL || strncmp(id + 5, "null", 4) == 0) continue;
    CHECK(n < max);
    ids[n++] = (uint32_t)strtoul(id + 5, NULL, 10);
  }
  CHECK_MSG(pclose(p) == 0, "the CLI failed: %s", cmd);
  return n;
}
