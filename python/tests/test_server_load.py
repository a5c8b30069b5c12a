"""`etllm serve` under load: 8 concurrent chat clients x 50 requests against --parallel 4,
every answer equal to its single-client one and complete.

Runs tools/bench/server_load.py through its functions with the built-in demo model (the
CLI from ETLLM_CLI, as the other CLI tests). Needs the `openai` package (tools/test-python.sh
installs it). Nothing here is timed: speed is measured by the benchmark (docs/performance.md,
section 12), not asserted.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import openai  # noqa: F401  (the load script's client; fail here, not later, without it)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "bench"))
import server_load  # noqa: E402

CLIENTS = 8
REQUESTS = 50  # per client
TURNS = 4
MAX_TOKENS = 8
PARALLEL = 4


def test_eight_clients_get_their_single_client_answers(cli):
    workload = server_load.build_workload(CLIENTS, REQUESTS, turns=TURNS, max_tokens=MAX_TOKENS)
    streamed = sum(step.stream for steps in workload.steps for step in steps)
    assert 0 < streamed < CLIENTS * REQUESTS, "the load mixes streamed and whole answers"
    with tempfile.TemporaryDirectory() as tmp:
        extra = server_load.server_args(None, None, None, "compact", Path(tmp))

        # The reference: every distinct request alone, in conversation order, on a fresh
        # single-slot server. Each conversation's history carries these answers.
        with server_load.Server(cli, 1, extra) as server:
            answers = server_load.reference_answers(server.url, workload, timeout=60)
            assert server.stop() == 0, server.stderr_text()
        assert len(answers) == CLIENTS * REQUESTS  # every conversation is distinct
        assert all(a.completion_tokens == MAX_TOKENS for a in answers.values())

        with server_load.Server(cli, PARALLEL, extra) as server:
            result = server_load.run_load(server.url, workload, answers, timeout=60)
            status = server.stop()
            stderr = server.stderr_text()

    records = result.pop("records")
    assert len(records) == CLIENTS * REQUESTS
    assert result["errors"] == 0, result["examples"]
    assert result["incomplete"] == 0, result["examples"]
    assert result["mismatches"] == 0, result["examples"]
    for record in records:
        answer = record.answer
        assert answer.finish_reason == "length"
        assert answer.completion_tokens == MAX_TOKENS
        assert answer.text == answers[(record.step.script, record.step.turn)].text
        assert 0 <= answer.cached_tokens <= answer.prompt_tokens
        if record.step.stream:
            assert answer.ttft is not None  # a chunk with content came before [DONE]
    assert result["completion_tokens"] == CLIENTS * REQUESTS * MAX_TOKENS
    # The server's counters agree with the responses' usage.
    assert result["metrics_mismatch"] == [], result["metrics"]
    assert status == 0, stderr
