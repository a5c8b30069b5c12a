#!/usr/bin/env python3
"""Load test and benchmark for `etllm serve`: concurrent multi-turn chat clients on the
official `openai` package's AsyncOpenAI, every answer checked against its single-client one.

    python3 -m venv /root/load-venv && /root/load-venv/bin/pip install openai
    /root/load-venv/bin/python tools/bench/server_load.py --cli target/release/etllm \\
        --clients 4,8 --requests 50 --parallel-values 1,4,8 --repeat 5 [--json] \\
        [--max-tokens 24] [--turns 4] [--mode chat|completions] [--stream alternate] \\
        [--model M.pte --tokenizer T.json] [--threads N] [--url http://127.0.0.1:8080]

The workload. Each client runs its requests one after another as conversations of --turns
turns: turn k resends the whole history (earlier user turns and the assistant's replies)
plus a new user turn, so a slot that still holds the conversation prefills only the new
turn. Requests alternate between streaming and not (--stream), with temperature 0,
ignore_eos and a fixed --max-tokens, so every answer has a known length. The user turns are
fixed pseudo-random sentences (--seed); the assistant turns of the history are the
single-client answers, so the script is the same whichever server answers it. Every
conversation is distinct (--distinct N draws the conversations from a pool of N instead,
which makes the reference pass shorter).

The reference. Before the load, every distinct request is sent once, sequentially and not
streamed, to a fresh `--parallel 1` server (with --url: to that server, before the load):
its answer is the single-client answer. With temperature 0 the answer must not depend on
the slot, the cache state or streaming, so every loaded response must carry exactly that
text, the same prompt_tokens, finish_reason "length" and completion_tokens == --max-tokens;
a stream must start with the assistant role, end with a finish_reason chunk, the usage chunk
and `data: [DONE]`, and hold nothing after it. Errors (any exception or non-2xx status:
the client is made with max_retries=0, so nothing is retried away) and mismatches make the
exit status non-zero. After each run the server's /metrics counters (prompt, cached and
generated tokens) must equal the sums of the responses' usage.

The measurement. For each --clients value, each --parallel-values value and each of
--repeat rounds, a fresh server (the measured servers are started with --quiet) gets one
warm-up request, then all clients start at once; the rounds alternate the order of the
parallel values (1,4 then 4,1 ...). Reported per cell, as medians over the rounds:
requests/s and generated tokens/s over the load's wall time, latency p50/p99 (request sent
to the last byte), time to first token p50/p99 (streamed requests: to the first chunk with
content), and the cached share (sum of usage.prompt_tokens_details.cached_tokens over sum of
prompt_tokens). The "ideal" cached share is the reference pass's: one client, each
conversation's turns back to back. The ratio rows divide each later parallel value's results
by the first's in the same round, and give the median of those ratios over the rounds.

Chat template: the servers this script starts get --chat-template compact (default), the
one-line template of the Rust tests (`<user>...<assistant>...`), written to a temporary
file: the demo model has no template of its own, and the built-in Llama 3 template spends
~80 of its 256 context tokens on one user message. --chat-template model keeps the model's
own, PATH passes a file.

`python/tests/test_server_load.py` runs this through its functions (Server, server_args,
build_workload, reference_answers, run_load). Results: docs/performance.md, section 12.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]

# The compact template of the Rust tests (tests/common/mod.rs, COMPACT_TEMPLATE).
COMPACT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

NAMES = [
    "Moses", "Aaron", "David", "Solomon", "Abraham", "Isaac", "Jacob", "Joseph", "Samuel",
    "Elijah", "Ruth", "Esther", "Daniel", "Noah", "Joshua", "Gideon", "Saul", "Jonathan",
    "Samson", "Deborah", "Miriam", "Nathan", "Elisha", "Jeremiah",
]
SENTENCES = [
    "Tell me of {a}.",
    "What did {a} say unto {b}?",
    "Where did {a} go after {b} died?",
    "Why was {a} afraid of {b}?",
    "Who was the father of {a}?",
    "How did {a} answer the LORD?",
    "What became of {a} and {b}?",
    "Speak of the house of {a}.",
    "And what of {b}?",
    "Did {a} keep the commandments?",
    "Which city did {a} build?",
    "Go on, and say what {b} did next.",
]


# ----------------------------------------------------------------------------- servers


def find_cli(given: Optional[str] = None) -> str:
    """The etllm binary: --cli, else ETLLM_CLI, else target/release/etllm, else PATH."""
    for candidate in (given, os.environ.get("ETLLM_CLI"), REPO / "target" / "release" / "etllm",
                      shutil.which("etllm")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise SystemExit("no etllm binary: give --cli PATH (or set ETLLM_CLI)")


class Server:
    """An `etllm serve --port 0` child process; `stop()` sends SIGTERM and returns the
    exit status."""

    def __init__(self, cli: str, parallel: int, extra: Sequence[str] = (), quiet: bool = True,
                 ready_timeout: float = 120.0):
        self.parallel = parallel
        self.stderr = tempfile.TemporaryFile()
        args = [cli, "serve", "--port", "0", "--parallel", str(parallel), *extra]
        if quiet:
            args.append("--quiet")
        self.args = args
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        line: List[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(ready_timeout)
        match = re.match(r"listening on (http://\S+)", line[0]) if line else None
        if not match:
            self.kill()
            raise RuntimeError(f"{' '.join(args)} did not start: stdout {line!r}, "
                               f"stderr {self.stderr_text()[-2000:]!r}")
        self.url = match.group(1)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status (killed after `timeout`: then -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.stderr.close()


def server_args(model: Optional[str], tokenizer: Optional[str], threads: Optional[int],
                chat_template: str, workdir: Path) -> List[str]:
    """The `etllm serve` options (but --port, --parallel, --quiet) for the servers started."""
    extra: List[str] = []
    if model:
        extra += ["--model", model]
    if tokenizer:
        extra += ["--tokenizer", tokenizer]
    if threads:
        extra += ["--threads", str(threads)]
    if chat_template == "compact":
        path = workdir / "compact.jinja"
        path.write_text(COMPACT_TEMPLATE)
        extra += ["--chat-template", str(path)]
    elif chat_template != "model":
        extra += ["--chat-template", chat_template]
    return extra


# ----------------------------------------------------------------------------- workload


@dataclasses.dataclass(frozen=True)
class Step:
    """One request of a client: turn `turn` of conversation `script`."""
    script: int
    turn: int
    stream: bool


@dataclasses.dataclass
class Workload:
    clients: int
    requests: int  # per client
    turns: int
    max_tokens: int
    mode: str  # "chat" or "completions"
    steps: List[List[Step]]  # per client
    user_turns: Dict[int, List[str]]  # script -> its user turns

    def distinct(self) -> Dict[int, int]:
        """script -> how many of its turns the load uses."""
        used: Dict[int, int] = {}
        for client in self.steps:
            for s in client:
                used[s.script] = max(used.get(s.script, 0), s.turn + 1)
        return used


def user_turns(seed: int, scripts: int, turns: int) -> Dict[int, List[str]]:
    """Each script's user turns; first turns are distinct, so are conversations."""
    out: Dict[int, List[str]] = {}
    seen = set()
    for script in range(scripts):
        rng = random.Random(f"{seed}:{script}")
        while True:
            texts = []
            for _ in range(turns):
                a, b = rng.sample(NAMES, 2)
                texts.append(rng.choice(SENTENCES).format(a=a, b=b))
            if texts[0] not in seen:
                break
        seen.add(texts[0])
        out[script] = texts
    return out


