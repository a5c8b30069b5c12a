/* Multimodal prompts (etllm_input, etllm_runner_generate_inputs / prefill_inputs and the
 * session's) on tests/fixtures/multimodal, a tiny Llava exported by optimum-executorch.
 * Every generation is checked against the eager-transformers greedy tokens of its
 * reference.json; the decoded pixels and pixel values fed directly are transformers'
 * CLIPImageProcessor's (preprocess.json), never EtLlm's. Bad inputs fail with their status
 * and change nothing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "etllm_media_reference.h"
#include "test_support.h"

#define MM_MAX_INPUTS 16

static const char *mm_file(const char *rel) {
  char path[512];
  int n = snprintf(path, sizeof path, "multimodal/%s", rel);
  CHECK(n > 0 && (size_t)n < sizeof path);
  return fixture(path);
}

static const etllm_mm_ref_case *mm_case(const char *name) {
  for (size_t i = 0; i < etllm_mm_ref_num_cases; i++) {
    if (strcmp(etllm_mm_ref_cases[i].name, name) == 0) return &etllm_mm_ref_cases[i];
  }
  etllm_test_fail(__FILE__, __LINE__, "no multimodal case `%s`", name);
}

static etllm_runner *open_mm(void) {
  etllm_runner *runner = NULL;
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  CHECK_OK(etllm_runner_open(mm_file("model.pte"), mm_file("tokenizer.json"), &options, &runner));
  CHECK(runner != NULL);
  return runner;
}

/* Greedy, no BOS added (the ids carry it), no echo: the reference's settings. */
static etllm_generation_config mm_greedy(int32_t n) {
  etllm_generation_config config = etllm_generation_config_default();
  config.echo = false;
  config.temperature = 0.0f;
  config.num_bos = 0;
  config.max_new_tokens = n;
  return config;
}

/* The case's inputs into `out` (room for MM_MAX_INPUTS): text pieces as their token ids,
 * images as files. The paths live in `paths` (one per input). Returns the count. */
static size_t case_inputs(const etllm_mm_ref_case *ref, etllm_input *out,
                          char paths[][512]) {
  CHECK(ref->num_inputs <= MM_MAX_INPUTS);
  for (size_t i = 0; i < ref->num_inputs; i++) {
    const etllm_mm_ref_input *in = &ref->inputs[i];
    out[i] = etllm_input_default();
    if (in->is_image) {
      int n = snprintf(paths[i], 512, "%s", mm_file(in->file));
      CHECK(n > 0 && n < 512);
      out[i].kind = ETLLM_INPUT_IMAGE_FILE;
      out[i].path = paths[i];
    } else {
      out[i].kind = ETLLM_INPUT_TOKENS;
      out[i].tokens = in->token_ids;
      out[i].num_tokens = in->num_token_ids;
    }
  }
  return ref->num_inputs;
}

static void check_greedy(const char *what, const collector *c, const etllm_mm_ref_case *ref) {
  check_ids(what, c->ids, c->num_ids, ref->greedy_ids, ref->num_greedy_ids);
}

static int64_t runner_position(const etllm_runner *runner) {
  int64_t pos = -1;
  CHECK_OK(etllm_runner_position(runner, &pos));
  return pos;
}

static int64_t session_position(const etllm_session *session) {
  int64_t pos = -1;
  CHECK_OK(etllm_session_position(session, &pos));
  return pos;
}

/* Generates the case's reference continuation on `runner` (after a reset) and checks it. */
static void check_runner_gives_reference(etllm_runner *runner, const char *name) {
  const etllm_mm_ref_case *ref = mm_case(name);
  etllm_input inputs[MM_MAX_INPUTS];
  char paths[MM_MAX_INPUTS][512];
  size_t n = case_inputs(ref, inputs, paths);
  static collector c;
  memset(&c, 0, sizeof c);
  etllm_generation_config config = mm_greedy((int32_t)ref->num_greedy_ids);
  CHECK_OK(etllm_runner_reset(runner));
  CHECK_OK(etllm_runner_generate_inputs(runner, inputs, n, &config, collect_token, NULL, &c,
                                        NULL));
  check_greedy(name, &c, ref);
}

