"""`etllm serve`: the OpenAI-compatible HTTP server, driven through the official `openai`
client where a client would be used, and through raw HTTP (httpx) for what a client cannot
send or does not show (bad JSON, oversized bodies, headers, disconnects).

The server runs the model built into the CLI (no --model). Expected texts are never written
down: they come from the server itself (greedy output, a first reply) or from
`etllm generate`, which the server must agree with."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from typing import Dict, Iterator, List, Optional

import httpx
import jsonschema
import openai
import pytest

from server_util import ServerProcess, run_server

MODEL_ID = "etllm-demo"
# A prompt the built-in model answers at length; ~80 tokens through the chat template.
QUESTION = [{"role": "user", "content": "Who is God?"}]
CTX = 256  # The built-in model's context.


# --- helpers -------------------------------------------------------------------------------

def client(server: ServerProcess, api_key: str = "unused") -> openai.OpenAI:
    """An OpenAI client that does not retry (so errors surface as they are answered)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0,
                         timeout=60)


def sse_events(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a server-sent-event response, in order."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


def metrics_text(server: ServerProcess, headers: Optional[Dict[str, str]] = None) -> str:
    r = httpx.get(server.url + "/metrics", headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def metric(text: str, sample: str) -> float:
    """The value of one sample (name with its labels, exactly as exposed); 0 when absent
    (a labelled counter appears once it was incremented)."""
    match = re.search(r"^" + re.escape(sample) + r" (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def requests_counted(text: str, endpoint: str, status: int) -> float:
    return metric(text, f'etllm_requests_total{{endpoint="{endpoint}",status="{status}"}}')


def wait_for_metric(server: ServerProcess, sample: str, accept, timeout: float = 10.0) -> float:
    """Polls /metrics until `accept(value)`; fails with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = metric(metrics_text(server), sample)
        if accept(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{sample} is {value} after {timeout} s; stderr:\n{server.stderr()}")
        time.sleep(0.02)


def cli_generate_text(cli: str, *args: str) -> str:
    """The text `etllm generate ... --json` prints: its token lines' "text" joined."""
    out = subprocess.run([cli, "generate", *args, "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    text = ""
    for line in out.stdout.splitlines():
        if line.strip():
            obj = json.loads(line)
            if "text" in obj:
                text += obj["text"]
    return text


def error_of(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


def assert_usage_consistent(usage) -> None:
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


# --- servers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(cli) -> Iterator[ServerProcess]:
    """One server shared by the tests that do not care about its history."""
    with run_server(cli) as s:
        yield s


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    return client(server)


# --- discovery and health ------------------------------------------------------------------

def test_models_lists_the_built_in_model(api):
    models = api.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].object == "model"


def test_model_name_option_renames_the_model_in_listing_and_responses(cli):
    with run_server(cli, "--model-name", "my-bible-model") as s:
        c = client(s)
        assert [m.id for m in c.models.list().data] == ["my-bible-model"]
        reply = c.chat.completions.create(model="anything", messages=QUESTION, max_tokens=2)
        assert reply.model == "my-bible-model"


def test_health_reports_idle_slots(cli):
    with run_server(cli, "--parallel", "3") as s:
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 200
        assert r.json() == {"status": "ok", "slots": 3, "slots_busy": 0, "queue_depth": 0}


# --- chat ----------------------------------------------------------------------------------

def test_chat_completion_has_openais_shape(api):
    reply = api.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL_ID
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert_usage_consistent(reply.usage)
    assert 1 <= reply.usage.completion_tokens <= 12


def test_chat_stream_sends_the_same_text_as_the_whole_reply(api):
    whole = api.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0,
                                        max_tokens=30)
    chunks = list(api.chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                              temperature=0, max_tokens=30, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    # Only the last chunk finishes, and the same way as the whole reply.
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # Without stream_options.include_usage, no chunk carries usage.
    assert all(c.usage is None for c in chunks)


def test_chat_stream_ends_with_done_on_the_wire(server):
    body = {"model": MODEL_ID, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    assert all("choices" in json.loads(e) for e in events[:-1])


def test_chat_text_content_parts_are_joined_like_a_string(api):
    as_string = api.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=15,
        messages=[{"role": "user", "content": "Who is God?"}])
    as_parts = api.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=15,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Who is "},
                                               {"type": "text", "text": "God?"}]}])
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


# --- completions ---------------------------------------------------------------------------

def test_completion_has_openais_shape(api):
    reply = api.completions.create(model=MODEL_ID, prompt="And God said", max_tokens=10)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.model == MODEL_ID
    assert len(reply.choices) == 1
    assert isinstance(reply.choices[0].text, str) and reply.choices[0].text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert_usage_consistent(reply.usage)


def test_completion_stream_sends_the_same_text_as_the_whole_reply(api):
    whole = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                   max_tokens=25)
    chunks = list(api.completions.create(model=MODEL_ID, prompt="And God said",
                                         temperature=0, max_tokens=25, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_equals_cli_generate_with_its_bos(api, cli):
    expected = cli_generate_text(cli, "--prompt", "And God said", "--temperature", "0",
                                 "--max-new-tokens", "20")
    reply = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                   max_tokens=20)
    assert reply.choices[0].text == expected


def test_completion_prompt_forms_agree(api):
    text = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                  max_tokens=10)
    one_in_list = api.completions.create(model=MODEL_ID, prompt=["And God said"],
                                         temperature=0, max_tokens=10)
    assert one_in_list.choices[0].text == text.choices[0].text
    assert one_in_list.usage.prompt_tokens == text.usage.prompt_tokens
    ids = [5, 17, 200, 33]
    by_ids = api.completions.create(model=MODEL_ID, prompt=ids, max_tokens=3)
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completion_echo_puts_the_prompt_first(api):
    plain = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                   max_tokens=8)
    echoed = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                    max_tokens=8, echo=True)
    assert echoed.choices[0].text == "And God said" + plain.choices[0].text
    streamed = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                      max_tokens=8, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


