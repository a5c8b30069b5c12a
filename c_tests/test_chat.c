/* Chat templates and conversations through the C ABI. Renderings are checked against HF
 * transformers' own (tests/fixtures/chat, turned into C data by EtLlmChatReference.cmake). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "etllm_chat_reference.h"
#include "test_support.h"

/* A template short enough for the fixture models' 128-token context. */
static const char *COMPACT =
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}";

static etllm_chat_template *load_template(const char *name) {
  etllm_chat_template *t = NULL;
  if (strcmp(name, "llama3") == 0) {
    CHECK_OK(etllm_chat_template_llama3(&t));
  } else if (strcmp(name, "llama2") == 0) {
    CHECK_OK(etllm_chat_template_llama2(&t));
  } else {
    char rel[256];
    CHECK(strncmp(name, "dir:", 4) == 0);
    snprintf(rel, sizeof rel, "chat/%s", name + 4);
    CHECK_OK(etllm_chat_template_from_model_dir(fixture(rel), &t));
  }
  CHECK(t != NULL);
  return t;
}

static void templates_render_as_hf_transformers_does(const char *arg) {
  (void)arg;
  size_t errors = 0;
  CHECK(etllm_chat_ref_num_cases == 19); /* 2 built-ins x 4 conversations x 2, 3 folders */
  for (size_t i = 0; i < etllm_chat_ref_num_cases; i++) {
    const etllm_chat_ref_case *c = &etllm_chat_ref_cases[i];
    etllm_chat_template *t = load_template(c->template_name);
    char *text = NULL;
    etllm_status s = etllm_chat_template_apply(t, c->messages, c->num_messages,
                                               c->add_generation_prompt, &text);
    if (c->text != NULL) {
      CHECK_MSG(s == ETLLM_OK, "case %zu (%s): %s", i, c->template_name,
                etllm_last_error_message());
      CHECK_MSG(strcmp(text, c->text) == 0, "case %zu (%s): got\n%s\nwant\n%s", i,
                c->template_name, text, c->text);
    } else {
      CHECK_MSG(s == ETLLM_ERR_CHAT_TEMPLATE, "case %zu: status %s", i, etllm_status_name(s));
      CHECK(text == NULL);
      CHECK_MSG(strstr(etllm_last_error_message(), c->error) != NULL, "case %zu: %s", i,
                etllm_last_error_message());
      errors++;
    }
    etllm_string_free(text);
    etllm_chat_template_free(t);
  }
  CHECK(errors == 2); /* llama2 refuses roles that do not alternate */
}

static void custom_template_uses_the_tokens_set(const char *arg) {
  (void)arg;
  etllm_chat_template *t = NULL;
  CHECK_OK(etllm_chat_template_new("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}", &t));
  CHECK_OK(etllm_chat_template_set_token(t, "bos_token", "<s>"));
  CHECK_OK(etllm_chat_template_set_token(t, "eos_token", "</s>"));
  etllm_chat_message m = {"user", "hi"};
  char *text = NULL;
  CHECK_OK(etllm_chat_template_apply(t, &m, 1, false, &text));
  CHECK(strcmp(text, "<s>hi</s>") == 0);
  etllm_string_free(text);
  etllm_chat_template_free(t);
}

