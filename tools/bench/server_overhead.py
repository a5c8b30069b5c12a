#!/usr/bin/env python3
"""Per-request overhead of `etllm serve`: one request at a time over a kept-alive HTTP
connection, against `etllm generate`'s in-process inference time on the same model, prompt
and settings, interleaved in the same run. Standard library only (http.client).

    python3 tools/bench/server_overhead.py --cli target/release/etllm \\
        --model /work/bench-models/s15m_v32k/model.pte \\
        --tokenizer /work/bench-models/tokenizers/sp_32k/tokenizer.model \\
        [--prompt-tokens 100,400] [--max-tokens 64] [--rounds 7] [--threads N] \\
        [--no-warmup] [--nodelay-shim] [--json]

Without --model the built-in demo model is used (context 256: use --prompt-tokens 100).

The server. One `etllm serve --port 0 --quiet` (--parallel 1, the default) for the whole
run, started first; one warm-up request. Its requests are POST /v1/completions with
{"prompt": P, "max_tokens": N, "temperature": 0, "ignore_eos": true}, on one
http.client connection kept alive (TCP_NODELAY on the client's side), timed with
time.perf_counter from before the request is written to the last byte of the response
(non-streamed) or to `data: [DONE]` (streamed, with stream_options.include_usage; TTFT is
to the first chunk whose text is not empty).

The baseline. `etllm generate --model M --tokenizer T --prompt P --max-new-tokens N
--temperature 0 --ignore-eos --json --warmup` (--warmup: a short generation first, so the
timed one pays no first-call costs; the server's requests are warm too). Its stats line
gives the in-process times, process start and model load excluded: inference =
inference_end - inference_start (tokenizing the prompt included), TTFT = first_token -
inference_start, decode tokens/s = (generated - 1) / (inference_end - first_token).

Prompts. For each --prompt-tokens value, a text of English-like words whose length (BOS
included, as the server counts it) is fitted to the value by asking the server
(max_tokens 1, before anything is timed). Round r uses two fresh variants of it, each
starting with its own word, so no earlier request shares a prefix with it beyond BOS:
P for the non-streamed requests and Q for the streamed ones. Each round runs, in an order
that alternates between rounds (server first, then CLI first):
  - server, non-streamed, P (cold: the slot holds another prompt), then P again (warm:
    the slot holds P and its answer; usage.prompt_tokens_details.cached_tokens > 0);
  - server, streamed, Q cold, then Q warm;
  - CLI on P and on Q.
Every server answer must equal the CLI's text on the same prompt (temperature 0), with
completion_tokens == N; a mismatch is printed and makes the exit status 1 (the timings are
still reported). The server's own numbers come from its /metrics, read before and after
each request (outside the timed span): its TTFT (arrival to first token, queue included),
its queue wait and its mean time per output token.

Reported per prompt length, medians over the rounds: total ms, TTFT ms, decode tokens/s,
the ratio server / CLI inference (total and TTFT; ratios are medians of the per-round
ratios) and the absolute overhead (server total - CLI inference time, per round, median).
Warm rows compare with the same cold CLI runs: the CLI has no warm equivalent in one
process, and the difference there is mostly the prefill the server skipped.
--nodelay-shim starts the server with LD_PRELOAD of a small shim (its C source is below;
built with `cc` into a temporary folder) that sets TCP_NODELAY on every socket the server
accepts. `etllm serve` does not set it (axum::serve does not by default), so a streamed
request's first chunk, written while the response headers' segment still waits for the
client's delayed ACK (40 ms on Linux), is held back by Nagle's algorithm until that ACK:
the shim shows what the streamed TTFT is without that.

Results: docs/performance.md, section 12.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]

WORDS = (
    "the a of and to in that it was he his with for as on but at by from they all which one "
    "had there when were said would what so up out if about who them then she into time "
    "could no more other some like these two her him has see now way people may first any "
    "new work great where after back little only years most very even through long found "
    "king land house water river mountain city children light morning evening field stone "
    "garden bread wine sheep tree gold silver road ship sea wind fire cloud voice word "
    "heart hand eye door table window letter number system value market story music"
).split()

# The first word of each variant: all distinct, so two variants share no prefix but BOS.
LEADS = (
    "Amber Birch Cedar Dawn Ember Fern Glade Harbor Iris Juniper Kestrel Lantern Meadow "
    "Nectar Orchid Pebble Quarry Raven Saffron Thistle Umber Velvet Willow Xenon Yarrow "
    "Zephyr Anchor Beacon Canyon Delta Falcon Granite Hollow Indigo Jasper Kelp Lagoon "
    "Marble Nimbus Onyx Prism Quartz Ridge Summit Tundra Valley Walnut Yonder Zinc"
).split()


# ----------------------------------------------------------------------------- server

NODELAY_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
static void nodelay(int fd) {
    if (fd >= 0) { int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); }
}
int accept4(int s, struct sockaddr *a, socklen_t *l, int f) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = dlsym(RTLD_NEXT, "accept4");
    int fd = real(s, a, l, f); nodelay(fd); return fd;
}
int accept(int s, struct sockaddr *a, socklen_t *l) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = dlsym(RTLD_NEXT, "accept");
    int fd = real(s, a, l); nodelay(fd); return fd;
}
"""


