#!/usr/bin/env python3
"""Side-by-side benchmark: EtLlm's `etllm generate` against upstream ExecuTorch's
TextLLMRunner (its Python binding, C++ runner underneath), on the same .pte and tokenizer,
every measurement in a fresh process.

    cargo build --release --bin etllm
    /root/etllm-export-venv/bin/python tools/bench/make_scale_fixtures.py      # the models
    nice -n -5 python3 tools/bench/vs_upstream.py --rounds 3 --tokens 128 --threads 1 \\
        [--pairs s15m_v32k,s15m_v128k,s15m_v152k] [--big] [--modes greedy,sampled] \\
        [--json results.json] [--md results.md]

The parent runs under any Python 3; the upstream side runs in the export venv
(--upstream-python, default /root/etllm-export-venv/bin/python), as
`python vs_upstream.py --upstream-child SPEC` (see upstream_child()).

Matrix (each flag takes a comma-separated list): --pairs MODEL[:TOKENIZER] (the folders
make_scale_fixtures.py writes under --root, default /work/bench-models; TOKENIZER is one of
the names in the model's info.json, default its first; --big adds qwen05b_v152k), --modes
greedy (temperature 0) / sampled (temperature 0.8, top-p 0.9: upstream's top-p is fixed
at 0.9), --threads (1,2), --tokens (128,1000). The prompt is PROMPT below: 30 tokens with the
128k and 152k tokenizers (31 with the BOS), 36 with sp_32k, 38 with hf_32k (the table
reports both sides' counts), after one BOS: `--bos 1` for EtLlm, num_bos=1 for upstream (upstream's HF
tokenizer adds its BOS through the tokenizer.json's TemplateProcessing, which
make_scale_fixtures.py writes; a prompt-token count that differs between the two is flagged).

Each round runs every (cell, side) job once, rounds in rotating order (round r starts
r/rounds of the way through the job list), after one untimed warm-up run per (pair, side)
that brings the files into the page cache. Per cell the table gives medians over the rounds
and the spread (min-max).

How each side is run
  EtLlm:    etllm generate --model M --tokenizer T --prompt P --bos 1 --max-new-tokens N
            --ignore-eos --json --threads n --temperature t [--top-p 0.9] --seed round
            (stdout to a file; its last line is {"stats": {...}}).
  upstream: a child Python that imports executorch.extension.llm.custom_ops.custom_ops
            (upstream's llama:: kernels, libcustom_ops_aot_lib) and TextLLMRunner, sets the
            pool with portable_lib._unsafe_reset_threadpool(n), points fd 1 at /dev/null (the
            runner prints the text itself), runs TextLLMRunner(M, T).generate(P,
            GenerationConfig(max_new_tokens=N, temperature=t, echo=False, num_bos=1)) without
            a token callback (the binding raises UnicodeDecodeError on split UTF-8 pieces),
            and writes its stats plus its own clock and memory readings to a side file.
            Upstream has no ignore_eos: the models' EOS rows are zero (make_scale_fixtures.py),
            and a run that stops early is counted in the last column.
            Threads: upstream's llama::custom_sdpa / update_cache kernels in the Python package
            (libcustom_ops_aot_lib) are built on ATen, and their at::parallel_for runs on
            torch's OpenMP pool (one thread per core by default), not on ExecuTorch's pool.
            With ExecuTorch's pool at 1 thread and OpenMP at 2, decode past position ~130 (below
            it, no slowdown was seen; the mechanism inside the ATen kernels was not traced) fell
            to 5-25 tok/s on this 2-core machine under load (measured on s15m_v32k: 127 tokens
            after a 37-token prompt took 5.6-16 s; 0.65 s with OMP_NUM_THREADS=1 or
            OMP_WAIT_POLICY=PASSIVE). So by default
            (--upstream-torch-threads match) the child gets OMP_NUM_THREADS=n and
            torch.set_num_threads(n), the same n as ExecuTorch's pool; upstream's C++ runner
            built with the non-ATen custom ops would use ExecuTorch's pool for both.

Both emit N tokens: the first is sampled from the prefill logits (upstream's is always
greedy), the other N-1 each take one decode forward call. Upstream reports
num_generated_tokens = N-1; EtLlm reports generated_tokens = N.

Metrics (each side from its own stats; EtLlm's are microseconds, upstream's whole ms)
  decode tok/s   decode forward steps / (inference_end - prompt_eval_end): N-1 steps for both
                 (EtLlm generated_tokens - 1, upstream num_generated_tokens). The window holds
                 the N-1 forward calls, N-1 samplings and the token output of both.
  prefill tok/s  prompt tokens / (prompt_eval_end - inference_start) (tokenizing included).
  TTFT ms        first_token - inference_start.
  load ms        model_load_end - model_load_start as each reports it. NOT the same scope:
                 EtLlm's covers tokenizer + program + method (Runner::open); upstream's only
                 the method load inside generate() (its constructor loads the tokenizer and
                 the program before). Hence:
  open ms        from just before opening to ready: EtLlm = its load ms; upstream = the child's
                 clock before TextLLMRunner(...) to model_load_end. Same scope on both sides.
  open->1st ms   from just before opening to the first token (open + TTFT + the gap between).
  spawn->1st ms  from the parent's clock just before it starts the process to the first token
                 (both stats use the Unix-epoch clock). Upstream's includes starting Python and
                 importing torch (~3 s), which a C++ host of its runner would not pay; shown
                 for completeness, not as a ratio.
  peak RSS +MiB  memory the runner adds at its peak, tokenizer + model + generation:
                 upstream: VmHWM at the end minus VmRSS just before TextLLMRunner(...), read in
                 the child after the imports, with the peak reset first (writing 5 to
                 /proc/self/clear_refs) so that import-time peaks do not count.
                 EtLlm: the process's max RSS (wait4's ru_maxrss, what /usr/bin/time -v reports)
                 minus the max RSS of `etllm --version` (the same binary and libraries,
                 started and exited without opening anything; measured once). The JSON also
                 gives EtLlm's tokenizer-only share: max RSS of `etllm tokenize --tokenizer T
                 --text P` minus the same baseline.
  non-model %    EtLlm only: the share of the decode window spent outside the model's
                 forward calls: 1 - decode model time / decode window. EtLlm times each forward
                 call from the KV-cache manager's input preparation (prepare_*) through
                 Method::execute to its logits extraction (update_*): the manager's work is
                 inside, sampling, detokenizing, stop checks and output are outside.
                 decode_model_execution_time_ms is the sum over the N-1 decode steps. Binaries
                 without that field only have aggregate_model_execution_time_ms (prefill chunks
                 and decode steps together); the decode part is then estimated as aggregate -
                 (prompt_eval_end - token_encode_end), that span being the prefill forward calls
                 plus the first sampling, so the share is an upper bound (by the first
                 sampling, well under 1 ms). The JSON says which was used.
  early          runs (of both sides) that emitted fewer than N tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ("The old lighthouse keeper climbed the spiral stairs every evening, lit the great lamp, "
          "and watched the fishing boats pass safely through the narrow channel below.")
MODES = {"greedy": (0.0, 1.0), "sampled": (0.8, 0.9)}
WARMUP_TOKENS = 8


# ---------------------------------------------------------------------------
# The upstream child (runs in the export venv)
# ---------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def upstream_child(spec: dict) -> None:
    t_start = time.time()
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama:: kernels)
    from executorch.kernels import quantized  # noqa: F401  (quantized_decomposed:: kernels)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from executorch.extension.pybindings import portable_lib

    # The runner and the pybindings share libexecutorch_threadpool.so's pool.
    portable_lib._unsafe_reset_threadpool(spec["threads"])
    threads = portable_lib._threadpool_get_thread_count()
    # libcustom_ops_aot_lib's llama:: kernels are built on ATen: their parallel_for runs on
    # torch's intra-op (OpenMP) pool, not on ExecuTorch's. See --upstream-torch-threads.
    import torch

    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    torch_threads = torch.get_num_threads()
    t_imports = time.time()
    hwm_after_imports = _status_kb("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_before = _status_kb("VmRSS")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # upstream prints the generated text itself
    out = {}
    t_open = time.time()
    runner = TextLLMRunner(spec["model"], spec["tokenizer"])
    t_ctor = time.time()
    cfg = GenerationConfig(max_new_tokens=spec["tokens"], temperature=spec["temperature"], echo=False,
                           num_bos=1)
    runner.generate(spec["prompt"], cfg, None, lambda s: out.update(s=s))
    t_end = time.time()
    s = out["s"]
    fields = ["model_load_start_ms", "model_load_end_ms", "inference_start_ms", "token_encode_end_ms",
              "prompt_eval_end_ms", "first_token_ms", "inference_end_ms", "aggregate_sampling_time_ms",
              "num_prompt_tokens", "num_generated_tokens"]
    result = {
        "stats": {k: getattr(s, k) for k in fields},
        "threads": threads, "torch_threads": torch_threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "t_start": t_start, "t_imports": t_imports, "t_open": t_open, "t_ctor": t_ctor, "t_end": t_end,
        "rss_before_kb": rss_before, "hwm_end_kb": _status_kb("VmHWM"), "rss_end_kb": _status_kb("VmRSS"),
        "hwm_after_imports_kb": hwm_after_imports, "hwm_reset": hwm_reset,
    }
    Path(spec["out"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# Running one measurement
# ---------------------------------------------------------------------------


def spawn(cmd: list[str], env=None) -> tuple[int, float, int, str, str]:
    """Runs cmd; returns (exit code, spawn time (epoch s), max RSS KiB, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.time()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, t, ru.ru_maxrss, out.read().decode(errors="replace"), err.read().decode(errors="replace")


class Bench:
    def __init__(self, args):
        self.args = args
        self.etllm = args.etllm
        self.baseline_kb = None
        self.tok_kb = {}

    def etllm_baseline(self) -> int:
        if self.baseline_kb is None:
            vals = []
            for _ in range(3):
                rc, _, kb, _, err = spawn([self.etllm, "--version"])
                assert rc == 0, err
                vals.append(kb)
            self.baseline_kb = int(statistics.median(vals))
        return self.baseline_kb

    def etllm_tokenizer_kb(self, tok: str) -> int:
        if tok not in self.tok_kb:
            rc, _, kb, _, err = spawn([self.etllm, "tokenize", "--tokenizer", tok, "--text", PROMPT])
            assert rc == 0, err
            self.tok_kb[tok] = kb - self.etllm_baseline()
        return self.tok_kb[tok]

    def run_etllm(self, pair: dict, mode: str, threads: int, n: int, seed: int) -> dict:
        temp, top_p = MODES[mode]
        cmd = [self.etllm, "generate", "--model", pair["model"], "--tokenizer", pair["tokenizer"],
               "--prompt", PROMPT, "--bos", "1", "--max-new-tokens", str(n), "--ignore-eos", "--json",
               "--threads", str(threads), "--temperature", str(temp), "--top-p", str(top_p), "--seed", str(seed)]
        rc, t_spawn, kb, out, err = spawn(cmd)
        if rc != 0:
            raise RuntimeError(f"etllm failed ({rc}): {shlex.join(cmd)}\n{err[-2000:]}")
        s = json.loads(out.strip().splitlines()[-1])["stats"]
        emitted = s["generated_tokens"]
        decode_ms = s["inference_end_ms"] - s["prompt_eval_end_ms"]
        if "decode_model_execution_time_ms" in s:
            decode_model, how = s["decode_model_execution_time_ms"], "decode_model_execution_time_ms"
        else:  # older binaries: aggregate minus the prefill span (an estimate, see the docstring)
            prefill_span = s["prompt_eval_end_ms"] - s["token_encode_end_ms"]
            decode_model, how = s["aggregate_model_execution_time_ms"] - prefill_span, "estimate"
        return {
            "side": "etllm", "prompt_tokens": s["prompt_tokens"], "emitted": emitted,
            "decode_steps": emitted - 1, "decode_ms": decode_ms,
            "prefill_ms": s["prompt_eval_end_ms"] - s["inference_start_ms"],
            "ttft_ms": s["first_token_ms"] - s["inference_start_ms"],
            "load_ms": s["model_load_end_ms"] - s["model_load_start_ms"],
            "open_ms": s["model_load_end_ms"] - s["model_load_start_ms"],
            "open_to_first_ms": s["first_token_ms"] - s["model_load_start_ms"],
            "spawn_to_first_ms": s["first_token_ms"] - t_spawn * 1000,
            "rss_incr_mb": (kb - self.etllm_baseline()) / 1024,
            "max_rss_mb": kb / 1024,
            "non_model_share": 1 - decode_model / decode_ms if decode_ms > 0 else None,
            "non_model_share_from": how,
            "sampling_share": s["aggregate_sampling_time_ms"] / decode_ms if decode_ms > 0 else None,
            "stop_reason": s["stop_reason"],
            "raw": s,
        }

    def run_upstream(self, pair: dict, mode: str, threads: int, n: int, seed: int) -> dict:
        temp, _ = MODES[mode]
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            side = f.name
        try:
            match = self.args.upstream_torch_threads == "match"
            spec = {"model": pair["model"], "tokenizer": pair["tokenizer"], "prompt": PROMPT, "tokens": n,
                    "temperature": temp, "threads": threads, "torch_threads": threads if match else None,
                    "out": side}
            cmd = [self.args.upstream_python, str(Path(__file__).resolve()), "--upstream-child", json.dumps(spec)]
            env = dict(os.environ)
            if match:
                env["OMP_NUM_THREADS"] = str(threads)
            rc, t_spawn, kb, out, err = spawn(cmd, env=env)
            if rc != 0:
                raise RuntimeError(f"upstream child failed ({rc}): {shlex.join(cmd)}\n{err[-3000:]}")
            r = json.loads(Path(side).read_text())
        finally:
            os.unlink(side)
        s = r["stats"]
        assert r["threads"] == threads, r["threads"]
        decode_ms = s["inference_end_ms"] - s["prompt_eval_end_ms"]
        return {
            "side": "upstream", "prompt_tokens": s["num_prompt_tokens"],
            "emitted": s["num_generated_tokens"] + 1, "decode_steps": s["num_generated_tokens"],
            "decode_ms": decode_ms,
            "prefill_ms": s["prompt_eval_end_ms"] - s["inference_start_ms"],
            "ttft_ms": s["first_token_ms"] - s["inference_start_ms"],
            "load_ms": s["model_load_end_ms"] - s["model_load_start_ms"],
            "open_ms": s["model_load_end_ms"] - r["t_open"] * 1000,
            "open_to_first_ms": s["first_token_ms"] - r["t_open"] * 1000,
            "spawn_to_first_ms": s["first_token_ms"] - t_spawn * 1000,
            "rss_incr_mb": (r["hwm_end_kb"] - r["rss_before_kb"]) / 1024,
            "max_rss_mb": kb / 1024,
            "child": {k: v for k, v in r.items() if k != "stats"},
            "raw": s,
        }


# ---------------------------------------------------------------------------
# Matrix, rounds, report
# ---------------------------------------------------------------------------


def resolve_pairs(root: Path, specs: list[str]) -> list[dict]:
    pairs = []
    for spec in specs:
        name, _, tok = spec.partition(":")
        info_path = root / name / "info.json"
        if not info_path.exists():
            raise SystemExit(f"{info_path} not found: run tools/bench/make_scale_fixtures.py --only {name}")
        info = json.loads(info_path.read_text())
        tok = tok or next(iter(info["tokenizers"]))
        if tok not in info["tokenizers"]:
            raise SystemExit(f"{name}: tokenizer {tok!r} not in {list(info['tokenizers'])}")
        pairs.append({
            "name": f"{name}+{tok}", "model": str((root / name / info["model"]).resolve()),
            "tokenizer": str((root / name / info["tokenizers"][tok]).resolve()),
            "vocab": info["vocab_size"], "tokenizer_vocab": info["tokenizer_vocab_size"][tok],
            "model_mb": round(info["bytes"] / 1e6, 1),
        })
    return pairs


def fmt(v, digits=1):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def summarize(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def rate(r: dict, steps_key: str, ms_key: str):
    return r[steps_key] / (r[ms_key] / 1000) if r[ms_key] > 0 else None


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream-child":
        upstream_child(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--root", type=Path, default=Path("/work/bench-models"))
    ap.add_argument("--pairs", default="s15m_v32k,s15m_v128k,s15m_v152k")
    ap.add_argument("--big", action="store_true", help="add qwen05b_v152k")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", default="128,1000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--etllm", default=str(ROOT / "target" / "release" / "etllm"))
    ap.add_argument("--upstream-python", default="/root/etllm-export-venv/bin/python")
    ap.add_argument("--upstream-torch-threads", choices=["match", "default"], default="match",
                    help="match (default): OMP_NUM_THREADS and torch.set_num_threads = --threads in the upstream "
                         "child; default: leave torch's own choice (one thread per core)")
    ap.add_argument("--json", type=Path, help="write every run and the summaries here")
    ap.add_argument("--md", type=Path, help="also write the markdown report here")
    args = ap.parse_args()

    command = shlex.join([sys.executable] + sys.argv)
    nice = os.nice(0)
    specs = [p for p in args.pairs.split(",") if p] + (["qwen05b_v152k"] if args.big else [])
    pairs = resolve_pairs(args.root, specs)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: {m!r} is not one of {list(MODES)}")
    threads = [int(t) for t in args.threads.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    cells = [(p["name"], m, t, n) for p in pairs for m in modes for t in threads for n in tokens]
    by_name = {p["name"]: p for p in pairs}
    bench = Bench(args)
    runner = {"etllm": bench.run_etllm, "upstream": bench.run_upstream}
    jobs = [(c, side) for c in cells for side in ("etllm", "upstream")]
    load_before = uptime()
    t0 = time.time()
    print(f"$ {command}", file=sys.stderr)
    print(f"{len(cells)} cells x 2 sides x {args.rounds} rounds = {len(jobs) * args.rounds} runs; {load_before}",
          file=sys.stderr)
    baseline = bench.etllm_baseline()
    tok_kb = {p["name"]: bench.etllm_tokenizer_kb(p["tokenizer"]) for p in pairs}
    if not args.no_warmup:
        for p in pairs:
            for side in ("etllm", "upstream"):
                runner[side](p, "greedy", threads[0], WARMUP_TOKENS, 0)
    results = {c: {"etllm": [], "upstream": []} for c in cells}
    for r in range(args.rounds):
        k = (r * len(jobs)) // args.rounds
        for (cell, side) in jobs[k:] + jobs[:k]:
            name, mode, thr, n = cell
            run = runner[side](by_name[name], mode, thr, n, seed=r + 1)
            run["round"] = r + 1
            run["decode_tps"] = rate(run, "decode_steps", "decode_ms")
            run["prefill_tps"] = rate(run, "prompt_tokens", "prefill_ms")
            results[cell][side].append(run)
        print(f"round {r + 1}/{args.rounds} done, {time.time() - t0:.0f} s; {uptime()}", file=sys.stderr)
    load_after = uptime()

    metrics = ["decode_tps", "prefill_tps", "ttft_ms", "load_ms", "open_ms", "open_to_first_ms",
               "spawn_to_first_ms", "rss_incr_mb"]
    summary = []
    for cell in cells:
        name, mode, thr, n = cell
        row = {"pair": name, "mode": mode, "threads": thr, "tokens": n}
        for side in ("etllm", "upstream"):
            runs = results[cell][side]
            row[side] = {m: summarize(runs, m) for m in metrics}
            row[side]["prompt_tokens"] = sorted({r["prompt_tokens"] for r in runs})
            row[side]["early"] = sum(r["emitted"] < n for r in runs)
        row["etllm"]["non_model_share"] = summarize(results[cell]["etllm"], "non_model_share")
        row["etllm"]["sampling_share"] = summarize(results[cell]["etllm"], "sampling_share")
        row["ratio"] = {m: (row["etllm"][m]["median"] / row["upstream"][m]["median"]
                            if row["etllm"][m] and row["upstream"][m] and row["upstream"][m]["median"] else None)
                        for m in metrics}
        summary.append(row)

    def cellv(row, side, m, digits=1):
        s = row[side][m]
        if s is None:
            return "-"
        if s["n"] == 1 or s["min"] == s["max"]:
            return fmt(s["median"], digits)
        return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"

    lines = [f"$ {command}", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; wall {time.time() - t0:.0f} s; "
             f"niceness {nice}; rounds {args.rounds}; upstream torch/OpenMP threads: {args.upstream_torch_threads}",
             f"- load before: `{load_before}`", f"- load after: `{load_after}`",
             f"- etllm: {args.etllm}; `etllm --version` max RSS {baseline / 1024:.1f} MiB (the baseline)",
             f"- prompt ({len(PROMPT)} chars, one BOS): {PROMPT!r}",
             "- pairs: " + "; ".join(f"{p['name']} (model vocab {p['vocab']}, tokenizer {p['tokenizer_vocab']}, "
                                     f"{p['model_mb']} MB, EtLlm tokenizer RSS {tok_kb[p['name']] / 1024:.1f} MiB)"
                                     for p in pairs),
             "- E = EtLlm, U = upstream TextLLMRunner; medians over the rounds, (min–max); E/U = ratio of "
             "medians (tok/s: higher is better for E; times and memory: lower is better for E).",
             "- open = tokenizer + program + method load, same scope on both sides; load (stats) differs "
             "in scope (see the script's docstring); spawn→1st for U includes starting Python and importing torch.",
             "",
             "| pair | mode | thr | N | prompt tok E/U | decode tok/s E | decode tok/s U | E/U | prefill tok/s E "
             "| prefill tok/s U | E/U | TTFT ms E | TTFT ms U | E/U | open ms E | open ms U | E/U "
             "| load ms (stats) E / U | open→1st ms E | open→1st ms U | E/U | spawn→1st ms E / U "
             "| peak RSS +MiB E | peak RSS +MiB U | E/U | E non-model % of decode | early |",
             "|" + "---|" * 27]
    for row in summary:
        rt = row["ratio"]
        ptok = f"{','.join(map(str, row['etllm']['prompt_tokens']))}/{','.join(map(str, row['upstream']['prompt_tokens']))}"
        if row["etllm"]["prompt_tokens"] != row["upstream"]["prompt_tokens"]:
            ptok += " (!)"
        nm = row["etllm"]["non_model_share"]
        nm_s = "-" if nm is None else f"{100 * nm['median']:.1f} ({100 * nm['min']:.1f}–{100 * nm['max']:.1f})"
        lines.append(
            f"| {row['pair']} | {row['mode']} | {row['threads']} | {row['tokens']} | {ptok} "
            f"| {cellv(row, 'etllm', 'decode_tps')} | {cellv(row, 'upstream', 'decode_tps')} | {fmt(rt['decode_tps'], 3)} "
            f"| {cellv(row, 'etllm', 'prefill_tps')} | {cellv(row, 'upstream', 'prefill_tps')} | {fmt(rt['prefill_tps'], 3)} "
            f"| {cellv(row, 'etllm', 'ttft_ms')} | {cellv(row, 'upstream', 'ttft_ms')} | {fmt(rt['ttft_ms'], 3)} "
            f"| {cellv(row, 'etllm', 'open_ms')} | {cellv(row, 'upstream', 'open_ms')} | {fmt(rt['open_ms'], 3)} "
            f"| {fmt(row['etllm']['load_ms']['median'])} / {fmt(row['upstream']['load_ms']['median'])} "
            f"| {cellv(row, 'etllm', 'open_to_first_ms')} | {cellv(row, 'upstream', 'open_to_first_ms')} "
            f"| {fmt(rt['open_to_first_ms'], 3)} "
            f"| {fmt(row['etllm']['spawn_to_first_ms']['median'], 0)} / {fmt(row['upstream']['spawn_to_first_ms']['median'], 0)} "
            f"| {cellv(row, 'etllm', 'rss_incr_mb')} | {cellv(row, 'upstream', 'rss_incr_mb')} | {fmt(rt['rss_incr_mb'], 3)} "
            f"| {nm_s} | {row['etllm']['early'] + row['upstream']['early']} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.md:
        args.md.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "niceness": nice, "load_before": load_before, "load_after": load_after,
            "prompt": PROMPT, "rounds": args.rounds, "etllm_version_max_rss_kb": baseline,
            "etllm_tokenizer_rss_mb": {k: v / 1024 for k, v in tok_kb.items()}, "pairs": pairs,
            "summary": summary,
            "runs": [{"pair": c[0], "mode": c[1], "threads": c[2], "tokens": c[3], **run}
                     for c in cells for side in ("etllm", "upstream") for run in results[c][side]],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
