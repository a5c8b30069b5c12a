// KV-cache managers written in C++ (etllm::IoManager, include/etllm.hpp): an exception
// thrown by a manager method never crosses into the library but becomes
// ETLLM_ERR_IO_MANAGER with the exception's what() in the message, the runner stays
// usable, and the runner deletes the manager exactly once on every path; the vtable's
// save_state and restore_state reach the class's (whose defaults refuse). The manager is
// examples/cpp/kv_in_model_manager.hpp, wrapped to throw on command.
//
// Usage: test_cpp_io_manager CASE (one behaviour per CTest test).
#include <etllm.hpp>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_in_model_manager.hpp"

namespace {

const std::string kFixtures = std::string(ETLLM_FIXTURES_DIR) + "/";
const std::string kModel = kFixtures + "dyn_xnnpack/model.pte";
const std::string kTokenizer = kFixtures + "tokenizer.json";

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

// The integer array after the n-th "key": in the fixture's reference.json.
std::vector<uint32_t> json_ids(const std::string& json, const std::string& key, int nth) {
  size_t at = 0;
  for (int i = 0; i <= nth; ++i) {
    at = json.find("\"" + key + "\":", at);
    CHECK(at != std::string::npos);
    at += key.size() + 3;
  }
  const size_t open = json.find('[', at), close = json.find(']', open);
  std::vector<uint32_t> ids;
  std::stringstream items(json.substr(open + 1, close - open - 1));
  for (std::string item; std::getline(items, item, ',');) ids.push_back(static_cast<uint32_t>(std::stoul(item)));
  return ids;
}

struct Case {
  std::vector<uint32_t> prompt_ids, greedy_ids;
};

std::vector<Case> reference_cases() {
  std::ifstream in(kFixtures + "dyn_xnnpack/reference.json");
  std::stringstream text;
  text << in.rdbuf();
  const std::string json = text.str();
  int count = 0;
  for (size_t at = json.find("\"prompt_ids\":"); at != std::string::npos; at = json.find("\"prompt_ids\":", at + 1)) {
    ++count;
  }
  std::vector<Case> cases;
  for (int i = 0; i < count; ++i) cases.push_back({json_ids(json, "prompt_ids", i), json_ids(json, "greedy_ids", i)});
  CHECK(!cases.empty());
  return cases;
}

std::vector<uint32_t> greedy(etllm::Runner& runner, const std::vector<uint32_t>& prompt, size_t n) {
  etllm::GenerationConfig config;
  config.echo = false;
  config.temperature = 0.0f;
  config.ignore_eos = true;
  config.max_new_tokens = static_cast<int32_t>(n);
  std::vector<uint32_t> ids;
  runner.generate_tokens(prompt, config, [&ids](std::string_view, int64_t id) {
    if (id >= 0) ids.push_back(static_cast<uint32_t>(id));
    return true;
  });
  return ids;
}

enum class Method {
  kNone,
  kLoad,
  kReset,
  kRewind,
  kPreparePrefill,
  kUpdatePrefill,
  kPrepareDecode,
  kUpdateDecode,
  kSaveState,
  kRestoreState
};
const char* name(Method m) {
  switch (m) {
    case Method::kLoad: return "load";
    case Method::kReset: return "reset";
    case Method::kRewind: return "rewind";
    case Method::kPreparePrefill: return "prepare_prefill";
    case Method::kUpdatePrefill: return "update_prefill";
    case Method::kPrepareDecode: return "prepare_decode";
    case Method::kUpdateDecode: return "update_decode";
    case Method::kSaveState: return "save_state";
    case Method::kRestoreState: return "restore_state";
    default: return "none";
  }
}

int destroyed = 0;  // ThrowingManager destructor calls in this process

// KvInModelManager that throws once from method `fail_at` (a std::runtime_error naming the
// method, or the int 42 when `non_standard`), then works again.
class ThrowingManager final : public KvInModelManager {
 public:
  ThrowingManager(Method* fail_at, bool non_standard = false) : fail_at_(fail_at), non_standard_(non_standard) {}
  ~ThrowingManager() override { ++destroyed; }