def build_nodelay_shim(folder: str) -> str:
    src, lib = Path(folder) / "nodelay.c", Path(folder) / "nodelay.so"
    src.write_text(NODELAY_SHIM_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], check=True)
    return str(lib)


class Server:
    """An `etllm serve --port 0 --quiet` child; stop() sends SIGTERM."""

    def __init__(self, args: List[str], ready_timeout: float = 300.0,
                 preload: Optional[str] = None):
        self.stderr = tempfile.TemporaryFile()
        self.args = args
        env = None
        if preload:
            env = dict(os.environ, LD_PRELOAD=preload)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env)
        line: List[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(ready_timeout)
        match = re.match(r"listening on http://(\S+):(\d+)", line[0]) if line else None
        if not match:
            self.stop()
            self.stderr.seek(0)
            raise RuntimeError(f"{' '.join(args)} did not start: stdout {line!r}, stderr "
                               f"{self.stderr.read().decode(errors='replace')[-2000:]!r}")
        self.host, self.port = match.group(1), int(match.group(2))

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Client:
    """One kept-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conn: Optional[http.client.HTTPConnection] = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.conn

    def complete(self, prompt: str, max_tokens: int, stream: bool) -> Dict:
        """One /v1/completions request; returns text, usage, total_s, ttft_s (streamed)."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        conn = self._connection()
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=data, headers=headers)
        resp = conn.getresponse()
        if not stream:
            raw = resp.read()
            t1 = time.perf_counter()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {raw[:500]!r}")
            obj = json.loads(raw)
            return {"text": obj["choices"][0]["text"], "usage": obj["usage"],
                    "finish_reason": obj["choices"][0]["finish_reason"],
                    "total_s": t1 - t0, "ttft_s": None}
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft = None
        parts: List[str] = []
        usage = None
        finish = None
        done = False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            obj = json.loads(payload)
            for choice in obj.get("choices") or []:
                text = choice.get("text") or ""
                if text and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if obj.get("usage"):
                usage = obj["usage"]
        t1 = time.perf_counter()
        rest = resp.read()  # the end of the chunked body, so the connection can be reused
        if not done or rest.strip():
            raise RuntimeError(f"stream did not end with [DONE] alone (after it: {rest[:200]!r})")
        return {"text": "".join(parts), "usage": usage, "finish_reason": finish,
                "total_s": t1 - t0, "ttft_s": ttft}

    def metrics(self) -> Dict[str, float]:
        conn = self._connection()
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        raw = resp.read().decode()
        out: Dict[str, float] = {}
        for line in raw.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            if name.endswith(("_sum", "_count")) and "{" not in name:
                out[name] = float(value)
        return out


