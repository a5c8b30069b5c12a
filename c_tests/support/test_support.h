/* Shared helpers of the EtLlm C tests: checks, fixture paths, a UTF-8 validator, a
 * token-collecting callback and a one-process-per-case runner. */
#ifndef ETLLM_TEST_SUPPORT_H
#define ETLLM_TEST_SUPPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "etllm.h"
#include "etllm_reference.h"

/* ---- Failing -------------------------------------------------------------------------- */

/* Prints "file:line: message" to stderr and exits with status 1. */
_Noreturn void etllm_test_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define CHECK(cond) \
  ((cond) ? (void)0 : etllm_test_fail(__FILE__, __LINE__, "check failed: %s", #cond))

#define CHECK_MSG(cond, ...) ((cond) ? (void)0 : etllm_test_fail(__FILE__, __LINE__, __VA_ARGS__))

/* `call` must return ETLLM_OK, and then the thread's error message must be "". */
#define CHECK_OK(call) etllm_test_check_ok((call), #call, __FILE__, __LINE__)

/* `call` must return `expected`, with a non-empty error message. */
#define CHECK_ERR(call, expected) \
  etllm_test_check_err((call), (expected), #call, __FILE__, __LINE__)

void etllm_test_check_ok(etllm_status got, const char *call, const char *file, int line);
void etllm_test_check_err(etllm_status got, etllm_status expected, const char *call,
                          const char *file, int line);

/* ---- Fixtures ------------------------------------------------------------------------- */

/* ETLLM_FIXTURES_DIR "/" rel. The string lives until 8 more calls have been made. */
const char *fixture(const char *rel);
/* tests/fixtures/<model>/model.pte */
const char *fixture_model(const char *model);
#define DEFAULT_MODEL "dyn_xnnpack"
#define TOKENIZER() fixture("tokenizer.json")

/* Opens `model` with the fixture tokenizer; fails the test on error. */
etllm_runner *open_runner(const char *model);
/* A runner of tests/fixtures/<model>/model.pte with the reference case's data files and
 * method (`ref` NULL: none given, "forward"). */
etllm_runner *open_runner_case(const char *model, const etllm_ref_case *ref);

/* Greedy, no echo, EOS ignored, at most `max_new_tokens`. */
etllm_generation_config greedy_config(int32_t max_new_tokens);

/* The reference model called `name`; fails the test when there is none. */
const etllm_ref_model *ref_model(const char *name);

/* Writes `len` bytes to a new temporary file and returns its path (free it with
 * remove_temp_file). */
char *write_temp_file(const void *data, size_t len);
void remove_temp_file(char *path);
/* Reads a whole file; fails the test on error. *out_len gets its size. */
void *read_file(const char *path, size_t *out_len);

/* ---- UTF-8 ---------------------------------------------------------------------------- */

/* True when the `len` bytes at `s` are well-formed UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF, no truncated sequence). */
bool utf8_valid(const char *s, size_t len);

/* ---- Collecting callbacks --------------------------------------------------------------- */

#define COLLECT_MAX_IDS 512
#define COLLECT_MAX_TEXT 16384

/* user_data of collect_token / collect_stats. Zero-initialize, then set the inputs. */
typedef struct collector {
  /* Input: return non-zero from the callback of this generated token (1-based); 0: never. */
  size_t stop_at_token;
  /* Output. */
  uint32_t ids[COLLECT_MAX_IDS]; /* generated token ids, in order */
  size_t num_ids;
  char echo[COLLECT_MAX_TEXT];   /* pieces with token id -1 before the first token */
  size_t echo_len;
  char text[COLLECT_MAX_TEXT];   /* every other piece, concatenated */
  size_t text_len;
  size_t num_pieces;             /* callbacks, echo included */
  size_t num_empty_pieces;
  size_t num_bad_utf8;           /* pieces that are not complete UTF-8 */
  size_t num_bad_len;            /* pieces whose len is not strlen(piece) (see below) */
  size_t num_embedded_nul;       /* pieces holding a U+0000 (strlen(piece) < len) */
  size_t num_stats_calls;
  etllm_stats stats;             /* what the stats callback got */
} collector;

int32_t collect_token(void *user_data, const char *piece, size_t len, int64_t token_id);
void collect_stats(void *user_data, const etllm_stats *stats);

/* Fails the test unless every piece the collector saw was complete UTF-8 with a right len. */
void check_pieces_well_formed(const collector *c);

/* ---- Sessions --------------------------------------------------------------------------- */

/* A new session over `runner`'s model; fails the test on error. */
etllm_session *open_session(etllm_runner *runner);

/* Greedy generation of exactly `n` tokens on `session` from `num_ids` prompt ids (0: the
 * conversation continues from its last token), collected into `*c` (cleared first); fails
 * the test on error. */
void session_generate_ids(etllm_session *session, const uint32_t *ids, size_t num_ids,
                          int32_t n, collector *c);

/* The session's tokens (etllm_session_tokens) into `ids` (room for `max`); returns how many
 * there are and fails the test if that is more than `max`. */
size_t session_tokens(const etllm_session *session, uint32_t *ids, size_t max);

/* Fails the test unless `got` holds exactly the `num_want` ids of `want` ("what" names the
 * comparison in the message). */
void check_ids(const char *what, const uint32_t *got, size_t num_got, const uint32_t *want,
               size_t num_want);

/* Fails the test unless `got` is exactly `ref`'s greedy continuation: all of its
 * greedy_ids, or, for an fp16 export whose reference also carries fp32_eager_greedy_ids,
 * the same length of those instead. Why two for f16: that fixture's greedy_ids come from
 * upstream's runtime (pybindings, XNNPACK) on the machine that made it, and XNNPACK chooses
 * its f16 microkernels by CPU: on CPUs without native f16 arithmetic the export computes
 * like fp32 and its greedy tokens then equal eager fp32's (they part where a step's top-2
 * margin is within f16 rounding). EtLlm links the same XNNPACK, so upstream's runtime gives
 * EtLlm's tokens on the same CPU. Both outside references are accepted; a runner bug matches
 * neither. Every other reference has greedy_ids only, compared exactly. */
void check_reference_ids(const char *what, const uint32_t *got, size_t num_got,
                         const etllm_ref_case *ref);

/* ---- The command-line tool ---------------------------------------------------------------- */

/* Runs an `etllm generate ... --json` command line and returns how many generated token ids
 * it printed (one {"id": N, ...} line a token), stored in `ids`; fails the test when the
 * command fails or prints more than `max`. */
size_t cli_token_ids(const char *cmd, uint32_t *ids, size_t max);

/* ---- Running cases ---------------------------------------------------------------------- */

typedef struct test_case {
  const char *name;
  /* `arg` is the command line's second argument, or NULL. */
  void (*run)(const char *arg);
} test_case;

/* Usage: <exe> CASE [ARG]. Runs the case called CASE; returns the process status. */
int run_test_case(int argc, char **argv, const test_case *cases, size_t num_cases);

#define NUM_CASES(a) (sizeof(a) / sizeof((a)[0]))

#endif /* ETLLM_TEST_SUPPORT_H */
