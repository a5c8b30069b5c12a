"""SentencePiece encode and per-token decode: EtLlm (in-process, through
`examples/bench_tokenizer.rs`) against the `sentencepiece` Python package on the same
model and texts, in interleaved rounds; prints medians and ratios. Never run in CI.

    cargo build --release --example bench_tokenizer
    /root/sp-venv/bin/python tools/bench/make_sp32k.py /work/bench-models/sp32k
    /root/sp-venv/bin/python tools/bench/sp_encode_vs_python.py /work/bench-models/sp32k \
        [--rounds 9] [--taskset 0]

Times are each side's thread CPU time (`CLOCK_THREAD_CPUTIME_ID`: `time.thread_time()`
and the example's clock), so that other work on a shared machine does not count;
`--wall` times wall-clock instead. Each round times Python first or EtLlm first
(alternately); within a round each side
encodes `bench.txt` once, each prompt of `prompts.json` once, and decodes every 2-token
window of the text's first 20,000 ids (what a text stream does per generated token), after
one untimed warm-up. Python's side is `SentencePieceProcessor.encode(text)` (ids) and
`decode(ids)`. The example also reports the `sentencepiece` crate's own `encode` (which
EtLlm used before) as `crate`.
"""

import argparse
import json
import os
import statistics
import subprocess
import time

import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "target", "release", "examples", "bench_tokenizer")


def python_round(sp, text, prompts, window, clock):
    out = {}
    for warm in (True, False):
        t0 = clock()
        ids = sp.encode(text)
        t_text = clock() - t0
        t0 = clock()
        for p in prompts:
            sp.encode(p)
        t_prompts = clock() - t0
        t0 = clock()
        for i in range(len(window) - 1):
            sp.decode(window[i : i + 2])
        t_decode2 = clock() - t0
        if not warm:
            mb = len(text.encode()) / 1e6
            pb = sum(len(p.encode()) for p in prompts) / 1e6
            out = {
                "text_mbs": mb / t_text,
                "prompt_us": t_prompts * 1e6 / len(prompts),
                "prompts_mbs": pb / t_prompts,
                "decode2_us": t_decode2 * 1e6 / (len(window) - 1),
            }
    return out, ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", help="folder with sp32k.model, bench.txt, prompts.json")
    ap.add_argument("--model", help="another .model file, on the same texts")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--taskset", help="CPU list for both sides (taskset -c)")
    ap.add_argument("--wall", action="store_true", help="wall-clock time, not CPU time")
    args = ap.parse_args()
    model = args.model or os.path.join(args.dir, "sp32k.model")
    text_path = os.path.join(args.dir, "bench.txt")
    prompts_path = os.path.join(args.dir, "prompts.json")
    if args.taskset:
        os.sched_setaffinity(0, {int(c) for c in args.taskset.split(",")})
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    with open(prompts_path, encoding="utf-8") as f:
        prompts = json.load(f)
    sp = spm.SentencePieceProcessor(model_file=model)
    window = sp.encode(text)[:20000]

    cmd = [EXAMPLE, "--tokenizer", model, "--text", text_path, "--prompts", prompts_path]
    cmd += ["--rounds", "1", "--json"] + (["--wall"] if args.wall else [])
    clock = time.perf_counter if args.wall else time.thread_time
    rows = {"python": [], "etllm": [], "crate": []}
    for r in range(args.rounds):
        sides = ["python", "rust"] if r % 2 == 0 else ["rust", "python"]
        for side in sides:
            if side == "python":
                res, _ = python_round(sp, text, prompts, window, clock)
                rows["python"].append(res)
            else:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                res = json.loads(out)
                rows["etllm"].append(res["etllm"])
                if "crate" in res:
                    rows["crate"].append(res["crate"])

    def med(name, key):
        return statistics.median(r[key] for r in rows[name]) if rows[name] else float("nan")

    print(
        f"{os.path.basename(model)}; sentencepiece {spm.__version__}; text {len(text.encode()) / 1e6:.2f} MB; "
        f"{len(prompts)} prompts; {args.rounds} rounds, medians of "
        f"{'wall-clock' if args.wall else 'CPU'} time"
    )
    keys = [
        ("text_mbs", "text MB/s", True),
        ("prompts_mbs", "prompts MB/s", True),
        ("prompt_us", "us/prompt", False),
        ("decode2_us", "decode2 us", False),
    ]
    print(f"{'':10}" + "".join(f"{label:>14}" for _, label, _ in keys))
    for name in ("python", "etllm", "crate"):
        if rows[name]:
            print(f"{name:10}" + "".join(f"{med(name, k):14.3f}" for k, _, _ in keys))
    print("ratio vs python (>1 means faster than python):")
    for name in ("etllm", "crate"):
        if rows[name]:
            cells = []
            for k, _, higher in keys:
                a, b = med(name, k), med("python", k)
                cells.append(a / b if higher else b / a)
            print(f"{name:10}" + "".join(f"{c:13.2f}x" for c in cells))


if __name__ == "__main__":
    main()
