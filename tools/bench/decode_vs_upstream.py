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

Decode speed at a depth: `--prompt-tokens P` replaces the prompt with a longer text that
the tokenizer (the `tokenizers` package) turns into P tokens, BOS included, so that the
decode rate is measured over the tokens generated at positions P..P+N only (prefill time
is not in the decode rate; upstream is given the prompt in pieces of at most 120 tokens,
see `long_prompt`). Each runner's prompt-token count is reported. `--greedy-only` runs just
the two greedy configurations. The report also gives, per round, EtLlm greedy / upstream
greedy (runs of the same round were interleaved), with its median, min and max;
`--etllm-before` adds a second etllm binary to the same rounds (before and after a change).
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
# The prompt as given to upstream: pieces prefilled one by one (see long_prompt).
PIECES = [PROMPT]
# Tokens of every piece but the last (BOS included), counted by the `tokenizers` package.
PIECE_TOKENS = 0
# Prompt length in tokens as each runner counted it (from its stats; for upstream, plus
# PIECE_TOKENS).
PROMPT_TOKENS = {}


def upstream_runner(model, tokenizer, threads, torch_threads=0):
    # Upstream's kernels for the llama:: custom ops (libcustom_ops_aot_lib), so that models
    # exported with use_sdpa_with_kv_cache run on upstream's side too.
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.llm.runner import TextLLMRunner

    if threads:
        # The runner and the pybindings share libexecutorch_threadpool.so's pool.
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
        assert portable_lib._threadpool_get_thread_count() == threads
        # Upstream's custom_sdpa multiplies through cpublas, which in libcustom_ops_aot_lib
        # is the BLAS that torch bundles (MKL's sgemm_), threaded by OpenMP with torch's
        # thread count, not the pool above. Left at its default (one thread per core), its
        # OpenMP threads spin next to the runner's and, on a busy 2-core machine, made
        # upstream's decode at depth several times slower; so it gets the same count (or
        # --upstream-torch-threads).
        import torch

        torch.set_num_threads(torch_threads or threads)
    return TextLLMRunner(model, tokenizer)


