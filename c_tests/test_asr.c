/* Speech to text (etllm_asr_*) on tests/fixtures/whisper, a tiny Whisper exported by
 * optimum-executorch. Transcriptions are checked against the eager-transformers greedy
 * tokens and text of its reference.json; the samples and log-mel features fed directly are
 * the fixture's (soundfile, transformers' WhisperFeatureExtractor), never EtLlm's. Bad audio
 * fails with ETLLM_ERR_INVALID_MEDIA and the handle stays usable. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "etllm_media_reference.h"
#include "test_support.h"

static const char *const STANDARD = "sot_en_transcribe_notimestamps";
static const char *const SPEECH = "audio/speech16k.wav";

static const char *whisper_file(const char *rel) {
  char path[512];
  int n = snprintf(path, sizeof path, "whisper/%s", rel);
  CHECK(n > 0 && (size_t)n < sizeof path);
  return fixture(path);
}

static const etllm_asr_ref_case *asr_case(const char *audio, const char *prompt) {
  for (size_t i = 0; i < etllm_asr_ref_num_cases; i++) {
    const etllm_asr_ref_case *c = &etllm_asr_ref_cases[i];
    if (strcmp(c->audio, audio) == 0 && strcmp(c->prompt, prompt) == 0) return c;
  }
  etllm_test_fail(__FILE__, __LINE__, "no whisper case %s / %s", audio, prompt);
}

static etllm_asr *open_asr(void) {
  etllm_asr_options options = etllm_asr_options_default();
  options.num_threads = 1;
  etllm_asr *asr = NULL;
  CHECK_OK(etllm_asr_open(whisper_file("model.pte"), whisper_file("tokenizer.json"), &options,
                          &asr));
  CHECK(asr != NULL);
  return asr;
}

/* Greedy, at most the reference's number of new tokens. */
static etllm_generation_config asr_greedy(void) {
  etllm_generation_config config = etllm_generation_config_default();
  config.temperature = 0.0f;
  config.echo = false;
  config.max_new_tokens = etllm_asr_ref_max_new_tokens;
  return config;
}

/* The case's decoder prompt: the standard one is language "en" (start, <|en|>,
 * <|transcribe|>, <|notimestamps|>); any other is given whole. */
static etllm_transcribe_options prompt_of(const etllm_asr_ref_case *ref) {
  etllm_transcribe_options o = etllm_transcribe_options_default();
  if (strcmp(ref->prompt, STANDARD) == 0) {
    o.language = "en";
  } else {
    o.decoder_prompt = ref->prompt_ids;
    o.num_decoder_prompt = ref->num_prompt_ids;
  }
  return o;
}

/* The reference's greedy ids without the end-of-text token: their count. */
static size_t expected_len(const etllm_asr_ref_case *ref) {
  if (!ref->stopped_on_eos) return ref->num_greedy_ids;
  CHECK(ref->num_greedy_ids > 0 && ref->greedy_ids[ref->num_greedy_ids - 1] == etllm_asr_ref_eos_id);
  return ref->num_greedy_ids - 1;
}

static etllm_input audio_file(const char *rel) {
  etllm_input in = etllm_input_default();
  in.kind = ETLLM_INPUT_AUDIO_FILE;
  in.path = whisper_file(rel);
  return in;
}

/* Transcribes `audio` with `ref`'s prompt and checks the tokens (and the text, when `text`)
 * against the reference; frees what it gets. */
static void check_transcript(etllm_asr *asr, const etllm_input *audio,
                             const etllm_asr_ref_case *ref, bool text, const char *what) {
  etllm_transcribe_options o = prompt_of(ref);
  etllm_generation_config config = asr_greedy();
  char *out_text = NULL;
  uint32_t *ids = NULL;
  size_t n = 0;
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_asr_transcribe(asr, audio, &o, &config, NULL, NULL, &out_text, &ids, &n,
                                &stats));
  check_ids(what, ids, n, ref->greedy_ids, expected_len(ref));
  CHECK(stats.num_generated_tokens == n);
  CHECK(stats.stop_reason == (ref->stopped_on_eos ? ETLLM_STOP_EOS : ETLLM_STOP_LENGTH));
  CHECK(out_text != NULL);
  if (text) {
    CHECK_MSG(strcmp(out_text, ref->text) == 0, "%s: text \"%s\", expected \"%s\"", what,
              out_text, ref->text);
  }
  etllm_string_free(out_text);
  etllm_buffer_free(ids);
}