# --- stream usage ---------------------------------------------------------------------------

def test_chat_stream_include_usage_ends_with_a_usage_chunk(api):
    chunks = list(api.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 6
    assert_usage_consistent(last.usage)
    # Every other chunk has choices and usage null.
    assert all(c.choices and c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completion_stream_include_usage_ends_with_a_usage_chunk(api):
    chunks = list(api.completions.create(
        model=MODEL_ID, prompt="And God said", max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 5
    assert_usage_consistent(last.usage)
    assert all(c.choices and c.usage is None for c in chunks[:-1])


# --- structured output ------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_response_format_output_is_valid_under_the_schema(api, seed):
    reply = api.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        seed=seed, max_tokens=120,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON}})
    # The schema bounds every value, so the grammar completes well within max_tokens.
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_json_object_response_format_output_is_an_object(api):
    finished = []
    for seed in range(6):
        reply = api.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Answer in JSON."}],
            seed=seed, max_tokens=150, response_format={"type": "json_object"})
        text = reply.choices[0].message.content
        assert text.lstrip().startswith("{")
        if reply.choices[0].finish_reason == "stop":
            finished.append(json.loads(text))
    # An unconstrained string may run into max_tokens; most outputs end.
    assert finished, "no json_object output finished within max_tokens"
    assert all(isinstance(o, dict) for o in finished)


def test_gbnf_grammar_extension_constrains_the_output(api):
    for seed in range(3):
        reply = api.chat.completions.create(
            model=MODEL_ID, messages=QUESTION, seed=seed, max_tokens=10,
            extra_body={"grammar": 'root ::= "yes" | "no"'})
        assert reply.choices[0].message.content in ("yes", "no")
        assert reply.choices[0].finish_reason == "stop"


# --- sampling ------------------------------------------------------------------------------

