// Tests of the C++ wrapper's multimodal inputs and speech to text (include/etllm.hpp):
// etllm::Input with Runner::generate_inputs / Session::generate_inputs / prefill_inputs on
// tests/fixtures/multimodal (a tiny Llava), and etllm::AsrRunner on tests/fixtures/whisper (a
// tiny Whisper). Every token is checked against the fixtures' eager-transformers references
// (reference.json); the pixels, pixel values, samples and log-mel features fed directly are
// the fixtures' (Pillow, CLIPImageProcessor, soundfile, WhisperFeatureExtractor), never
// EtLlm's. Errors are etllm::Error with the C status.
#include <etllm.hpp>

#include "harness.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>

namespace {

const std::string kFixtures = ETLLM_FIXTURES_DIR "/";
const std::string kMM = kFixtures + "multimodal/";
const std::string kWhisper = kFixtures + "whisper/";

// ---- A small JSON reader for the reference files ------------------------------------------

struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  std::string text;  // a string's value, or a number's literal
  bool boolean = false;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json& operator[](const std::string& key) const {
    for (const auto& f : fields)
      if (f.first == key) return f.second;
    throw std::runtime_error("no key \"" + key + "\" in the JSON object");
  }
  const Json& operator[](size_t i) const { return items.at(i); }
  size_t size() const { return kind == kArray ? items.size() : fields.size(); }
  uint32_t u32() const { return static_cast<uint32_t>(std::stoul(text)); }
  std::vector<uint32_t> ids() const {
    std::vector<uint32_t> v;
    for (const Json& j : items) v.push_back(j.u32());
    return v;
  }
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> v;
    for (const Json& j : items) v.push_back(static_cast<uint8_t>(j.u32()));
    return v;
  }
  // The numbers as float, each parsed straight to float (the files hold float32 values as
  // their shortest round-trip decimals).
  std::vector<float> floats() const {
    std::vector<float> v;
    for (const Json& j : items) v.push_back(std::strtof(j.text.c_str(), nullptr));
    return v;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  Json parse() {
    Json j = value();
    space();
    if (at_ != s_.size()) fail("trailing text");
    return j;
  }

 private:
  [[noreturn]] void fail(const char* what) const {
    throw std::runtime_error(std::string("JSON: ") + what + " at byte " + std::to_string(at_));
  }
  void space() {
    while (at_ < s_.size() && (s_[at_] == ' ' || s_[at_] == '\n' || s_[at_] == '\r' || s_[at_] == '\t')) ++at_;
  }
  char peek() {
    space();
    if (at_ >= s_.size()) fail("unexpected end");
    return s_[at_];
  }
  void expect(char c) {
    if (peek() != c) fail("unexpected character");
    ++at_;
  }
  std::string string() {
    expect('"');
    std::string out;
    while (at_ < s_.size() && s_[at_] != '"') {
      char c = s_[at_++];
      if (c == '\\') {
        const char e = s_.at(at_++);
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'r': out += '\r'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'u': {
            const unsigned cp = static_cast<unsigned>(std::stoul(s_.substr(at_, 4), nullptr, 16));
            at_ += 4;
            if (cp >= 0xD800 && cp < 0xE000) fail("surrogate escapes are not handled");
            if (cp < 0x80) {
              out += static_cast<char>(cp);
            } else if (cp < 0x800) {
              out += static_cast<char>(0xC0 | (cp >> 6));
              out += static_cast<char>(0x80 | (cp & 0x3F));
            } else {
              out += static_cast<char>(0xE0 | (cp >> 12));
              out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
              out += static_cast<char>(0x80 | (cp & 0x3F));
            }
            break;
          }
          default: out += e;
        }
      } else {
        out += c;
      }
    }
    expect('"');
    return out;
  }
  Json value() {
    Json j;
    const char c = peek();
    if (c == '{') {
      j.kind = Json::kObject;
      ++at_;
      if (peek() == '}') {
        ++at_;
        return j;
      }
      for (;;) {
        std::string key = string();
        expect(':');
        j.fields.emplace_back(std::move(key), value());
        if (peek() == ',') {
          ++at_;
          continue;
        }
        expect('}');
        return j;
      }
    }
    if (c == '[') {
      j.kind = Json::kArray;
      ++at_;
      if (peek() == ']') {
        ++at_;
        return j;
      }
      for (;;) {
        j.items.push_back(value());
        if (peek() == ',') {
          ++at_;
          continue;
        }
        expect(']');
        return j;
      }
    }
    if (c == '"') {
      j.kind = Json::kString;
      j.text = string();
      return j;
    }
    for (const char* word : {"true", "false", "null"}) {
      if (s_.compare(at_, std::char_traits<char>::length(word), word) == 0) {
        at_ += std::char_traits<char>::length(word);
        j.kind = word[0] == 'n' ? Json::kNull : Json::kBool;
        j.boolean = word[0] == 't';
        return j;
      }
    }
    const size_t start = at_;
    while (at_ < s_.size() && std::string("+-0123456789.eE").find(s_[at_]) != std::string::npos) ++at_;
    if (at_ == start) fail("not a JSON value");
    j.kind = Json::kNumber;
    j.text = s_.substr(start, at_ - start);
    return j;
  }

  const std::string& s_;
  size_t at_ = 0;
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