  etllm::LoadResult load(const etllm::ModelInfo& model) override {
    maybe_throw(Method::kLoad);
    return KvInModelManager::load(model);
  }
  void reset() override {
    maybe_throw(Method::kReset);
    KvInModelManager::reset();
  }
  void rewind(int64_t pos) override {
    maybe_throw(Method::kRewind);
    KvInModelManager::rewind(pos);
  }
  etllm::Step prepare_prefill(etllm::Span<const uint64_t> tokens, int64_t start_pos) override {
    maybe_throw(Method::kPreparePrefill);
    return KvInModelManager::prepare_prefill(tokens, start_pos);
  }
  etllm::Logits update_prefill(etllm::Span<const etllm::TensorView> outputs) override {
    maybe_throw(Method::kUpdatePrefill);
    return KvInModelManager::update_prefill(outputs);
  }
  etllm::Step prepare_decode(uint64_t token, int64_t pos) override {
    maybe_throw(Method::kPrepareDecode);
    return KvInModelManager::prepare_decode(token, pos);
  }
  etllm::Logits update_decode(etllm::Span<const etllm::TensorView> outputs) override {
    maybe_throw(Method::kUpdateDecode);
    return KvInModelManager::update_decode(outputs);
  }
  void save_state(etllm::StateWriter& out) override {
    maybe_throw(Method::kSaveState);
    KvInModelManager::save_state(out);
  }
  void restore_state(etllm::Span<const uint8_t> state) override {
    maybe_throw(Method::kRestoreState);
    KvInModelManager::restore_state(state);
  }

  static std::string message(Method m) { return std::string("C++ manager threw in ") + name(m); }

 private:
  void maybe_throw(Method m) {
    if (*fail_at_ != m) return;
    *fail_at_ = Method::kNone;
    if (non_standard_) throw 42;
    throw std::runtime_error(message(m));
  }
  Method* fail_at_;
  bool non_standard_;
};

etllm::RunnerOptions one_thread() {
  etllm::RunnerOptions o;
  o.num_threads = 1;
  return o;
}

// `f` throws etllm::Error with ETLLM_ERR_IO_MANAGER and a message containing `expected`.
void check_io_manager_error(const std::function<void()>& f, const std::string& expected) {
  try {
    f();
  } catch (const etllm::Error& e) {
    if (e.status() != ETLLM_ERR_IO_MANAGER || e.message().find(expected) == std::string::npos) {
      std::fprintf(stderr, "got %s; expected ETLLM_ERR_IO_MANAGER with \"%s\"\n", e.what(), expected.c_str());
      std::exit(1);
    }
    return;
  }
  std::fprintf(stderr, "no etllm::Error was thrown (expected \"%s\")\n", expected.c_str());
  std::exit(1);
}

// An exception from each step method in turn: generate throws etllm::Error with
// ETLLM_ERR_IO_MANAGER and the exception's what(); the position is rolled back; after
// reset the runner generates the reference tokens again.
void exception_becomes_io_manager_error() {
  const Case c = reference_cases()[0];
  Method fail_at = Method::kNone;
  etllm::Runner runner(kModel, kTokenizer, one_thread(), std::make_unique<ThrowingManager>(&fail_at));
  runner.load();
  for (Method m : {Method::kPreparePrefill, Method::kUpdatePrefill, Method::kPrepareDecode, Method::kUpdateDecode}) {
    fail_at = m;
    check_io_manager_error([&] { greedy(runner, c.prompt_ids, 4); }, ThrowingManager::message(m));
    CHECK(fail_at == Method::kNone);  // it did throw
    CHECK(runner.position() == 0);
    runner.reset();
    CHECK(greedy(runner, c.prompt_ids, c.greedy_ids.size()) == c.greedy_ids);
    runner.reset();
  }
}

// An exception from load: load() throws etllm::Error with ETLLM_ERR_IO_MANAGER and the
// exception's what(); the runner keeps the manager, and loading again works.
void exception_in_load_becomes_io_manager_error() {
  const Case c = reference_cases()[0];
  Method fail_at = Method::kLoad;
  etllm::Runner runner(kModel, kTokenizer, one_thread(), std::make_unique<ThrowingManager>(&fail_at));
  check_io_manager_error([&] { runner.load(); }, ThrowingManager::message(Method::kLoad));
  CHECK(!runner.is_loaded());
  runner.load();
  CHECK(greedy(runner, c.prompt_ids, c.greedy_ids.size()) == c.greedy_ids);
}

// Something thrown that is not a std::exception is caught too, with a generic message.
void non_standard_exception_becomes_io_manager_error() {
  Method fail_at = Method::kPrepareDecode;
  etllm::Runner runner(kModel, kTokenizer, one_thread(), std::make_unique<ThrowingManager>(&fail_at, true));
  check_io_manager_error([&] { greedy(runner, reference_cases()[0].prompt_ids, 4); }, "not a std::exception");
  runner.reset();
  CHECK(greedy(runner, reference_cases()[0].prompt_ids, 4).size() == 4);
}

// The runner deletes its manager once, when the (moved-to) runner is destroyed.
void destructor_runs_once_when_runner_is_destroyed() {
  Method fail_at = Method::kNone;
  {
    etllm::Runner a(kModel, kTokenizer, one_thread(), std::make_unique<ThrowingManager>(&fail_at));
    CHECK(greedy(a, reference_cases()[0].prompt_ids, 4).size() == 4);
    etllm::Runner b(std::move(a));
    CHECK(destroyed == 0);
  }
  CHECK(destroyed == 1);
  {
    // Never loaded: destroyed all the same.
    etllm::Runner never_loaded(kModel, kTokenizer, one_thread(), std::make_unique<ThrowingManager>(&fail_at));
  }
  CHECK(destroyed == 2);
}

// When the Runner constructor throws (a model path that is not UTF-8), the manager it was
// given has been deleted once; a runner whose load fails deletes it when destroyed.
void destructor_runs_once_when_runner_creation_fails() {
  Method fail_at = Method::kNone;
  bool threw = false;
  try {
    etllm::Runner runner("\xff.pte", kTokenizer, one_thread(), std::make_unique<ThrowingManager>(&fail_at));
  } catch (const etllm::Error& e) {
    threw = e.status() == ETLLM_ERR_INVALID_UTF8;
  }
  CHECK(threw);
  CHECK(destroyed == 1);
  {
    etllm::Runner runner(kFixtures + "does/not/exist.pte", kTokenizer, one_thread(),
                         std::make_unique<ThrowingManager>(&fail_at));
    try {
      runner.load();
    } catch (const etllm::Error& e) {
      CHECK(e.status() == ETLLM_ERR_FILE_ACCESS);
    }
    CHECK(destroyed == 1);
  }
  CHECK(destroyed == 2);
}

// The C++ manager generates what the built-in manager and eager PyTorch generate, for
// every reference case, on one runner with reset between cases.
void manager_matches_builtin() {
  etllm::Runner custom(kModel, kTokenizer, one_thread(), std::make_unique<KvInModelManager>());
  etllm::Runner builtin(kModel, kTokenizer, one_thread());
  for (const Case& c : reference_cases()) {
    custom.reset();
    builtin.reset();
    const std::vector<uint32_t> got = greedy(custom, c.prompt_ids, c.greedy_ids.size());
    CHECK(got == greedy(builtin, c.prompt_ids, c.greedy_ids.size()));
    CHECK(got == c.greedy_ids);
  }
}

// ---- Saved states: the vtable's save_state and restore_state reach the class ------------

// A new buffer holding what `vt`'s save_state appends, or nullptr (freed) when it fails
// with `*status`.
etllm_state_buffer* saved(const etllm_io_manager& vt, etllm_status* status) {
  etllm_state_buffer* buffer = nullptr;
  etllm::detail::check(etllm_state_buffer_new(&buffer));
  *status = vt.save_state(vt.user_data, buffer);
  if (*status == ETLLM_OK) return buffer;
  etllm_state_buffer_free(buffer);
  return nullptr;
}

std::vector<uint8_t> bytes(const etllm_state_buffer* buffer) {
  const uint8_t* data = nullptr;
  size_t len = 0;
  etllm::detail::check(etllm_state_buffer_data(buffer, &data, &len));
  return {data, data + len};
}

// A manager whose state is a byte string; its destructor records the last one restored.
class Stateful final : public KvInModelManager {
 public:
  explicit Stateful(std::vector<uint8_t>* restored) : restored_(restored) {}
  void save_state(etllm::StateWriter& out) override {
    out.append("head|", 5);
    out.append_value(uint32_t{7});
  }
  void restore_state(etllm::Span<const uint8_t> state) override { restored_->assign(state.begin(), state.end()); }