def test_seeded_chat_repeats_and_equals_cli_generate(cli):
    # A fresh server: no earlier request whose cache the first one could reuse.
    expected = cli_generate_text(cli, "--chat", "--prompt", "Who is God?", "--seed", "7",
                                 "--temperature", "0.8", "--max-new-tokens", "20")
    with run_server(cli) as s:
        c = client(s)
        replies = [c.chat.completions.create(model=MODEL_ID, messages=QUESTION, seed=7,
                                             temperature=0.8, max_tokens=20)
                   for _ in range(2)]
        assert replies[0].usage.prompt_tokens_details.cached_tokens == 0
        texts = [r.choices[0].message.content for r in replies]
        assert texts[0] == expected
        # The second reuses the first's cached prompt and still samples the same text.
        assert replies[1].usage.prompt_tokens_details.cached_tokens > 0
        assert texts[1] == texts[0]
        streamed = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(model=MODEL_ID, messages=QUESTION, seed=7,
                                                temperature=0.8, max_tokens=20, stream=True))
        assert streamed == texts[0]


def test_different_seeds_sample_different_texts(api):
    texts = {api.chat.completions.create(model=MODEL_ID, messages=QUESTION, seed=seed,
                                         temperature=1.0, max_tokens=20).choices[0].message.content
             for seed in range(4)}
    assert len(texts) > 1


def test_temperature_zero_is_the_same_across_calls_and_seeds(api):
    texts = [api.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0,
                                         seed=seed, max_tokens=30).choices[0].message.content
             for seed in (1, 2, 3)]
    assert texts[0] and texts[0] == texts[1] == texts[2]


# --- stop and length ------------------------------------------------------------------------

def greedy_chat(api, max_tokens: int = 60) -> str:
    return api.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0,
                                       max_tokens=max_tokens).choices[0].message.content


def pick_stop(greedy: str) -> str:
    """A stop string that occurs in `greedy` after some text: its first occurrence is past
    the start, and it spans a word boundary (so it likely straddles tokens)."""
    for start in range(8, len(greedy) - 5):
        stop = greedy[start:start + 5]
        if " " in stop.strip() and greedy.find(stop) == start:
            return stop
    pytest.fail(f"no usable stop string in {greedy!r}")
    raise AssertionError


