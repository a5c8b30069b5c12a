// Chat templates and conversations through the C++ wrapper (include/etllm.hpp).
#include <etllm.hpp>

#include "harness.hpp"

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const std::string kFixtures = ETLLM_FIXTURES_DIR "/";
const std::string kModel = kFixtures + "dyn_xnnpack/model.pte";
const std::string kTokenizer = kFixtures + "tokenizer.json";
// Short enough for the fixture models' 128-token context.
const std::string kCompact =
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}";

etllm::GenerationConfig greedy(int32_t n) {
  etllm::GenerationConfig c;
  c.temperature = 0.0f;
  c.max_new_tokens = n;
  c.ignore_eos = true;
  return c;
}

void templates_render_and_raise() {
  const etllm::ChatTemplate llama3 = etllm::ChatTemplate::llama3();
  CHECK(llama3.apply({{"user", "hi"}}, false) ==
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>");
  // Llama 2's template refuses roles that do not alternate, with its own message.
  try {
    etllm::ChatTemplate::llama2().apply({{"user", "a"}, {"user", "b"}}, true);
    CHECK(false);
  } catch (const etllm::Error& e) {
    CHECK(e.status() == ETLLM_ERR_CHAT_TEMPLATE);
    CHECK(e.message().find("Conversation roles must alternate") != std::string::npos);
  }
  etllm::ChatTemplate t("{{ bos_token }}{{ messages[0].content }}");
  t.set_token("bos_token", "<s>");
  CHECK(t.apply({{"user", "x"}}, true) == "<s>x");
  CHECK(!etllm::ChatTemplate::from_model_dir(kFixtures).has_value());
  CHECK(etllm::ChatTemplate::from_model_dir(kFixtures + "chat/config_list").has_value());
}

void runner_uses_the_template_set() {
  etllm::Runner runner(kModel, kTokenizer);
  runner.load();
  const etllm::ChatTemplate t(kCompact);
  runner.set_chat_template(&t);
  CHECK(runner.apply_chat_template({{"user", "hi"}}, true) == "<user>hi<assistant>");
  runner.set_chat_template(nullptr);
  CHECK(runner.apply_chat_template({{"user", "hi"}}, true).rfind("<|begin_of_text|>", 0) == 0);
}

void conversation_rewinds_and_resets() {
  etllm::Runner runner(kModel, kTokenizer);
  const etllm::ChatTemplate t(kCompact);
  etllm::Conversation chat(runner, &t);
  std::vector<int64_t> ids;
  const etllm::Conversation::Reply first = chat.send("Once upon", greedy(4));
  const int64_t before = runner.position();
  const etllm::Conversation::Reply second = chat.send("a time", greedy(4), [&](std::string_view, int64_t id) {
    ids.push_back(id);
    return true;
  });
  CHECK(ids.size() == 4);
  CHECK(second.stats.num_generated_tokens == 4);
  CHECK(chat.rewind());
  CHECK(runner.position() == before);
  CHECK(chat.send("a time", greedy(4)).text == second.text);
  const std::vector<etllm::ChatMessage> messages = chat.messages();
  CHECK(messages.size() == 4);
  CHECK(messages[1].role == "assistant" && messages[1].content == first.text);
  chat.reset();
  CHECK(runner.position() == 0);
  CHECK(chat.messages().empty());
  CHECK(chat.send("Once upon", greedy(4)).text == first.text);
}

}  // namespace

int main() {
  run("templates_render_and_raise", templates_render_and_raise);
  run("runner_uses_the_template_set", runner_uses_the_template_set);
  run("conversation_rewinds_and_resets", conversation_rewinds_and_resets);
  return finish();
}