Json read_json(const std::string& path) { return JsonParser(read_text(path)).parse(); }

std::vector<uint8_t> read_bytes(const std::string& path) {
  const std::string s = read_text(path);
  return std::vector<uint8_t>(s.begin(), s.end());
}

// A raw little-endian float32 file.
std::vector<float> read_f32(const std::string& path) {
  const std::string s = read_text(path);
  std::vector<float> v(s.size() / sizeof(float));
  std::copy(s.data(), s.data() + v.size() * sizeof(float), reinterpret_cast<char*>(v.data()));
  return v;
}

// ---- Helpers ---------------------------------------------------------------------------

// `f()` must throw etllm::Error with `status` and a message.
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

// A folder of its own in the temporary folder (removed by the caller's files' removal).
std::string temp_dir() {
  const char* dir = std::getenv("TMPDIR");
  std::string tmpl = std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/etllm-cpp-mm-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return std::string(buf.data());
}

void copy_file(const std::string& from, const std::string& to) {
  std::ofstream out(to, std::ios::binary);
  out << read_text(from);
  if (!out) throw std::runtime_error("cannot write " + to);
}

// ---- Multimodal ------------------------------------------------------------------------

const Json& mm_reference() {
  static const Json ref = read_json(kMM + "reference.json");
  return ref;
}

const Json& mm_case(const std::string& name) {
  const Json& cases = mm_reference()["cases"];
  for (const Json& c : cases.items)
    if (c["name"].text == name) return c;
  throw std::runtime_error("no case " + name + " in multimodal/reference.json");
}

// rgb.png as transformers' CLIPImageProcessor saw it (preprocess.json).
const Json& rgb_preprocessed() {
  static const Json pre = read_json(kMM + "preprocess.json");
  return pre["images"]["rgb.png"];
}

// The case's inputs: text pieces as their token ids, images as files.
std::vector<etllm::Input> case_inputs(const Json& c) {
  std::vector<etllm::Input> inputs;
  for (const Json& in : c["inputs"].items) {
    if (in["type"].text == "text") {
      inputs.push_back(etllm::Input::tokens(in["token_ids"].ids()));
    } else {
      inputs.push_back(etllm::Input::image_file(kMM + in["file"].text));
    }
  }
  return inputs;
}

// The one-image case's inputs with its image replaced by `image`.
std::vector<etllm::Input> one_image_with(etllm::Input image) {
  std::vector<etllm::Input> inputs = case_inputs(mm_case("one_image"));
  CHECK(inputs[1].kind() == ETLLM_INPUT_IMAGE_FILE);
  inputs[1] = std::move(image);
  return inputs;
}