static void one_image_matches_eager_transformers(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_mm();
  check_runner_gives_reference(runner, "one_image");
  etllm_runner_free(runner);
}

static void two_images_match_eager_transformers(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_mm();
  check_runner_gives_reference(runner, "two_images");
  etllm_runner_free(runner);
}

static void a_session_matches_eager_transformers(const char *arg) {
  (void)arg;
  const etllm_mm_ref_case *ref = mm_case("two_images");
  etllm_runner *runner = open_mm();
  etllm_session *session = open_session(runner);
  etllm_input inputs[MM_MAX_INPUTS];
  char paths[MM_MAX_INPUTS][512];
  size_t n = case_inputs(ref, inputs, paths);
  static collector c;
  etllm_generation_config config = mm_greedy(16);
  CHECK_OK(etllm_session_generate_inputs(session, inputs, n, &config, collect_token, NULL, &c,
                                         NULL));
  check_greedy("two images on a session", &c, ref);
  CHECK(session_position(session) == (int64_t)(ref->prompt_len + 16));
  /* The runner's own conversation is untouched. */
  CHECK(runner_position(runner) == 0);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* Each image fills one position per image token: the position and the stats count them. */
static void the_position_and_stats_count_one_row_per_image_token(const char *arg) {
  (void)arg;
  const etllm_mm_ref_case *ref = mm_case("one_image");
  etllm_runner *runner = open_mm();
  etllm_input inputs[MM_MAX_INPUTS];
  char paths[MM_MAX_INPUTS][512];
  size_t n = case_inputs(ref, inputs, paths);
  static collector c;
  etllm_generation_config config = mm_greedy(16);
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_generate_inputs(runner, inputs, n, &config, collect_token,
                                        collect_stats, &c, &stats));
  check_greedy("one image", &c, ref);
  check_pieces_well_formed(&c);
  CHECK(c.num_stats_calls == 1);
  CHECK(stats.num_prompt_tokens == ref->prompt_len);
  CHECK(stats.num_generated_tokens == 16);
  CHECK(stats.stop_reason == ETLLM_STOP_LENGTH);
  CHECK(runner_position(runner) == (int64_t)(ref->prompt_len + 16));
  etllm_runner_free(runner);
}

/* Prefilling the first text and the image, then generating from the last text, gives the
 * same continuation as one call: on the runner and on a session. */
static void prefill_inputs_then_generate_inputs_continue_like_one_call(const char *arg) {
  (void)arg;
  const etllm_mm_ref_case *ref = mm_case("one_image");
  etllm_runner *runner = open_mm();
  etllm_session *session = open_session(runner);
  etllm_input inputs[MM_MAX_INPUTS];
  char paths[MM_MAX_INPUTS][512];
  CHECK(case_inputs(ref, inputs, paths) == 3);
  const int64_t first = (int64_t)(ref->inputs[0].num_rows + ref->inputs[1].num_rows);
  etllm_generation_config config = mm_greedy(16);
  static collector c;

  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_runner_prefill_inputs(runner, inputs, 2, &config, &stats));
  CHECK(stats.num_prompt_tokens == (uint64_t)first);
  CHECK(runner_position(runner) == first);
  CHECK_OK(etllm_runner_generate_inputs(runner, inputs + 2, 1, &config, collect_token, NULL,
                                        &c, NULL));
  check_greedy("runner: prefill, then generate", &c, ref);

  memset(&c, 0, sizeof c);
  CHECK_OK(etllm_session_prefill_inputs(session, inputs, 2, NULL, NULL));
  CHECK(session_position(session) == first);
  CHECK_OK(etllm_session_generate_inputs(session, inputs + 2, 1, &config, collect_token, NULL,
                                         &c, NULL));
  check_greedy("session: prefill, then generate", &c, ref);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* Text inputs, tokenized by EtLlm, with the BOS that num_bos = 1 adds for the "<s>" the
 * reference's first text starts with. */