/* ARG: "<audio file>:<prompt>", a reference case: its tokens, end of text left out. */
static void transcription_matches_eager_transformers(const char *arg) {
  CHECK_MSG(arg != NULL && strchr(arg, ':') != NULL, "this case needs AUDIO:PROMPT");
  char audio[256];
  const char *colon = strchr(arg, ':');
  CHECK((size_t)(colon - arg) < sizeof audio - 8);
  snprintf(audio, sizeof audio, "audio/%.*s", (int)(colon - arg), arg);
  const etllm_asr_ref_case *ref = asr_case(audio, colon + 1);
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file(ref->audio);
  check_transcript(asr, &in, ref, false, arg);
  etllm_asr_free(asr);
}

/* Every reference case's text, special tokens left out, in one handle (each transcription
 * starts over). */
static void transcribed_text_matches_eager_transformers(const char *arg) {
  (void)arg;
  etllm_asr *asr = open_asr();
  for (size_t i = 0; i < etllm_asr_ref_num_cases; i++) {
    const etllm_asr_ref_case *ref = &etllm_asr_ref_cases[i];
    const etllm_input in = audio_file(ref->audio);
    check_transcript(asr, &in, ref, true, ref->audio);
  }
  etllm_asr_free(asr);
}

/* The samples soundfile decoded from speech16k.wav (16 kHz mono floats), as the reference
 * saw them. */
static void samples_match_eager_transformers(const char *arg) {
  (void)arg;
  const etllm_asr_ref_case *ref = asr_case(SPEECH, STANDARD);
  size_t len = 0;
  float *samples = read_file(whisper_file("speech16k.samples.f32"), &len);
  etllm_input in = etllm_input_default();
  in.kind = ETLLM_INPUT_AUDIO_SAMPLES;
  in.floats = samples;
  in.num_floats = len / sizeof(float);
  in.sample_rate = 16000;
  in.channels = 1;
  etllm_asr *asr = open_asr();
  check_transcript(asr, &in, ref, true, "samples");
  etllm_asr_free(asr);
  free(samples);
}