// Greedy, no BOS added (the ids carry it), no echo: the reference's settings.
etllm::GenerationConfig greedy(int32_t n) {
  etllm::GenerationConfig c;
  c.echo = false;
  c.temperature = 0.0f;
  c.max_new_tokens = n;
  c.num_bos = 0;
  return c;
}

template <class Target>
std::vector<uint32_t> generate(Target& target, const std::vector<etllm::Input>& inputs, int32_t n = 16,
                               const etllm::GenerationConfig* config = nullptr) {
  std::vector<uint32_t> ids;
  target.generate_inputs(inputs, config != nullptr ? *config : greedy(n), [&ids](std::string_view, int64_t id) {
    if (id >= 0) ids.push_back(static_cast<uint32_t>(id));
    return true;
  });
  return ids;
}

etllm::Runner mm_runner() { return etllm::Runner(kMM + "model.pte", kMM + "tokenizer.json"); }

void one_image_matches_eager_transformers() {
  const Json& c = mm_case("one_image");
  etllm::Runner runner = mm_runner();
  CHECK(generate(runner, case_inputs(c)) == c["greedy_ids"].ids());
}

void two_images_match_eager_transformers() {
  const Json& c = mm_case("two_images");
  etllm::Runner runner = mm_runner();
  CHECK(generate(runner, case_inputs(c)) == c["greedy_ids"].ids());
}

void a_session_matches_eager_transformers() {
  const Json& c = mm_case("two_images");
  etllm::Runner runner = mm_runner();
  etllm::Session session = runner.session();
  CHECK(generate(session, case_inputs(c)) == c["greedy_ids"].ids());
}

void the_position_and_stats_count_one_row_per_image_token() {
  const Json& c = mm_case("one_image");
  etllm::Runner runner = mm_runner();
  std::vector<uint32_t> ids;
  int stats_calls = 0;
  const etllm::Stats stats = runner.generate_inputs(
      case_inputs(c), greedy(16),
      [&ids](std::string_view, int64_t id) {
        if (id >= 0) ids.push_back(static_cast<uint32_t>(id));
        return true;
      },
      [&stats_calls](const etllm::Stats&) { ++stats_calls; });
  const uint32_t prompt_len = c["prompt_len"].u32();
  CHECK(stats_calls == 1);
  CHECK(stats.num_prompt_tokens == prompt_len);
  CHECK(stats.num_generated_tokens == 16);
  CHECK(stats.stop_reason == ETLLM_STOP_LENGTH);
  CHECK(runner.position() == static_cast<int64_t>(prompt_len + 16));
}

void prefill_inputs_then_generate_inputs_continue_like_one_call() {
  const Json& c = mm_case("one_image");
  const std::vector<etllm::Input> inputs = case_inputs(c);
  const size_t first = c["inputs"][0]["token_ids"].size(), rows = c["inputs"][1]["num_tokens"].u32();
  etllm::Runner runner = mm_runner();
  runner.prefill_inputs({inputs[0], inputs[1]}, greedy(0));
  CHECK(runner.position() == static_cast<int64_t>(first + rows));
  CHECK(generate(runner, {inputs[2]}) == c["greedy_ids"].ids());
  // The same on a session.
  etllm::Session session = runner.session();
  session.prefill_inputs({inputs[0], inputs[1]}, greedy(0));
  CHECK(session.position() == static_cast<int64_t>(first + rows));
  CHECK(generate(session, {inputs[2]}) == c["greedy_ids"].ids());
}

void text_inputs_with_one_bos_match_eager_transformers() {
  const Json& c = mm_case("one_image");
  // The first piece's text is "<s>USER: ": its "<s>" is the BOS num_bos = 1 adds.
  std::string first = c["inputs"][0]["text"].text;
  CHECK(first.rfind("<s>", 0) == 0);
  first = first.substr(3);
  etllm::GenerationConfig config = greedy(16);
  config.num_bos = 1;
  etllm::Runner runner = mm_runner();
  const std::vector<etllm::Input> inputs = {etllm::Input::text(first),
                                            etllm::Input::image_file(kMM + c["inputs"][1]["file"].text),
                                            etllm::Input::text(c["inputs"][2]["text"].text)};
  CHECK(generate(runner, inputs, 16, &config) == c["greedy_ids"].ids());
}