static void text_inputs_with_one_bos_match_eager_transformers(const char *arg) {
  (void)arg;
  const etllm_mm_ref_case *ref = mm_case("one_image");
  const char *first = ref->inputs[0].text;
  CHECK(strncmp(first, "<s>", 3) == 0);
  etllm_input inputs[3] = {etllm_input_default(), etllm_input_default(), etllm_input_default()};
  inputs[0].kind = ETLLM_INPUT_TEXT;
  inputs[0].text = first + 3;
  inputs[1].kind = ETLLM_INPUT_IMAGE_FILE;
  inputs[1].path = mm_file(ref->inputs[1].file);
  inputs[2].kind = ETLLM_INPUT_TEXT;
  inputs[2].text = ref->inputs[2].text;
  etllm_generation_config config = mm_greedy(16);
  config.num_bos = 1;
  etllm_runner *runner = open_mm();
  static collector c;
  CHECK_OK(etllm_runner_generate_inputs(runner, inputs, 3, &config, collect_token, NULL, &c,
                                        NULL));
  check_greedy("text inputs", &c, ref);
  etllm_runner_free(runner);
}

/* Generates the one-image case with its image replaced by `image`; checks the reference. */
static void check_one_image_with(const etllm_input *image, const char *what) {
  const etllm_mm_ref_case *ref = mm_case("one_image");
  etllm_input inputs[MM_MAX_INPUTS];
  char paths[MM_MAX_INPUTS][512];
  CHECK(case_inputs(ref, inputs, paths) == 3 && ref->inputs[1].is_image);
  inputs[1] = *image;
  etllm_runner *runner = open_mm();
  static collector c;
  memset(&c, 0, sizeof c);
  etllm_generation_config config = mm_greedy(16);
  CHECK_OK(etllm_runner_generate_inputs(runner, inputs, 3, &config, collect_token, NULL, &c,
                                        NULL));
  check_greedy(what, &c, ref);
  etllm_runner_free(runner);
}

static void encoded_image_bytes_match_eager_transformers(const char *arg) {
  (void)arg;
  size_t len = 0;
  uint8_t *png = read_file(mm_file("images/rgb.png"), &len);
  etllm_input image = etllm_input_default();
  image.kind = ETLLM_INPUT_IMAGE_ENCODED;
  image.bytes = png;
  image.num_bytes = len;
  check_one_image_with(&image, "rgb.png as bytes");
  free(png);
}

/* Pillow's resize and center crop of rgb.png (32x32 RGB): the processor then only rescales
 * and normalizes, as transformers does. */
static void decoded_pixels_match_eager_transformers(const char *arg) {
  (void)arg;
  etllm_input image = etllm_input_default();
  image.kind = ETLLM_INPUT_IMAGE_PIXELS;
  image.bytes = etllm_mm_rgb_cropped_hwc;
  image.num_bytes = sizeof etllm_mm_rgb_cropped_hwc;
  image.width = 32;
  image.height = 32;
  image.channels = 3;
  check_one_image_with(&image, "rgb.png as pixels");
}

static void pixel_values_as_features_match_eager_transformers(const char *arg) {
  (void)arg;
  const size_t sizes[] = {3, 32, 32};
  etllm_input image = etllm_input_default();
  image.kind = ETLLM_INPUT_FEATURES;
  image.floats = etllm_mm_rgb_pixel_values_chw;
  image.num_floats = 3072;
  image.sizes = sizes;
  image.num_sizes = 3;
  check_one_image_with(&image, "rgb.png's pixel values");
  /* With the batch dimension too. */
  const size_t batched[] = {1, 3, 32, 32};
  image.sizes = batched;
  image.num_sizes = 4;
  check_one_image_with(&image, "rgb.png's pixel values, [1, 3, 32, 32]");
}

/* A bad image (ARG: a file in multimodal/images), as a file and as bytes, is
 * ETLLM_ERR_INVALID_MEDIA in generate and prefill, on a runner and a session; nothing
 * changes, and both still give the reference afterwards. */