def test_stop_string_ends_the_chat_reply_before_it(api):
    greedy = greedy_chat(api)
    stop = pick_stop(greedy)
    reply = api.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0,
                                        max_tokens=60, stop=stop)
    text = reply.choices[0].message.content
    assert stop not in text
    assert text == greedy[:greedy.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_stop_string_list_ends_the_streamed_reply_before_it(api):
    greedy = greedy_chat(api)
    stop = pick_stop(greedy)
    chunks = list(api.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, temperature=0, max_tokens=60,
        stop=["@@never@@", stop], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == greedy[:greedy.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_string_ends_a_completion(api):
    greedy = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                    max_tokens=40).choices[0].text
    stop = pick_stop(greedy)
    reply = api.completions.create(model=MODEL_ID, prompt="And God said", temperature=0,
                                   max_tokens=40, stop=stop)
    assert reply.choices[0].text == greedy[:greedy.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_max_tokens_finishes_with_length_and_that_many_tokens(api):
    reply = api.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=7,
                                        extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    reply = api.chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                        max_completion_tokens=5,
                                        extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    reply = api.completions.create(model=MODEL_ID, prompt="And", max_tokens=9,
                                   extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 9


def test_without_max_tokens_generation_stops_at_the_context_with_length(cli):
    with run_server(cli, "--ctx", "100") as s:
        reply = client(s).chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                                  extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.total_tokens == 100


# --- prefix reuse ---------------------------------------------------------------------------

def test_resent_conversation_reuses_the_cached_prompt(cli):
    with run_server(cli) as s:
        c = client(s)
        first = c.chat.completions.create(model=MODEL_ID, messages=QUESTION, temperature=0,
                                          max_tokens=20)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        history = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                              {"role": "user", "content": "And what of the earth?"}]
        second = c.chat.completions.create(model=MODEL_ID, messages=history, temperature=0,
                                           max_tokens=5)
        cached = second.usage.prompt_tokens_details.cached_tokens
        # The whole first prompt is reused; only (at most) the new turn is fed.
        assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
        text = metrics_text(s)
        assert metric(text, "etllm_cached_prompt_tokens_total") == cached


def test_each_slot_keeps_its_own_conversation(cli):
    with run_server(cli, "--parallel", "2") as s:
        c = client(s)
        a = [{"role": "user", "content": "Who made the heaven?"}]
        b = [{"role": "system", "content": "Thou art a prophet."},
             {"role": "user", "content": "Where is Egypt?"}]
        first = {}
        for name, messages in (("a", a), ("b", b)):
            first[name] = c.chat.completions.create(model=MODEL_ID, messages=messages,
                                                    temperature=0, max_tokens=10)
        for name, messages in (("a", a), ("b", b)):
            reply = first[name]
            history = messages + [{"role": "assistant",
                                   "content": reply.choices[0].message.content},
                                  {"role": "user", "content": "Why?"}]
            again = c.chat.completions.create(model=MODEL_ID, messages=history,
                                              temperature=0, max_tokens=3)
            assert again.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens, name


# --- errors --------------------------------------------------------------------------------

def test_bad_json_is_an_invalid_request(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]


def test_body_not_an_object_is_an_invalid_request(server):
    r = httpx.post(server.url + "/v1/completions", json=["prompt"], timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_too_long_chat_prompt_is_context_length_exceeded(api):
    long = "And the LORD spake unto Moses, saying, " * 60
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=MODEL_ID, max_tokens=5,
                                    messages=[{"role": "user", "content": long}])
    assert raised.value.status_code == 400
    assert error_of(raised.value)["code"] == "context_length_exceeded"
    assert error_of(raised.value)["param"] == "messages"


def test_too_long_completion_prompt_is_context_length_exceeded_naming_prompt(api):
    with pytest.raises(openai.BadRequestError) as raised:
        api.completions.create(model=MODEL_ID, prompt=[7] * CTX, max_tokens=1)
    error = error_of(raised.value)
    assert error["code"] == "context_length_exceeded"
    # The completions endpoint has no `messages`; the prompt is what is too long.
    assert error["param"] == "prompt"


def test_prompt_plus_max_tokens_beyond_the_context_is_context_length_exceeded(api):
    prompt_tokens = api.chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                                max_tokens=1).usage.prompt_tokens
    # Exactly the context is allowed; one more token is not.
    ok = api.chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                     max_tokens=CTX - prompt_tokens,
                                     extra_body={"ignore_eos": True})
    assert ok.usage.total_tokens == CTX
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                    max_tokens=CTX - prompt_tokens + 1)
    assert error_of(raised.value)["code"] == "context_length_exceeded"


def test_ctx_option_lowers_the_context_limit(cli):
    with run_server(cli, "--ctx", "64") as s:
        with pytest.raises(openai.BadRequestError) as raised:
            # The chat template alone makes this prompt longer than 64 tokens.
            client(s).chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=1)
        assert error_of(raised.value)["code"] == "context_length_exceeded"
        reply = client(s).completions.create(model=MODEL_ID, prompt=[7] * 60, max_tokens=4,
                                             extra_body={"ignore_eos": True})
        assert reply.usage.total_tokens == 64


def test_invalid_json_schema_is_a_400_naming_response_format(api):
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(
            model=MODEL_ID, messages=QUESTION, max_tokens=5,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}})
    assert raised.value.status_code == 400
    assert error_of(raised.value)["param"] == "response_format"


@pytest.mark.parametrize("param,kwargs", [
    ("n", {"n": 2}),
    ("logprobs", {"logprobs": True}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("logit_bias", {"logit_bias": {"5": 10}}),
    ("presence_penalty", {"presence_penalty": 0.5}),
    ("frequency_penalty", {"frequency_penalty": 0.5}),
])
def test_unsupported_chat_parameter_is_refused_by_name(api, param, kwargs):
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=2, **kwargs)
    error = error_of(raised.value)
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == param