void image_bytes_match_the_file() {
  etllm::Runner runner = mm_runner();
  const std::vector<etllm::Input> inputs = one_image_with(etllm::Input::image_bytes(read_bytes(kMM + "images/rgb.png")));
  CHECK(generate(runner, inputs) == mm_case("one_image")["greedy_ids"].ids());
}

void decoded_pixels_match_eager_transformers() {
  // Pillow's resize + center crop of rgb.png (32x32 RGB): the processor then only rescales
  // and normalizes, as transformers does.
  etllm::Runner runner = mm_runner();
  const std::vector<uint8_t> pixels = rgb_preprocessed()["cropped_hwc_uint8"].bytes();
  CHECK(pixels.size() == 32 * 32 * 3);
  const std::vector<etllm::Input> inputs = one_image_with(etllm::Input::image_pixels(pixels, 32, 32, 3));
  CHECK(generate(runner, inputs) == mm_case("one_image")["greedy_ids"].ids());
}

void pixel_values_as_features_match_eager_transformers() {
  etllm::Runner runner = mm_runner();
  const std::vector<float> values = rgb_preprocessed()["pixel_values_chw"].floats();
  CHECK(values.size() == 3 * 32 * 32);
  const std::vector<etllm::Input> inputs = one_image_with(etllm::Input::features(values, {3, 32, 32}));
  CHECK(generate(runner, inputs) == mm_case("one_image")["greedy_ids"].ids());
}

void bad_images_throw_invalid_media_and_change_nothing() {
  const Json& c = mm_case("one_image");
  etllm::Runner runner = mm_runner();
  generate(runner, {etllm::Input::tokens({1, 55, 53})}, 2);
  const int64_t before = runner.position();
  for (const char* bad : {"truncated.png", "corrupt.jpg", "image.tiff", "not_an_image.png"}) {
    const std::vector<etllm::Input> inputs = {etllm::Input::tokens({55}),
                                              etllm::Input::image_file(kMM + "images/" + bad)};
    check_throws(ETLLM_ERR_INVALID_MEDIA, [&] { generate(runner, inputs, 4); });
    CHECK(runner.position() == before);
    const std::vector<etllm::Input> as_bytes = {etllm::Input::tokens({55}),
                                                etllm::Input::image_bytes(read_bytes(kMM + "images/" + bad))};
    check_throws(ETLLM_ERR_INVALID_MEDIA, [&] { runner.prefill_inputs(as_bytes, greedy(0)); });
    CHECK(runner.position() == before);
  }
  runner.reset();
  CHECK(generate(runner, case_inputs(c)) == c["greedy_ids"].ids());
}

void an_image_for_a_text_only_model_throws_unsupported_model() {
  etllm::Runner runner(kFixtures + "dyn_xnnpack/model.pte", kFixtures + "tokenizer.json");
  const std::vector<etllm::Input> inputs = {etllm::Input::tokens({1, 5}),
                                            etllm::Input::image_file(kMM + "images/rgb.png")};
  check_throws(ETLLM_ERR_UNSUPPORTED_MODEL, [&] { generate(runner, inputs, 2); });
  CHECK(runner.position() == 0);
  CHECK(generate(runner, {etllm::Input::tokens({1, 5})}, 3).size() == 3);
}

void more_image_rows_than_the_context_throw_context_full_and_change_nothing() {
  // 8 images of 16 rows each fill 128 positions: with the text, more than the context.
  std::vector<etllm::Input> inputs = {etllm::Input::tokens({1, 55})};
  for (int i = 0; i < 8; ++i) inputs.push_back(etllm::Input::image_file(kMM + "images/rgb.png"));
  etllm::Runner runner = mm_runner();
  check_throws(ETLLM_ERR_CONTEXT_FULL, [&] { generate(runner, inputs, 4); });
  CHECK(runner.position() == 0);
  const Json& c = mm_case("one_image");
  CHECK(generate(runner, case_inputs(c)) == c["greedy_ids"].ids());
}

