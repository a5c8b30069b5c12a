"""Encode throughput (MB/s) of each tokenizer format: EtLlm (`etllm tokenize`, whose
--file mode times nothing itself, so this script times it from outside, minus a startup
run on an empty-ish text) against the format's Python reference on the same text, in the
same run.

    cargo build --release --bin etllm
    taskset -c 0 /root/etllm-export-venv/bin/python tools/bench/tokenizer_encode.py

The text: tests/fixtures/tokenizers' training-style corpus strings repeated to ~1 MB.
References: sentencepiece (.model), tiktoken (rank file, special tokens allowed),
pytorch_tokenizers' C++ Llama2cTokenizer (tokenizer.bin), tokenizers (tokenizer.json).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import sentencepiece as spm
import tiktoken
import tokenizers
from pytorch_tokenizers import CppLlama2cTokenizer
from pytorch_tokenizers.constants import CL100K_PAT_STR, LLAMA_SPECIAL_TOKENS
from tiktoken.load import load_tiktoken_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
ETLLM = os.path.join(ROOT, "target", "release", "etllm")


def corpus(size):
    with open(os.path.join(FIX, "reference.json"), encoding="utf-8") as f:
        ref = json.load(f)
    texts = [c["text"] for c in ref["hf"]["cases"] if c["text"]]
    # No special-token strings: every implementation then reads the same plain text.
    texts = [t for t in texts if "<" not in t]
    block = "\n".join(texts) + "\n"
    return block * (size // len(block.encode()) + 1)


def best(f, runs=3):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def etllm_time(tokenizer, path, small_path):
    run = lambda p: subprocess.run(
        [ETLLM, "tokenize", "--tokenizer", tokenizer, "--file", p],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # Process start and tokenizer load, measured on a tiny text, are subtracted.
    return max(best(lambda: run(path)) - best(lambda: run(small_path)), 1e-9)


def main():
    text = corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
    mb = len(text.encode()) / 1e6
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "text.txt")
    small = os.path.join(tmp, "small.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(small, "w", encoding="utf-8") as f:
        f.write("a")

    sp = spm.SentencePieceProcessor(model_file=os.path.join(FIX, "sp_bpe.model"))
    spu = spm.SentencePieceProcessor(model_file=os.path.join(FIX, "sp_unigram.model"))
    ranks = load_tiktoken_bpe(os.path.join(FIX, "tiktoken.model"))
    enc = tiktoken.Encoding(
        name="bench",
        pat_str=CL100K_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA_SPECIAL_TOKENS)},
    )
    l2c = CppLlama2cTokenizer()
    l2c.load(os.path.join(FIX, "llama2c.bin"))
    hf = tokenizers.Tokenizer.from_file(os.path.join(FIX, "hf", "tokenizer.json"))

    # llama2.c's reference rescans every pair after each merge (quadratic in the text's
    # length), so it gets the text line by line; EtLlm (a heap of merges) encodes the whole
    # file as one text, which is no less work. Not strictly like for like: see the report.
    lines = [l for l in text.split("\n") if l]
    rows = [
        ("sentencepiece BPE", "sp_bpe.model", lambda: sp.encode(text), None),
        ("sentencepiece unigram", "sp_unigram.model", lambda: spu.encode(text), None),
        ("tiktoken", "tiktoken.model", lambda: enc.encode(text, allowed_special="all"), None),
        ("llama2c", "llama2c.bin", lambda: [l2c.encode(l, 0, 0) for l in lines], "lines"),
        ("hf tokenizer.json", "hf", lambda: hf.encode(text, add_special_tokens=False), None),
    ]
    print(f"text: {mb:.2f} MB ({len(lines)} lines)")
    print(f"{'format':24} {'EtLlm MB/s':>11} {'reference MB/s':>15}")
    for name, file, ref, _mode in rows:
        tok = os.path.join(FIX, file)
        t_ref = best(ref)
        t_etllm = etllm_time(tok, path, small)
        print(f"{name:24} {mb / t_etllm:11.2f} {mb / t_ref:15.2f}")


if __name__ == "__main__":
    main()