static void bad_image_is_invalid_media_and_changes_nothing(const char *arg) {
  CHECK_MSG(arg != NULL, "this case needs an image file name");
  char rel[256];
  snprintf(rel, sizeof rel, "images/%s", arg);
  size_t len = 0;
  uint8_t *bytes = read_file(mm_file(rel), &len);
  const uint32_t prompt[] = {1, 55, 53}, more[] = {55};
  etllm_runner *runner = open_mm();
  etllm_session *session = open_session(runner);
  static collector c;
  etllm_generation_config config = mm_greedy(2);
  CHECK_OK(etllm_runner_generate_tokens(runner, prompt, 3, &config, collect_token, NULL, &c,
                                        NULL));
  CHECK_OK(etllm_session_generate_tokens(session, prompt, 3, &config, collect_token, NULL, &c,
                                         NULL));
  const int64_t before = runner_position(runner);
  CHECK(session_position(session) == before);

  etllm_input inputs[2] = {etllm_input_default(), etllm_input_default()};
  inputs[0].kind = ETLLM_INPUT_TOKENS;
  inputs[0].tokens = more;
  inputs[0].num_tokens = 1;
  for (int as_bytes = 0; as_bytes < 2; as_bytes++) {
    inputs[1] = etllm_input_default();
    if (as_bytes) {
      inputs[1].kind = ETLLM_INPUT_IMAGE_ENCODED;
      inputs[1].bytes = bytes;
      inputs[1].num_bytes = len;
    } else {
      inputs[1].kind = ETLLM_INPUT_IMAGE_FILE;
      inputs[1].path = mm_file(rel);
    }
    memset(&c, 0, sizeof c);
    etllm_stats stats = etllm_stats_default();
    CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, collect_token,
                                           collect_stats, &c, &stats),
              ETLLM_ERR_INVALID_MEDIA);
    CHECK(c.num_pieces == 0 && c.num_stats_calls == 0);
    CHECK_ERR(etllm_runner_prefill_inputs(runner, inputs, 2, NULL, NULL),
              ETLLM_ERR_INVALID_MEDIA);
    CHECK_ERR(etllm_session_generate_inputs(session, inputs, 2, &config, collect_token, NULL,
                                            &c, NULL),
              ETLLM_ERR_INVALID_MEDIA);
    CHECK_ERR(etllm_session_prefill_inputs(session, inputs, 2, NULL, NULL),
              ETLLM_ERR_INVALID_MEDIA);
    CHECK(runner_position(runner) == before);
    CHECK(session_position(session) == before);
  }
  etllm_session_free(session);
  check_runner_gives_reference(runner, "one_image");
  etllm_runner_free(runner);
  free(bytes);
}

static void a_missing_image_file_is_file_access(const char *arg) {
  (void)arg;
  const uint32_t prompt[] = {1, 55};
  etllm_input inputs[2] = {etllm_input_default(), etllm_input_default()};
  inputs[0].kind = ETLLM_INPUT_TOKENS;
  inputs[0].tokens = prompt;
  inputs[0].num_tokens = 2;
  inputs[1].kind = ETLLM_INPUT_IMAGE_FILE;
  inputs[1].path = mm_file("images/nope.png");
  etllm_runner *runner = open_mm();
  etllm_generation_config config = mm_greedy(2);
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_FILE_ACCESS);
  CHECK(runner_position(runner) == 0);
  etllm_runner_free(runner);
}

static void an_image_for_a_text_only_model_is_unsupported_model(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  const uint32_t prompt[] = {1, 5};
  etllm_input inputs[2] = {etllm_input_default(), etllm_input_default()};
  inputs[0].kind = ETLLM_INPUT_TOKENS;
  inputs[0].tokens = prompt;
  inputs[0].num_tokens = 2;
  inputs[1].kind = ETLLM_INPUT_IMAGE_FILE;
  inputs[1].path = mm_file("images/rgb.png");
  etllm_generation_config config = mm_greedy(2);
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_UNSUPPORTED_MODEL);
  CHECK(strstr(etllm_last_error_message(), "vision_encoder") != NULL);
  CHECK(runner_position(runner) == 0);
  /* Still usable: text-only input lists work on it. */
  static collector c;
  config.max_new_tokens = 3;
  CHECK_OK(etllm_runner_generate_inputs(runner, inputs, 1, &config, collect_token, NULL, &c,
                                        NULL));
  CHECK(c.num_ids == 3);
  etllm_runner_free(runner);
}