void preprocessor_config_option_is_used() {
  // The model and tokenizer in a folder without preprocessor_config.json: an image needs the
  // option.
  const std::string dir = temp_dir();
  copy_file(kMM + "model.pte", dir + "/model.pte");
  copy_file(kMM + "tokenizer.json", dir + "/tokenizer.json");
  const Json& c = mm_case("one_image");
  {
    etllm::Runner bare(dir + "/model.pte", dir + "/tokenizer.json");
    check_throws(ETLLM_ERR_UNSUPPORTED_MODEL, [&] { generate(bare, case_inputs(c)); });
    etllm::RunnerOptions options;
    options.preprocessor_config = kMM + "preprocessor_config.json";
    etllm::Runner runner(dir + "/model.pte", dir + "/tokenizer.json", options);
    CHECK(generate(runner, case_inputs(c)) == c["greedy_ids"].ids());
    // Given for a model without a vision encoder, it fails the load.
    etllm::Runner text_only(kFixtures + "dyn_xnnpack/model.pte", kFixtures + "tokenizer.json", options);
    check_throws(ETLLM_ERR_INVALID_ARGUMENT, [&] { text_only.load(); });
  }
  std::remove((dir + "/model.pte").c_str());
  std::remove((dir + "/tokenizer.json").c_str());
  rmdir(dir.c_str());
}

void exception_in_callback_propagates_and_the_runner_stays_usable() {
  const Json& c = mm_case("one_image");
  etllm::Runner runner = mm_runner();
  bool threw = false;
  try {
    runner.generate_inputs(case_inputs(c), greedy(16), [](std::string_view, int64_t) -> bool {
      throw std::logic_error("from the callback");
    });
  } catch (const std::logic_error& e) {
    threw = std::string(e.what()) == "from the callback";
  }
  CHECK(threw);
  runner.reset();
  CHECK(generate(runner, case_inputs(c)) == c["greedy_ids"].ids());
}

void input_owns_its_data_and_maps_to_the_c_struct() {
  static_assert(std::is_copy_constructible_v<etllm::Input> && std::is_nothrow_move_constructible_v<etllm::Input>);
  etllm::Input pixels = etllm::Input::image_pixels(std::vector<uint8_t>(12, 7), 2, 2, 3);
  const etllm::Input copy = pixels;
  pixels = etllm::Input::text("replaced");
  const etllm_input c = copy.to_c();
  CHECK(c.struct_size == sizeof(etllm_input));
  CHECK(c.kind == ETLLM_INPUT_IMAGE_PIXELS);
  CHECK(c.num_bytes == 12 && c.bytes[11] == 7);
  CHECK(c.width == 2 && c.height == 2 && c.channels == 3);
  const etllm_input t = pixels.to_c();
  CHECK(t.kind == ETLLM_INPUT_TEXT && std::string(t.text) == "replaced");
  const etllm_input a = etllm::Input::audio_samples({0.5f, -0.5f}, 8000, 2).to_c();
  CHECK(a.kind == ETLLM_INPUT_AUDIO_SAMPLES && a.num_floats == 2 && a.sample_rate == 8000 && a.channels == 2);
  const etllm::Input f = etllm::Input::features({1.0f, 2.0f}, {1, 2});
  const etllm_input fc = f.to_c();
  CHECK(fc.kind == ETLLM_INPUT_FEATURES && fc.num_sizes == 2 && fc.sizes[1] == 2 && fc.floats[1] == 2.0f);
  const etllm::Input w = etllm::Input::audio_file("a.wav");
  CHECK(w.to_c().kind == ETLLM_INPUT_AUDIO_FILE && std::string(w.to_c().path) == "a.wav");
}