@pytest.mark.parametrize("param,kwargs", [
    ("n", {"n": 3}),
    ("best_of", {"best_of": 2}),
    ("logprobs", {"logprobs": 2}),
    ("suffix", {"suffix": "amen"}),
])
def test_unsupported_completion_parameter_is_refused_by_name(api, param, kwargs):
    with pytest.raises(openai.BadRequestError) as raised:
        api.completions.create(model=MODEL_ID, prompt="And", max_tokens=2, **kwargs)
    error = error_of(raised.value)
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == param


def test_unsupported_parameters_at_their_neutral_values_and_unknown_fields_are_accepted(api):
    reply = api.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=2, n=1, logprobs=False,
        presence_penalty=0, frequency_penalty=0.0, logit_bias={},
        extra_body={"not_an_openai_field": [1, 2]})
    assert reply.choices[0].message.content


def test_unknown_route_is_404_and_wrong_method_405(server):
    r = httpx.get(server.url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_url"
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405


def test_body_over_max_body_is_413(cli):
    with run_server(cli, "--max-body", "1000") as s:
        body = json.dumps({"model": MODEL_ID, "messages": QUESTION,
                           "padding": "x" * 2000}).encode()
        r = httpx.post(s.url + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"

        # Also without a Content-Length (chunked): the limit is enforced while reading.
        def chunks():
            for i in range(0, len(body), 100):
                yield body[i:i + 100]
        r = httpx.post(s.url + "/v1/completions", content=chunks(), timeout=10)
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"

        # A body under the limit is served.
        reply = client(s).chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                                  max_tokens=2)
        assert reply.choices[0].message.content


def test_api_key_is_required_except_for_health(cli):
    with run_server(cli, "--api-key", "sesame") as s:
        # No key.
        r = httpx.post(s.url + "/v1/chat/completions",
                       json={"messages": QUESTION, "max_tokens": 2}, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(s.url + "/metrics", timeout=10).status_code == 401
        # Wrong key.
        with pytest.raises(openai.AuthenticationError) as raised:
            client(s, api_key="open-barley").chat.completions.create(
                model=MODEL_ID, messages=QUESTION, max_tokens=2)
        assert raised.value.status_code == 401
        assert error_of(raised.value)["code"] == "invalid_api_key"
        # The right key.
        reply = client(s, api_key="sesame").chat.completions.create(
            model=MODEL_ID, messages=QUESTION, max_tokens=2)
        assert reply.choices[0].message.content
        assert metrics_text(s, {"Authorization": "Bearer sesame"})
        # /health needs none.
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_api_key_can_come_from_the_environment(cli):
    with run_server(cli, env={"ETLLM_API_KEY": "from-env"}) as s:
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="other").models.list()
        assert [m.id for m in client(s, api_key="from-env").models.list().data] == [MODEL_ID]


def post_in_threads(url: str, body: dict, n: int, timeout: float):
    """Starts `n` threads that POST `body` to `url` at the same moment; returns the threads
    and the list their responses are appended to."""
    start = threading.Barrier(n)
    results: List[httpx.Response] = []
    lock = threading.Lock()

    def send():
        start.wait()
        r = httpx.post(url, json=body, timeout=timeout)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_full_queue_is_503_with_retry_after(cli):
    with run_server(cli, "--parallel", "1", "--queue", "1") as s:
        body = {"model": MODEL_ID, "prompt": "And", "max_tokens": 200, "ignore_eos": True}
        threads, results = post_in_threads(s.url + "/v1/completions", body, 4, timeout=60)
        for t in threads:
            t.join(60)
        assert len(results) == 4
        statuses = sorted(r.status_code for r in results)
        # One runs and one waits; the others find the queue full.
        assert statuses.count(503) >= 1, statuses
        assert set(statuses) == {200, 503}, statuses
        for r in results:
            if r.status_code == 503:
                assert r.headers.get("retry-after", "").isdigit(), r.headers
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["usage"]["completion_tokens"] == 200
        text = metrics_text(s)
        assert requests_counted(text, "/v1/completions", 503) == statuses.count(503)
        assert requests_counted(text, "/v1/completions", 200) == statuses.count(200)


def test_openai_client_sees_queue_full_as_a_503(cli):
    with run_server(cli, "--parallel", "1", "--queue", "1") as s:
        long = {"model": MODEL_ID, "prompt": "And", "ignore_eos": True}  # To the context end.
        with httpx.stream("POST", s.url + "/v1/completions", json={**long, "stream": True},
                          timeout=60) as running:
            assert running.status_code == 200
            events = sse_events(running)
            next(events)  # The first request is generating now.
            waiting: List[httpx.Response] = []
            waiter = threading.Thread(target=lambda: waiting.append(
                httpx.post(s.url + "/v1/completions", json={**long, "max_tokens": 5},
                           timeout=60)))
            waiter.start()
            deadline = time.monotonic() + 10
            while httpx.get(s.url + "/health", timeout=10).json()["queue_depth"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
            # Both places are taken: a third request is refused.
            with pytest.raises(openai.APIStatusError) as raised:
                client(s).completions.create(model=MODEL_ID, prompt="And", max_tokens=2)
            assert raised.value.status_code == 503
            assert error_of(raised.value)["code"] == "queue_full"
            assert raised.value.response.headers.get("retry-after", "").isdigit()
            assert list(events)[-1] == "[DONE]"
        waiter.join(60)
        assert waiting[0].status_code == 200
        assert waiting[0].json()["usage"]["completion_tokens"] == 5


# --- cancellation --------------------------------------------------------------------------

def test_client_disconnect_mid_stream_cancels_the_generation(cli):
    with run_server(cli) as s:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
                "stream": True, "ignore_eos": True}  # Until the context is full.
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                events = sse_events(r)
                for _ in range(3):
                    assert "choices" in json.loads(next(events))
                health = httpx.get(s.url + "/health", timeout=10).json()
                assert health["slots_busy"] == 1
        # The connection is closed now.
        wait_for_metric(s, "etllm_cancelled_requests_total", lambda v: v >= 1)
        wait_for_metric(s, "etllm_busy_slots", lambda v: v == 0)
        text = metrics_text(s)
        # It stopped early: fewer tokens than the context had room for.
        assert metric(text, "etllm_generated_tokens_total") < CTX - 20
        # And the server still answers.
        reply = client(s).chat.completions.create(model=MODEL_ID, messages=QUESTION,
                                                  max_tokens=3)
        assert reply.choices[0].message.content
        assert httpx.get(s.url + "/health", timeout=10).json()["slots_busy"] == 0


def test_client_giving_up_on_a_non_streamed_request_cancels_it(cli):
    with run_server(cli) as s:
        body = {"model": MODEL_ID, "prompt": "And", "ignore_eos": True}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.1)
        wait_for_metric(s, "etllm_cancelled_requests_total", lambda v: v >= 1)
        wait_for_metric(s, "etllm_busy_slots", lambda v: v == 0)
        assert metric(metrics_text(s), "etllm_generated_tokens_total") < CTX - 20