def long_prompt(tokenizer_path, n_tokens, piece_tokens=120):
    """Pieces of text that the tokenizer encodes to n_tokens - 1 tokens in all (plus BOS:
    n_tokens), each piece at most piece_tokens tokens.

    Upstream's runner prefills a long prompt in chunks of the model's max_seq_len (128),
    one more than a dynamic-shape export takes (127), and fails; it is given the pieces
    one by one instead (`prefill`, then `generate` on the last). EtLlm gets the pieces
    joined by spaces as one prompt and chunks it itself; its count may differ from the
    sum of the pieces' by the odd token at a piece boundary.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    count = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731
    base = ("Once upon a time, in a small village by the sea, there lived an old fisherman. "
            "Every evening the children gathered around the fire to hear a story about storms, "
            "whales and distant islands, and he told them one more before they went home.")
    words = (" ".join([base] * (n_tokens // 8 + 8))).split(" ")
    pieces, current, done = [], [], 0
    for word in words:
        if done + count(" ".join(current + [word])) > n_tokens - 1:
            break
        if current and count(" ".join(current + [word])) > piece_tokens:
            pieces.append(" ".join(current))
            done += count(pieces[-1])
            current = []
            if done + count(word) > n_tokens - 1:
                break
        current.append(word)
    if current:
        pieces.append(" ".join(current))
    return pieces, 1 + sum(count(p) for p in pieces)


def run_upstream(runner, temperature):
    from executorch.extension.llm.runner import GenerationConfig

    out = {}
    for k, piece in enumerate(PIECES[:-1]):
        runner.prefill(piece, GenerationConfig(echo=False, num_bos=1 if k == 0 else 0))
    cfg = GenerationConfig(max_new_tokens=TOKENS + 1, temperature=temperature, echo=False,
                           num_bos=1 if len(PIECES) == 1 else 0)
    # Upstream prints the generated text to stdout itself; keep it out of ours.
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        runner.generate(PIECES[-1], cfg, None, lambda s: out.update(s=s))
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)
    runner.reset()
    s = out["s"]
    PROMPT_TOKENS.setdefault("upstream", PIECE_TOKENS + s.num_prompt_tokens)
    return s.num_generated_tokens, (s.inference_end_ms - s.prompt_eval_end_ms) / 1000.0


def run_etllm(binary, model, tokenizer, temperature, top_p, seed, threads):
    cmd = [
        binary, "generate", "--model", model, "--tokenizer", tokenizer, "--prompt", PROMPT,
        "--bos", "1", "--max-new-tokens", str(TOKENS), "--ignore-eos", "--json",
        "--temperature", str(temperature), "--top-p", str(top_p), "--seed", str(seed),
    ] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    stats = json.loads(out.strip().splitlines()[-1])["stats"]
    PROMPT_TOKENS.setdefault("etllm", stats["prompt_tokens"])
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
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="measure decode at depth: a prompt of this many tokens (BOS included) "
                         "instead of \"Once upon a time\"")
    ap.add_argument("--greedy-only", action="store_true",
                    help="run only the greedy configurations")
    ap.add_argument("--upstream-torch-threads", type=int, default=0,
                    help="torch's (OpenMP) thread count on upstream's side, which its custom_sdpa "
                         "uses through MKL (default: --threads)")
    ap.add_argument("--etllm-before", default=None,
                    help="another etllm binary (say, before a change) to run greedy in the same "
                         "rounds; its ratios to upstream are reported too")
    args = ap.parse_args()
    globals()["TOKENS"] = args.tokens
    if args.prompt_tokens:
        pieces, total = long_prompt(args.tokenizer, args.prompt_tokens)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(args.tokenizer)
        globals()["PIECES"] = pieces
        globals()["PIECE_TOKENS"] = 1 + sum(len(tok.encode(p, add_special_tokens=False).ids)
                                            for p in pieces[:-1]) if len(pieces) > 1 else 0
        globals()["PROMPT"] = " ".join(pieces)
        print(f"prompt: {len(pieces)} pieces, {total} tokens with BOS", file=sys.stderr)

    upstream = upstream_runner(args.model, args.tokenizer, args.threads, args.upstream_torch_threads)
    configs = {
        "upstream T=0.8 (top-p 0.9)": lambda r: run_upstream(upstream, 0.8),
        "upstream T=0": lambda r: run_upstream(upstream, 0.0),
        "etllm T=0.8 top-p 0.9": lambda r: run_etllm(args.etllm, args.model, args.tokenizer, 0.8, 0.9, r, args.threads),
        "etllm T=0": lambda r: run_etllm(args.etllm, args.model, args.tokenizer, 0.0, 1.0, r, args.threads),
    }
    if args.etllm_before:
        configs["etllm-before T=0"] = lambda r: run_etllm(
            args.etllm_before, args.model, args.tokenizer, 0.0, 1.0, r, args.threads)
    if args.greedy_only:
        configs = {k: v for k, v in configs.items() if k.endswith("T=0")}
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
    def per_round_ratio(name):
        ratios = [e / u for e, u in zip(rates[name], rates["upstream T=0"])]
        return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                "max": round(max(ratios), 3)}

    report = {
        "rounds": args.rounds,
        "threads": args.threads or "default",
        "upstream_torch_threads": __import__("torch").get_num_threads(),
        "prompt_tokens": PROMPT_TOKENS,
        "tokens_per_run": TOKENS,
        "decode_tok_s_median": {k: round(v, 1) for k, v in med.items()},
        "decode_tok_s_min_max": {k: [round(min(v), 1), round(max(v), 1)] for k, v in rates.items()},
        "etllm_greedy_over_upstream_greedy": round(med["etllm T=0"] / med["upstream T=0"], 3),
        "etllm_greedy_over_upstream_greedy_per_round": per_round_ratio("etllm T=0"),
        "runs_that_stopped_early": short,
    }
    if args.etllm_before:
        report["etllm_before_greedy_over_upstream_greedy"] = round(
            med["etllm-before T=0"] / med["upstream T=0"], 3)
        report["etllm_before_greedy_over_upstream_greedy_per_round"] = per_round_ratio("etllm-before T=0")
    if not args.greedy_only:
        report["etllm_sampled_over_upstream_sampled"] = round(
            med["etllm T=0.8 top-p 0.9"] / med["upstream T=0.8 (top-p 0.9)"], 3)
        report["etllm_sampled_over_etllm_greedy"] = round(med["etllm T=0.8 top-p 0.9"] / med["etllm T=0"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