// ---- Speech to text --------------------------------------------------------------------

const Json& asr_reference() {
  static const Json ref = read_json(kWhisper + "reference.json");
  return ref;
}

const Json& asr_case(const std::string& audio, const std::string& prompt) {
  for (const Json& c : asr_reference()["cases"].items)
    if (c["audio"].text == audio && c["prompt"].text == prompt) return c;
  throw std::runtime_error("no case " + audio + " / " + prompt + " in whisper/reference.json");
}

const std::string kStandard = "sot_en_transcribe_notimestamps";
const std::string kSpeech = "audio/speech16k.wav";

// The case's decoder prompt: the standard one is language "en" (start, <|en|>,
// <|transcribe|>, <|notimestamps|>); any other is given whole.
etllm::TranscribeOptions prompt_of(const Json& c) {
  etllm::TranscribeOptions o;
  if (c["prompt"].text == kStandard) {
    o.language = "en";
  } else {
    o.decoder_prompt = c["prompt_ids"].ids();
  }
  return o;
}

// The reference's greedy ids without the end-of-text token, which transcribe leaves out.
std::vector<uint32_t> expected_tokens(const Json& c) {
  std::vector<uint32_t> ids = c["greedy_ids"].ids();
  if (c["stopped_on_eos"].boolean) {
    CHECK(ids.back() == asr_reference()["eos_token_id"].u32());
    ids.pop_back();
  }
  return ids;
}

// Greedy, at most the reference's number of new tokens.
etllm::GenerationConfig asr_greedy() {
  etllm::GenerationConfig g = greedy(static_cast<int32_t>(asr_reference()["greedy_max_new_tokens"].u32()));
  g.num_bos = 0;
  return g;
}

etllm::AsrRunner asr_runner() { return etllm::AsrRunner(kWhisper + "model.pte", kWhisper + "tokenizer.json"); }

void transcribe_case(const std::string& audio, const std::string& prompt) {
  const Json& c = asr_case(audio, prompt);
  etllm::AsrRunner asr = asr_runner();
  const etllm::Transcript t = asr.transcribe(etllm::Input::audio_file(kWhisper + audio), prompt_of(c), asr_greedy());
  CHECK(t.tokens == expected_tokens(c));
  CHECK(t.text == c["text"].text);
  CHECK(t.stats.num_generated_tokens == t.tokens.size());
  CHECK(t.stats.stop_reason == (c["stopped_on_eos"].boolean ? ETLLM_STOP_EOS : ETLLM_STOP_LENGTH));
}

void speech_with_the_standard_prompt_matches_eager_transformers() { transcribe_case(kSpeech, kStandard); }
void speech_with_the_start_token_only_matches_eager_transformers() { transcribe_case(kSpeech, "sot_only"); }
void stereo_with_the_standard_prompt_matches_eager_transformers() {
  transcribe_case("audio/stereo16k.wav", kStandard);
}
void stereo_with_the_start_token_only_matches_eager_transformers() {
  transcribe_case("audio/stereo16k.wav", "sot_only");
}

void samples_and_features_match_eager_transformers() {
  const Json& c = asr_case(kSpeech, kStandard);
  etllm::AsrRunner asr = asr_runner();
  // The samples soundfile decoded, and the features WhisperFeatureExtractor made from them.
  const etllm::Transcript from_samples = asr.transcribe(
      etllm::Input::audio_samples(read_f32(kWhisper + "speech16k.samples.f32"), 16000), prompt_of(c), asr_greedy());
  CHECK(from_samples.tokens == expected_tokens(c));
  const etllm::Transcript from_features = asr.transcribe(
      etllm::Input::features(read_f32(kWhisper + "speech16k.mel_call.f32"), {80, 3000}), prompt_of(c), asr_greedy());
  CHECK(from_features.tokens == expected_tokens(c));
  CHECK(from_features.stats.num_prompt_tokens == 1500);  // the encoder's output length
}

