"""Interleaved decode benchmark: EtLlm's `etllm generate` against upstream ExecuTorch's
TextLLMRunner (its Python binding), on the same .pte, in the same run.

Each round runs, in a rotating order, one generation of each configuration:

    upstream T=0.8   upstream's sampler at temperature 0.8 (its top-p is fixed at 0.9)
    upstream T=0     upstream greedy
    etllm T=0.8 p0.9 EtLlm sampling with the same settings
    etllm T=0        EtLlm greedy

and reports, per configuration, the median decode tokens/s over the rounds, plus the
ratios the issue asks for: EtLlm sampled / upstream sampled, and EtLlm sampled / EtLlm
greedy. Decode tokens/s is computed the same way for both, from each one's own stats
(upstream's field names): num_generated_tokens / (inference_end_ms - prompt_eval_end_ms).
Both generate 100 tokens after "Once upon a time" with one BOS, EOS ignored where the API
allows (upstream has no ignore_eos; the benchmark model is random-weight and its EOS
probability is negligible, and a run that stops early is reported).

Needs the export venv (torch + executorch 1.5.1; see tools/fixtures/README.md). Never CI:

    cargo build --release
    /root/etllm-export-venv/bin/python tools/bench/decode_vs_upstream.py \
        --model /work/bench-models/llama_288_6/model.pte --tokenizer tests/fixtures/tokenizer.json \
        --rounds 9 [--threads 1]

The bench model comes from `tools/fixtures/make_fixtures.py --bench` (dim 288, 6 layers,
32,000-entry vocabulary); `tools/fixtures/make_custom_ops.py --bench` exports the same
weights with `use_sdpa_with_kv_cache` (`custom_ops/model.pte`), which upstream runs on
its own `llama::` kernels (loaded here) and EtLlm on its own.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time"
# Upstream generates max_new_tokens - 1 tokens; EtLlm exactly max_new_tokens.
TOKENS = 100


def upstream_runner(model, tokenizer, threads):
    # Upstream's kernels for the llama:: custom ops (libcustom_ops_aot_lib), so that models
    # exported with use_sdpa_with_kv_cache run on upstream's side too.
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.llm.runner import TextLLMRunner

    if threads:
        # The runner and the pybindings share libexecutorch_threadpool.so's pool.
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
        assert portable_lib._threadpool_get_thread_count() == threads
    return TextLLMRunner(model, tokenizer)


def run_upstream(runner, temperature):
    from executorch.extension.llm.runner import GenerationConfig

    out = {}
    cfg = GenerationConfig(max_new_tokens=TOKENS + 1, temperature=temperature, echo=False, num_bos=1)
    # Upstream prints the generated text to stdout itself; keep it out of ours.
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        runner.generate(PROMPT, cfg, None, lambda s: out.update(s=s))
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)
    runner.reset()
    s = out["s"]
    return s.num_generated_tokens, (s.inference_end_ms - s.prompt_eval_end_ms) / 1000.0


def run_etllm(binary, model, tokenizer, temperature, top_p, seed, threads):
    cmd = [
        binary, "generate", "--model", model, "--tokenizer", tokenizer, "--prompt", PROMPT,
        "--bos", "1", "--max-new-tokens", str(TOKENS), "--ignore-eos", "--json",
        "--temperature", str(temperature), "--top-p", str(top_p), "--seed", str(seed),
    ] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    stats = json.loads(out.strip().splitlines()[-1])["stats"]
    return stats["generated_tokens"], (stats["inference_end_ms"] - stats["prompt_eval_end_ms"]) / 1000.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--etllm", default=str(ROOT / "target" / "release" / "etllm"))
    ap.add_argument("--tokens", type=int, default=TOKENS,
                    help="tokens to generate per run (default 100; the context is 512 on the bench model)")
    ap.add_argument("--threads", type=int, default=0,
                    help="thread-pool size for both (0: each runtime's default)")
    args = ap.parse_args()
    globals()["TOKENS"] = args.tokens

    upstream = upstream_runner(args.model, args.tokenizer, args.threads)
    configs = {
        "upstream T=0.8 (top-p 0.9)": lambda r: run_upstream(upstream, 0.8),
        "upstream T=0": lambda r: run_upstream(upstream, 0.0),
        "etllm T=0.8 top-p 0.9": lambda r: run_etllm(args.etllm, args.model, args.tokenizer, 0.8, 0.9, r, args.threads),
        "etllm T=0": lambda r: run_etllm(args.etllm, args.model, args.tokenizer, 0.0, 1.0, r, args.threads),
    }
    names = list(configs)
    # One warm-up run of each, not counted.
    for name in names:
        configs[name](0)
    rates = {name: [] for name in names}
    short = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            n, dt = configs[name](r + 1)
            if n < TOKENS:
                short.append((name, r, n))
            rates[name].append(n / dt)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {rates[name][-1]:.1f}" for name in names), file=sys.stderr)

    med = {name: statistics.median(v) for name, v in rates.items()}
    report = {
        "rounds": args.rounds,
        "threads": args.threads or "default",
        "tokens_per_run": TOKENS,
        "decode_tok_s_median": {k: round(v, 1) for k, v in med.items()},
        "decode_tok_s_min_max": {k: [round(min(v), 1), round(max(v), 1)] for k, v in rates.items()},
        "etllm_sampled_over_upstream_sampled": round(med["etllm T=0.8 top-p 0.9"] / med["upstream T=0.8 (top-p 0.9)"], 3),
        "etllm_sampled_over_etllm_greedy": round(med["etllm T=0.8 top-p 0.9"] / med["etllm T=0"], 3),
        "etllm_greedy_over_upstream_greedy": round(med["etllm T=0"] / med["upstream T=0"], 3),
        "runs_that_stopped_early": short,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
