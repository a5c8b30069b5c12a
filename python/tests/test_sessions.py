"""Sessions: conversations of their own over one loaded model, their saved states and prefix
reuse. Every continuation is checked against the eager-PyTorch greedy reference of
tests/fixtures/dyn_xnnpack/reference.json: a session that was set aside, saved, restored (in
the same runner or a freshly loaded one) or rewound must go on exactly as the reference
does."""

from __future__ import annotations

import dataclasses
import gc

import pytest

import etllm
from conftest import TOKENIZER, generated_ids, greedy, model, reference

REF = reference("dyn_xnnpack")
LONG = max(REF["cases"], key=lambda c: len(c["prompt_ids"]))  # the most KV cache to move
THE = REF["cases"][0]
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def open_runner(name: str = "dyn_xnnpack") -> etllm.Runner:
    return etllm.Runner(model(name), TOKENIZER)


def gen(target, prompt, n: int):
    return generated_ids(target, prompt, greedy(n))


@pytest.fixture
def runner():
    with open_runner() as r:
        yield r


def test_interleaved_sessions_give_the_reference(runner):
    a, b = LONG, THE
    with runner.session() as sa, runner.session() as sb:
        got_a = gen(sa, a["prompt_ids"], 3)
        got_b = gen(sb, b["prompt_ids"], 3)
        got_a += gen(sa, [], 3)
        # The runner's own conversation is one more.
        assert gen(runner, a["prompt_ids"], 4) == a["greedy_ids"][:4]
        got_b += gen(sb, [], 3)
        got_a += gen(sa, [], 2)
        assert got_a == a["greedy_ids"][:8]
        assert got_b == b["greedy_ids"][:6]
        assert sa.tokens == a["prompt_ids"] + a["greedy_ids"][:8]
        assert sa.position == len(a["prompt_ids"]) + 8


def test_a_state_saved_mid_prompt_continues_in_another_runner(runner):
    prompt = LONG["prompt_ids"]
    with runner.session() as session:
        stats = session.prefill(prompt[:-1], greedy(1))
        assert stats.num_prompt_tokens == len(prompt) - 1
        state = session.save()
        assert isinstance(state, bytes) and state
        assert gen(session, prompt[-1:], 8) == LONG["greedy_ids"][:8]
        # A freshly loaded model, as another process would have.
        with open_runner() as fresh, fresh.session() as restored:
            assert restored.load(state) == b""
            assert restored.position == len(prompt) - 1
            assert restored.tokens == prompt[:-1]
            assert gen(restored, prompt[-1:], 8) == LONG["greedy_ids"][:8]
        # The first session goes back to where it was saved.
        session.load(bytearray(state))
        assert gen(session, prompt[-1:], 8) == LONG["greedy_ids"][:8]


def test_a_state_file_round_trips_its_user_data(runner, tmp_path):
    path = tmp_path / "chat.state"
    app_data = b"chat\x00\xff{}\n"
    with runner.session() as session:
        first = gen(session, LONG["prompt_ids"], 4)
        assert first == LONG["greedy_ids"][:4]
        session.save_file(path, app_data)
        assert path.read_bytes()  # written in place, no temporary file left beside it
        assert [p.name for p in tmp_path.iterdir()] == ["chat.state"]
        with open_runner() as fresh, fresh.session() as restored:
            assert restored.load_file(str(path)) == app_data
            assert restored.tokens == session.tokens
            assert gen(restored, [], 4) == LONG["greedy_ids"][4:8]
            # The file holds what load() takes.
            assert restored.load(path.read_bytes()) == app_data
            assert gen(restored, [], 4) == LONG["greedy_ids"][4:8]
            before = restored.position
            with pytest.raises(etllm.FileAccessError):
                restored.load_file(tmp_path / "absent.state")
            with pytest.raises(etllm.FileAccessError):
                restored.save_file(tmp_path / "no-such-folder" / "x.state")
            assert restored.position == before


