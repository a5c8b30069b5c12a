"""Multimodal prompts (Runner.generate_inputs, Session.generate_inputs, prefill_inputs) on
tests/fixtures/multimodal, a tiny Llava exported by optimum-executorch. Every generation is
checked against the eager-transformers greedy tokens of its reference.json; the decoded
pixels and pixel values fed directly come from transformers' CLIPImageProcessor
(preprocess.json), never from EtLlm."""

from __future__ import annotations

import json
from array import array

import numpy as np
import pytest

import etllm
from conftest import FIXTURES, TOKENIZER

MM = FIXTURES / "multimodal"
MODEL = str(MM / "model.pte")
MM_TOKENIZER = str(MM / "tokenizer.json")
REF = json.loads((MM / "reference.json").read_text())
CASES = {c["name"]: c for c in REF["cases"]}
PRE = json.loads((MM / "preprocess.json").read_text())
RGB = PRE["images"]["rgb.png"]
BAD_IMAGES = ["truncated.png", "corrupt.jpg", "image.tiff", "not_an_image.png"]


def greedy(n: int = 16) -> etllm.GenerationConfig:
    """The reference's settings: greedy, no BOS added (the ids carry it), no echo."""
    return etllm.GenerationConfig(temperature=0.0, max_new_tokens=n, num_bos=0, echo=False)


def case_inputs(case: dict) -> list:
    """The case's inputs: text pieces as their token ids, images as files."""
    return [
        etllm.Tokens(i["token_ids"]) if i["type"] == "text" else etllm.Image(MM / i["file"])
        for i in case["inputs"]
    ]


def with_image(case: dict, image) -> list:
    """The case's inputs with its (only) image replaced by `image`."""
    inputs = case_inputs(case)
    (at,) = [k for k, i in enumerate(case["inputs"]) if i["type"] == "image"]
    inputs[at] = image
    return inputs


def generated(target, inputs, n: int = 16, config=None) -> list:
    ids: list = []
    target.generate_inputs(
        inputs, config or greedy(n), lambda p: ids.append(p.token_id) if p.token_id is not None else None
    )
    return ids


@pytest.fixture
def runner():
    with etllm.Runner(MODEL, MM_TOKENIZER) as r:
        yield r


@pytest.fixture(params=["runner", "session"])
def target(request, runner):
    """The runner's own conversation, or a session of it."""
    if request.param == "runner":
        yield runner
    else:
        with runner.session() as s:
            yield s


@pytest.mark.parametrize("name", ["one_image", "two_images"])
def test_greedy_tokens_match_eager_transformers(target, name):
    case = CASES[name]
    assert generated(target, case_inputs(case)) == case["greedy_ids"]


def test_the_position_counts_one_row_per_image_token(target):
    case = CASES["one_image"]
    generated(target, case_inputs(case))
    assert target.position == case["prompt_len"] + 16


def test_generate_inputs_returns_the_streamed_text_and_sets_the_stats(runner):
    case = CASES["one_image"]
    pieces: list = []
    stats: list = []
    text = runner.generate_inputs(case_inputs(case), greedy(), pieces.append, stats.append)
    assert text == "".join(pieces) and text
    assert [p.token_id for p in pieces if p.token_id is not None] == case["greedy_ids"]
    assert runner.last_stats.num_generated_tokens == 16
    assert runner.last_stats.num_prompt_tokens == case["prompt_len"]
    assert runner.last_stats.stop_reason == "length"
    assert len(stats) == 1 and stats[0].num_generated_tokens == 16


def test_keyword_overrides_apply_to_the_config(runner):
    case = CASES["one_image"]
    ids: list = []
    runner.generate_inputs(
        case_inputs(case),
        token_callback=lambda p: ids.append(p.token_id) if p.token_id is not None else None,
        temperature=0.0, max_new_tokens=5, echo=False,
    )
    assert ids == case["greedy_ids"][:5]


def test_prefill_inputs_then_generate_inputs_continue_like_one_call(target):
    case = CASES["one_image"]
    inputs = case_inputs(case)
    target.prefill_inputs(inputs[:2], greedy(0))
    assert target.position == len(case["inputs"][0]["token_ids"]) + case["inputs"][1]["num_tokens"]
    assert generated(target, inputs[2:]) == case["greedy_ids"]