 private:
  std::vector<uint8_t>* restored_;
};

// The C vtable's callbacks call save_state (with a StateWriter over EtLlm's buffer) and
// restore_state (with the bytes) of the C++ object.
void state_callbacks_reach_the_class() {
  std::vector<uint8_t> restored;
  const etllm_io_manager vt = etllm::IoManager::to_c(std::make_unique<Stateful>(&restored));
  CHECK(vt.save_state != nullptr && vt.restore_state != nullptr);
  etllm_status status = ETLLM_OK;
  etllm_state_buffer* buffer = saved(vt, &status);
  CHECK(buffer != nullptr);
  std::vector<uint8_t> want = {'h', 'e', 'a', 'd', '|', 0, 0, 0, 0};
  const uint32_t seven = 7;
  std::memcpy(want.data() + 5, &seven, 4);
  CHECK(bytes(buffer) == want);
  const uint8_t state[3] = {1, 2, 3};
  CHECK(vt.restore_state(vt.user_data, state, 3) == ETLLM_OK);
  CHECK((restored == std::vector<uint8_t>{1, 2, 3}));
  etllm_state_buffer_free(buffer);
  vt.destroy(vt.user_data);
}

// A manager that does not override them cannot save or restore: both callbacks fail with
// ETLLM_ERR_IO_MANAGER.
void default_save_and_restore_refuse() {
  class Plain final : public etllm::IoManager {
   public:
    etllm::LoadResult load(const etllm::ModelInfo&) override { return {}; }
    void reset() override {}
    void rewind(int64_t) override {}
    etllm::Step prepare_prefill(etllm::Span<const uint64_t>, int64_t) override { return {}; }
    etllm::Logits update_prefill(etllm::Span<const etllm::TensorView>) override { return {}; }
    etllm::Step prepare_decode(uint64_t, int64_t) override { return {}; }
    etllm::Logits update_decode(etllm::Span<const etllm::TensorView>) override { return {}; }
  };
  const etllm_io_manager vt = etllm::IoManager::to_c(std::make_unique<Plain>());
  etllm_status status = ETLLM_OK;
  CHECK(saved(vt, &status) == nullptr && status == ETLLM_ERR_IO_MANAGER);
  CHECK(vt.restore_state(vt.user_data, nullptr, 0) == ETLLM_ERR_IO_MANAGER);
  vt.destroy(vt.user_data);
}

// An exception in save_state or restore_state (standard or not) becomes
// ETLLM_ERR_IO_MANAGER; the manager works afterwards.
void exception_in_save_or_restore_becomes_io_manager_error() {
  for (bool non_standard : {false, true}) {
    Method fail_at = Method::kSaveState;
    const etllm_io_manager vt = etllm::IoManager::to_c(std::make_unique<ThrowingManager>(&fail_at, non_standard));
    etllm_status status = ETLLM_OK;
    CHECK(saved(vt, &status) == nullptr && status == ETLLM_ERR_IO_MANAGER);
    etllm_state_buffer* buffer = saved(vt, &status);
    CHECK(buffer != nullptr);
    const std::vector<uint8_t> state = bytes(buffer);
    fail_at = Method::kRestoreState;
    CHECK(vt.restore_state(vt.user_data, state.data(), state.size()) == ETLLM_ERR_IO_MANAGER);
    CHECK(vt.restore_state(vt.user_data, state.data(), state.size()) == ETLLM_OK);
    etllm_state_buffer_free(buffer);
    vt.destroy(vt.user_data);
  }
}

// The example manager's state is its tag and version: it restores its own and refuses
// others; a runner driving it generates the reference after a restore.
void example_manager_state_round_trips() {
  const Case c = reference_cases()[0];
  auto owned = std::make_unique<KvInModelManager>();
  KvInModelManager* manager = owned.get();  // the runner owns it; used between its calls
  etllm::Runner runner(kModel, kTokenizer, one_thread(), std::move(owned));
  CHECK(greedy(runner, c.prompt_ids, 4).size() == 4);
  std::vector<uint8_t> state;
  {
    etllm_state_buffer* buffer = nullptr;
    etllm::detail::check(etllm_state_buffer_new(&buffer));
    etllm::StateWriter out(buffer);
    manager->save_state(out);
    state = bytes(buffer);
    etllm_state_buffer_free(buffer);
  }
  CHECK((state == std::vector<uint8_t>{'c', 'p', 'K', 'V', 1, 0, 0, 0}));
  runner.reset();
  manager->restore_state(state);
  bool refused = false;
  try {
    manager->restore_state(std::vector<uint8_t>{'e', 'x', 'K', 'V', 1, 0, 0, 0});
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused);
  CHECK(greedy(runner, c.prompt_ids, c.greedy_ids.size()) == c.greedy_ids);
}

}  // namespace