void bad_wavs_throw_invalid_media_and_the_runner_stays_usable() {
  const Json& c = asr_case(kSpeech, kStandard);
  etllm::AsrRunner asr = asr_runner();
  for (const char* bad : {"truncated.wav", "not_a_wav.wav", "empty.wav", "six_channel.wav"}) {
    CHECK(!asr_reference()["audio"][bad]["valid"].boolean);
    check_throws(ETLLM_ERR_INVALID_MEDIA,
                 [&] { asr.transcribe(etllm::Input::audio_file(kWhisper + "audio/" + bad), prompt_of(c)); });
  }
  const etllm::Transcript t = asr.transcribe(etllm::Input::audio_file(kWhisper + kSpeech), prompt_of(c), asr_greedy());
  CHECK(t.tokens == expected_tokens(c));
}

void a_decoder_only_model_throws_unsupported_model() {
  check_throws(ETLLM_ERR_UNSUPPORTED_MODEL,
               [&] { etllm::AsrRunner(kFixtures + "dyn_xnnpack/model.pte", kFixtures + "tokenizer.json"); });
}

void a_whisper_model_given_to_runner_throws_unsupported_model() {
  etllm::Runner runner(kWhisper + "model.pte", kWhisper + "tokenizer.json");
  check_throws(ETLLM_ERR_UNSUPPORTED_MODEL, [&] { runner.load(); });
}

void stop_from_another_thread_ends_the_transcription() {
  const Json& c = asr_case(kSpeech, kStandard);
  etllm::AsrRunner asr = asr_runner();
  size_t pieces = 0;
  const etllm::Transcript t =
      asr.transcribe(etllm::Input::audio_file(kWhisper + kSpeech), prompt_of(c), asr_greedy(),
                     [&](std::string_view, int64_t) {
                       if (++pieces == 2) std::thread([&asr] { asr.stop(); }).join();
                       return true;
                     });
  CHECK(t.stats.stop_reason == ETLLM_STOP_REQUESTED);
  const std::vector<uint32_t> want = expected_tokens(c);
  CHECK(t.tokens == std::vector<uint32_t>(want.begin(), want.begin() + 2));
  // The next transcription clears the request.
  CHECK(asr.transcribe(etllm::Input::audio_file(kWhisper + kSpeech), prompt_of(c), asr_greedy()).tokens == want);
}

void the_callback_streams_the_text_and_false_stops() {
  const Json& c = asr_case(kSpeech, kStandard);
  etllm::AsrRunner asr = asr_runner();
  std::string text;
  std::vector<uint32_t> ids;
  const etllm::Transcript t = asr.transcribe(etllm::Input::audio_file(kWhisper + kSpeech), prompt_of(c),
                                             asr_greedy(), [&](std::string_view piece, int64_t id) {
                                               text.append(piece);
                                               ids.push_back(static_cast<uint32_t>(id));
                                               return ids.size() < 3;
                                             });
  CHECK(t.stats.stop_reason == ETLLM_STOP_CALLBACK);
  const std::vector<uint32_t> want = expected_tokens(c);
  CHECK(ids == std::vector<uint32_t>(want.begin(), want.begin() + 3));
  CHECK(t.tokens == ids && t.text == text);
}

void exception_in_the_asr_callback_propagates_and_the_runner_stays_usable() {
  const Json& c = asr_case(kSpeech, kStandard);
  etllm::AsrRunner asr = asr_runner();
  bool threw = false;
  try {
    asr.transcribe(etllm::Input::audio_file(kWhisper + kSpeech), prompt_of(c), asr_greedy(),
                   [](std::string_view, int64_t) -> bool { throw std::logic_error("from the callback"); });
  } catch (const std::logic_error&) {
    threw = true;
  }
  CHECK(threw);
  CHECK(asr.transcribe(etllm::Input::audio_file(kWhisper + kSpeech), prompt_of(c), asr_greedy()).tokens ==
        expected_tokens(c));
}

