"""Speech to text (etllm.AsrRunner) on tests/fixtures/whisper, a tiny Whisper exported by
optimum-executorch. Transcriptions are checked against the eager-transformers greedy tokens
and text of its reference.json; the samples and log-mel features fed directly are the
fixture's (soundfile and transformers' WhisperFeatureExtractor), never EtLlm's."""

from __future__ import annotations

import json
import threading
from array import array

import numpy as np
import pytest

import etllm
from conftest import FIXTURES, TOKENIZER

WHISPER = FIXTURES / "whisper"
MODEL = str(WHISPER / "model.pte")
W_TOKENIZER = str(WHISPER / "tokenizer.json")
REF = json.loads((WHISPER / "reference.json").read_text())
N = REF["greedy_max_new_tokens"]
CASES = {(c["audio"], c["prompt"]): c for c in REF["cases"]}
BAD_WAVS = [name for name, a in REF["audio"].items() if not a["valid"]]
GOOD_WAVS = [name for name, a in REF["audio"].items() if a["valid"]]
STANDARD = "sot_en_transcribe_notimestamps"
SPEECH = "audio/speech16k.wav"


def f32(name: str) -> array:
    """A raw little-endian float32 file of the fixture."""
    values = array("f")
    values.frombytes((WHISPER / name).read_bytes())
    return values


def prompt_kwargs(case: dict) -> dict:
    """The case's decoder prompt: the standard one is language "en" (start, <|en|>,
    <|transcribe|>, <|notimestamps|>); any other is given whole."""
    if case["prompt"] == STANDARD:
        return {"language": "en"}
    return {"decoder_prompt": case["prompt_ids"]}


def expected_tokens(case: dict) -> list:
    """The reference's greedy ids without the end-of-text token (transcribe leaves it out)."""
    ids = list(case["greedy_ids"])
    if case["stopped_on_eos"]:
        assert ids[-1] == REF["eos_token_id"]
        ids.pop()
    return ids


@pytest.fixture(scope="module")
def asr():
    with etllm.AsrRunner(MODEL, W_TOKENIZER) as a:
        yield a


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0].split('/')[-1]}-{k[1]}")
def test_transcribed_tokens_match_eager_transformers(asr, key):
    case = CASES[key]
    t = asr.transcribe(WHISPER / case["audio"], max_new_tokens=N, **prompt_kwargs(case))
    assert t.tokens == expected_tokens(case)


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0].split('/')[-1]}-{k[1]}")
def test_transcribed_text_matches_eager_transformers(asr, key):
    case = CASES[key]
    t = asr.transcribe(WHISPER / case["audio"], max_new_tokens=N, **prompt_kwargs(case))
    assert t.text == case["text"]


def test_an_end_of_text_token_stops_with_eos_and_is_left_out(asr):
    case = CASES[("audio/stereo16k.wav", STANDARD)]
    assert case["stopped_on_eos"]
    t = asr.transcribe(WHISPER / case["audio"], language="en", max_new_tokens=N)
    assert t.stats.stop_reason == "eos"
    assert REF["eos_token_id"] not in t.tokens
    assert t.stats.num_generated_tokens == len(case["greedy_ids"]) - 1


def test_max_new_tokens_ends_with_length(asr):
    case = CASES[(SPEECH, STANDARD)]
    t = asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=5)
    assert t.tokens == case["greedy_ids"][:5]
    assert t.stats.stop_reason == "length"


def test_the_stats_count_the_encoder_output_as_the_prompt(asr):
    t = asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=3)
    assert t.stats.num_prompt_tokens == 1500  # encoder f32[1, 1500, 64]
    assert t.stats.num_generated_tokens == 3
    assert t.stats.prompt_eval_end_us >= t.stats.inference_start_us > 0


def test_a_path_string_and_an_audio_file_input_are_the_same(asr):
    case = CASES[(SPEECH, STANDARD)]
    a = asr.transcribe(str(WHISPER / SPEECH), language="en", max_new_tokens=N)
    b = asr.transcribe(etllm.Audio(WHISPER / SPEECH), language="en", max_new_tokens=N)
    assert a.tokens == b.tokens == case["greedy_ids"]


@pytest.mark.parametrize("as_type", [lambda v: v, list, np.array])
def test_samples_give_the_reference_tokens(asr, as_type):
    # The samples soundfile decoded from speech16k.wav, as the reference saw them.
    case = CASES[(SPEECH, STANDARD)]
    samples = as_type(f32("speech16k.samples.f32"))
    t = asr.transcribe(etllm.Audio(samples=samples, sample_rate=16000), language="en", max_new_tokens=N)
    assert t.tokens == case["greedy_ids"]


def test_stereo_downmixed_samples_give_the_reference_tokens(asr):
    case = CASES[("audio/stereo16k.wav", STANDARD)]
    samples = f32("stereo16k.mono.f32")
    t = asr.transcribe(etllm.Audio(samples=samples, sample_rate=16000), language="en", max_new_tokens=N)
    assert t.tokens == expected_tokens(case)


def test_log_mel_features_give_the_reference_tokens(asr):
    # The features transformers' WhisperFeatureExtractor made (the reference's own input).
    case = CASES[(SPEECH, STANDARD)]
    features = etllm.Features(f32("speech16k.mel_call.f32"), [80, 3000])
    t = asr.transcribe(features, language="en", max_new_tokens=N)
    assert t.tokens == case["greedy_ids"]


