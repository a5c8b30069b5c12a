/*
 * A multi-turn chat with rewind, in C (docs/tutorials/chat-with-rewind.md).
 *
 *   chat MODEL.pte TOKENIZER.json "FIRST MESSAGE" [MAX_NEW_TOKENS [TEMPLATE.jinja]]
 *
 * Sends two user messages, drops the second turn with etllm_conversation_rewind, sends it
 * again, and checks that the regenerated reply is the same (decoding is greedy). Earlier
 * turns stay in the KV cache: each send feeds only the text the chat template adds for
 * the new turn. The template is TEMPLATE.jinja when given, else the model's own (a
 * chat_template.jinja or tokenizer_config.json beside the tokenizer, else the built-in
 * Llama 3 template). The test models' context holds 128 tokens, so CI passes
 * examples/data/compact_chat.jinja. Exits 1 on an error or a mismatch.
 */
#include <etllm.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The streamed reply, kept to compare replies. */
typedef struct {
  char text[4096];
  size_t len;
} reply_text;

static int32_t on_piece(void *user_data, const char *piece, size_t len, int64_t token_id) {
  (void)token_id;
  reply_text *reply = user_data;
  fwrite(piece, 1, len, stdout);
  fflush(stdout);
  if (reply->len + len < sizeof reply->text) {
    memcpy(reply->text + reply->len, piece, len);
    reply->len += len;
  }
  return 0;
}

static int fail(const char *what, etllm_status status) {
  fprintf(stderr, "%s failed: %s: %s\n", what, etllm_status_name(status),
          etllm_last_error_message());
  return 1;
}

/* Reads a whole file into a NUL-terminated string (free it), or NULL. */
static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *text = NULL;
  size_t len = 0, cap = 0;
  for (;;) {
    if (len + 1024 + 1 > cap) {
      cap = cap ? cap * 2 : 4096;
      char *grown = realloc(text, cap);
      if (!grown) break;
      text = grown;
    }
    size_t n = fread(text + len, 1, cap - len - 1, f);
    len += n;
    if (n == 0) break;
  }
  fclose(f);
  if (text) text[len] = '\0';
  return text;
}

/* One turn: prints the user message and streams the reply into *reply. */
static etllm_status turn(etllm_conversation *chat, etllm_runner *runner,
                         const etllm_generation_config *config, const char *user,
                         reply_text *reply) {
  printf("user: %s\nassistant: ", user);
  reply->len = 0;
  etllm_status status =
      etllm_conversation_send(chat, runner, user, config, on_piece, NULL, reply, NULL);
  printf("\n");
  return status;
}

int main(int argc, char **argv) {
  if (argc < 4 || argc > 6) {
    fprintf(stderr, "usage: %s MODEL.pte TOKENIZER.json FIRST_MESSAGE [MAX_NEW_TOKENS [TEMPLATE.jinja]]\n",
            argv[0]);
    return 2;
  }
  etllm_runner *runner = NULL;
  etllm_status status = etllm_runner_open(argv[1], argv[2], NULL, &runner);
  if (status != ETLLM_OK) return fail("etllm_runner_open", status);

  /* The template: a compiled copy goes into the conversation, so ours is freed at once. */
  etllm_chat_template *template = NULL;
  if (argc == 6) {
    char *source = read_file(argv[5]);
    if (!source) {
      fprintf(stderr, "cannot read %s\n", argv[5]);
      etllm_runner_free(runner);
      return 1;
    }
    status = etllm_chat_template_new(source, &template);
    free(source);
    if (status != ETLLM_OK) {
      etllm_runner_free(runner);
      return fail("etllm_chat_template_new", status);
    }
  }
  etllm_conversation *chat = NULL;
  status = etllm_conversation_new(runner, template, &chat); /* NULL: the model's template */
  etllm_chat_template_free(template);                       /* NULL is ignored */
  if (status != ETLLM_OK) {
    etllm_runner_free(runner);
    return fail("etllm_conversation_new", status);
  }

  etllm_generation_config config = etllm_generation_config_default();
  config.max_new_tokens = argc >= 5 ? atoi(argv[4]) : 32;
  config.temperature = 0.0f; /* greedy, so that a regenerated reply is the same */
  /* num_bos, num_eos and echo are ignored by conversations: the template decides. */

  int rc = 1;
  reply_text first, second, again;
  int64_t before = 0, after = 0;
  bool dropped = false;
  size_t messages = 0;
  if ((status = turn(chat, runner, &config, argv[3], &first)) != ETLLM_OK) {
    fail("etllm_conversation_send", status);
    goto done;
  }
  /* Where the second turn begins in the KV cache. */
  etllm_runner_position(runner, &before);
  if ((status = turn(chat, runner, &config, "Tell me more.", &second)) != ETLLM_OK) {
    fail("etllm_conversation_send", status);
    goto done;
  }
  /* Drop the last turn (message and reply): the runner goes back to `before`, and the
   * cache entries after it are overwritten by the next turn. */
  if ((status = etllm_conversation_rewind(chat, runner, &dropped)) != ETLLM_OK) {
    fail("etllm_conversation_rewind", status);
    goto done;
  }
  etllm_runner_position(runner, &after);
  printf("(rewound: %s, position %lld -> %lld)\n", dropped ? "yes" : "no", (long long)before,
         (long long)after);
  if ((status = turn(chat, runner, &config, "Tell me more.", &again)) != ETLLM_OK) {
    fail("etllm_conversation_send", status);
    goto done;
  }
  etllm_conversation_num_messages(chat, &messages);

  /* The checks CI relies on. */
  if (!dropped || after != before) {
    fprintf(stderr, "rewind did not go back to position %lld\n", (long long)before);
  } else if (again.len != second.len || memcmp(again.text, second.text, second.len) != 0) {
    fprintf(stderr, "the regenerated reply differs from the first one\n");
  } else if (messages != 4) {
    fprintf(stderr, "expected 4 messages, found %zu\n", messages);
  } else if (first.len == 0 || second.len == 0) {
    fprintf(stderr, "a reply is empty\n");
  } else {
    fprintf(stderr, "ok: %zu messages; the rewound turn regenerated the same reply\n", messages);
    rc = 0;
  }
done:
  etllm_conversation_free(chat); /* before or after the runner: it does not own it */
  etllm_runner_free(runner);
  return rc;
}