def test_plain_lists_are_tokens_and_plain_strs_are_text(runner):
    case = CASES["one_image"]
    pieces = case["inputs"]
    # The first piece's text is "<s>USER: ": its "<s>" is the BOS that num_bos = 1 adds.
    first = pieces[0]["text"].removeprefix("<s>")
    assert etllm.Tokenizer(MM_TOKENIZER).encode(pieces[2]["text"]) == pieces[2]["token_ids"]
    inputs = [first, etllm.Image(MM / pieces[1]["file"]), pieces[2]["text"]]
    config = etllm.GenerationConfig(temperature=0.0, max_new_tokens=16, num_bos=1, echo=False)
    assert generated(runner, inputs, config=config) == case["greedy_ids"]
    runner.reset()
    as_lists = [list(pieces[0]["token_ids"]), etllm.Image(MM / pieces[1]["file"]), tuple(pieces[2]["token_ids"])]
    assert generated(runner, as_lists) == case["greedy_ids"]


def test_encoded_image_bytes_give_the_reference_tokens(runner):
    case = CASES["one_image"]
    data = (MM / "images" / "rgb.png").read_bytes()
    assert generated(runner, with_image(case, etllm.Image(data=data))) == case["greedy_ids"]


def test_decoded_pixels_give_the_reference_tokens(runner):
    # Pillow's resize + center crop of rgb.png (32x32 RGB): the processor then only
    # rescales and normalizes, as transformers does.
    case = CASES["one_image"]
    pixels = bytes(RGB["cropped_hwc_uint8"])
    image = etllm.Image(pixels=pixels, width=32, height=32, channels=3)
    assert generated(runner, with_image(case, image)) == case["greedy_ids"]


def test_a_numpy_pixel_array_gives_its_own_shape(runner):
    case = CASES["one_image"]
    pixels = np.array(RGB["cropped_hwc_uint8"], dtype=np.uint8).reshape(32, 32, 3)
    image = etllm.Image(pixels=pixels)
    assert (image.width, image.height, image.channels) == (32, 32, 3)
    assert generated(runner, with_image(case, image)) == case["greedy_ids"]


@pytest.mark.parametrize("as_type", [list, np.array, lambda v: array("f", v)])
def test_pixel_values_as_features_give_the_reference_tokens(runner, as_type):
    case = CASES["one_image"]
    values = as_type(RGB["pixel_values_chw"])
    features = etllm.Features(values, [3, 32, 32])
    assert generated(runner, with_image(case, features)) == case["greedy_ids"]


def test_a_numpy_features_array_gives_its_own_sizes(runner):
    case = CASES["one_image"]
    values = np.array(RGB["pixel_values_chw"], dtype=np.float32).reshape(1, 3, 32, 32)
    features = etllm.Features(values)
    assert features.sizes == [1, 3, 32, 32]
    assert generated(runner, with_image(case, features)) == case["greedy_ids"]


def test_features_of_the_wrong_shape_raise_invalid_argument(runner):
    with pytest.raises(etllm.InvalidArgumentError):
        runner.generate_inputs([etllm.Features([0.0] * 768, [3, 16, 16])], greedy(2))
    assert runner.position == 0


@pytest.mark.parametrize("bad", BAD_IMAGES)
def test_a_bad_image_raises_invalid_media_and_changes_nothing(target, bad):
    generated(target, [etllm.Tokens([1, 55, 53])], 2)
    before = target.position
    with pytest.raises(etllm.InvalidMediaError) as info:
        target.generate_inputs([etllm.Tokens([55]), etllm.Image(MM / "images" / bad)], greedy(4))
    assert info.value.status == 22 and info.value.message
    assert target.position == before
    # Still usable: the reference, from an empty conversation.
    target.reset()
    case = CASES["one_image"]
    assert generated(target, case_inputs(case)) == case["greedy_ids"]


@pytest.mark.parametrize("bad", BAD_IMAGES)
def test_bad_image_bytes_raise_invalid_media(runner, bad):
    data = (MM / "images" / bad).read_bytes()
    with pytest.raises(etllm.InvalidMediaError):
        runner.generate_inputs([etllm.Tokens([1, 55]), etllm.Image(data=data)], greedy(2))
    assert runner.position == 0


def test_a_bad_image_in_prefill_inputs_raises_invalid_media_and_changes_nothing(target):
    with pytest.raises(etllm.InvalidMediaError):
        target.prefill_inputs([etllm.Tokens([1, 55]), etllm.Image(MM / "images" / "truncated.png")])
    assert target.position == 0


def test_pixels_of_the_wrong_length_raise_invalid_argument(runner):
    with pytest.raises(etllm.InvalidArgumentError):
        runner.generate_inputs(
            [etllm.Tokens([1, 55]), etllm.Image(pixels=b"\0" * 10, width=4, height=4, channels=3)],
            greedy(2),
        )
    assert runner.position == 0