def build_workload(clients: int, requests: int, turns: int = 4, max_tokens: int = 24,
                   stream: str = "alternate", mode: str = "chat", distinct: int = 0,
                   seed: int = 0, scripts_per_client: Optional[int] = None) -> Workload:
    """Client c's j-th conversation is script c * S + j (S = conversations a client runs;
    give scripts_per_client to share numbering between workloads), or with `distinct` N,
    script (c + j * clients) % N. Request i of a client is streamed when (c + i) is odd
    ("alternate"), always ("always") or never ("never")."""
    per_client = math.ceil(requests / turns)
    stride = scripts_per_client or per_client
    steps: List[List[Step]] = []
    for c in range(clients):
        mine = []
        for i in range(requests):
            j, k = divmod(i, turns)
            script = (c + j * clients) % distinct if distinct else c * stride + j
            streamed = {"alternate": (c + i) % 2 == 1, "always": True, "never": False}[stream]
            mine.append(Step(script, k, streamed))
        steps.append(mine)
    scripts = distinct if distinct else clients * stride
    return Workload(clients, requests, turns, max_tokens, mode, steps,
                    user_turns(seed, scripts, turns))


def render_compact(messages: List[dict]) -> str:
    """The compact template's text, for --mode completions (the prompt is the transcript)."""
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def messages_for(workload: Workload, answers: Dict[Tuple[int, int], "Answer"], script: int,
                 turn: int) -> List[dict]:
    """The conversation up to the user's turn `turn`, with the reference answers as the
    assistant's earlier turns."""
    messages = []
    for k in range(turn + 1):
        messages.append({"role": "user", "content": workload.user_turns[script][k]})
        if k < turn:
            messages.append({"role": "assistant", "content": answers[(script, k)].text})
    return messages


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass
class Answer:
    """What one request got back."""
    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    latency: float = 0.0
    ttft: Optional[float] = None  # streamed requests: to the first chunk with content
    problems: List[str] = dataclasses.field(default_factory=list)  # incomplete/malformed
    error: Optional[str] = None  # exception or status

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems


