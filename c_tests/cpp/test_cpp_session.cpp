// Tests of etllm::Session (include/etllm.hpp): sessions made by Runner::session() continue
// like the eager-PyTorch greedy reference (tests/fixtures/dyn_xnnpack/reference.json) when
// interleaved, saved and restored (as bytes and files, with user data), rewound and reset;
// errors are etllm::Error with the C status; a session is move-only and outlives its runner.
#include <etllm.hpp>

#include "harness.hpp"

#include "reference.hpp"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <vector>

namespace {

const std::string kFixtures = ETLLM_FIXTURES_DIR "/";
const std::string kModel = kFixtures + "dyn_xnnpack/model.pte";
const std::string kTokenizer = kFixtures + "tokenizer.json";

// Case 1 has the longest prompt (most KV cache to set aside and restore); case 0 is "The".
Case reference_case(int nth) { return reference_case_of(kFixtures + "dyn_xnnpack/reference.json", nth); }

etllm::GenerationConfig greedy(int32_t n) { return greedy_config<etllm::GenerationConfig>(n); }

// The reference's greedy ids [from, from + n).
std::vector<uint32_t> slice(const std::vector<uint32_t>& ids, size_t from, size_t n) {
  return std::vector<uint32_t>(ids.begin() + static_cast<long>(from), ids.begin() + static_cast<long>(from + n));
}

// Greedy generation of `n` tokens from `ids` (empty: continue); returns the token ids.
std::vector<uint32_t> gen(etllm::Session& s, const std::vector<uint32_t>& ids, int32_t n) {
  std::vector<uint32_t> got;
  s.generate_tokens(ids, greedy(n), [&got](std::string_view, int64_t id) {
    if (id >= 0) got.push_back(static_cast<uint32_t>(id));
    return true;
  });
  return got;
}

// A path for a state file in the temporary folder (the file does not exist).
std::string temp_path(const char* name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/etllm-cpp-session-" +
         std::to_string(static_cast<long>(getpid())) + "-" + name;
}

// `f()` must throw etllm::Error with `status`.
template <class F>
void check_throws(etllm_status status, F&& f) {
  try {
    f();
  } catch (const etllm::Error& e) {
    if (e.status() != status) {
      std::fprintf(stderr, "expected %s, got %s\n", etllm_status_name(status), e.what());
      throw;
    }
    CHECK(!e.message().empty());
    return;
  }
  throw std::runtime_error(std::string("no exception; expected ") + etllm_status_name(status));
}

void interleaved_sessions_match_reference() {
  const Case a = reference_case(1), b = reference_case(0);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session sa = runner.session();  // loads the runner
  etllm::Session sb = runner.session();
  CHECK(runner.is_loaded());
  std::vector<uint32_t> got_a = gen(sa, a.prompt_ids, 3);
  std::vector<uint32_t> got_b = gen(sb, b.prompt_ids, 3);
  for (uint32_t id : gen(sa, {}, 3)) got_a.push_back(id);
  // The runner's own conversation is one more.
  std::vector<uint32_t> own;
  runner.generate_tokens(a.prompt_ids, greedy(4), [&own](std::string_view, int64_t id) {
    if (id >= 0) own.push_back(static_cast<uint32_t>(id));
    return true;
  });
  for (uint32_t id : gen(sb, {}, 3)) got_b.push_back(id);
  CHECK(got_a == slice(a.greedy_ids, 0, 6));
  CHECK(got_b == slice(b.greedy_ids, 0, 6));
  CHECK(own == slice(a.greedy_ids, 0, 4));
  // tokens(): the prompt, then the generated tokens; position() counts them.
  std::vector<uint32_t> want = a.prompt_ids;
  for (uint32_t id : got_a) want.push_back(id);
  CHECK(sa.tokens() == want);
  CHECK(sa.position() == static_cast<int64_t>(want.size()));
}

void state_bytes_and_files_carry_user_data_to_another_runner() {
  const Case c = reference_case(1);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session session = runner.session();
  const std::vector<uint32_t> first = gen(session, c.prompt_ids, 4);
  CHECK(first == slice(c.greedy_ids, 0, 4));
  const std::vector<uint8_t> state = session.save_state("{\"messages\": []}");
  const std::vector<uint8_t> binary = {0, 1, 2, 0xff, 0};
  const std::string path = temp_path("state");
  session.save_state_file(path, binary);

  etllm::Runner fresh(kModel, kTokenizer);
  etllm::Session restored = fresh.session();
  const std::vector<uint8_t> data = restored.load_state(state);
  CHECK(std::string(data.begin(), data.end()) == "{\"messages\": []}");
  CHECK(restored.tokens() == session.tokens());
  CHECK(gen(restored, {}, 4) == slice(c.greedy_ids, 4, 4));

  etllm::Session from_file = fresh.session();
  CHECK(from_file.load_state_file(path) == binary);
  CHECK(gen(from_file, {}, 4) == slice(c.greedy_ids, 4, 4));
  std::remove(path.c_str());
  check_throws(ETLLM_ERR_FILE_ACCESS, [&] { from_file.load_state_file(path); });

  // No user data: an empty vector back.
  CHECK(restored.load_state(session.save_state()).empty());
  CHECK(gen(restored, {}, 2) == slice(c.greedy_ids, 4, 2));
}

void bad_state_is_invalid_state_and_the_session_keeps_its_own() {
  const Case c = reference_case(1);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session session = runner.session();
  CHECK(gen(session, c.prompt_ids, 3) == slice(c.greedy_ids, 0, 3));
  std::vector<uint8_t> state = session.save_state();
  std::vector<uint8_t> truncated(state.begin(), state.begin() + static_cast<long>(state.size() / 2));
  std::vector<uint8_t> flipped = state;
  flipped[flipped.size() / 2] ^= 0x10;
  check_throws(ETLLM_ERR_INVALID_STATE, [&] { session.load_state(truncated); });
  check_throws(ETLLM_ERR_INVALID_STATE, [&] { session.load_state(flipped); });
  check_throws(ETLLM_ERR_INVALID_STATE, [&] { session.load_state({}); });
  CHECK(gen(session, {}, 3) == slice(c.greedy_ids, 3, 3));
}

void reuse_prefix_counts_the_reused_tokens() {
  const Case c = reference_case(1);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session session = runner.session();
  etllm::GenerationConfig config = greedy(4);
  config.reuse_prefix = true;
  std::vector<uint32_t> history = c.prompt_ids, got;
  auto collect = [&got](std::string_view, int64_t id) {
    if (id >= 0) got.push_back(static_cast<uint32_t>(id));
    return true;
  };
  etllm::Stats stats = session.generate_tokens(history, config, collect);
  CHECK(stats.reused_prompt_tokens == 0);
  for (uint32_t id : got) history.push_back(id);
  got.clear();
  int stats_calls = 0;
  stats = session.generate_tokens(history, config, collect, [&](const etllm::Stats& s) {
    ++stats_calls;
    CHECK(s.reused_prompt_tokens == history.size() - 1);
  });
  CHECK(stats_calls == 1);
  CHECK(stats.num_prompt_tokens == history.size());
  CHECK(stats.reused_prompt_tokens == history.size() - 1);
  CHECK(got == slice(c.greedy_ids, 4, 4));
}

void session_is_move_only_and_outlives_its_runner() {
  static_assert(!std::is_copy_constructible_v<etllm::Session>);
  static_assert(!std::is_copy_assignable_v<etllm::Session>);
  static_assert(std::is_nothrow_move_constructible_v<etllm::Session>);
  static_assert(std::is_nothrow_move_assignable_v<etllm::Session>);
  const Case c = reference_case(0);
  std::vector<etllm::Session> sessions;
  {
    etllm::Runner runner(kModel, kTokenizer);
    sessions.push_back(runner.session());
    sessions.push_back(runner.session());
  }  // the runner is freed; its model stays loaded for the sessions
  etllm::Session moved = std::move(sessions[0]);
  check_throws(ETLLM_ERR_NULL_ARGUMENT, [&] { (void)sessions[0].position(); });  // NOLINT: moved from
  std::string text;
  etllm::GenerationConfig config = greedy(5);
  config.num_bos = 1;
  const etllm::Stats stats = moved.generate("The", config, [&text](const std::string& piece) { text += piece; });
  CHECK(stats.num_generated_tokens == 5 && stats.num_prompt_tokens == c.prompt_ids.size());
  CHECK(!text.empty());
  std::vector<uint32_t> want = c.prompt_ids;
  for (size_t i = 0; i < 5; ++i) want.push_back(c.greedy_ids[i]);
  CHECK(moved.tokens() == want);
  sessions[1] = std::move(moved);  // move-assignment frees the target's session first
  CHECK(gen(sessions[1], {}, 3) == slice(c.greedy_ids, 5, 3));
}

void busy_and_stop_from_a_callback() {
  const Case c = reference_case(1);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session a = runner.session();
  etllm::Session b = runner.session();
  CHECK(gen(b, c.prompt_ids, 2) == slice(c.greedy_ids, 0, 2));
  std::vector<etllm_status> nested;
  std::vector<uint32_t> got;
  const etllm::Stats stats = a.generate_tokens(c.prompt_ids, greedy(10), [&](std::string_view, int64_t id) {
    if (id < 0) return true;
    got.push_back(static_cast<uint32_t>(id));
    if (got.size() == 1) {
      for (auto call : std::vector<std::function<void()>>{
               [&] { gen(b, c.prompt_ids, 1); }, [&] { (void)b.save_state(); }, [&] { b.rewind(1); },
               [&] { runner.generate_tokens(c.prompt_ids, greedy(1), {}); }}) {
        try {
          call();
          nested.push_back(ETLLM_OK);
        } catch (const etllm::Error& e) {
          nested.push_back(e.status());
        }
      }
    }
    if (got.size() == 4) a.stop();  // ends after this token
    return true;
  });
  CHECK(nested == std::vector<etllm_status>(4, ETLLM_ERR_BUSY));
  CHECK(stats.stop_reason == ETLLM_STOP_REQUESTED);
  CHECK(got == slice(c.greedy_ids, 0, 4));
  CHECK(gen(a, {}, 2) == slice(c.greedy_ids, 4, 2));
  CHECK(gen(b, {}, 2) == slice(c.greedy_ids, 2, 2));
}

void exception_in_callback_propagates_and_session_stays_usable() {
  const Case c = reference_case(1);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session session = runner.session();
  int calls = 0;
  try {
    session.generate_tokens(c.prompt_ids, greedy(10), [&](std::string_view, int64_t) -> bool {
      if (++calls == 3) throw std::logic_error("from the callback");
      return true;
    });
    CHECK(false);
  } catch (const std::logic_error& e) {
    CHECK(std::string(e.what()) == "from the callback");
  }
  // The callback stopped generation at its third token, which stays in the conversation.
  CHECK(session.tokens().size() == c.prompt_ids.size() + 3);
  CHECK(gen(session, {}, 3) == slice(c.greedy_ids, 3, 3));
}

void prefill_rewind_and_reset() {
  const Case c = reference_case(1);
  const int64_t n = static_cast<int64_t>(c.prompt_ids.size());
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session session = runner.session();
  const etllm::Stats stats = session.prefill_tokens(c.prompt_ids);
  CHECK(stats.num_prompt_tokens == c.prompt_ids.size());
  CHECK(session.position() == n);
  CHECK(gen(session, {}, 6) == slice(c.greedy_ids, 0, 6));
  session.rewind(n + 2);
  CHECK(session.position() == n + 2);
  CHECK(gen(session, {c.greedy_ids[2]}, 3) == slice(c.greedy_ids, 3, 3));
  check_throws(ETLLM_ERR_INVALID_ARGUMENT, [&] { session.rewind(n + 100); });
  session.reset();
  CHECK(session.position() == 0 && session.tokens().empty());
  check_throws(ETLLM_ERR_INVALID_ARGUMENT, [&] { gen(session, {}, 1); });
  // A text prompt, prefilled, continued by an empty one.
  etllm::GenerationConfig bos;
  bos.num_bos = 1;
  session.prefill("The", bos);
  std::string text;
  session.generate("", greedy(4), [&text](const std::string& piece) { text += piece; });
  const Case the = reference_case(0);
  CHECK(session.tokens() == std::vector<uint32_t>({the.prompt_ids[0], the.prompt_ids[1], the.greedy_ids[0],
                                                   the.greedy_ids[1], the.greedy_ids[2], the.greedy_ids[3]}));
}

}  // namespace

