"""etllm.Server: the OpenAI-compatible server started from Python, in this process, over a
Runner's model (the C API's etllm_server_*), asked with the official openai client."""

from __future__ import annotations

import openai
import pytest

import etllm
from conftest import TOKENIZER, model, reference


@pytest.fixture(scope="module")
def runner() -> etllm.Runner:
    return etllm.Runner(model("dyn_xnnpack"), str(TOKENIZER))


def test_greedy_completion_of_token_ids_is_the_reference(runner: etllm.Runner) -> None:
    case = reference("dyn_xnnpack")["cases"][0]
    n = 6
    want = etllm.Tokenizer(str(TOKENIZER)).decode(case["greedy_ids"][:n])
    with etllm.Server(runner, port=0, model_name="tiny") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        done = client.completions.create(
            model="tiny", prompt=case["prompt_ids"], max_tokens=n, temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert done.choices[0].text == want
    assert done.usage.completion_tokens == n
    assert done.choices[0].finish_reason == "length"


def test_api_key_is_required(runner: etllm.Runner) -> None:
    with etllm.Server(runner, port=0, api_key="s3cret") as server:
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="other", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert len(right.models.list().data) == 1


def test_port_in_use_is_server_error(runner: etllm.Runner) -> None:
    with etllm.Server(runner, port=0) as first:
        with pytest.raises(etllm.ServerError, match="cannot listen"):
            etllm.Server(runner, port=first.port)


def test_bad_options_are_errors(runner: etllm.Runner) -> None:
    with pytest.raises(etllm.InvalidArgumentError):
        etllm.Server(runner, port=0, parallel=0)
    with pytest.raises(ValueError):
        etllm.Server(runner, port=70000)


def test_stop_then_close_and_use_after_close(runner: etllm.Runner) -> None:
    server = etllm.Server(runner, port=0)
    assert server.port > 0
    server.stop()
    server.stop()
    server.close()
    server.close()
    with pytest.raises(ValueError, match="closed"):
        server.port
