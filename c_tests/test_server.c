/* The HTTP server from C (etllm_server_*): started on a free loopback port over a runner's
 * model, asked over a plain socket, stopped. What the server answers (every parameter and
 * error) is tested with the OpenAI client in python/tests/test_server.py; this file tests
 * the C lifecycle: options, the port, the API key, errors, stop and free. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "test_support.h"

/* One HTTP/1.1 request to 127.0.0.1:port; returns the status (0 when the connection
 * failed) and writes the whole answer (headers and body) to `answer`. */
static int http(uint16_t port, const char *method, const char *path, const char *headers,
                const char *body, char *answer, size_t cap) {
  answer[0] = '\0';
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(fd >= 0);
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
    close(fd);
    return 0;
  }
  char request[4096];
  int n = snprintf(request, sizeof request,
                   "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n%s"
                   "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                   method, path, headers, strlen(body), body);
  CHECK(n > 0 && (size_t)n < sizeof request);
  CHECK(write(fd, request, (size_t)n) == n);
  size_t len = 0;
  for (;;) {
    ssize_t got = read(fd, answer + len, cap - 1 - len);
    if (got <= 0) break;
    len += (size_t)got;
    CHECK(len < cap - 1);
  }
  answer[len] = '\0';
  close(fd);
  int status = 0;
  CHECK_MSG(sscanf(answer, "HTTP/1.1 %d", &status) == 1, "not an HTTP answer: %s", answer);
  return status;
}

static etllm_server *start(etllm_runner *runner, etllm_server_options *options) {
  etllm_server *server = NULL;
  CHECK_OK(etllm_server_start(runner, options, &server));
  CHECK(server != NULL);
  CHECK(etllm_server_port(server) != 0);
  return server;
}

static etllm_server_options any_port(void) {
  etllm_server_options options = etllm_server_options_default();
  options.port = 0;
  return options;
}

static char answer[1 << 16];

/* A completion request over the socket gets an OpenAI-shaped answer with the requested
 * number of tokens; /health and /v1/models answer too. */
static void serves_completions(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_server_options options = any_port();
  options.model_name = "tiny";
  etllm_server *server = start(runner, &options);
  uint16_t port = etllm_server_port(server);

  CHECK(http(port, "GET", "/health", "", "", answer, sizeof answer) == 200);
  CHECK_MSG(strstr(answer, "\"status\":\"ok\"") != NULL, "%s", answer);
  CHECK(http(port, "GET", "/v1/models", "", "", answer, sizeof answer) == 200);
  CHECK_MSG(strstr(answer, "\"id\":\"tiny\"") != NULL, "%s", answer);
  const char *body =
      "{\"prompt\": [1, 5, 9], \"max_tokens\": 5, \"temperature\": 0, \"ignore_eos\": true}";
  CHECK(http(port, "POST", "/v1/completions", "", body, answer, sizeof answer) == 200);
  CHECK_MSG(strstr(answer, "\"object\":\"text_completion\"") != NULL, "%s", answer);
  CHECK_MSG(strstr(answer, "\"completion_tokens\":5") != NULL, "%s", answer);
  CHECK_MSG(strstr(answer, "\"finish_reason\":\"length\"") != NULL, "%s", answer);

  CHECK_OK(etllm_server_stop(server));
  etllm_server_free(server);
  etllm_runner_free(runner);
}

/* The server keeps the model loaded after the runner is freed. */
static void server_outlives_runner(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_server_options options = any_port();
  etllm_server *server = start(runner, &options);
  etllm_runner_free(runner);
  const char *body = "{\"prompt\": [1, 5], \"max_tokens\": 2, \"temperature\": 0}";
  CHECK(http(etllm_server_port(server), "POST", "/v1/completions", "", body, answer,
             sizeof answer) == 200);
  etllm_server_free(server);
}