// A chat on a session, saved after one turn with its JSON as user data and resumed in
// another runner, replies as the uninterrupted chat.
void conversation_on_a_session_resumes_from_saved_state() {
  const etllm::ChatTemplate tmpl(
      "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}");
  const etllm::GenerationConfig config = greedy(5);
  etllm::Runner runner(kModel, kTokenizer);
  etllm::Session whole = runner.session();
  etllm::Conversation chat(whole, tmpl);
  chat.send("Once upon", config);
  const std::string want = chat.send("a time", config).text;

  etllm::Session first = runner.session();
  etllm::Conversation part(first, tmpl);
  part.send("Once upon", config);
  const std::vector<uint8_t> state = first.save_state(part.to_json());

  etllm::Runner other(kModel, kTokenizer);
  etllm::Session resumed = other.session();
  const std::vector<uint8_t> user_data = resumed.load_state(state);
  etllm::Conversation again =
      etllm::Conversation::from_json(resumed, tmpl, std::string(user_data.begin(), user_data.end()));
  CHECK(again.send("a time", config).text == want);
  CHECK(again.messages().size() == 4);
  CHECK(again.rewind());
  again.reset();
  CHECK(resumed.position() == 0);
  check_throws(ETLLM_ERR_INVALID_STATE, [&] { etllm::Conversation::from_json(resumed, tmpl, "[]"); });
}

int main() {
  run("interleaved_sessions_match_reference", interleaved_sessions_match_reference);
  run("state_bytes_and_files_carry_user_data_to_another_runner",
      state_bytes_and_files_carry_user_data_to_another_runner);
  run("bad_state_is_invalid_state_and_the_session_keeps_its_own",
      bad_state_is_invalid_state_and_the_session_keeps_its_own);
  run("reuse_prefix_counts_the_reused_tokens", reuse_prefix_counts_the_reused_tokens);
  run("session_is_move_only_and_outlives_its_runner", session_is_move_only_and_outlives_its_runner);
  run("busy_and_stop_from_a_callback", busy_and_stop_from_a_callback);
  run("exception_in_callback_propagates_and_session_stays_usable",
      exception_in_callback_propagates_and_session_stays_usable);
  run("prefill_rewind_and_reset", prefill_rewind_and_reset);
  run("conversation_on_a_session_resumes_from_saved_state",
      conversation_on_a_session_resumes_from_saved_state);
  return finish();
}
