"""Trains the benchmark SentencePiece model: a 32,000-piece BPE with Llama 2's settings
(byte fallback, identity normalization, digits split, `<unk>`=0 `<s>`=1 `</s>`=2), on
local text only, and writes the benchmark texts beside it. Never run in CI.

    apt-get install bible-kjv          # the `bible` program and the KJV text
    python3 -m venv /root/sp-venv && /root/sp-venv/bin/pip install sentencepiece==0.2.1
    /root/sp-venv/bin/python tools/bench/make_sp32k.py /work/bench-models/sp32k

Training text: the King James Bible (`bible gen1:1-rev22:21`) and the top-level modules
of this Python's standard library. Written to OUT:

- `sp32k.model`: the model;
- `bench.txt`: ~1 MB of text (the Bible's verses and standard-library source, interleaved
  in blocks, so both prose and code are in it);
- `prompts.json`: a list of prompts cut from `bench.txt` (at whitespace, 120 to 600 bytes
  each, so about 25 to 200 tokens).

Deterministic for a given Python, `bible-kjv` and `sentencepiece`.
"""

import glob
import json
import os
import random
import subprocess
import sys
import sysconfig

import sentencepiece as spm

BENCH_BYTES = 1_000_000


def kjv():
    out = subprocess.run(
        ["bible", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    # Verse lines start with their number; the wrapped continuation lines are joined.
    verses, cur = [], []
    for line in out.splitlines():
        s = line.strip()
        if not s:
            continue
        head = s.split(" ", 1)[0]
        if head.isdigit() and line.startswith("  "):
            if cur:
                verses.append(" ".join(cur))
            cur = [s.split(" ", 1)[1] if " " in s else ""]
        elif cur:
            cur.append(s)
    if cur:
        verses.append(" ".join(cur))
    return verses


def stdlib():
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    lines = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(l.rstrip("\n") for l in f)
    return lines


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "/work/bench-models/sp32k"
    os.makedirs(out, exist_ok=True)
    verses, code = kjv(), stdlib()
    train = os.path.join(out, "train.txt")
    with open(train, "w", encoding="utf-8") as f:
        for line in verses + code:
            if line.strip():
                f.write(line + "\n")

    prefix = os.path.join(out, "sp32k")
    spm.SentencePieceTrainer.train(
        input=train,
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=32000,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        max_sentence_length=16384,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    os.remove(train)
    os.remove(prefix + ".vocab")

    # The benchmark text: blocks of 40 verses and 60 source lines, alternately, from a
    # fixed place in each, up to BENCH_BYTES.
    parts, size, v, c = [], 0, 10_000, 20_000
    while size < BENCH_BYTES:
        for block in (verses[v : v + 40], code[c : c + 60]):
            text = "\n".join(block) + "\n"
            parts.append(text)
            size += len(text.encode())
        v, c = (v + 40) % (len(verses) - 40), (c + 60) % (len(code) - 60)
    bench = "".join(parts)
    bench = bench.encode()[:BENCH_BYTES].decode("utf-8", errors="ignore")
    with open(os.path.join(out, "bench.txt"), "w", encoding="utf-8") as f:
        f.write(bench)

    rng = random.Random(15)
    prompts, pos = [], 0
    while pos < len(bench) and len(prompts) < 2000:
        want = rng.randint(120, 600)
        end = bench.find(" ", pos + want)
        if end < 0:
            break
        prompts.append(bench[pos:end])
        pos = end
    with open(os.path.join(out, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(prompts, f, ensure_ascii=False)

    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    n = [len(sp.encode(p)) for p in prompts]
    print(
        f"{out}: {sp.get_piece_size()} pieces; bench.txt {len(bench.encode())} bytes, "
        f"{len(sp.encode(bench))} tokens; {len(prompts)} prompts, "
        f"{min(n)}-{max(n)} tokens (mean {sum(n) / len(n):.0f})"
    )


if __name__ == "__main__":
    main()