static void audio_for_a_model_without_an_audio_encoder_is_unsupported_model(const char *arg) {
  (void)arg;
  const uint32_t prompt[] = {1, 55};
  float samples[1600] = {0};
  etllm_input inputs[2] = {etllm_input_default(), etllm_input_default()};
  inputs[0].kind = ETLLM_INPUT_TOKENS;
  inputs[0].tokens = prompt;
  inputs[0].num_tokens = 2;
  inputs[1].kind = ETLLM_INPUT_AUDIO_SAMPLES;
  inputs[1].floats = samples;
  inputs[1].num_floats = 1600;
  inputs[1].sample_rate = 16000;
  inputs[1].channels = 1;
  etllm_runner *runner = open_mm();
  etllm_generation_config config = mm_greedy(2);
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_UNSUPPORTED_MODEL);
  CHECK(runner_position(runner) == 0);
  etllm_runner_free(runner);
}

/* 8 images of 16 rows each fill 128 positions: with the text, more than the context. */
static void more_image_rows_than_the_context_are_context_full_and_change_nothing(
    const char *arg) {
  (void)arg;
  const uint32_t prompt[] = {1, 55};
  etllm_input inputs[9];
  inputs[0] = etllm_input_default();
  inputs[0].kind = ETLLM_INPUT_TOKENS;
  inputs[0].tokens = prompt;
  inputs[0].num_tokens = 2;
  char path[512];
  snprintf(path, sizeof path, "%s", mm_file("images/rgb.png"));
  for (int i = 1; i < 9; i++) {
    inputs[i] = etllm_input_default();
    inputs[i].kind = ETLLM_INPUT_IMAGE_FILE;
    inputs[i].path = path;
  }
  etllm_runner *runner = open_mm();
  etllm_generation_config config = mm_greedy(4);
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 9, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_CONTEXT_FULL);
  CHECK_ERR(etllm_runner_prefill_inputs(runner, inputs, 9, NULL, NULL), ETLLM_ERR_CONTEXT_FULL);
  CHECK(runner_position(runner) == 0);
  check_runner_gives_reference(runner, "one_image");
  etllm_runner_free(runner);
}

/* Copies `from` to `dir`/`name`. */
static void copy_into(const char *from, const char *dir, const char *name, char *out,
                      size_t out_size) {
  size_t len = 0;
  void *data = read_file(from, &len);
  int n = snprintf(out, out_size, "%s/%s", dir, name);
  CHECK(n > 0 && (size_t)n < out_size);
  FILE *f = fopen(out, "wb");
  CHECK_MSG(f != NULL, "cannot write %s", out);
  CHECK(fwrite(data, 1, len, f) == len);
  CHECK(fclose(f) == 0);
  free(data);
}

/* The model and tokenizer in a folder without preprocessor_config.json: an image needs the
 * option, and with it the reference comes out. */