def test_a_missing_image_file_raises_file_access_error(runner):
    with pytest.raises(etllm.FileAccessError):
        runner.generate_inputs([etllm.Tokens([1, 55]), etllm.Image(MM / "nope.png")], greedy(2))


def test_an_image_for_a_text_only_model_raises_unsupported_model():
    with etllm.Runner(FIXTURES / "dyn_xnnpack" / "model.pte", TOKENIZER) as text_only:
        with pytest.raises(etllm.UnsupportedModelError) as info:
            text_only.generate_inputs(
                [etllm.Tokens([1, 5]), etllm.Image(MM / "images" / "rgb.png")], greedy(2)
            )
        assert "vision_encoder" in info.value.message
        assert text_only.position == 0
        assert len(generated(text_only, [etllm.Tokens([1, 5])], 3)) == 3


def test_more_image_rows_than_the_context_raise_context_full_and_change_nothing(runner):
    # 8 images of 16 rows each fill 128 positions: with the text, more than the context.
    inputs = [etllm.Tokens([1, 55])] + [etllm.Image(MM / "images" / "rgb.png")] * 8
    with pytest.raises(etllm.ContextFullError):
        runner.generate_inputs(inputs, greedy(4))
    assert runner.position == 0
    case = CASES["one_image"]
    assert generated(runner, case_inputs(case)) == case["greedy_ids"]


def test_audio_for_a_model_without_an_audio_encoder_raises_unsupported_model(runner):
    audio = etllm.Audio(samples=[0.0] * 1600, sample_rate=16000)
    with pytest.raises(etllm.UnsupportedModelError):
        runner.generate_inputs([etllm.Tokens([1, 55]), audio], greedy(2))
    assert runner.position == 0


def test_an_empty_input_list_raises_invalid_argument(runner):
    with pytest.raises(etllm.InvalidArgumentError):
        runner.generate_inputs([], greedy(2))


@pytest.fixture
def bare_model(tmp_path):
    """The model and tokenizer copied to a folder without a preprocessor_config.json."""
    for name in ("model.pte", "tokenizer.json"):
        (tmp_path / name).write_bytes((MM / name).read_bytes())
    return tmp_path


def test_without_image_processor_settings_an_image_raises_unsupported_model(bare_model):
    with etllm.Runner(bare_model / "model.pte", bare_model / "tokenizer.json") as r:
        with pytest.raises(etllm.UnsupportedModelError) as info:
            r.generate_inputs([etllm.Tokens([1, 55]), etllm.Image(MM / "images" / "rgb.png")], greedy(2))
        assert "preprocessor_config" in info.value.message
        assert r.position == 0


def test_preprocessor_config_given_explicitly_is_used(bare_model):
    case = CASES["one_image"]
    with etllm.Runner(
        bare_model / "model.pte", bare_model / "tokenizer.json",
        preprocessor_config=MM / "preprocessor_config.json",
    ) as r:
        assert generated(r, case_inputs(case)) == case["greedy_ids"]


def test_preprocessor_config_for_a_text_only_model_raises_invalid_argument():
    with pytest.raises(etllm.InvalidArgumentError):
        etllm.Runner(
            FIXTURES / "dyn_xnnpack" / "model.pte", TOKENIZER,
            preprocessor_config=MM / "preprocessor_config.json",
        )


def test_invalid_media_error_is_status_22():
    assert etllm.ERROR_CLASSES[22] is etllm.InvalidMediaError
    assert etllm.status_name(22) == "ETLLM_ERR_INVALID_MEDIA"
    assert issubclass(etllm.InvalidMediaError, etllm.EtLlmError)


def test_input_objects_check_their_arguments():
    with pytest.raises(ValueError):
        etllm.Image(MM / "images" / "rgb.png", data=b"x")
    with pytest.raises(ValueError):
        etllm.Image()
    with pytest.raises(ValueError):
        etllm.Image(pixels=b"\0" * 12)  # no width and height
    with pytest.raises(TypeError):
        etllm.Image(pixels=np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        etllm.Audio(samples=[0.0, 0.1])  # no sample_rate
    with pytest.raises(ValueError):
        etllm.Tokens([-1])
    with pytest.raises(TypeError):
        etllm.Text(b"bytes")
    with pytest.raises(ValueError):
        etllm.Features([0.0, 1.0])  # no sizes


def test_an_input_list_refuses_what_is_not_an_input(runner):
    with pytest.raises(TypeError):
        runner.generate_inputs("a bare str", greedy(2))
    with pytest.raises(TypeError):
        runner.generate_inputs([3.5], greedy(2))
    assert runner.position == 0