void asr_runner_is_move_only() {
  static_assert(!std::is_copy_constructible_v<etllm::AsrRunner> && !std::is_copy_assignable_v<etllm::AsrRunner>);
  static_assert(std::is_nothrow_move_constructible_v<etllm::AsrRunner>);
  etllm::AsrRunner a = asr_runner();
  etllm::AsrRunner b = std::move(a);
  check_throws(ETLLM_ERR_NULL_ARGUMENT, [&] { a.stop(); });  // NOLINT: moved from
  b.stop();  // nothing running: a request the next transcription clears
  const Json& c = asr_case(kSpeech, kStandard);
  CHECK(b.transcribe(etllm::Input::audio_file(kWhisper + kSpeech), prompt_of(c), asr_greedy()).tokens ==
        expected_tokens(c));
}

}  // namespace

int main() {
  run("one_image_matches_eager_transformers", one_image_matches_eager_transformers);
  run("two_images_match_eager_transformers", two_images_match_eager_transformers);
  run("a_session_matches_eager_transformers", a_session_matches_eager_transformers);
  run("the_position_and_stats_count_one_row_per_image_token", the_position_and_stats_count_one_row_per_image_token);
  run("prefill_inputs_then_generate_inputs_continue_like_one_call",
      prefill_inputs_then_generate_inputs_continue_like_one_call);
  run("text_inputs_with_one_bos_match_eager_transformers", text_inputs_with_one_bos_match_eager_transformers);
  run("image_bytes_match_the_file", image_bytes_match_the_file);
  run("decoded_pixels_match_eager_transformers", decoded_pixels_match_eager_transformers);
  run("pixel_values_as_features_match_eager_transformers", pixel_values_as_features_match_eager_transformers);
  run("bad_images_throw_invalid_media_and_change_nothing", bad_images_throw_invalid_media_and_change_nothing);
  run("an_image_for_a_text_only_model_throws_unsupported_model",
      an_image_for_a_text_only_model_throws_unsupported_model);
  run("more_image_rows_than_the_context_throw_context_full_and_change_nothing",
      more_image_rows_than_the_context_throw_context_full_and_change_nothing);
  run("preprocessor_config_option_is_used", preprocessor_config_option_is_used);
  run("exception_in_callback_propagates_and_the_runner_stays_usable",
      exception_in_callback_propagates_and_the_runner_stays_usable);
  run("input_owns_its_data_and_maps_to_the_c_struct", input_owns_its_data_and_maps_to_the_c_struct);

  run("speech_with_the_standard_prompt_matches_eager_transformers",
      speech_with_the_standard_prompt_matches_eager_transformers);
  run("speech_with_the_start_token_only_matches_eager_transformers",
      speech_with_the_start_token_only_matches_eager_transformers);
  run("stereo_with_the_standard_prompt_matches_eager_transformers",
      stereo_with_the_standard_prompt_matches_eager_transformers);
  run("stereo_with_the_start_token_only_matches_eager_transformers",
      stereo_with_the_start_token_only_matches_eager_transformers);
  run("samples_and_features_match_eager_transformers", samples_and_features_match_eager_transformers);
  run("bad_wavs_throw_invalid_media_and_the_runner_stays_usable",
      bad_wavs_throw_invalid_media_and_the_runner_stays_usable);
  run("a_decoder_only_model_throws_unsupported_model", a_decoder_only_model_throws_unsupported_model);
  run("a_whisper_model_given_to_runner_throws_unsupported_model",
      a_whisper_model_given_to_runner_throws_unsupported_model);
  run("stop_from_another_thread_ends_the_transcription", stop_from_another_thread_ends_the_transcription);
  run("the_callback_streams_the_text_and_false_stops", the_callback_streams_the_text_and_false_stops);
  run("exception_in_the_asr_callback_propagates_and_the_runner_stays_usable",
      exception_in_the_asr_callback_propagates_and_the_runner_stays_usable);
  run("asr_runner_is_move_only", asr_runner_is_move_only);
  return finish();
}