static void preprocessor_config_option_is_used(const char *arg) {
  (void)arg;
  const char *tmp = getenv("TMPDIR");
  char dir[512];
  snprintf(dir, sizeof dir, "%s/etllm-mm-XXXXXX", tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
  CHECK(mkdtemp(dir) != NULL);
  char model[600], tokenizer[600];
  copy_into(mm_file("model.pte"), dir, "model.pte", model, sizeof model);
  copy_into(mm_file("tokenizer.json"), dir, "tokenizer.json", tokenizer, sizeof tokenizer);
  const etllm_mm_ref_case *ref = mm_case("one_image");
  etllm_input inputs[MM_MAX_INPUTS];
  char paths[MM_MAX_INPUTS][512];
  size_t n = case_inputs(ref, inputs, paths);
  etllm_generation_config config = mm_greedy(16);

  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  etllm_runner *bare = NULL;
  CHECK_OK(etllm_runner_open(model, tokenizer, &options, &bare));
  CHECK_ERR(etllm_runner_generate_inputs(bare, inputs, n, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_UNSUPPORTED_MODEL);
  CHECK(strstr(etllm_last_error_message(), "preprocessor_config") != NULL);
  etllm_runner_free(bare);

  options.preprocessor_config = mm_file("preprocessor_config.json");
  etllm_runner *runner = NULL;
  CHECK_OK(etllm_runner_open(model, tokenizer, &options, &runner));
  static collector c;
  CHECK_OK(etllm_runner_generate_inputs(runner, inputs, n, &config, collect_token, NULL, &c,
                                        NULL));
  check_greedy("with preprocessor_config", &c, ref);
  etllm_runner_free(runner);
  CHECK(unlink(model) == 0 && unlink(tokenizer) == 0 && rmdir(dir) == 0);
}

static void preprocessor_config_for_a_text_only_model_is_invalid_argument(const char *arg) {
  (void)arg;
  etllm_runner_options options = etllm_runner_options_default();
  options.num_threads = 1;
  options.preprocessor_config = mm_file("preprocessor_config.json");
  etllm_runner *runner = (etllm_runner *)&options; /* must be set to NULL */
  CHECK_ERR(etllm_runner_open(fixture_model(DEFAULT_MODEL), TOKENIZER(), &options, &runner),
            ETLLM_ERR_INVALID_ARGUMENT);
  CHECK(runner == NULL);
}

static void null_arguments(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_mm();
  etllm_session *session = open_session(runner);
  const uint32_t prompt[] = {1, 55};
  etllm_input input = etllm_input_default();
  input.kind = ETLLM_INPUT_TOKENS;
  input.tokens = prompt;
  input.num_tokens = 2;
  etllm_generation_config config = mm_greedy(2);
  CHECK_ERR(etllm_runner_generate_inputs(NULL, &input, 1, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_runner_generate_inputs(runner, NULL, 1, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_runner_prefill_inputs(NULL, &input, 1, NULL, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_runner_prefill_inputs(runner, NULL, 1, NULL, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_generate_inputs(NULL, &input, 1, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_session_prefill_inputs(session, NULL, 1, NULL, NULL), ETLLM_ERR_NULL_ARGUMENT);
  /* A NULL pointer the kind reads. */
  etllm_input bad = etllm_input_default(); /* ETLLM_INPUT_TEXT with text NULL */
  CHECK_ERR(etllm_runner_generate_inputs(runner, &bad, 1, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  bad.kind = ETLLM_INPUT_IMAGE_FILE;
  CHECK_ERR(etllm_runner_generate_inputs(runner, &bad, 1, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK(runner_position(runner) == 0);
  CHECK(session_position(session) == 0);
  etllm_session_free(session);
  etllm_runner_free(runner);
}

/* Input lists that cannot be fed: each is an error, and nothing changes. */
static void bad_input_lists_are_refused_and_change_nothing(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_mm();
  etllm_generation_config config = mm_greedy(2);
  const uint32_t prompt[] = {1, 55}, outside[] = {9999};
  etllm_input inputs[2] = {etllm_input_default(), etllm_input_default()};
  inputs[0].kind = ETLLM_INPUT_TOKENS;
  inputs[0].tokens = prompt;
  inputs[0].num_tokens = 2;

  /* No inputs. */
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 0, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* A kind that is none. */
  inputs[1].kind = 99;
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* An empty text, and a token outside the vocabulary. */
  inputs[1] = etllm_input_default();
  inputs[1].text = "";
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  inputs[1].kind = ETLLM_INPUT_TOKENS;
  inputs[1].tokens = outside;
  inputs[1].num_tokens = 1;
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* Pixels whose byte count is not width * height * channels, or 5 channels. */
  uint8_t pixels[48] = {0};
  inputs[1] = etllm_input_default();
  inputs[1].kind = ETLLM_INPUT_IMAGE_PIXELS;
  inputs[1].bytes = pixels;
  inputs[1].num_bytes = 47;
  inputs[1].width = 4;
  inputs[1].height = 4;
  inputs[1].channels = 3;
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  inputs[1].num_bytes = 48;
  inputs[1].width = 3;
  inputs[1].height = 2;
  inputs[1].channels = 8;
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* Features of another shape than the encoder takes. */
  static float values[768];
  const size_t sizes[] = {3, 16, 16};
  inputs[1] = etllm_input_default();
  inputs[1].kind = ETLLM_INPUT_FEATURES;
  inputs[1].floats = values;
  inputs[1].num_floats = 768;
  inputs[1].sizes = sizes;
  inputs[1].num_sizes = 3;
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* A struct_size this library does not know. */
  inputs[1] = etllm_input_default();
  inputs[1].struct_size = 3;
  CHECK_ERR(etllm_runner_generate_inputs(runner, inputs, 2, &config, NULL, NULL, NULL, NULL),
            ETLLM_ERR_STRUCT_SIZE);
  CHECK(runner_position(runner) == 0);
  check_runner_gives_reference(runner, "one_image");
  etllm_runner_free(runner);
}

/* The default input: struct_size set, an empty text input. */
static void input_default_is_an_empty_text_input(const char *arg) {
  (void)arg;
  etllm_input in = etllm_input_default();
  CHECK(in.struct_size == sizeof(etllm_input));
  CHECK(in.kind == ETLLM_INPUT_TEXT);
  CHECK(in.text == NULL && in.path == NULL && in.tokens == NULL && in.bytes == NULL);
  CHECK(in.floats == NULL && in.sizes == NULL);
  CHECK(in.num_tokens == 0 && in.num_bytes == 0 && in.num_floats == 0 && in.num_sizes == 0);
  CHECK(in.width == 0 && in.height == 0 && in.channels == 0 && in.sample_rate == 0);
  CHECK(strcmp(etllm_status_name(ETLLM_ERR_INVALID_MEDIA), "ETLLM_ERR_INVALID_MEDIA") == 0);
  CHECK(ETLLM_ERR_INVALID_MEDIA == 22);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"one_image_matches_eager_transformers", one_image_matches_eager_transformers},
      {"two_images_match_eager_transformers", two_images_match_eager_transformers},
      {"a_session_matches_eager_transformers", a_session_matches_eager_transformers},
      {"the_position_and_stats_count_one_row_per_image_token",
       the_position_and_stats_count_one_row_per_image_token},
      {"prefill_inputs_then_generate_inputs_continue_like_one_call",
       prefill_inputs_then_generate_inputs_continue_like_one_call},
      {"text_inputs_with_one_bos_match_eager_transformers",
       text_inputs_with_one_bos_match_eager_transformers},
      {"encoded_image_bytes_match_eager_transformers",
       encoded_image_bytes_match_eager_transformers},
      {"decoded_pixels_match_eager_transformers", decoded_pixels_match_eager_transformers},
      {"pixel_values_as_features_match_eager_transformers",
       pixel_values_as_features_match_eager_transformers},
      {"bad_image_is_invalid_media_and_changes_nothing",
       bad_image_is_invalid_media_and_changes_nothing},
      {"a_missing_image_file_is_file_access", a_missing_image_file_is_file_access},
      {"an_image_for_a_text_only_model_is_unsupported_model",
       an_image_for_a_text_only_model_is_unsupported_model},
      {"audio_for_a_model_without_an_audio_encoder_is_unsupported_model",
       audio_for_a_model_without_an_audio_encoder_is_unsupported_model},
      {"more_image_rows_than_the_context_are_context_full_and_change_nothing",
       more_image_rows_than_the_context_are_context_full_and_change_nothing},
      {"preprocessor_config_option_is_used", preprocessor_config_option_is_used},
      {"preprocessor_config_for_a_text_only_model_is_invalid_argument",
       preprocessor_config_for_a_text_only_model_is_invalid_argument},
      {"null_arguments", null_arguments},
      {"bad_input_lists_are_refused_and_change_nothing",
       bad_input_lists_are_refused_and_change_nothing},
      {"input_default_is_an_empty_text_input", input_default_is_an_empty_text_input},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