/* The log-mel features transformers' WhisperFeatureExtractor made ([80, 3000]). */
static void features_match_eager_transformers(const char *arg) {
  (void)arg;
  const etllm_asr_ref_case *ref = asr_case(SPEECH, STANDARD);
  size_t len = 0;
  float *mel = read_file(whisper_file("speech16k.mel_call.f32"), &len);
  CHECK(len == 80 * 3000 * sizeof(float));
  const size_t sizes[] = {80, 3000};
  etllm_input in = etllm_input_default();
  in.kind = ETLLM_INPUT_FEATURES;
  in.floats = mel;
  in.num_floats = 80 * 3000;
  in.sizes = sizes;
  in.num_sizes = 2;
  etllm_asr *asr = open_asr();
  check_transcript(asr, &in, ref, true, "features");
  /* Sizes that do not hold the values given. */
  const size_t wrong[] = {80, 2999};
  in.sizes = wrong;
  etllm_transcribe_options o = prompt_of(ref);
  CHECK_ERR(etllm_asr_transcribe(asr, &in, &o, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  etllm_asr_free(asr);
  free(mel);
}

/* The encoder's output length is the prompt count; the timestamps are in order. */
static void stats_count_the_encoder_output_as_the_prompt(const char *arg) {
  (void)arg;
  const etllm_asr_ref_case *ref = asr_case(SPEECH, STANDARD);
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file(SPEECH);
  etllm_transcribe_options o = prompt_of(ref);
  etllm_generation_config config = asr_greedy();
  config.max_new_tokens = 3;
  etllm_stats stats = etllm_stats_default();
  uint32_t *ids = NULL;
  size_t n = 0;
  CHECK_OK(etllm_asr_transcribe(asr, &in, &o, &config, NULL, NULL, NULL, &ids, &n, &stats));
  check_ids("3 tokens", ids, n, ref->greedy_ids, 3);
  CHECK(stats.num_prompt_tokens == 1500); /* encoder f32[1, 1500, 64] */
  CHECK(stats.num_generated_tokens == 3);
  CHECK(stats.stop_reason == ETLLM_STOP_LENGTH);
  CHECK(stats.inference_start_us > 0 && stats.prompt_eval_end_us >= stats.inference_start_us);
  CHECK(stats.inference_end_us >= stats.prompt_eval_end_us);
  CHECK(stats.model_load_end_us >= stats.model_load_start_us && stats.model_load_start_us > 0);
  etllm_buffer_free(ids);
  etllm_asr_free(asr);
}

/* Each output is optional; the text streams to the callback as it is made, special tokens
 * left out. */
static void outputs_are_optional_and_the_text_streams(const char *arg) {
  (void)arg;
  const etllm_asr_ref_case *ref = asr_case(SPEECH, "sot_only");
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file(SPEECH);
  etllm_transcribe_options o = prompt_of(ref);
  etllm_generation_config config = asr_greedy();
  static collector c;
  CHECK_OK(etllm_asr_transcribe(asr, &in, &o, &config, collect_token, &c, NULL, NULL, NULL,
                                NULL));
  check_pieces_well_formed(&c);
  CHECK_MSG(strcmp(c.text, ref->text) == 0, "streamed \"%s\", expected \"%s\"", c.text, ref->text);
  /* The reference has a special token (<|fr|>): kept in the tokens, not streamed. */
  size_t specials = 0;
  for (size_t i = 0; i < ref->num_greedy_ids; i++) specials += ref->greedy_ids[i] >= etllm_asr_ref_eos_id;
  CHECK(specials > 0);
  CHECK(c.num_ids == expected_len(ref) - specials);
  etllm_asr_free(asr);
}

/* Returning non-zero from the callback stops: ETLLM_STOP_CALLBACK, the tokens so far. */
static void nonzero_from_the_callback_stops(const char *arg) {
  (void)arg;
  const etllm_asr_ref_case *ref = asr_case(SPEECH, STANDARD);
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file(SPEECH);
  etllm_transcribe_options o = prompt_of(ref);
  etllm_generation_config config = asr_greedy();
  static collector c;
  c.stop_at_token = 3;
  etllm_stats stats = etllm_stats_default();
  uint32_t *ids = NULL;
  size_t n = 0;
  CHECK_OK(etllm_asr_transcribe(asr, &in, &o, &config, collect_token, &c, NULL, &ids, &n,
                                &stats));
  CHECK(stats.stop_reason == ETLLM_STOP_CALLBACK);
  check_ids("stopped after 3", ids, n, ref->greedy_ids, 3);
  etllm_buffer_free(ids);
  etllm_asr_free(asr);
}

typedef struct stop_state {
  etllm_asr *asr;
  size_t pieces;
} stop_state;

static void *stop_thread(void *p) {
  CHECK_OK(etllm_asr_stop(((stop_state *)p)->asr));
  return NULL;
}

static int32_t stop_after_two(void *user_data, const char *piece, size_t len, int64_t id) {
  (void)piece;
  (void)len;
  (void)id;
  stop_state *s = user_data;
  if (++s->pieces == 2) {
    pthread_t t;
    CHECK(pthread_create(&t, NULL, stop_thread, s) == 0);
    CHECK(pthread_join(t, NULL) == 0);
  }
  return 0;
}

/* etllm_asr_stop from another thread ends the transcription before the next decoder step
 * (ETLLM_STOP_REQUESTED); the next transcription clears it and runs whole. */
static void stop_from_another_thread_ends_the_transcription(const char *arg) {
  (void)arg;
  const etllm_asr_ref_case *ref = asr_case(SPEECH, STANDARD);
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file(SPEECH);
  etllm_transcribe_options o = prompt_of(ref);
  etllm_generation_config config = asr_greedy();
  stop_state s = {asr, 0};
  etllm_stats stats = etllm_stats_default();
  uint32_t *ids = NULL;
  size_t n = 0;
  CHECK_OK(etllm_asr_transcribe(asr, &in, &o, &config, stop_after_two, &s, NULL, &ids, &n,
                                &stats));
  CHECK(stats.stop_reason == ETLLM_STOP_REQUESTED);
  check_ids("stopped after 2", ids, n, ref->greedy_ids, 2);
  etllm_buffer_free(ids);
  check_transcript(asr, &in, ref, true, "after a stop");
  etllm_asr_free(asr);
}

static int32_t transcribe_again(void *user_data, const char *piece, size_t len, int64_t id) {
  (void)piece;
  (void)len;
  (void)id;
  etllm_asr *asr = user_data;
  const etllm_input in = audio_file(SPEECH);
  CHECK_ERR(etllm_asr_transcribe(asr, &in, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_BUSY);
  return 1;
}

static void a_call_from_the_callback_is_busy(const char *arg) {
  (void)arg;
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file(SPEECH);
  etllm_transcribe_options o = etllm_transcribe_options_default();
  o.language = "en";
  etllm_stats stats = etllm_stats_default();
  CHECK_OK(etllm_asr_transcribe(asr, &in, &o, NULL, transcribe_again, asr, NULL, NULL, NULL,
                                &stats));
  CHECK(stats.stop_reason == ETLLM_STOP_CALLBACK);
  etllm_asr_free(asr);
}

/* A WAV the reference marks invalid (truncated, not a WAV, no samples, six channels) is
 * ETLLM_ERR_INVALID_MEDIA; every output is NULL and the handle still transcribes the
 * reference. */
static void bad_wav_is_invalid_media_and_the_handle_stays_usable(const char *arg) {
  CHECK_MSG(arg != NULL, "this case needs a WAV file name");
  bool listed = false;
  for (size_t i = 0; i < etllm_asr_ref_num_bad_wavs; i++) listed |= strcmp(etllm_asr_ref_bad_wavs[i], arg) == 0;
  CHECK_MSG(listed, "%s is not a bad WAV of the reference", arg);
  char rel[256];
  snprintf(rel, sizeof rel, "audio/%s", arg);
  const etllm_asr_ref_case *ref = asr_case(SPEECH, STANDARD);
  etllm_asr *asr = open_asr();
  const etllm_input bad = audio_file(rel);
  etllm_transcribe_options o = prompt_of(ref);
  char *text = (char *)"sentinel";
  uint32_t *ids = (uint32_t *)(void *)&o;
  size_t n = 7;
  static collector c;
  CHECK_ERR(etllm_asr_transcribe(asr, &bad, &o, NULL, collect_token, &c, &text, &ids, &n, NULL),
            ETLLM_ERR_INVALID_MEDIA);
  CHECK(text == NULL && ids == NULL && n == 0);
  CHECK(c.num_pieces == 0);
  const etllm_input good = audio_file(SPEECH);
  check_transcript(asr, &good, ref, true, "after a bad WAV");
  etllm_asr_free(asr);
}

/* Every WAV layout the reference marks valid (PCM 8/16-bit, float, extensible, stereo,
 * 44.1 kHz) is read. */
static void every_valid_wav_layout_is_read(const char *arg) {
  (void)arg;
  CHECK(etllm_asr_ref_num_good_wavs >= 6);
  etllm_asr *asr = open_asr();
  etllm_transcribe_options o = etllm_transcribe_options_default();
  o.language = "en";
  etllm_generation_config config = asr_greedy();
  config.max_new_tokens = 2;
  for (size_t i = 0; i < etllm_asr_ref_num_good_wavs; i++) {
    char rel[256];
    snprintf(rel, sizeof rel, "audio/%s", etllm_asr_ref_good_wavs[i]);
    const etllm_input in = audio_file(rel);
    etllm_stats stats = etllm_stats_default();
    CHECK_OK(etllm_asr_transcribe(asr, &in, &o, &config, NULL, NULL, NULL, NULL, NULL, &stats));
    CHECK_MSG(stats.num_prompt_tokens == 1500 && stats.num_generated_tokens >= 1, "%s",
              etllm_asr_ref_good_wavs[i]);
  }
  etllm_asr_free(asr);
}

static void a_missing_wav_is_file_access(const char *arg) {
  (void)arg;
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file("audio/nope.wav");
  CHECK_ERR(etllm_asr_transcribe(asr, &in, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_FILE_ACCESS);
  etllm_asr_free(asr);
}

static void a_decoder_only_model_is_unsupported_model(const char *arg) {
  (void)arg;
  static char sentinel;
  etllm_asr *asr = (etllm_asr *)(void *)&sentinel;
  CHECK_ERR(etllm_asr_open(fixture_model(DEFAULT_MODEL), TOKENIZER(), NULL, &asr),
            ETLLM_ERR_UNSUPPORTED_MODEL);
  CHECK(asr == NULL);
}

static void a_whisper_model_given_to_runner_open_is_unsupported_model(const char *arg) {
  (void)arg;
  static char sentinel;
  etllm_runner *runner = (etllm_runner *)(void *)&sentinel;
  CHECK_ERR(etllm_runner_open(whisper_file("model.pte"), whisper_file("tokenizer.json"), NULL,
                              &runner),
            ETLLM_ERR_UNSUPPORTED_MODEL);
  CHECK(runner == NULL);
}

/* Inputs, prompts and options that cannot be used: each an error, the handle usable. */
static void bad_arguments_are_refused(const char *arg) {
  (void)arg;
  etllm_asr *asr = open_asr();
  const etllm_input in = audio_file(SPEECH);
  etllm_transcribe_options o = etllm_transcribe_options_default();
  CHECK_ERR(etllm_asr_transcribe(NULL, &in, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_asr_transcribe(asr, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_asr_stop(NULL), ETLLM_ERR_NULL_ARGUMENT);
  etllm_asr *out = NULL;
  CHECK_ERR(etllm_asr_open(NULL, whisper_file("tokenizer.json"), NULL, &out),
            ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_asr_open(whisper_file("model.pte"), whisper_file("tokenizer.json"), NULL, NULL),
            ETLLM_ERR_NULL_ARGUMENT);
  /* An input of another kind than audio or features. */
  etllm_input text = etllm_input_default();
  text.text = "hello";
  CHECK_ERR(etllm_asr_transcribe(asr, &text, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* A language the tokenizer has no token for; an empty decoder prompt; a prompt id
   * outside the vocabulary. */
  o.language = "xx";
  CHECK_ERR(etllm_asr_transcribe(asr, &in, &o, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  o = etllm_transcribe_options_default();
  const uint32_t empty[1] = {0}, outside[] = {401, 9999};
  o.decoder_prompt = empty;
  o.num_decoder_prompt = 0;
  CHECK_ERR(etllm_asr_transcribe(asr, &in, &o, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  o.decoder_prompt = outside;
  o.num_decoder_prompt = 2;
  CHECK_ERR(etllm_asr_transcribe(asr, &in, &o, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_INVALID_ARGUMENT);
  /* A struct_size this library does not know. */
  o = etllm_transcribe_options_default();
  o.struct_size = 3;
  CHECK_ERR(etllm_asr_transcribe(asr, &in, &o, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ETLLM_ERR_STRUCT_SIZE);
  etllm_asr_options options = etllm_asr_options_default();
  options.struct_size = 3;
  CHECK_ERR(etllm_asr_open(whisper_file("model.pte"), whisper_file("tokenizer.json"), &options,
                           &out),
            ETLLM_ERR_STRUCT_SIZE);
  CHECK(out == NULL);
  check_transcript(asr, &in, asr_case(SPEECH, STANDARD), true, "after bad arguments");
  etllm_asr_free(asr);
  etllm_asr_free(NULL);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"transcription_matches_eager_transformers", transcription_matches_eager_transformers},
      {"transcribed_text_matches_eager_transformers",
       transcribed_text_matches_eager_transformers},
      {"samples_match_eager_transformers", samples_match_eager_transformers},
      {"features_match_eager_transformers", features_match_eager_transformers},
      {"stats_count_the_encoder_output_as_the_prompt",
       stats_count_the_encoder_output_as_the_prompt},
      {"outputs_are_optional_and_the_text_streams", outputs_are_optional_and_the_text_streams},
      {"nonzero_from_the_callback_stops", nonzero_from_the_callback_stops},
      {"stop_from_another_thread_ends_the_transcription",
       stop_from_another_thread_ends_the_transcription},
      {"a_call_from_the_callback_is_busy", a_call_from_the_callback_is_busy},
      {"bad_wav_is_invalid_media_and_the_handle_stays_usable",
       bad_wav_is_invalid_media_and_the_handle_stays_usable},
      {"every_valid_wav_layout_is_read", every_valid_wav_layout_is_read},
      {"a_missing_wav_is_file_access", a_missing_wav_is_file_access},
      {"a_decoder_only_model_is_unsupported_model", a_decoder_only_model_is_unsupported_model},
      {"a_whisper_model_given_to_runner_open_is_unsupported_model",
       a_whisper_model_given_to_runner_open_is_unsupported_model},
      {"bad_arguments_are_refused", bad_arguments_are_refused},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