/* With an API key, requests without it (or with another) are 401; /health stays open. */
static void api_key_is_required(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_server_options options = any_port();
  options.api_key = "s3cret";
  etllm_server *server = start(runner, &options);
  uint16_t port = etllm_server_port(server);
  CHECK(http(port, "GET", "/v1/models", "", "", answer, sizeof answer) == 401);
  CHECK(http(port, "GET", "/v1/models", "Authorization: Bearer wrong\r\n", "", answer,
             sizeof answer) == 401);
  CHECK_MSG(strstr(answer, "invalid_api_key") != NULL, "%s", answer);
  CHECK(http(port, "GET", "/v1/models", "Authorization: Bearer s3cret\r\n", "", answer,
             sizeof answer) == 200);
  CHECK(http(port, "GET", "/health", "", "", answer, sizeof answer) == 200);
  etllm_server_free(server);
  etllm_runner_free(runner);
}

/* A port already in use is ETLLM_ERR_SERVER, and nothing is returned. */
static void port_in_use_is_server_error(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_server_options options = any_port();
  etllm_server *first = start(runner, &options);
  options.port = etllm_server_port(first);
  etllm_server *second = (etllm_server *)&options; /* must be reset to NULL */
  CHECK_ERR(etllm_server_start(runner, &options, &second), ETLLM_ERR_SERVER);
  CHECK(second == NULL);
  CHECK(strstr(etllm_last_error_message(), "cannot listen") != NULL);
  etllm_server_free(first);
  etllm_runner_free(runner);
}

/* After etllm_server_stop nothing listens; a second stop does nothing. */
static void stop_closes_the_port(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_server_options options = any_port();
  etllm_server *server = start(runner, &options);
  uint16_t port = etllm_server_port(server);
  CHECK_OK(etllm_server_stop(server));
  CHECK_OK(etllm_server_stop(server));
  CHECK(http(port, "GET", "/health", "", "", answer, sizeof answer) == 0);
  etllm_server_free(server);
  etllm_runner_free(runner);
}

/* Bad arguments are errors, never a crash. */
static void bad_arguments(const char *arg) {
  (void)arg;
  etllm_runner *runner = open_runner(DEFAULT_MODEL);
  etllm_server *server = NULL;
  etllm_server_options options = any_port();
  CHECK_ERR(etllm_server_start(NULL, &options, &server), ETLLM_ERR_NULL_ARGUMENT);
  CHECK_ERR(etllm_server_start(runner, &options, NULL), ETLLM_ERR_NULL_ARGUMENT);
  options.parallel = 0;
  CHECK_ERR(etllm_server_start(runner, &options, &server), ETLLM_ERR_INVALID_ARGUMENT);
  options = any_port();
  options.queue_size = 0;
  CHECK_ERR(etllm_server_start(runner, &options, &server), ETLLM_ERR_INVALID_ARGUMENT);
  options = any_port();
  options.struct_size = 3;
  CHECK_ERR(etllm_server_start(runner, &options, &server), ETLLM_ERR_STRUCT_SIZE);
  options = any_port();
  options.host = "not a host name";
  CHECK_ERR(etllm_server_start(runner, &options, &server), ETLLM_ERR_SERVER);
  CHECK(server == NULL);
  CHECK_ERR(etllm_server_stop(NULL), ETLLM_ERR_NULL_ARGUMENT);
  CHECK(etllm_server_port(NULL) == 0);
  etllm_server_free(NULL);
  etllm_runner_free(runner);
}

int main(int argc, char **argv) {
  static const test_case cases[] = {
      {"serves_completions", serves_completions},
      {"server_outlives_runner", server_outlives_runner},
      {"api_key_is_required", api_key_is_required},
      {"port_in_use_is_server_error", port_in_use_is_server_error},
      {"stop_closes_the_port", stop_closes_the_port},
      {"bad_arguments", bad_arguments},
  };
  return run_test_case(argc, argv, cases, NUM_CASES(cases));
}