def make_client(url: str, timeout: float):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=os.environ.get(
        "ETLLM_API_KEY", "none"), max_retries=0, timeout=timeout)


def _usage(answer: Answer, usage) -> None:
    if usage is None:
        answer.problems.append("no usage")
        return
    answer.prompt_tokens = usage.prompt_tokens
    answer.completion_tokens = usage.completion_tokens
    details = usage.prompt_tokens_details
    answer.cached_tokens = details.cached_tokens if details is not None else None
    if answer.cached_tokens is None:
        answer.problems.append("no usage.prompt_tokens_details.cached_tokens")


async def _sse_events(response):
    """The data fields of a server-sent event stream, as raw strings."""
    data: List[str] = []
    async for line in response.iter_lines():
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])
        elif line.startswith(":"):
            continue  # comment / keep-alive
    if data:
        yield "\n".join(data)


async def send(client, mode: str, messages: List[dict], max_tokens: int, stream: bool,
               model: str = "etllm") -> Answer:
    """One request through the SDK. Streams are read event by event (the SDK's own types
    parse each chunk) so that `[DONE]` and what follows it can be checked."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk

    answer = Answer()
    params = dict(model=model, max_tokens=max_tokens, temperature=0,
                  extra_body={"ignore_eos": True})
    if mode == "chat":
        params["messages"] = messages
        api = client.chat.completions
    else:
        params["prompt"] = render_compact(messages)
        api = client.completions
    start = time.perf_counter()
    try:
        if not stream:
            result = await api.create(**params)
            answer.latency = time.perf_counter() - start
            if len(result.choices) != 1:
                answer.problems.append(f"{len(result.choices)} choices")
            else:
                choice = result.choices[0]
                answer.text = (choice.message.content if mode == "chat" else choice.text) or ""
                answer.finish_reason = choice.finish_reason
            _usage(answer, result.usage)
            return answer
        chunk_type = ChatCompletionChunk if mode == "chat" else Completion
        parts: List[str] = []
        ids = set()
        saw_role = finished = done = False
        usage = None
        async with api.with_streaming_response.create(
                stream=True, stream_options={"include_usage": True}, **params) as response:
            async for data in _sse_events(response):
                now = time.perf_counter()
                if done:
                    answer.problems.append(f"data after [DONE]: {data[:80]!r}")
                    continue
                if data == "[DONE]":
                    done = True
                    continue
                body = json.loads(data)
                if "error" in body:
                    answer.error = f"error event in the stream: {body['error']}"
                    continue
                # Chat chunks are validated against the SDK's type. The SDK has no type of
                # its own for completion chunks (it reads them as Completion, whose
                # finish_reason cannot be null, without validating): built the same way.
                chunk = (chunk_type.model_validate(body) if mode == "chat"
                         else chunk_type.construct(**body))
                ids.add(chunk.id)
                if chunk.usage is not None:
                    if chunk.choices:
                        answer.problems.append("usage chunk with choices")
                    if usage is not None:
                        answer.problems.append("two usage chunks")
                    usage = chunk.usage
                    continue
                if len(chunk.choices) != 1:
                    answer.problems.append(f"chunk with {len(chunk.choices)} choices")
                    continue
                choice = chunk.choices[0]
                if finished:
                    answer.problems.append("chunk after the finish_reason chunk")
                if mode == "chat":
                    if choice.delta.role == "assistant":
                        saw_role = True
                    piece = choice.delta.content or ""
                else:
                    piece = choice.text or ""
                if piece:
                    if answer.ttft is None:
                        answer.ttft = now - start
                    parts.append(piece)
                if choice.finish_reason is not None:
                    finished = True
                    answer.finish_reason = choice.finish_reason
        answer.latency = time.perf_counter() - start
        answer.text = "".join(parts)
        if not done:
            answer.problems.append("the stream ended without [DONE]")
        if not finished:
            answer.problems.append("no chunk with a finish_reason")
        if mode == "chat" and not saw_role:
            answer.problems.append("no chunk with the assistant role")
        if len(ids) > 1:
            answer.problems.append(f"{len(ids)} different chunk ids")
        _usage(answer, usage)
    except Exception as e:  # noqa: BLE001 - every failure is counted, by type
        answer.latency = time.perf_counter() - start
        status = getattr(e, "status_code", None)
        answer.error = f"{type(e).__name__}{f' {status}' if status else ''}: {e}"
    return answer


def check_complete(answer: Answer, max_tokens: int) -> List[str]:
    """What makes an answer incomplete (besides the stream checks made while reading)."""
    problems = []
    if answer.finish_reason != "length":
        problems.append(f"finish_reason {answer.finish_reason!r}, expected 'length'")
    if answer.completion_tokens != max_tokens:
        problems.append(f"completion_tokens {answer.completion_tokens}, expected {max_tokens}")
    if (answer.cached_tokens is not None and answer.prompt_tokens is not None
            and not 0 <= answer.cached_tokens <= answer.prompt_tokens):
        problems.append(f"cached_tokens {answer.cached_tokens} outside 0..{answer.prompt_tokens}")
    return problems


# ----------------------------------------------------------------------------- metrics


def scrape_metrics(url: str) -> Dict[str, float]:
    """The server's /metrics samples, by name with labels."""
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/metrics")
    key = os.environ.get("ETLLM_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            pass
    return samples


COUNTERS = {
    "prompt_tokens": "etllm_prompt_tokens_total",
    "cached_tokens": "etllm_cached_prompt_tokens_total",
    "completion_tokens": "etllm_generated_tokens_total",
}


# ----------------------------------------------------------------------------- phases


async def _reference(url: str, workload: Workload, timeout: float) -> Dict[Tuple[int, int], Answer]:
    client = make_client(url, timeout)
    answers: Dict[Tuple[int, int], Answer] = {}
    try:
        for script, turns in sorted(workload.distinct().items()):
            for turn in range(turns):
                messages = messages_for(workload, answers, script, turn)
                answer = await send(client, workload.mode, messages, workload.max_tokens, False)
                problems = ([answer.error] if answer.error else []) + answer.problems + \
                    check_complete(answer, workload.max_tokens)
                if problems:
                    raise RuntimeError(f"reference request (conversation {script}, turn {turn}) "
                                       f"failed: {problems}; messages {messages}")
                answers[(script, turn)] = answer
    finally:
        await client.close()
    return answers


def reference_answers(url: str, workload: Workload,
                      timeout: float = 120.0) -> Dict[Tuple[int, int], Answer]:
    """Every distinct request's single-client answer, one request at a time, each
    conversation's turns in order (the assistant turns of its history are the answers)."""
    return asyncio.run(_reference(url, workload, timeout))


@dataclasses.dataclass
class Record:
    client: int
    step: Step
    answer: Answer
    mismatch: Optional[str] = None


async def _load(url: str, workload: Workload, answers: Dict[Tuple[int, int], Answer],
                timeout: float) -> Tuple[List[Record], float]:
    clients = [make_client(url, timeout) for _ in range(workload.clients)]
    records: List[Record] = []

    async def run_client(c: int) -> None:
        for step in workload.steps[c]:
            messages = messages_for(workload, answers, step.script, step.turn)
            answer = await send(clients[c], workload.mode, messages, workload.max_tokens,
                                step.stream)
            record = Record(c, step, answer)
            if answer.error is None:
                answer.problems += check_complete(answer, workload.max_tokens)
                expected = answers[(step.script, step.turn)]
                if answer.text != expected.text:
                    record.mismatch = f"text {answer.text!r}, expected {expected.text!r}"
                elif answer.prompt_tokens != expected.prompt_tokens:
                    record.mismatch = (f"prompt_tokens {answer.prompt_tokens}, expected "
                                       f"{expected.prompt_tokens}")
            records.append(record)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(run_client(c) for c in range(workload.clients)))
    finally:
        wall = time.perf_counter() - start
        for client in clients:
            await client.close()
    return records, wall


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(records: List[Record], wall: float) -> dict:
    """Counts, throughput, latency and TTFT percentiles (ms) and the cached share."""
    ok = [r for r in records if r.answer.error is None]
    errors = [r for r in records if r.answer.error is not None]
    incomplete = [r for r in ok if r.answer.problems]
    mismatches = [r for r in ok if r.mismatch]
    latencies = [r.answer.latency * 1e3 for r in ok]
    ttfts = [r.answer.ttft * 1e3 for r in ok if r.step.stream and r.answer.ttft is not None]
    prompt = sum(r.answer.prompt_tokens or 0 for r in ok)
    cached = sum(r.answer.cached_tokens or 0 for r in ok)
    generated = sum(r.answer.completion_tokens or 0 for r in ok)
    return {
        "requests": len(records),
        "streamed": sum(r.step.stream for r in records),
        "errors": len(errors),
        "incomplete": len(incomplete),
        "mismatches": len(mismatches),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None,
        "tokens_per_s": generated / wall if wall else None,
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p99_ms": percentile(latencies, 99),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": generated,
        "cached_share": cached / prompt if prompt else None,
        "examples": [
            {"client": r.client, "conversation": r.step.script, "turn": r.step.turn,
             "stream": r.step.stream, "error": r.answer.error, "problems": r.answer.problems,
             "mismatch": r.mismatch}
            for r in (errors + incomplete + mismatches)[:10]
        ],
    }