int main(int argc, char** argv) {
  const struct {
    const char* name;
    void (*run)();
  } cases[] = {
      {"exception_becomes_io_manager_error", exception_becomes_io_manager_error},
      {"exception_in_load_becomes_io_manager_error", exception_in_load_becomes_io_manager_error},
      {"non_standard_exception_becomes_io_manager_error", non_standard_exception_becomes_io_manager_error},
      {"destructor_runs_once_when_runner_is_destroyed", destructor_runs_once_when_runner_is_destroyed},
      {"destructor_runs_once_when_runner_creation_fails", destructor_runs_once_when_runner_creation_fails},
      {"manager_matches_builtin", manager_matches_builtin},
      {"state_callbacks_reach_the_class", state_callbacks_reach_the_class},
      {"default_save_and_restore_refuse", default_save_and_restore_refuse},
      {"exception_in_save_or_restore_becomes_io_manager_error", exception_in_save_or_restore_becomes_io_manager_error},
      {"example_manager_state_round_trips", example_manager_state_round_trips},
  };
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASE\n", argv[0]);
    return 2;
  }
  for (const auto& c : cases) {
    if (std::strcmp(c.name, argv[1]) == 0) {
      try {
        c.run();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
      }
      return 0;
    }
  }
  std::fprintf(stderr, "no case called `%s`\n", argv[1]);
  return 2;
}