static void bad_templates_and_arguments_are_errors(const char *arg) {
  (void)arg;
  etllm_chat_template *t = (etllm_chat_template *)&t; /* must be set to NULL on failure */
  CHECK_ERR(etllm_chat_template_new("{% for m in messages %}", &t), ETLLM_ERR_CHAT_TEMPLATE);
  CHECK(t == NULL);
  CHECK_ERR(etllm_chat_template_new(NULL, &t), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_chat_template_llama3(NULL), ETLLM_ERR_NULL_ARGUMENT);
  /* A folder with no template: the fixtures folder itself. */
  CHECK_ERR(etllm_chat_template_from_model_dir(fixture("."), &t), ETLLM_ERR_NOT_FOUND);
  CHECK_ERR(etllm_chat_template_from_model_dir(fixture("chat/no-such-folder/tokenizer_config.json"), &t),
            ETLLM_ERR_NOT_FOUND);
  CHECK_OK(etllm_chat_template_llama3(&t));
  etllm_chat_message bad = {NULL, "hi"};
  char *text = NULL;
  CHECK_ERR(etllm_chat_template_apply(t, &bad, 1, true, &text), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_chat_template_apply(t, NULL, 1, true, &text), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_chat_template_apply(t, NULL, 0, true, NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(text == NULL);
  /* No messages at all: the Llama 3 template renders just the reply header. */
  CHECK_OK(etllm_chat_template_apply(t, NULL, 0, true, &text));
  CHECK(strcmp(text, "<|start_header_id|>assistant<|end_header_id|>\n\n") == 0);
  etllm_string_free(text);
  etllm_chat_template_free(t);
  etllm_chat_template_free(NULL);
}

static void runner_renders_with_the_template_set(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_chat_message m = {"user", "hi"};
  char *text = NULL;
  /* No template files beside the fixture tokenizer: the built-in Llama 3 template. */
  CHECK_OK(etllm_runner_apply_chat_template(runner, &m, 1, false, &text));
  CHECK(strcmp(text, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>") == 0);
  etllm_string_free(text);
  etllm_chat_template *t = NULL;
  CHECK_OK(etllm_chat_template_new(COMPACT, &t));
  CHECK_OK(etllm_runner_set_chat_template(runner, t));
  etllm_chat_template_free(t); /* the runner keeps its own copy */
  CHECK_OK(etllm_runner_apply_chat_template(runner, &m, 1, true, &text));
  CHECK(strcmp(text, "<user>hi<assistant>") == 0);
  etllm_string_free(text);
  CHECK_OK(etllm_runner_set_chat_template(runner, NULL));
  CHECK_OK(etllm_runner_apply_chat_template(runner, &m, 1, true, &text));
  CHECK(strncmp(text, "<|begin_of_text|>", 17) == 0);
  etllm_string_free(text);
  etllm_runner_free(runner);
}

static etllm_conversation *compact_conversation(etllm_runner *runner) {
  etllm_chat_template *t = NULL;
  CHECK_OK(etllm_chat_template_new(COMPACT, &t));
  etllm_conversation *conv = NULL;
  CHECK_OK(etllm_conversation_new(runner, t, &conv));
  etllm_chat_template_free(t);
  return conv;
}

static void send(etllm_conversation *conv, etllm_runner *runner, const char *user,
                 collector *out) {
  etllm_generation_config config = greedy_config(5);
  config.ignore_eos = true;
  memset(out, 0, sizeof *out);
  CHECK_OK(etllm_conversation_send(conv, runner, user, &config, collect_token, NULL, out, NULL));
  CHECK(out->num_ids == 5);
}

static void conversation_rewind_regenerates_the_same_reply(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_conversation *conv = compact_conversation(runner);
  collector first, reply, again;
  send(conv, runner, "Once upon", &first);
  int64_t before = -1, after = -1;
  CHECK_OK(etllm_runner_position(runner, &before));
  send(conv, runner, "a time", &reply);
  bool dropped = false;
  CHECK_OK(etllm_conversation_rewind(conv, runner, &dropped));
  CHECK(dropped);
  CHECK_OK(etllm_runner_position(runner, &after));
  CHECK(after == before);
  send(conv, runner, "a time", &again);
  CHECK(memcmp(reply.ids, again.ids, sizeof reply.ids[0] * 5) == 0);
  /* The messages: user, assistant, user, assistant; the replies are the streamed text. */
  size_t n = 0;
  CHECK_OK(etllm_conversation_num_messages(conv, &n));
  CHECK(n == 4);
  char *role = NULL, *content = NULL;
  CHECK_OK(etllm_conversation_message(conv, 1, &role, &content));
  CHECK(strcmp(role, "assistant") == 0);
  CHECK(strlen(content) == first.text_len && memcmp(content, first.text, first.text_len) == 0);
  etllm_string_free(role);
  etllm_string_free(content);
  CHECK_ERR(etllm_conversation_message(conv, 4, &role, &content), ETLLM_ERR_NOT_FOUND);
  etllm_conversation_free(conv);
  etllm_runner_free(runner);
}

static void conversation_reset_starts_over(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_conversation *conv = compact_conversation(runner);
  CHECK_OK(etllm_conversation_set_system(conv, "Be brief."));
  collector first, again;
  send(conv, runner, "Hello", &first);
  send(conv, runner, "More", &again);
  CHECK_ERR(etllm_conversation_set_system(conv, "late"), ETLLM_ERR_INVALID_ARGUMENT);
  CHECK_OK(etllm_conversation_reset(conv, runner));
  int64_t pos = -1;
  CHECK_OK(etllm_runner_position(runner, &pos));
  CHECK(pos == 0);
  size_t n = 0;
  CHECK_OK(etllm_conversation_num_messages(conv, &n));
  CHECK(n == 1); /* the system message stays */
  send(conv, runner, "Hello", &again);
  CHECK(memcmp(first.ids, again.ids, sizeof first.ids[0] * 5) == 0);
  bool dropped = false;
  CHECK_OK(etllm_conversation_rewind(conv, runner, &dropped));
  CHECK_OK(etllm_conversation_rewind(conv, runner, &dropped));
  CHECK(!dropped);
  etllm_conversation_free(conv);
  etllm_runner_free(runner);
}

static void send_session(etllm_conversation *conv, etllm_session *session, const char *user,
                         collector *out) {
  etllm_generation_config config = greedy_config(5);
  config.ignore_eos = true;
  memset(out, 0, sizeof *out);
  CHECK_OK(etllm_conversation_send_session(conv, session, user, &config, collect_token, NULL,
                                           out, NULL));
  CHECK(out->num_ids == 5);
}

/* A chat on a session, saved after its first turn (state, with the conversation's JSON as
 * user data) and resumed on a freshly opened model, replies as the uninterrupted chat. */
static void conversation_resumes_on_a_session_from_its_saved_state(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_session *whole = NULL, *first = NULL;
  CHECK_OK(etllm_session_new(runner, &whole));
  CHECK_OK(etllm_session_new(runner, &first));
  etllm_conversation *a = compact_conversation(runner);
  etllm_conversation *b = compact_conversation(runner);
  collector turn, want, got;
  send_session(a, whole, "Once upon", &turn);
  send_session(a, whole, "a time", &want);

  send_session(b, first, "Once upon", &turn);
  char *json = NULL;
  CHECK_OK(etllm_conversation_to_json(b, &json));
  uint8_t *state = NULL;
  size_t state_len = 0;
  CHECK_OK(etllm_session_save_state(first, (const uint8_t *)json, strlen(json), &state,
                                    &state_len));

  etllm_runner *other = open_runner(DEFAULT_MODEL);
  etllm_session *resumed = NULL;
  CHECK_OK(etllm_session_new(other, &resumed));
  uint8_t *user_data = NULL;
  size_t user_len = 0;
  CHECK_OK(etllm_session_load_state(resumed, state, state_len, &user_data, &user_len));
  CHECK(user_len == strlen(json) && memcmp(user_data, json, user_len) == 0);
  char *text = malloc(user_len + 1);
  memcpy(text, user_data, user_len);
  text[user_len] = 0;
  etllm_chat_template *t = NULL;
  CHECK_OK(etllm_chat_template_new(COMPACT, &t));
  etllm_conversation *c = NULL;
  CHECK_OK(etllm_conversation_from_json(other, t, text, &c));
  send_session(c, resumed, "a time", &got);
  CHECK(memcmp(got.ids, want.ids, sizeof want.ids[0] * 5) == 0);
  size_t n = 0;
  CHECK_OK(etllm_conversation_num_messages(c, &n));
  CHECK(n == 4);

  /* Rewind and reset reach the session. */
  int64_t before = -1, after = -1;
  bool dropped = false;
  CHECK_OK(etllm_conversation_rewind_session(c, resumed, &dropped));
  CHECK(dropped);
  CHECK_OK(etllm_session_position(resumed, &after));
  CHECK_OK(etllm_session_position(first, &before));
  CHECK(after == before);
  CHECK_OK(etllm_conversation_reset_session(c, resumed));
  CHECK_OK(etllm_session_position(resumed, &after));
  CHECK(after == 0);
  etllm_conversation *bad = NULL;
  CHECK_ERR(etllm_conversation_from_json(other, t, "{\"messages\": 3}", &bad),
            ETLLM_ERR_INVALID_STATE);
  CHECK(bad == NULL);

  free(text);
  etllm_buffer_free(user_data);
  etllm_buffer_free(state);
  etllm_string_free(json);
  etllm_chat_template_free(t);
  etllm_conversation_free(a);
  etllm_conversation_free(b);
  etllm_conversation_free(c);
  etllm_session_free(whole);
  etllm_session_free(first);
  etllm_session_free(resumed);
  etllm_runner_free(runner);
  etllm_runner_free(other);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"templates_render_as_hf_transformers_does", templates_render_as_hf_transformers_does},
      {"custom_template_uses_the_tokens_set", custom_template_uses_the_tokens_set},
      {"bad_templates_and_arguments_are_errors", bad_templates_and_arguments_are_errors},
      {"runner_renders_with_the_template_set", runner_renders_with_the_template_set},
      {"conversation_rewind_regenerates_the_same_reply",
       conversation_rewind_regenerates_the_same_reply},
      {"conversation_reset_starts_over", conversation_reset_starts_over},
      {"conversation_resumes_on_a_session_from_its_saved_state",
       conversation_resumes_on_a_session_from_its_saved_state},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