def run_load(url: str, workload: Workload, answers: Dict[Tuple[int, int], Answer],
             timeout: float = 120.0, check_metrics: bool = True) -> dict:
    """Runs every client at once against `url`; returns summarize()'s dict plus
    "records", and with check_metrics the server's counter deltas ("metrics") and any
    disagreement with the responses' usage ("metrics_mismatch")."""
    before = scrape_metrics(url) if check_metrics else None
    records, wall = asyncio.run(_load(url, workload, answers, timeout))
    result = summarize(records, wall)
    result["records"] = records
    if check_metrics:
        after = scrape_metrics(url)
        delta = {k: after.get(v, 0) - before.get(v, 0) for k, v in COUNTERS.items()}
        for name in ("time_to_first_token", "queue_wait", "time_per_output_token"):
            s = f"etllm_{name}_seconds_sum"
            n = f"etllm_{name}_seconds_count"
            count = after.get(n, 0) - before.get(n, 0)
            delta[f"server_{name}_mean_ms"] = (
                (after.get(s, 0) - before.get(s, 0)) / count * 1e3 if count else None)
        result["metrics"] = delta
        result["metrics_mismatch"] = [
            f"{k}: /metrics {int(delta[k])}, responses {result[k]}"
            for k in COUNTERS if result["errors"] == 0 and int(delta[k]) != result[k]
        ]
    return result