def metric_delta(before: Dict[str, float], after: Dict[str, float], base: str) -> Optional[float]:
    """The mean of histogram `base` over the samples added between two /metrics reads."""
    count = after.get(base + "_count", 0) - before.get(base + "_count", 0)
    if count <= 0:
        return None
    return (after.get(base + "_sum", 0) - before.get(base + "_sum", 0)) / count


def find_metric(metrics: Dict[str, float], word: str) -> Optional[str]:
    for name in metrics:
        if word in name and name.endswith("_count"):
            return name[: -len("_count")]
    return None


# ----------------------------------------------------------------------------- CLI


def cli_generate(cli: str, extra: List[str], prompt: str, max_tokens: int,
                 warmup: bool) -> Dict:
    args = [cli, "generate", *extra, "--prompt", prompt, "--max-new-tokens", str(max_tokens),
            "--temperature", "0", "--ignore-eos", "--json"]
    if warmup:
        args.append("--warmup")
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... failed: {out.stderr[-2000:]}")
    parts: List[str] = []
    stats = None
    for line in out.stdout.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "stats" in obj:
            stats = obj["stats"]
        elif obj.get("text") is not None:
            parts.append(obj["text"])
    if stats is None:
        raise RuntimeError("no stats line from etllm generate")
    ms = lambda k: stats[k + "_ms"]  # noqa: E731
    gen = stats["generated_tokens"]
    decode_s = (ms("inference_end") - ms("first_token")) / 1000
    return {"text": "".join(parts), "prompt_tokens": stats["prompt_tokens"],
            "generated_tokens": gen,
            "total_s": (ms("inference_end") - ms("inference_start")) / 1000,
            "ttft_s": (ms("first_token") - ms("inference_start")) / 1000,
            "prefill_s": (ms("prompt_eval_end") - ms("token_encode_end")) / 1000,
            "decode_tps": (gen - 1) / decode_s if gen > 1 and decode_s > 0 else float("nan"),
            "process_wall_s": wall}


# ----------------------------------------------------------------------------- prompts


def base_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words: List[str] = []
    while len(words) < n_words:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        sentence[0] = sentence[0].capitalize()
        words.extend(sentence[:-1])
        words.append(sentence[-1] + ".")
    return " ".join(words[:n_words])


def variant(base: str, k: int) -> str:
    return f"{LEADS[k % len(LEADS)]} {base}"