# --- metrics -------------------------------------------------------------------------------

METRIC_SAMPLES = [
    "etllm_requests_total",
    "etllm_prompt_tokens_total",
    "etllm_cached_prompt_tokens_total",
    "etllm_generated_tokens_total",
    "etllm_cancelled_requests_total",
    "etllm_time_to_first_token_seconds_bucket",
    "etllm_time_to_first_token_seconds_count",
    "etllm_time_per_output_token_seconds_count",
    "etllm_queue_wait_seconds_count",
    "etllm_queue_depth",
    "etllm_busy_slots",
    "etllm_slots",
]


def test_metrics_expose_the_documented_series_and_count_requests(cli):
    with run_server(cli, "--parallel", "2") as s:
        c = client(s)
        c.models.list()
        c.models.list()
        reply = c.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=6,
                                          extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL_ID, messages=QUESTION, n=2)
        assert httpx.get(s.url + "/no/such/route", timeout=10).status_code == 404

        r = httpx.get(s.url + "/metrics", timeout=10)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        text = r.text
        assert text.rstrip().endswith("# EOF")
        sample_names = {line.split("{")[0].split(" ")[0]
                        for line in text.splitlines() if line and not line.startswith("#")}
        for name in METRIC_SAMPLES:
            assert name in sample_names, f"{name} missing from:\n{text}"

        assert requests_counted(text, "/v1/models", 200) == 2
        assert requests_counted(text, "/v1/chat/completions", 200) == 1
        assert requests_counted(text, "/v1/chat/completions", 400) == 1
        assert requests_counted(text, "other", 404) == 1
        assert metric(text, "etllm_prompt_tokens_total") == reply.usage.prompt_tokens
        assert metric(text, "etllm_generated_tokens_total") == 6
        assert metric(text, "etllm_time_to_first_token_seconds_count") == 1
        assert metric(text, "etllm_time_per_output_token_seconds_count") == 1
        assert metric(text, "etllm_queue_wait_seconds_count") == 1
        assert metric(text, "etllm_slots") == 2
        assert metric(text, "etllm_busy_slots") == 0
        assert metric(text, "etllm_queue_depth") == 0
        assert metric(text, "etllm_cancelled_requests_total") == 0
        # The scrape itself is counted once it is answered.
        assert requests_counted(metrics_text(s), "/metrics", 200) == 1