def warm_up(url: str, mode: str, timeout: float = 120.0) -> None:
    """One short request, outside the measurement."""
    async def go():
        client = make_client(url, timeout)
        try:
            answer = await send(client, mode, [{"role": "user", "content": "Warm up."}], 2, False)
        finally:
            await client.close()
        if answer.error:
            raise RuntimeError(f"warm-up request failed: {answer.error}")
    asyncio.run(go())


# ----------------------------------------------------------------------------- report


def fmt(value, digits=1, pct=False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{value * 100:.{digits}f}%"
    return f"{value:.{digits}f}"


def cell_medians(runs: List[dict]) -> dict:
    keys = ["requests_per_s", "tokens_per_s", "latency_p50_ms", "latency_p99_ms",
            "ttft_p50_ms", "ttft_p99_ms", "cached_share"]
    out = {}
    for k in keys:
        values = [r[k] for r in runs if r[k] is not None]
        out[k] = statistics.median(values) if values else None
    for k in ("requests", "errors", "incomplete", "mismatches"):
        out[k] = sum(r[k] for r in runs)
    out["metrics_mismatch"] = sum(len(r.get("metrics_mismatch") or []) for r in runs)
    out["runs"] = len(runs)
    return out


RATIO_KEYS = ["requests_per_s", "tokens_per_s", "latency_p50_ms", "latency_p99_ms",
              "ttft_p50_ms", "ttft_p99_ms"]


def paired_ratios(runs: Dict[Tuple[int, int], List[dict]],
                  parallel_values: List[int]) -> Dict[Tuple[int, int], dict]:
    """For each later parallel value, the median over rounds of its value divided by the
    first parallel value's in the same round (the runs of a round are close in time, so
    the machine's drift between rounds cancels)."""
    out = {}
    for (clients, p), mine in runs.items():
        if p == parallel_values[0]:
            continue
        base = {r["round"]: r for r in runs.get((clients, parallel_values[0]), [])}
        ratios = {}
        for k in RATIO_KEYS:
            values = [r[k] / base[r["round"]][k] for r in mine
                      if r["round"] in base and r[k] is not None and base[r["round"]][k]]
            ratios[k] = statistics.median(values) if values else None
        out[(clients, p)] = ratios
    return out


def markdown(cells: Dict[Tuple[int, int], dict], ideal: Dict[int, Optional[float]],
             parallel_values: List[int], ratios: Dict[Tuple[int, int], dict]) -> str:
    lines = [
        "| clients | --parallel | requests | errors | mismatches or incomplete | req/s | tok/s | latency p50 / p99, ms "
        "| TTFT p50 / p99, ms | cached share (ideal) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for clients in sorted({c for c, _ in cells}):
        for p in parallel_values:
            m = cells.get((clients, p))
            if m is None:
                continue
            bad = m["mismatches"] + m["incomplete"]
            lines.append(
                f"| {clients} | {p} | {m['requests']} | {m['errors']} | {bad} | "
                f"{fmt(m['requests_per_s'], 2)} | {fmt(m['tokens_per_s'], 0)} | "
                f"{fmt(m['latency_p50_ms'], 0)} / {fmt(m['latency_p99_ms'], 0)} | "
                f"{fmt(m['ttft_p50_ms'], 0)} / {fmt(m['ttft_p99_ms'], 0)} | "
                f"{fmt(m['cached_share'], 1, pct=True)} ({fmt(ideal.get(clients), 1, pct=True)}) |")
        for p in parallel_values[1:]:
            paired = ratios.get((clients, p))
            if not paired:
                continue

            def ratio(k):
                return f"{paired[k]:.2f}x" if paired[k] is not None else "-"
            lines.append(
                f"| {clients} | {p} / {parallel_values[0]} | | | | "
                f"**{ratio('requests_per_s')}** | {ratio('tokens_per_s')} | "
                f"{ratio('latency_p50_ms')} / {ratio('latency_p99_ms')} | "
                f"{ratio('ttft_p50_ms')} / {ratio('ttft_p99_ms')} | |")
    return "\n".join(lines)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", help="the etllm binary (default: $ETLLM_CLI, target/release/etllm)")
    ap.add_argument("--url", help="an existing server instead of starting one (--parallel-values "
                    "is then only a label; the reference pass runs on it, before the load)")
    ap.add_argument("--model", help="--model for the servers started (default: the demo model)")
    ap.add_argument("--tokenizer", help="--tokenizer for the servers started")
    ap.add_argument("--threads", type=int, help="--threads for the servers started")
    ap.add_argument("--chat-template", default="compact",
                    help="compact (default), model (the model's own) or a file")
    ap.add_argument("--clients", default="8", help="concurrent clients; a comma list runs each")
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--mode", choices=["chat", "completions"], default="chat",
                    help="chat: /v1/chat/completions with messages; completions: "
                    "/v1/completions with the compact transcript as the prompt")
    ap.add_argument("--stream", choices=["alternate", "always", "never"], default="alternate")
    ap.add_argument("--distinct", type=int, default=0,
                    help="draw conversations from a pool of N (default: all distinct)")
    ap.add_argument("--parallel-values", default="1,4")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, alternating the order")
    ap.add_argument("--seed", type=int, default=0, help="for the user turns")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the servers started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    client_values = [int(x) for x in args.clients.split(",")]
    parallel_values = [int(x) for x in args.parallel_values.split(",")]
    per_client = math.ceil(args.requests / args.turns)
    workloads = {c: build_workload(c, args.requests, args.turns, args.max_tokens, args.stream,
                                   args.mode, args.distinct, args.seed, per_client)
                 for c in client_values}
    # One reference pass covers every workload: client c's conversations have the same
    # numbers whatever the client count (with --distinct, the pool is shared).
    union = build_workload(max(client_values), args.requests, args.turns, args.max_tokens,
                           args.stream, args.mode, args.distinct, args.seed, per_client)
    started = time.perf_counter()
    failed = False
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"},
                    "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        extra = server_args(args.model, args.tokenizer, args.threads, args.chat_template,
                            Path(tmp))
        cli = None if args.url else find_cli(args.cli)
        result["config"]["cli"] = cli
        result["config"]["server_args"] = extra

        def fresh(parallel: int, quiet: bool = True) -> Server:
            return Server(cli, parallel, extra, quiet=quiet)

        # Reference answers.
        t0 = time.perf_counter()
        if args.url:
            answers = reference_answers(args.url, union, args.timeout)
        else:
            with fresh(1) as server:
                answers = reference_answers(server.url, union, args.timeout)
                rc = server.stop()
                if rc != 0:
                    log(f"reference server exited with {rc}: {server.stderr_text()[-2000:]}")
                    failed = True
        ideal: Dict[int, Optional[float]] = {}
        for c, w in workloads.items():
            keys = {(s.script, s.turn) for client in w.steps for s in client}
            prompt = sum(answers[k].prompt_tokens for k in keys)
            ideal[c] = sum(answers[k].cached_tokens for k in keys) / prompt if prompt else None
        log(f"reference: {len(answers)} distinct requests in {time.perf_counter() - t0:.1f} s; "
            f"prompt tokens {min(a.prompt_tokens for a in answers.values())}-"
            f"{max(a.prompt_tokens for a in answers.values())}")

        runs: Dict[Tuple[int, int], List[dict]] = {}
        for rep in range(args.repeat):
            order = parallel_values if rep % 2 == 0 else parallel_values[::-1]
            for clients in client_values:
                for p in order:
                    load_before = os.getloadavg()[0]
                    if args.url:
                        run = run_load(args.url, workloads[clients], answers, args.timeout)
                        rc = 0
                    else:
                        with fresh(p) as server:
                            warm_up(server.url, args.mode, args.timeout)
                            run = run_load(server.url, workloads[clients], answers, args.timeout)
                            rc = server.stop()
                            run["server_exit"] = rc
                            if rc != 0:
                                run["server_stderr"] = server.stderr_text()[-2000:]
                    records = run.pop("records")
                    # The 1-minute load average before and after: other work on the machine.
                    run["loadavg"] = [load_before, os.getloadavg()[0]]
                    run.update(clients=clients, parallel=p, round=rep)
                    runs.setdefault((clients, p), []).append(run)
                    result["runs"].append(run)
                    bad = (run["errors"] or run["mismatches"] or run["incomplete"]
                           or run["metrics_mismatch"] or rc != 0)
                    failed |= bool(bad)
                    log(f"round {rep} clients {clients} parallel {p}: {run['requests']} requests, "
                        f"{run['errors']} errors, {run['incomplete']} incomplete, "
                        f"{run['mismatches']} mismatches, {run['requests_per_s']:.2f} req/s, "
                        f"cached {fmt(run['cached_share'], 1, pct=True)}"
                        + (f", /metrics: {run['metrics_mismatch']}" if run["metrics_mismatch"] else "")
                        + (f", server exit {rc}" if rc else ""))
                    for example in run["examples"]:
                        log("  ", json.dumps(example))
                    del records
    cells = {k: cell_medians(v) for k, v in runs.items()}
    ratios = paired_ratios(runs, parallel_values)
    result["cells"] = [{"clients": c, "parallel": p, **m} for (c, p), m in sorted(cells.items())]
    result["ratios"] = [{"clients": c, "parallel": p, "vs_parallel": parallel_values[0], **m}
                        for (c, p), m in sorted(ratios.items())]
    result["ideal_cached_share"] = ideal
    result["total_s"] = time.perf_counter() - started
    result["ok"] = not failed
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(cells, ideal, parallel_values, ratios))
        print(f"\n{'OK' if not failed else 'FAILED'}: medians of {args.repeat} round(s) (requests, "
              f"errors, mismatches: totals); "
              f"{args.mode}, {args.turns}-turn conversations, max_tokens {args.max_tokens}, "
              f"{args.requests} requests per client; {result['total_s']:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