def fit_prompt(client: Client, target: int, seed: int) -> Tuple[str, int]:
    """A base text whose variants are about `target` tokens (BOS included) on this server."""
    def count(n: int) -> int:
        r = client.complete(variant(base_text(n, seed), 0), 1, False)
        return r["usage"]["prompt_tokens"]
    lo, hi = 1, max(2, target)
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while lo < hi:  # smallest word count reaching the target
        mid = (lo + hi) // 2
        if count(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return base_text(lo, seed), count(lo)


# ----------------------------------------------------------------------------- main


def median(xs: List[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cli", default=str(REPO / "target/release/etllm"))
    ap.add_argument("--model")
    ap.add_argument("--tokenizer")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prompt-tokens", default="100,400")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-warmup", action="store_true",
                    help="run `etllm generate` without --warmup")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nodelay-shim", action="store_true",
                    help="run the server with TCP_NODELAY set on its accepted sockets "
                         "(LD_PRELOAD shim, needs cc)")
    ap.add_argument("--json", action="store_true", help="also print the raw samples as JSON")
    a = ap.parse_args()

    extra: List[str] = []
    if a.model:
        extra += ["--model", a.model]
    if a.tokenizer:
        extra += ["--tokenizer", a.tokenizer]
    if a.threads:
        extra += ["--threads", str(a.threads)]
    targets = [int(x) for x in a.prompt_tokens.split(",") if x.strip()]
    N = a.max_tokens

    shim_dir = tempfile.TemporaryDirectory() if a.nodelay_shim else None
    preload = build_nodelay_shim(shim_dir.name) if shim_dir else None
    server = Server([a.cli, "serve", *extra, "--port", "0", "--quiet"], preload=preload)
    failures: List[str] = []
    results: Dict[int, Dict] = {}
    try:
        client = Client(server.host, server.port)
        client.complete("Warm up.", 8, False)
        client.complete("Warm up, streamed.", 8, True)
        m0 = client.metrics()
        ttft_metric = find_metric(m0, "time_to_first_token")
        queue_metric = find_metric(m0, "queue_wait")
        tpot_metric = find_metric(m0, "time_per_output_token")

        lead = 1
        for ti, target in enumerate(targets):
            base, fitted = fit_prompt(client, target, a.seed + ti)
            print(f"# prompt ~{target} tokens: fitted {fitted} ({len(base)} chars)",
                  file=sys.stderr)
            rows: Dict[str, List[Dict]] = {k: [] for k in
                                           ("whole_cold", "whole_warm", "stream_cold",
                                            "stream_warm", "cli")}

            def timed(prompt: str, stream: bool) -> Tuple[Dict, Dict, Dict]:
                """One server request with the metrics read before and after it."""
                before = client.metrics()
                r = client.complete(prompt, N, stream)
                return r, before, client.metrics()

            def record(kind: str, r: Dict, before: Dict, after: Dict, ref: str, rnd: int) -> None:
                """Adds the server's own timings to `r`, checks its text against the CLI's
                and keeps it."""
                r["server_ttft_s"] = metric_delta(before, after, ttft_metric) if ttft_metric else None
                r["server_queue_s"] = metric_delta(before, after, queue_metric) if queue_metric else None
                r["server_tpot_s"] = metric_delta(before, after, tpot_metric) if tpot_metric else None
                r["round"] = rnd
                if r["text"] != ref or r["usage"]["completion_tokens"] != N:
                    msg = (f"MISMATCH prompt~{target} round {rnd} {kind}: server "
                           f"{r['text']!r} ({r['usage']['completion_tokens']} tokens) != CLI "
                           f"{ref!r}")
                    print(msg, file=sys.stderr)
                    failures.append(msg)
                rows[kind].append(r)

            for rnd in range(a.rounds):
                P, Q = variant(base, lead), variant(base, lead + 1)
                lead += 2
                cli_first = rnd % 2 == 1
                clis: Dict[str, Dict] = {}
                if cli_first:
                    for key, prompt in (("P", P), ("Q", Q)):
                        clis[key] = cli_generate(a.cli, extra, prompt, N, not a.no_warmup)
                # The references: the CLI's texts (a first, untimed server pass would
                # otherwise be needed; when the server goes first, check afterwards).
                pending: List[Tuple] = []
                for kind, prompt, stream, key in (("whole_cold", P, False, "P"),
                                                  ("whole_warm", P, False, "P"),
                                                  ("stream_cold", Q, True, "Q"),
                                                  ("stream_warm", Q, True, "Q")):
                    r, before, after = timed(prompt, stream)
                    if cli_first:
                        record(kind, r, before, after, clis[key]["text"], rnd)
                    else:
                        pending.append((kind, key, r, before, after))
                if not cli_first:
                    for key, prompt in (("P", P), ("Q", Q)):
                        clis[key] = cli_generate(a.cli, extra, prompt, N, not a.no_warmup)
                    for kind, key, r, before, after in pending:
                        record(kind, r, before, after, clis[key]["text"], rnd)
                for key in ("P", "Q"):
                    clis[key]["round"] = rnd
                    clis[key]["which"] = key
                    rows["cli"].append(clis[key])
                print(f"#   round {rnd + 1}/{a.rounds}: whole cold "
                      f"{rows['whole_cold'][-1]['total_s'] * 1e3:.1f} ms, CLI "
                      f"{clis['P']['total_s'] * 1e3:.1f} ms", file=sys.stderr)
            results[target] = rows
    finally:
        server.stop()
    print_report(a, results, failures)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "max_tokens": N, "results":
                          {str(k): v for k, v in results.items()}, "failures": failures}))
    return 1 if failures else 0