# --- shutdown ------------------------------------------------------------------------------

def stream_through_sigterm(s: ServerProcess) -> List[str]:
    """Starts a long streamed chat, sends SIGTERM after its first chunk and reads on to
    the end; returns the events (the first included)."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r)
            received = [next(events)]
            s.proc.send_signal(signal.SIGTERM)
            try:
                received.extend(events)
            except httpx.TransportError:
                pass  # The server may close the connection: the stream ended.
    return received


def test_sigterm_during_a_stream_lets_it_finish_and_exits_0(cli):
    with run_server(cli, "--shutdown-timeout", "1") as s:
        events = stream_through_sigterm(s)
        assert s.stop(timeout=10) == 0
    last = events[-1]
    if last != "[DONE]":
        # Cancelled at the timeout: the stream ends with an error event.
        assert json.loads(last)["error"]["code"] == "server_shutting_down"
    else:
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_sigterm_with_zero_timeout_cancels_the_stream_and_exits_0(cli):
    with run_server(cli, "--shutdown-timeout", "0") as s:
        events = stream_through_sigterm(s)
        assert s.stop(timeout=10) == 0
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "server_shutting_down"
    assert error["type"] == "server_error"


def test_sigint_stops_an_idle_server_with_exit_0(cli):
    with run_server(cli) as s:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        assert s.stop(signal.SIGINT, timeout=10) == 0


def test_requests_still_running_at_the_shutdown_timeout_get_503(cli):
    with run_server(cli, "--parallel", "1", "--shutdown-timeout", "0") as s:
        body = {"model": MODEL_ID, "prompt": "And", "ignore_eos": True}  # To the context end.
        threads, results = post_in_threads(s.url + "/v1/completions", body, 2, timeout=30)
        # One generates, one waits: then stop the server.
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health", timeout=10).json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert s.stop(timeout=10) == 0
    assert len(results) == 2
    for r in results:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "server_shutting_down"
        assert r.headers.get("retry-after", "").isdigit()


def test_sigterm_with_an_idle_keep_alive_connection_exits_promptly(cli):
    with run_server(cli) as s:
        with httpx.Client(timeout=10) as h:
            # The connection stays open (keep-alive) after this request.
            assert h.post(s.url + "/v1/completions",
                          json={"prompt": "And", "max_tokens": 2}).status_code == 200
            started = time.monotonic()
            assert s.stop(timeout=10) == 0
            # An idle connection does not hold the process for the shutdown timeout (10 s).
            assert time.monotonic() - started < 5


def test_rejected_stream_request_is_a_plain_json_error(server):
    body = {"model": MODEL_ID, "stream": True,
            "messages": [{"role": "user", "content": "word " * 400}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "context_length_exceeded"