def test_features_of_the_wrong_size_raise_invalid_argument(asr):
    with pytest.raises(etllm.InvalidArgumentError):
        asr.transcribe(etllm.Features([0.0] * 800, [80, 10]), language="en")


@pytest.mark.parametrize("bad", BAD_WAVS)
def test_a_bad_wav_raises_invalid_media_and_the_runner_stays_usable(asr, bad):
    with pytest.raises(etllm.InvalidMediaError) as info:
        asr.transcribe(WHISPER / "audio" / bad, language="en")
    assert info.value.status == 22 and info.value.message
    case = CASES[(SPEECH, STANDARD)]
    assert asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N).tokens == case["greedy_ids"]


@pytest.mark.parametrize("good", GOOD_WAVS)
def test_every_valid_wav_layout_is_read(asr, good):
    t = asr.transcribe(WHISPER / "audio" / good, language="en", max_new_tokens=2)
    assert t.stats.num_prompt_tokens == 1500
    assert t.stats.num_generated_tokens >= 1


def test_a_missing_wav_raises_file_access_error(asr):
    with pytest.raises(etllm.FileAccessError):
        asr.transcribe(WHISPER / "audio" / "nope.wav", language="en")


def test_the_token_callback_streams_the_text(asr):
    case = CASES[(SPEECH, STANDARD)]
    pieces: list = []
    t = asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N, token_callback=pieces.append)
    assert "".join(pieces) == t.text == case["text"]
    assert [p.token_id for p in pieces] == case["greedy_ids"][: len(pieces)]


def test_special_tokens_are_kept_in_the_tokens_but_not_streamed(asr):
    case = CASES[(SPEECH, "sot_only")]
    assert REF["special_tokens"]["<|fr|>"] in case["greedy_ids"]
    pieces: list = []
    t = asr.transcribe(
        WHISPER / SPEECH, decoder_prompt=case["prompt_ids"], max_new_tokens=N, token_callback=pieces.append
    )
    assert REF["special_tokens"]["<|fr|>"] in t.tokens
    assert REF["special_tokens"]["<|fr|>"] not in [p.token_id for p in pieces]


def test_returning_true_from_the_token_callback_stops(asr):
    case = CASES[(SPEECH, STANDARD)]
    pieces: list = []

    def on_piece(p):
        pieces.append(p)
        return len(pieces) == 3

    t = asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N, token_callback=on_piece)
    assert t.stats.stop_reason == "callback"
    assert t.tokens == case["greedy_ids"][:3]


def test_an_exception_in_the_token_callback_is_raised_and_the_runner_stays_usable(asr):
    def boom(_piece):
        raise RuntimeError("from the callback")

    with pytest.raises(RuntimeError, match="from the callback"):
        asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N, token_callback=boom)
    case = CASES[(SPEECH, STANDARD)]
    assert asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N).tokens == case["greedy_ids"]


def test_stop_ends_a_running_transcription_and_the_next_one_runs_whole(asr):
    case = CASES[(SPEECH, STANDARD)]
    seen: list = []

    def on_piece(p):
        seen.append(p)
        if len(seen) == 2:
            # From another thread, as a UI would.
            t = threading.Thread(target=asr.stop)
            t.start()
            t.join()

    t = asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N, token_callback=on_piece)
    assert t.stats.stop_reason == "stopped"
    assert t.tokens == case["greedy_ids"][:2]
    assert asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N).tokens == case["greedy_ids"]


def test_a_call_from_inside_the_callback_raises_busy(asr):
    errors: list = []

    def on_piece(_p):
        try:
            asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=1)
        except etllm.BusyError as e:
            errors.append(e)
        return True

    asr.transcribe(WHISPER / SPEECH, language="en", max_new_tokens=N, token_callback=on_piece)
    assert len(errors) == 1


def test_an_unknown_language_raises_invalid_argument(asr):
    with pytest.raises(etllm.InvalidArgumentError):
        asr.transcribe(WHISPER / SPEECH, language="xx")


def test_an_empty_decoder_prompt_raises_invalid_argument(asr):
    with pytest.raises(etllm.InvalidArgumentError):
        asr.transcribe(WHISPER / SPEECH, decoder_prompt=[])


def test_a_decoder_only_model_raises_unsupported_model():
    with pytest.raises(etllm.UnsupportedModelError):
        etllm.AsrRunner(FIXTURES / "dyn_xnnpack" / "model.pte", TOKENIZER)


def test_a_whisper_model_given_to_runner_raises_unsupported_model():
    with pytest.raises(etllm.UnsupportedModelError):
        etllm.Runner(MODEL, W_TOKENIZER)


def test_audio_of_another_type_is_refused(asr):
    with pytest.raises(TypeError):
        asr.transcribe(etllm.Image(WHISPER / SPEECH))
    with pytest.raises(TypeError):
        asr.transcribe(3)


def test_a_closed_runner_raises_value_error():
    a = etllm.AsrRunner(MODEL, W_TOKENIZER)
    a.close()
    a.close()  # twice is fine
    with pytest.raises(ValueError):
        a.transcribe(WHISPER / SPEECH)