def test_bad_states_raise_invalid_state_error_and_the_session_keeps_its_own(runner):
    assert issubclass(etllm.InvalidStateError, etllm.EtLlmError)
    assert etllm.ERROR_CLASSES[20] is etllm.InvalidStateError
    with open_runner("dyn_portable") as other, other.session() as s:
        gen(s, LONG["prompt_ids"], 2)
        foreign = s.save()
    with runner.session() as session:
        assert gen(session, LONG["prompt_ids"], 3) == LONG["greedy_ids"][:3]
        good = session.save()
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 1
        before = session.tokens
        for what, bad in [
            ("truncated", good[: len(good) // 3]),
            ("one byte short", good[:-1]),
            ("a flipped bit", bytes(flipped)),
            ("not a state", b"hello, world"),
            ("empty", b""),
            ("another model's", foreign),
        ]:
            with pytest.raises(etllm.InvalidStateError) as info:
                session.load(bad)
            assert info.value.status == 20 and info.value.message, what
            assert info.value.status_name == "ETLLM_ERR_INVALID_STATE"
            assert session.tokens == before, what
        assert "another model" in str(info.value)
        assert gen(session, [], 3) == LONG["greedy_ids"][3:6]


def test_reuse_prefix_feeds_only_what_differs(runner):
    # Two reference prompts with the same first tokens, the second one longer.
    a = THE
    b = next(c for c in REF["cases"] if c is not a and c["prompt_ids"][:2] == a["prompt_ids"][:2])
    common = 0
    for x, y in zip(a["prompt_ids"], b["prompt_ids"]):
        if x != y:
            break
        common += 1
    assert len(b["prompt_ids"]) > common >= 2
    reuse = dataclasses.replace(greedy(4), reuse_prefix=True)
    with runner.session() as session:
        out = generated_ids(session, a["prompt_ids"], reuse)
        assert out == a["greedy_ids"][:4]
        assert session.last_stats.reused_prompt_tokens == 0
        # The whole conversation again, with the reply: only its last token is fed.
        history = a["prompt_ids"] + out
        seen = []
        session.generate(history, reuse, None, seen.append)
        assert session.last_stats.num_prompt_tokens == len(history)
        assert session.last_stats.reused_prompt_tokens == len(history) - 1
        assert seen[0].reused_prompt_tokens == len(history) - 1
        assert session.last_stats.to_dict()["reused_prompt_tokens"] == len(history) - 1
        # A prompt that diverges keeps the common prefix only.
        assert generated_ids(session, b["prompt_ids"], reuse) == b["greedy_ids"][:4]
        assert session.last_stats.reused_prompt_tokens == common
        assert session.tokens[: len(b["prompt_ids"])] == b["prompt_ids"]
    # The runner takes it as well, also as a keyword override. The same prompt again
    # feeds its last token again (its logits pick the first new token).
    n = len(a["prompt_ids"])
    runner.reset()
    assert gen(runner, a["prompt_ids"], 2) == a["greedy_ids"][:2]
    runner.generate(a["prompt_ids"], greedy(2), reuse_prefix=True)
    assert runner.last_stats.reused_prompt_tokens == n - 1
    stats = runner.prefill(a["prompt_ids"] + [7], reuse_prefix=True)
    assert stats.reused_prompt_tokens == n and stats.num_prompt_tokens == n + 1
    assert runner.position == n + 1


def test_a_session_outlives_its_runner():
    runner = open_runner()
    sa, sb = runner.session(), runner.session()
    assert gen(sb, LONG["prompt_ids"], 3) == LONG["greedy_ids"][:3]
    runner.close()
    del runner
    gc.collect()
    # From text, BOS added, with the stats callback.
    stats = []
    config = dataclasses.replace(greedy(6), num_bos=1)
    ids = []
    sa.generate(THE["prompt"], config, lambda p: ids.append(p.token_id) if p.token_id is not None else None, stats.append)
    assert ids == THE["greedy_ids"][:6]
    assert stats[0].num_prompt_tokens == len(THE["prompt_ids"])
    assert gen(sb, [], 3) == LONG["greedy_ids"][3:6]
    # States move between them as before.
    sa.load(sb.save())
    sb.close()
    assert gen(sa, [], 3) == LONG["greedy_ids"][6:9]
    sa.close()


def test_a_closed_session_and_wrong_arguments_raise(runner):
    with runner.session() as session:
        with pytest.raises(TypeError):
            session.save("text is not bytes")
        with pytest.raises(TypeError):
            session.load(None)
        with pytest.raises(TypeError):
            session.save_file("x.state", user_data=3)
        with pytest.raises(etllm.InvalidArgumentError):
            session.rewind(5)  # past the (empty) conversation
        with pytest.raises(etllm.InvalidArgumentError):
            session.generate("")  # nothing to continue
        assert session.position == 0 and session.tokens == []
    assert "closed" in repr(session)
    for call in (lambda: session.position, lambda: session.tokens, session.save, session.reset,
                 lambda: session.generate("x")):
        with pytest.raises(ValueError, match="session is closed"):
            call()
    session.close()  # twice is fine


def test_a_call_on_the_same_model_from_a_callback_raises_busy_error(runner):
    with runner.session() as a, runner.session() as b:
        assert gen(b, LONG["prompt_ids"], 2) == LONG["greedy_ids"][:2]
        state = b.save()
        nested, ids = [], []

        def on_token(piece):
            if piece.token_id is None:
                return
            ids.append(piece.token_id)
            if len(ids) == 1:
                for call in (lambda: gen(b, LONG["prompt_ids"], 1), b.save, lambda: b.load(state),
                             lambda: b.rewind(1), lambda: b.prefill([1, 2]),
                             lambda: gen(runner, [1, 2], 1), lambda: gen(a, [], 1)):
                    try:
                        call()
                        nested.append(None)
                    except etllm.EtLlmError as e:
                        nested.append(e)

        a.generate(LONG["prompt_ids"], greedy(5), on_token)
        assert [type(e) for e in nested] == [etllm.BusyError] * 7
        assert ids == LONG["greedy_ids"][:5]
        assert b.position == len(LONG["prompt_ids"]) + 2
        assert gen(b, [], 3) == LONG["greedy_ids"][2:5]
        assert gen(a, [], 3) == LONG["greedy_ids"][5:8]


def test_stop_from_a_callback_stops_that_session_only(runner):
    with runner.session() as session, runner.session() as other:
        got = []

        def stop_at_third(piece):
            if piece.token_id is not None:
                got.append(piece.token_id)
                if len(got) == 3:
                    session.stop()

        session.generate(LONG["prompt_ids"], greedy(10), stop_at_third)
        assert got == LONG["greedy_ids"][:3]
        assert session.last_stats.stop_reason == "stopped"
        assert gen(session, [], 4) == LONG["greedy_ids"][3:7]
        # Another session's stop does not end this one, nor that session's next call.
        got = []

        def stop_the_other(piece):
            if piece.token_id is not None:
                got.append(piece.token_id)
            other.stop()

        session.generate([], greedy(5), stop_the_other)
        assert got == LONG["greedy_ids"][7:12]
        assert session.last_stats.stop_reason == "length"
        assert gen(other, LONG["prompt_ids"], 4) == LONG["greedy_ids"][:4]


def test_stream_on_a_session(runner):
    with runner.session() as session:
        pieces = list(session.stream(LONG["prompt_ids"], greedy(6)))
        assert [p.token_id for p in pieces if p.token_id is not None] == LONG["greedy_ids"][:6]
        assert session.last_stats.num_generated_tokens == 6
        # Leaving the loop early stops the generation; the conversation holds what was made.
        for n, _piece in enumerate(session.stream([], greedy(10)), 1):
            if n == 2:
                break
        assert session.last_stats.stop_reason == "stopped"
        made = 6 + session.last_stats.num_generated_tokens
        assert made < 16
        assert session.tokens == LONG["prompt_ids"] + LONG["greedy_ids"][:made]


def test_prefill_rewind_and_reset(runner):
    prompt = LONG["prompt_ids"]
    with runner.session() as session, runner.session() as other:
        session.prefill(prompt)
        assert session.position == len(prompt)
        assert gen(session, [], 6) == LONG["greedy_ids"][:6]
        gen(other, prompt[:2], 2)  # the rewind brings this session's cache back first
        session.rewind(len(prompt) + 2)
        assert session.tokens == prompt + LONG["greedy_ids"][:2]
        assert gen(session, LONG["greedy_ids"][2:3], 4) == LONG["greedy_ids"][3:7]
        session.reset()
        assert session.position == 0 and session.tokens == []
        assert gen(session, prompt, 5) == LONG["greedy_ids"][:5]


def test_a_conversation_on_a_session_replies_as_one_on_a_runner(runner):
    template = etllm.ChatTemplate(TEMPLATE)
    config = greedy(5)
    on_runner = etllm.Conversation(runner, template, system="Be brief.")
    want = [on_runner.send(m, config) for m in ("Once upon", "a time", "there was")]
    assert on_runner.rewind()
    want_again = on_runner.send("there was", config)
    with runner.session() as session:
        chat = etllm.Conversation(session, template, system="Be brief.")
        pieces = []
        got = [chat.send("Once upon", config, pieces.append)]
        assert "".join(pieces) == got[0]
        position = session.position
        got += [chat.send(m, config) for m in ("a time", "there was")]
        assert got == want
        assert chat.messages == on_runner.messages
        assert session.last_stats.num_generated_tokens == 5
        assert chat.rewind() and chat.rewind()
        assert session.position == position
        assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
        assert chat.send("a time", config) == want[1]
        assert chat.send("there was", config) == want_again
        copy = etllm.Conversation.from_json(runner, on_runner.to_json(), template)
        assert copy.messages == on_runner.messages
        chat.reset()
        assert session.position == 0 and chat.messages == [{"role": "system", "content": "Be brief."}]


def test_a_conversation_resumes_from_a_saved_state_and_its_json(runner):
    template = etllm.ChatTemplate(TEMPLATE)
    config = greedy(5)
    with runner.session() as whole:
        chat = etllm.Conversation(whole, template)
        chat.send("Once upon", config)
        want = chat.send("a time", config)
    # Interrupted after the first turn, resumed in a freshly loaded model.
    with runner.session() as first:
        chat = etllm.Conversation(first, template)
        chat.send("Once upon", config)
        state = first.save(chat.to_json().encode())
    with open_runner() as fresh, fresh.session() as resumed:
        user_data = resumed.load(state)
        chat = etllm.Conversation.from_json(resumed, user_data.decode(), template)
        assert chat.send("a time", config) == want
        assert len(chat.messages) == 4
        with pytest.raises(etllm.InvalidStateError):
            etllm.Conversation.from_json(resumed, "{not json", template)
        # Given no template, a conversation on a session renders with its runner's.
        fresh.set_chat_template(template)
        with fresh.session() as s1, fresh.session() as s2:
            untemplated = etllm.Conversation(s1).send("Once upon", config)
            assert untemplated == etllm.Conversation(s2, template).send("Once upon", config)