def print_report(a, results: Dict[int, Dict], failures: List[str]) -> None:
    N = a.max_tokens
    shim = ", server with the TCP_NODELAY shim" if a.nodelay_shim else ""
    print(f"\nmax_tokens {N}, {a.rounds} rounds{shim}, medians (ratios and overheads: medians of "
          f"the per-round values)\n")
    print("| prompt tokens (cached) | request | total ms | TTFT ms | decode tok/s | "
          "CLI inference ms | CLI TTFT ms | CLI decode tok/s | total ratio | TTFT ratio | "
          "overhead ms | server's own TTFT / queue wait / TPOT ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for target, rows in results.items():
        clis = rows["cli"]
        cli_by = {(c["round"], c["which"]): c for c in clis}
        for kind, label in (("whole_cold", "whole, cold"), ("whole_warm", "whole, warm"),
                            ("stream_cold", "streamed, cold"), ("stream_warm", "streamed, warm")):
            rs = rows[kind]
            key = "P" if kind.startswith("whole") else "Q"
            refs = [cli_by[(r["round"], key)] for r in rs]
            prompt_tokens = median([r["usage"]["prompt_tokens"] for r in rs])
            cached = median([(r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                             for r in rs])
            total = median([r["total_s"] * 1e3 for r in rs])
            ttft = median([r["ttft_s"] * 1e3 for r in rs if r["ttft_s"] is not None])
            if kind.startswith("stream"):
                tps = median([(N - 1) / (r["total_s"] - r["ttft_s"]) for r in rs
                              if r["ttft_s"] is not None and N > 1])
                ttft_ratio = median([r["ttft_s"] / c["ttft_s"] for r, c in zip(rs, refs)
                                     if r["ttft_s"] is not None])
                ttft_s, ttft_ratio_s = f"{ttft:.1f}", f"{ttft_ratio:.2f}x"
            else:
                tps = float("nan")
                ttft_s, ttft_ratio_s = "—", "—"
            cli_total = median([c["total_s"] * 1e3 for c in refs])
            cli_ttft = median([c["ttft_s"] * 1e3 for c in refs])
            cli_tps = median([c["decode_tps"] for c in refs])
            ratio = median([r["total_s"] / c["total_s"] for r, c in zip(rs, refs)])
            overhead = median([(r["total_s"] - c["total_s"]) * 1e3 for r, c in zip(rs, refs)])
            own = [median([r[k] * 1e3 for r in rs if r.get(k) is not None])
                   for k in ("server_ttft_s", "server_queue_s", "server_tpot_s")]
            fmt = lambda x, f: format(x, f) if x == x else "—"  # noqa: E731 (NaN: —)
            tps_s = fmt(tps, ".0f")
            print(f"| {prompt_tokens:.0f} ({cached:.0f}) | {label} | {total:.1f} | {ttft_s} | "
                  f"{tps_s} | {cli_total:.1f} | {cli_ttft:.1f} | {fmt(cli_tps, '.0f')} | {ratio:.2f}x | "
                  f"{ttft_ratio_s} | {overhead:+.1f} | {fmt(own[0], '.1f')} / "
                  f"{fmt(own[1], '.2f')} / {fmt(own[2], '.2f')} |")
    print()
    for target, rows in results.items():
        warm = [r for k in ("whole_warm", "stream_warm") for r in rows[k]]
        if warm and all(not (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                        for r in warm):
            print(f"note: no warm request of ~{target} tokens had cached tokens: the server "
                  f"did not reuse the slot's prefix (the warm rows are cold too)")
    if failures:
        print(f"{len(failures)} MISMATCHES (see above)")
    else:
        print("every server answer equal to the CLI's on the same prompt")


if __name__ == "__main__":
    sys.exit(main())
