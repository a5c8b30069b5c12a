// Tests of etllm::Server (include/etllm.hpp): it serves on a free port from construction,
// answers over a plain socket, stops on stop() or destruction, is move-only, outlives its
// runner, and reports a port in use as etllm::Error ETLLM_ERR_SERVER.
#include <etllm.hpp>

#include "harness.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <type_traits>

namespace {

const std::string kFixtures = ETLLM_FIXTURES_DIR "/";
const std::string kModel = kFixtures + "dyn_xnnpack/model.pte";
const std::string kTokenizer = kFixtures + "tokenizer.json";

// GET `path` on 127.0.0.1:port; the whole answer, or "" when nothing listens.
std::string get(uint16_t port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  CHECK(write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size()));
  std::string answer;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) answer.append(buf, static_cast<size_t>(n));
  close(fd);
  return answer;
}

etllm::ServerOptions any_port() {
  etllm::ServerOptions options;
  options.port = 0;
  return options;
}

void serves_until_stopped_and_outlives_its_runner() {
  auto runner = std::make_unique<etllm::Runner>(kModel, kTokenizer);
  etllm::ServerOptions options = any_port();
  options.model_name = "tiny";
  etllm::Server server(*runner, options);
  runner.reset();
  const uint16_t port = server.port();
  CHECK(port != 0);
  const std::string models = get(port, "/v1/models");
  CHECK(models.rfind("HTTP/1.1 200", 0) == 0);
  CHECK(models.find("\"id\":\"tiny\"") != std::string::npos);
  server.stop();
  server.stop();
  CHECK(get(port, "/health").empty());
}

void a_port_in_use_throws_server_error() {
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Server first(runner, any_port());
  etllm::ServerOptions same = any_port();
  same.port = first.port();
  try {
    etllm::Server second(runner, same);
    CHECK(false);
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_SERVER);
  }
}

void server_is_move_only() {
  static_assert(!std::is_copy_constructible_v<etllm::Server>);
  static_assert(std::is_nothrow_move_constructible_v<etllm::Server>);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Server a(runner, any_port());
  const uint16_t port = a.port();
  etllm::Server b(std::move(a));
  CHECK(b.port() == port);
  try {
    (void)a.port();
    CHECK(false);
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_NULL_ARGUMENT);
  }
  CHECK(get(port, "/health").find("\"status\":\"ok\"") != std::string::npos);
}

}  // namespace

int main() {
  run("serves_until_stopped_and_outlives_its_runner", serves_until_stopped_and_outlives_its_runner);
  run("a_port_in_use_throws_server_error", a_port_in_use_throws_server_error);
  run("server_is_move_only", server_is_move_only);
  return finish();
}
