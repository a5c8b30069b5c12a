#!/usr/bin/env python3
"""Real-size tokenizers and random-weight models for EtLlm's benchmarks at scale (issue 15).

Run ONLY by hand, in the export venv (torch 2.14.1 + executorch 1.5.1 + tokenizers +
sentencepiece + tiktoken; see tools/fixtures/README.md). Never in CI. Nothing it writes
belongs in the repository: the default output directory is outside it.

    /root/etllm-export-venv/bin/python tools/bench/make_scale_fixtures.py            # tokenizers + 3 models
    /root/etllm-export-venv/bin/python tools/bench/make_scale_fixtures.py --only tokenizers
    /root/etllm-export-venv/bin/python tools/bench/make_scale_fixtures.py --only s15m_v128k
    nice -n 5 /root/etllm-export-venv/bin/python tools/bench/make_scale_fixtures.py --only qwen05b_v152k
    /root/etllm-export-venv/bin/python tools/bench/make_scale_fixtures.py --big      # everything, 0.5B too

Options: --out DIR (default /work/bench-models), --only NAME[,NAME...] where NAME is
`tokenizers`, `models`, a tokenizer name or a model name below, --big (adds the 0.5B
model to the default set), --etllm BIN (default target/release/etllm; the EtLlm load
checks are skipped with a warning if it is missing), --no-verify (skip the checks),
--force (rebuild tokenizer files that exist; by default they are kept and re-checked;
models are always rebuilt). The quantized benchmark exports (QUANTIZED below:
s15m_v32k_8da4w, s15m_v32k_8da4w_kv8) are built only when named in --only.

Everything is deterministic (fixed seeds, sorted inputs), except build_log.json (timings).
The models need their tokenizers; `--only MODEL` builds the paired tokenizer first if it is
missing. The script exits non-zero, with a banner, on any failed check.

Files (under --out)
-------------------

    (Sizes as built on Debian 12 / Python 3.11.)

    tokenizers/corpus.txt               16.7 MB: training text of the two 32k tokenizers: the King
                                        James Bible (Debian `bible-kjv-text`, printed with
                                        `bible Gen1:1-Rev22:21`), then every *.py of this Python's
                                        stdlib (tests and site-packages excluded; sorted paths),
                                        then /usr/share/common-licenses/* (sorted)
    tokenizers/mixed.txt                0.37 MB of mixed text used by the equivalence checks
                                        (Bible, Python, licences, fixture sentences in several
                                        scripts with emoji, seeded random Unicode/whitespace/digits)

    tokenizers/tiktoken_128k/tokenizer.model   vocab 128,000 ranks (+256 specials = 128,256), 2.2 MB
        The first 128,000 ranks of OpenAI's o200k_base (from the tiktoken-rs 0.12.1 crate's
        assets; ranks 0..255 are the 256 single bytes, so the prefix is a complete byte-level
        BPE). Llama 3's layout: the 256 special tokens come from the loader (EtLlm's
        TiktokenOptions::llama3 and upstream's Tiktoken() defaults: <|begin_of_text|> 128000,
        <|end_of_text|> 128001, ...) and so does the split pattern (Llama 3's).

    tokenizers/hf_128k/tokenizer.json (+ tokenizer_config.json)   vocab 128,256, 9.7 MB
        HF byte-level BPE converted from the same 128,000 ranks: vocab in GPT-2's
        byte-to-unicode form, id = rank, one merge per token (the last merge that byte-level
        BPE with only lower ranks makes when it rebuilds the token; every token of the prefix
        is rebuilt that way, so the merges reproduce tiktoken exactly), merge priority = rank.
        Pre-tokenizer: Split(Llama 3's regex, isolated) + ByteLevel(no prefix space, no regex);
        decoder ByteLevel; ignore_merges true (as Llama 3's file). 256 special tokens named as
        in Llama 3.1 (<|begin_of_text|> 128000, <|end_of_text|> 128001, <|eot_id|> 128009, ...).
        Post-processor: TemplateProcessing "<|begin_of_text|> $A" (as Llama 3's file), which is
        how upstream's HFTokenizer adds its BOS (it ignores num_bos otherwise; EtLlm ignores
        the post-processor and adds the model's get_bos_id itself).

    tokenizers/hf_152k/tokenizer.json (+ tokenizer_config.json)   vocab 151,665, 11.6 MB
        The same conversion of the first 151,643 ranks of o200k_base, plus Qwen2.5's 22
        special tokens (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, ...,
        <|file_sep|> 151664). Split regex: Qwen2's (Llama 3's with single digits); no NFC
        normalizer (Qwen's files have one; left out so the ids equal tiktoken's on any text).
        Qwen defines no BOS; this file's TemplateProcessing prepends <|endoftext|>, the id
        upstream's Qwen 2.5 export recipe gives get_bos_id (151643), so that both runners
        start the prompt with the same single BOS.

    tokenizers/hf_32k/tokenizer.json (+ tokenizer_config.json)    vocab 32,000, 2.3 MB
        HF byte-level BPE (GPT-2 pre-tokenizer) trained with `tokenizers` on corpus.txt:
        <unk> 0, <s> 1, </s> 2, the 256 byte symbols, 31,741 merges. TemplateProcessing "<s> $A".

    tokenizers/sp_32k/tokenizer.model   vocab 32,000, 0.53 MB
        SentencePiece BPE trained with `sentencepiece` on corpus.txt, Llama 2's settings:
        byte_fallback, <unk> 0, <s> 1, </s> 2, no pad, split_digits, identity normalisation,
        dummy prefix, whitespace-only pieces allowed.

    tokenizers/verify.json              the results of the checks below

    s15m_v32k/model.pte      98 MB   vocab 32,000   pairs with sp_32k (also hf_32k)    bos 1, eos [2]
    s15m_v128k/model.pte     320 MB  vocab 128,256  pairs with tiktoken_128k (also hf_128k)
                                                    bos 128000, eos [128001, 128009]
    s15m_v152k/model.pte     375 MB  vocab 151,936  pairs with hf_152k  bos 151643, eos [151643, 151645]
    qwen05b_v152k/model.pte  2.5 GB  (--big) vocab 151,936, pairs with hf_152k, same bos/eos.
                             Export: ~5 min wall, 10.3 GB peak RSS on this 2-core machine.
        each with info.json (the tokenizer(s) to use, relative to the model's folder, the
        params, export settings, init, size and sha256).

    build_log.json           wall time of each step (the only non-deterministic file, besides
                             sp_32k/tokenizer.model's record of its training paths, which
                             depend on --out; its pieces and scores do not)

Models: random weights, exported with upstream's `export_llm` (model_class llama3) exactly
like tools/fixtures/make_fixtures.py --bench, with upstream's recommended recipe: fp32,
XNNPACK with extended ops, use_kv_cache, enable_dynamic_shape, use_sdpa_with_kv_cache
(so they contain llama::custom_sdpa / llama::update_cache), max_seq_length 256 (the prefill
chunk), max_context_length 2048.
  - s15m_*: the stories15M shape (dim 288, 6 layers, 6 heads, 6 kv heads, multiple_of 32,
    norm eps 1e-5).
  - qwen05b_v152k: Qwen2.5-0.5B's shape (dim 896, 24 layers, 14 heads, 2 kv heads, hidden_dim
    4864, qkv bias, HF rope, rope theta 1e6, norm eps 1e-6), untied output layer (~2.5 GB).
Weights: make_fixtures.random_state_dict's recipe (norms 1 + N(0, 0.05^2), embeddings
N(0, 1), linears N(0, 1/fan_in), output N(0, gain^2/dim), seed 7), plus q/k/v biases
N(0, 0.02^2) for the 0.5B model; the first gain in (4, 6, 3, 8) whose eager
greedy continuations are non-degenerate is kept. Then the output rows of the EOS ids and of
the ids past the tokenizer's vocabulary (the padding rows of a 151,936-row table) are set to
zero: their logit is always 0, far below the top logits, so a benchmark run does not stop
early on EOS (upstream has no ignore_eos) and never samples an id the tokenizer lacks.
Each .pte is checked against eager PyTorch (prefill logits of a prompt, then decode steps)
through ExecuTorch's pybindings with upstream's llama:: kernels loaded.

Checks (verify.json; any failure exits non-zero):
  - tiktoken (Python) with the 128,000 / 151,643 prefix ranks and the file's split regex
    encodes mixed.txt to exactly the ids `tokenizers` gives with hf_128k / hf_152k.
  - EtLlm (`etllm tokenize --file mixed.txt`) gives the same ids for tiktoken_128k,
    hf_128k and hf_152k; for hf_32k and sp_32k the same as `tokenizers` / `sentencepiece`.
  - Each tokenizer's vocabulary size in EtLlm (the highest id `etllm detokenize` accepts + 1)
    and in upstream's C++ tokenizers (pytorch_tokenizers Cpp*, the code TextLLMRunner uses)
    equals the expected size; both encode a sample sentence (with and without one BOS) to
    the same ids. Upstream's ids on mixed.txt are recorded too (its tiktoken split regex lacks
    Llama 3's `\\s+(?!\\S)` branch, so runs of spaces before a word split differently there).
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "fixtures"))

DEFAULT_OUT = Path("/work/bench-models")
O200K_GLOB = str(Path.home() / ".cargo/registry/src/*/tiktoken-rs-0.12.1/assets/o200k_base.tiktoken")

# Llama 3's split pattern (EtLlm's LLAMA3_PATTERN, tiktoken's cl100k pattern).
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's: the same with single digits.
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA31_SPECIAL_BASE = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|reserved_special_token_0|>",
    3: "<|reserved_special_token_1|>", 4: "<|finetune_right_pad_id|>", 5: "<|reserved_special_token_2|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
    10: "<|python_tag|>",
}


def llama31_specials() -> list[str]:
    out = []
    for i in range(256):
        out.append(LLAMA31_SPECIAL_BASE.get(i) or f"<|reserved_special_token_{i - 8}|>")
    assert len(set(out)) == 256 and out[11] == "<|reserved_special_token_3|>"
    return out


QWEN25_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]

TOKENIZERS = {
    # name: (file inside tokenizers/NAME, expected vocabulary size)
    "tiktoken_128k": ("tokenizer.model", 128_256),
    "hf_128k": ("tokenizer.json", 128_256),
    "hf_152k": ("tokenizer.json", 151_665),
    "hf_32k": ("tokenizer.json", 32_000),
    "sp_32k": ("tokenizer.model", 32_000),
}

S15M = {"dim": 288, "n_layers": 6, "n_heads": 6, "n_kv_heads": 6, "multiple_of": 32, "norm_eps": 1e-5}
QWEN05B = {"dim": 896, "n_layers": 24, "n_heads": 14, "n_kv_heads": 2, "hidden_dim": 4864,
           "norm_eps": 1e-6, "rope_theta": 1_000_000.0, "use_hf_rope": True, "attention_qkv_bias": True}
MODELS = {
    # name: (params, vocab, tokenizers (first = primary), bos, eos ids)
    "s15m_v32k": (S15M, 32_000, ["sp_32k", "hf_32k"], 1, [2]),
    "s15m_v128k": (S15M, 128_256, ["tiktoken_128k", "hf_128k"], 128_000, [128_001, 128_009]),
    "s15m_v152k": (S15M, 151_936, ["hf_152k"], 151_643, [151_643, 151_645]),
    "qwen05b_v152k": (QWEN05B, 151_936, ["hf_152k"], 151_643, [151_643, 151_645]),
}
# Quantized exports of a model above, with upstream's published recipes (issue 16): name ->
# (base model, export_llm quantization keys). The base model's weights and checks are reused;
# the check against eager is skipped (quantization changes the logits by design; the tests'
# small fixtures check quantized exports against upstream's runtime instead).
QUANTIZED = {
    # Llama 3.2's recipe: 8-bit dynamic activations, 4-bit grouped weights, 4-bit embeddings.
    "s15m_v32k_8da4w": ("s15m_v32k", dict(qmode="8da4w", group_size=32, embedding_quantize="4,32")),
    # The same with the int8 KV cache (and 8-bit embeddings, as upstream's docs pair them).
    "s15m_v32k_8da4w_kv8": ("s15m_v32k", dict(qmode="8da4w", group_size=32, embedding_quantize="8,0",
                                              quantize_kv_cache=True)),
    # A real model's shape (Qwen2.5-0.5B) in Llama 3.2's recipe.
    "qwen05b_v152k_8da4w": ("qwen05b_v152k", dict(qmode="8da4w", group_size=32, embedding_quantize="4,32")),
}
BIG = {"qwen05b_v152k"}
MAX_SEQ_LEN = 256
MAX_CONTEXT_LEN = 2048

SAMPLE = "Hello world! Once upon a time, in 2024, a café served 東京 ramen 🍜 to 42 people."

FAILURES: list[str] = []
LOG: dict[str, float] = {}


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print("\n" + "!" * 78 + f"\n!!! CHECK FAILED: {msg}\n" + "!" * 78 + "\n", flush=True)


class step:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.t0 = time.time()
        print(f"=== {self.name}", flush=True)

    def __exit__(self, *exc):
        LOG[self.name] = round(time.time() - self.t0, 1)
        print(f"=== {self.name}: {LOG[self.name]} s", flush=True)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


def bible_text() -> str:
    try:
        r = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise SystemExit("needs the `bible` program and its text: apt-get install bible-kjv-text bible-kjv")
    assert len(r.stdout) > 4_000_000, len(r.stdout)
    return r.stdout


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def build_corpus(out: Path) -> Path:
    path = out / "tokenizers" / "corpus.txt"
    if path.exists():
        return path
    parts = [bible_text()]
    for p in stdlib_files():
        parts.append(p.read_bytes().decode("utf-8", errors="replace"))
    for p in sorted(Path("/usr/share/common-licenses").glob("*")):
        if p.is_file():
            parts.append(p.read_bytes().decode("utf-8", errors="replace"))
    text = "\n".join(parts).replace("\r\n", "\n").replace("\x00", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


RANGES = [(0x41, 0x7A), (0xC0, 0xFF), (0x391, 0x3C9), (0x410, 0x44F), (0x621, 0x64A), (0x905, 0x939),
          (0x3041, 0x3096), (0x30A1, 0x30F6), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F),
          (0x2200, 0x22FF), (0x300, 0x36F), (0x2000, 0x206F), (0xE000, 0xE0FF)]
SEPS = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", " \t ", "", "", "", "", ""]
BITS = ["'s", "'T", "'ll", "'Re", "n't", "...", "!!", "?!", "--", "()", "[];", "==", "->", "#", "@",
        "$", "%", "1", "12", "123", "1234", "12345678", "3.14159", "1,000,000", "0x1F", "2024-12-05",
        "e\u0301", "\u200d", "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\ufeff", "\u00a0", "ﬁ"]


def random_unicode(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        r = rng.random()
        if r < 0.6:
            lo, hi = rng.choice(RANGES)
            w = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 9)))
        elif r < 0.8:
            w = rng.choice(BITS)
        else:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ABCXYZ") for _ in range(rng.randint(1, 12)))
        w = w.replace("\ud800", "")
        out.append(w + rng.choice(SEPS))
        size += len(out[-1])
    return "".join(out)


def build_mixed(out: Path, corpus: Path) -> Path:
    import make_fixtures as mf

    path = out / "tokenizers" / "mixed.txt"
    text = corpus.read_text(encoding="utf-8")
    assert len(text) > 12_000_000, len(text)
    rng = random.Random(15)
    pools = mf.ENGLISH + mf.ACCENTED + mf.CJK + mf.EMOJI
    parts = [
        text[1_000_000:1_080_000],                     # Bible
        text[6_000_000:6_080_000],                     # Python (the Bible is the first ~4.3 MB)
        text[-40_000:],                                # licences
        "\n".join(" ".join(rng.choice(pools) for _ in range(rng.randint(1, 4))) for _ in range(400)),
        random_unicode(rng, 60_000),
    ]
    mixed = "\n".join(parts)
    # No special-token text: `tokenizers` would match added tokens, tiktoken's
    # encode_ordinary would not.
    for s in llama31_specials() + QWEN25_SPECIALS + ["<s>", "</s>", "<unk>"]:
        mixed = mixed.replace(s, s.replace("<", "< "))
    path.write_text(mixed, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def load_o200k() -> list[bytes]:
    paths = glob.glob(O200K_GLOB)
    if not paths:
        raise SystemExit(f"o200k_base.tiktoken not found ({O200K_GLOB}); run `cargo fetch` in the repo")
    ranked = {}
    for line in Path(paths[0]).read_bytes().splitlines():
        tok, rank = line.split()
        ranked[int(rank)] = base64.b64decode(tok)
    by_rank = [ranked[i] for i in range(len(ranked))]
    assert sorted(len(t) for t in by_rank[:256]) == [1] * 256, "ranks 0..255 must be the single bytes"
    assert len(set(by_rank)) == len(by_rank)
    return by_rank


def last_merges(by_rank: list[bytes], n: int) -> list[tuple[bytes, bytes]]:
    """For each token of rank 256..n-1: the two parts that byte-level BPE, using only lower
    ranks, joins last when it rebuilds the token from its bytes."""
    ranks = {t: i for i, t in enumerate(by_rank[:n])}
    merges = []
    for r in range(256, n):
        parts = [bytes([b]) for b in by_rank[r]]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                k = ranks.get(parts[i] + parts[i + 1])
                if k is not None and k < r and (best is None or k < best[0]):
                    best = (k, i)
            if best is None:
                raise SystemExit(f"rank {r} ({by_rank[r]!r}) is not reachable by BPE over lower ranks")
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2 and ranks.get(parts[0]) is not None and ranks.get(parts[1]) is not None
        merges.append((parts[0], parts[1]))
    return merges


def write_tiktoken(by_rank: list[bytes], n: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i in range(n):
            f.write(base64.b64encode(by_rank[i]) + b" " + str(i).encode() + b"\n")


def hf_from_ranks(by_rank, merges, n, pattern, specials, bos, ignore_merges, path: Path, config: dict):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    b2u = bytes_to_unicode()
    u = lambda t: "".join(b2u[b] for b in t)  # noqa: E731
    vocab = {u(by_rank[i]): i for i in range(n)}
    assert len(vocab) == n
    hf_merges = [(u(a), u(b)) for a, b in merges[: n - 256]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=hf_merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos_id = n + specials.index(bos)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    assert tok.get_vocab_size(with_added_tokens=True) == n + len(specials)
    write_hf(tok, path, config)


def write_hf(tok, path: Path, config: dict) -> None:
    from tokenizers import Tokenizer

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    Tokenizer.from_file(str(path))


def train_hf_32k(corpus: Path, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32_000, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([str(corpus)], trainer=trainer)
    assert tok.get_vocab_size() == 32_000, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    write_hf(tok, path, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                         "add_bos_token": True, "model_max_length": MAX_CONTEXT_LEN})


def train_sp_32k(corpus: Path, path: Path) -> None:
    import sentencepiece as spm

    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = path.parent / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=32_000,
        character_coverage=0.99995, byte_fallback=True, split_digits=True, split_by_unicode_script=True,
        split_by_whitespace=True, split_by_number=True, max_sentencepiece_length=16,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=16384, shuffle_input_sentence=False, num_threads=2, minloglevel=1,
    )
    (path.parent / "tokenizer.vocab").unlink(missing_ok=True)
    assert prefix.with_suffix(".model") == path
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == 32_000 and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)


def make_tokenizers(out: Path, names: list[str], etllm: str | None, verify: bool, force: bool) -> None:
    tdir = out / "tokenizers"
    with step("corpus"):
        corpus = build_corpus(out)
        mixed = build_mixed(out, corpus)
    print(f"corpus {corpus.stat().st_size} bytes; mixed {mixed.stat().st_size} bytes")
    todo = [n for n in names if force or not (tdir / n / TOKENIZERS[n][0]).exists()]
    if todo != names:
        print(f"kept (exist; --force rebuilds): {[n for n in names if n not in todo]}")
    by_rank = None
    merges = None
    if {"tiktoken_128k", "hf_128k", "hf_152k"} & set(names):
        with step("o200k ranks and merges"):
            by_rank = load_o200k()
            merges = last_merges(by_rank, 151_643) if {"hf_128k", "hf_152k"} & set(todo) else None
    if "tiktoken_128k" in todo:
        with step("tiktoken_128k"):
            write_tiktoken(by_rank, 128_000, tdir / "tiktoken_128k" / "tokenizer.model")
    if "hf_128k" in todo:
        with step("hf_128k"):
            hf_from_ranks(by_rank, merges, 128_000, LLAMA3_PAT, llama31_specials(), "<|begin_of_text|>", True,
                          tdir / "hf_128k" / "tokenizer.json",
                          {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                           "model_max_length": MAX_CONTEXT_LEN})
    if "hf_152k" in todo:
        with step("hf_152k"):
            hf_from_ranks(by_rank, merges, 151_643, QWEN2_PAT, QWEN25_SPECIALS, "<|endoftext|>", False,
                          tdir / "hf_152k" / "tokenizer.json",
                          {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                           "model_max_length": MAX_CONTEXT_LEN})
    if "hf_32k" in todo:
        with step("hf_32k (train)"):
            train_hf_32k(corpus, tdir / "hf_32k" / "tokenizer.json")
    if "sp_32k" in todo:
        with step("sp_32k (train)"):
            train_sp_32k(corpus, tdir / "sp_32k" / "tokenizer.model")
    if verify:
        with step("verify tokenizers"):
            verify_tokenizers(out, names, mixed, etllm, by_rank)


# ---------------------------------------------------------------------------
# Tokenizer checks
# ---------------------------------------------------------------------------


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(label: str, got: list[int], want: list[int], record: dict, must: bool = True) -> bool:
    i = first_diff(got, want)
    record[label] = {"ids": len(got), "expected_ids": len(want), "equal": i is None}
    if i is not None:
        record[label]["first_difference_at"] = i
        record[label]["got"] = got[max(0, i - 3): i + 5]
        record[label]["expected"] = want[max(0, i - 3): i + 5]
        msg = f"{label}: ids differ at index {i} ({len(got)} vs {len(want)} ids)"
        if must:
            fail(msg)
        else:
            print("note: " + msg)
    else:
        print(f"ok: {label}: {len(got)} ids equal")
    return i is None


def etllm_ids(etllm: str, tok: Path, *, text: str | None = None, file: Path | None = None, bos: int = 0):
    cmd = [etllm, "tokenize", "--tokenizer", str(tok), "--bos", str(bos)]
    cmd += ["--text", text] if text is not None else ["--file", str(file)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def etllm_vocab_size(etllm: str, tok: Path, expected: int) -> int | None:
    """The vocabulary size EtLlm sees: the highest id `etllm detokenize` accepts, plus one
    (checked at expected-1 and expected)."""
    ok = lambda i: subprocess.run([etllm, "detokenize", "--tokenizer", str(tok), "--ids", f"[{i}]"],  # noqa: E731
                                  capture_output=True).returncode == 0
    if ok(expected - 1) and not ok(expected):
        return expected
    lo, hi = 0, 1 << 20  # ok(lo) true, ok(hi) false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return hi


def upstream_tokenizer(name: str, path: Path):
    import pytorch_tokenizers as pt

    cls = {"tiktoken": pt.CppTiktoken, "hf": pt.CppHFTokenizer, "sp": pt.CppSPTokenizer}[name.split("_")[0]]
    t = cls()
    t.load(str(path))
    return t


def verify_tokenizers(out: Path, names: list[str], mixed: Path, etllm: str | None, by_rank) -> None:
    import sentencepiece as spm
    import tiktoken
    from tokenizers import Tokenizer

    tdir = out / "tokenizers"
    text = mixed.read_bytes().decode("utf-8")  # not read_text: that would turn \r\n into \n
    report = json.loads((tdir / "verify.json").read_text()) if (tdir / "verify.json").exists() else {}
    report["mixed_txt"] = {"bytes": len(text.encode()), "sha256": sha256(mixed)}
    report["sample"] = SAMPLE
    if etllm is None:
        print("WARNING: no etllm binary: EtLlm checks skipped")
    for name in names:
        fname, vsize = TOKENIZERS[name]
        path = tdir / name / fname
        rec = report[name] = {"file": str(path.relative_to(out)), "bytes": path.stat().st_size,
                              "sha256": sha256(path), "expected_vocab_size": vsize}
        kind = name.split("_")[0]
        # The reference ids on mixed.txt.
        if kind in ("tiktoken", "hf") and name != "hf_32k":
            n = {"tiktoken_128k": 128_000, "hf_128k": 128_000, "hf_152k": 151_643}[name]
            pat = QWEN2_PAT if name == "hf_152k" else LLAMA3_PAT
            enc = tiktoken.Encoding(name=f"o200k_prefix_{n}", pat_str=pat,
                                    mergeable_ranks={by_rank[i]: i for i in range(n)}, special_tokens={})
            ref = enc.encode_ordinary(text)
            rec["reference"] = f"tiktoken {tiktoken.__version__}, first {n} ranks of o200k_base"
            if kind == "hf":
                hf = Tokenizer.from_file(str(path))
                rec["vocab_size_tokenizers"] = hf.get_vocab_size(with_added_tokens=True)
                compare("tokenizers(hf) == tiktoken on mixed.txt", hf.encode(text, add_special_tokens=False).ids,
                        ref, rec)
                sample_ref = hf.encode(SAMPLE, add_special_tokens=False).ids
            else:
                sample_ref = enc.encode_ordinary(SAMPLE)
        elif name == "hf_32k":
            hf = Tokenizer.from_file(str(path))
            rec["vocab_size_tokenizers"] = hf.get_vocab_size(with_added_tokens=True)
            ref = hf.encode(text, add_special_tokens=False).ids
            rec["reference"] = "tokenizers"
            sample_ref = hf.encode(SAMPLE, add_special_tokens=False).ids
        else:
            sp = spm.SentencePieceProcessor(model_file=str(path))
            rec["vocab_size_sentencepiece"] = sp.get_piece_size()
            ref = sp.encode(text)
            rec["reference"] = f"sentencepiece {spm.__version__}"
            sample_ref = sp.encode(SAMPLE)
        bos = {"hf_32k": 1, "sp_32k": 1, "tiktoken_128k": 128_000, "hf_128k": 128_000, "hf_152k": 151_643}[name]
        rec["sample_ids"] = sample_ref
        # EtLlm.
        if etllm is not None:
            compare("etllm == reference on mixed.txt", etllm_ids(etllm, path, file=mixed), ref, rec)
            compare("etllm sample", etllm_ids(etllm, path, text=SAMPLE), sample_ref, rec)
            # An HF tokenizer's BOS comes from its folder's tokenizer_config.json (hf_152k's
            # <|endoftext|> is not a name EtLlm guesses a BOS from; a generation takes the
            # model's get_bos_id anyway).
            compare("etllm sample --bos 1" + (" (folder)" if kind == "hf" else ""),
                    etllm_ids(etllm, path.parent if kind == "hf" else path, text=SAMPLE, bos=1),
                    [bos] + sample_ref, rec)
            rec["vocab_size_etllm"] = etllm_vocab_size(etllm, path, vsize)
            if rec["vocab_size_etllm"] != vsize:
                fail(f"{name}: EtLlm's vocabulary size {rec['vocab_size_etllm']} != {vsize}")
        # Upstream's C++ tokenizers (those TextLLMRunner loads).
        up = upstream_tokenizer(name, path.parent if kind == "hf" else path)
        rec["vocab_size_upstream"] = up.vocab_size()
        rec["upstream_bos_eos"] = [up.bos_tok(), up.eos_tok()]
        if up.vocab_size() != vsize:
            fail(f"{name}: upstream's vocabulary size {up.vocab_size()} != {vsize}")
        compare("upstream sample", list(up.encode(SAMPLE, 0, 0)), sample_ref, rec)
        compare("upstream sample bos=1", list(up.encode(SAMPLE, 1, 0)), [bos] + sample_ref, rec)
        compare("upstream == reference on mixed.txt (report only)", list(up.encode(text, 0, 0)), ref, rec,
                must=False)
        print(f"{name}: vocab expected {vsize}; EtLlm {rec.get('vocab_size_etllm')}; upstream {up.vocab_size()}")
    (tdir / "verify.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def tokenizer_path(out: Path, name: str) -> Path:
    return out / "tokenizers" / name / TOKENIZERS[name][0]


def prompt_ids(out: Path, tok_name: str, bos: int) -> list[int]:
    path = tokenizer_path(out, tok_name)
    text = "Once upon a time, in a small village by the sea, there lived an old fisherman"
    if tok_name.startswith("sp"):
        import sentencepiece as spm

        ids = spm.SentencePieceProcessor(model_file=str(path)).encode(text)
    elif tok_name.startswith("tiktoken"):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ids = tiktoken.Encoding(name=tok_name, pat_str=LLAMA3_PAT, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                special_tokens={}).encode_ordinary(text)
    else:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    return [bos] + ids


def random_weights(params: dict, seed: int, out_gain: float) -> dict:
    """make_fixtures.random_state_dict (biases, which Qwen's q/k/v have, ~N(0, 0.02^2))."""
    import make_fixtures as mf

    return mf.random_state_dict(params, seed, out_gain, bias_std=0.02)


def make_model(out: Path, name: str, verify: bool) -> None:
    import torch

    import make_fixtures as mf

    quant = {}
    if name in QUANTIZED:
        base_name, quant = QUANTIZED[name]
        verify = False  # see QUANTIZED
    else:
        base_name = name
    base, vocab, toks, bos, eos = MODELS[base_name]
    params = dict(base, vocab_size=vocab)
    tok_vocab = TOKENIZERS[toks[0]][1]
    assert all(TOKENIZERS[t][1] <= vocab for t in toks)
    mdir = out / name
    mdir.mkdir(parents=True, exist_ok=True)
    # Named after the base model: upstream's model.py loads a checkpoint whose path contains
    # "8da4w" or "int8" as pre-quantized.
    work = Path(tempfile.mkdtemp(prefix=f"etllm-scale-{base_name}-"))
    ids = prompt_ids(out, toks[0], bos)
    big = name in BIG
    n_check = 8 if big else 24

    with step(f"{name}: weights"):
        chosen = None
        for out_gain in (4.0, 6.0, 3.0, 8.0):
            sd = random_weights(params, seed=7, out_gain=out_gain)
            w = sd["output.weight"]
            w[eos] = 0.0
            w[tok_vocab:] = 0.0
            ref = mf.build_transformer(params, sd, use_kv_cache=False, dynamic=False,
                                       max_seq_len=MAX_CONTEXT_LEN, max_context_len=MAX_CONTEXT_LEN)
            first, greedy, margin = mf.eager_greedy(ref, ids, n_check)
            probs = torch.softmax(first / 0.8, dim=-1)
            zero_mass = float(probs[eos].sum() + probs[tok_vocab:].sum())
            degenerate = len(set(greedy)) < min(8, n_check - 2) or mf.is_degenerate(greedy) and not big
            print(f"{name}: out_gain {out_gain}: greedy {greedy[:12]}..., distinct {len(set(greedy))}, "
                  f"min top-2 margin {margin:.4f}, p(zeroed rows) at T=0.8 {zero_mass:.2e}")
            if not degenerate:
                chosen = (out_gain, sd, ref, first, greedy, margin, zero_mass)
                break
            del ref
        if chosen is None:
            raise SystemExit(f"{name}: no non-degenerate output gain")
        out_gain, sd, ref, first, greedy, margin, zero_mass = chosen
        del ref, chosen
        # Decode-step references from eager (prefill logits of `ids`, then each greedy token).
        params_path = work / "params.json"
        params_path.write_text(json.dumps(params))
        ckpt = work / "checkpoint.pth"
        torch.save(sd, ckpt)
        del sd

    pte = mdir / "model.pte"
    with step(f"{name}: export"):
        mf.METADATA_JSON = json.dumps({"get_bos_id": bos, "get_eos_ids": eos})
        mf.export_llm(work, name, params_path, ckpt, pte, kv=True, dynamic=True, xnnpack=True, extended=True,
                      max_seq_len=MAX_SEQ_LEN, max_context_len=MAX_CONTEXT_LEN, sdpa_with_kv_cache=True,
                      **quant)
    ckpt.unlink()

    check = {}
    if verify:
        with step(f"{name}: check against eager"):
            check = check_pte(pte, ids, greedy, first, vocab, bos, eos)
    size = pte.stat().st_size
    info = {
        "model": "model.pte",
        "tokenizer": os.path.relpath(tokenizer_path(out, toks[0]), mdir),
        "tokenizers": {t: os.path.relpath(tokenizer_path(out, t), mdir) for t in toks},
        "vocab_size": vocab,
        "tokenizer_vocab_size": {t: TOKENIZERS[t][1] for t in toks},
        "bos_id": bos,
        "eos_ids": eos,
        "params": params,
        "export": {"tool": "executorch.extension.llm.export.export_llm (executorch 1.5.1)",
                   "model_class": "llama3", "dtype": "fp32", "xnnpack": True, "extended_ops": True,
                   "use_kv_cache": True, "enable_dynamic_shape": True, "use_sdpa_with_kv_cache": True,
                   "max_seq_length": MAX_SEQ_LEN, "max_context_length": MAX_CONTEXT_LEN,
                   "quantization": quant},
        "init": {"seed": 7, "out_gain": out_gain,
                 "zeroed_output_rows": f"eos ids {eos} and ids {tok_vocab}..{vocab - 1}" if tok_vocab < vocab
                 else f"eos ids {eos}",
                 "eager_greedy": greedy, "eager_min_top2_margin": round(margin, 5),
                 "p_zeroed_rows_first_step_T0.8": float(f"{zero_mass:.3e}")},
        "check": check,
        "bytes": size,
        "sha256": sha256(pte),
    }
    (mdir / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{name}: {pte} {size / 1e6:.1f} MB")


def check_pte(pte: Path, ids, greedy, first, vocab, bos, eos) -> dict:
    """The .pte through the pybindings (upstream's llama:: kernels) against eager PyTorch:
    prefill logits of `ids`, then greedy decode steps fed one token at a time."""
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

    import make_fixtures as mf

    desc = mf.describe_pte(pte)
    meta = desc["metadata"]
    want = {"get_vocab_size": vocab, "get_bos_id": bos, "get_max_seq_len": MAX_SEQ_LEN,
            "get_max_context_len": MAX_CONTEXT_LEN, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
            "use_kv_cache": True}
    for k, v in want.items():
        if meta.get(k) != v:
            fail(f"{pte}: metadata {k} = {meta.get(k)!r}, expected {v!r}")
    if list(meta.get("get_eos_ids", [])) != eos:
        fail(f"{pte}: metadata get_eos_ids = {meta.get('get_eos_ids')!r}, expected {eos}")
    ops = desc["signatures"]["forward"].get("operators", [])
    m = mf.PteModel(pte)
    out = m.run(torch.tensor([ids]), torch.tensor([0])).reshape(-1)
    err = float((out - first).abs().max())
    pos = len(ids)
    tokens = []
    tok = int(torch.argmax(out))
    for _ in range(len(greedy)):
        tokens.append(tok)
        out = m.run(torch.tensor([[tok]]), torch.tensor([pos])).reshape(-1)
        pos += 1
        tok = int(torch.argmax(out))
    scale = float(first.abs().max())
    ok = err <= 1e-3 * max(1.0, scale) and tokens == greedy
    if not ok:
        fail(f"{pte}: pybindings vs eager: max |prefill logit diff| {err:.2e} (scale {scale:.1f}); "
             f"greedy {tokens[:10]} vs eager {greedy[:10]}")
    else:
        print(f"ok: {pte.parent.name}: prefill logits within {err:.2e} of eager; {len(tokens)} greedy tokens equal")
    return {"metadata": meta, "operators": ops, "prefill_max_abs_diff_vs_eager": float(f"{err:.3e}"),
            "greedy_equal_eager": tokens == greedy}


# ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", default="", help="comma-separated: tokenizers, models, or tokenizer/model names")
    ap.add_argument("--big", action="store_true", help="also the 0.5B model (qwen05b_v152k, ~2.5 GB)")
    ap.add_argument("--etllm", default=str(REPO / "target" / "release" / "etllm"))
    ap.add_argument("--no-verify", action="store_true", help="skip the checks")
    ap.add_argument("--force", action="store_true",
                    help="rebuild tokenizers that exist (by default they are kept and only checked)")
    args = ap.parse_args()
    verify = not args.no_verify

    wanted = [w for w in args.only.split(",") if w]
    if not wanted:
        toks = list(TOKENIZERS)
        models = [m for m in MODELS if m not in BIG or args.big]
    else:
        toks, models = [], []
        for w in wanted:
            if w == "tokenizers":
                toks += list(TOKENIZERS)
            elif w == "models":
                models += [m for m in MODELS if m not in BIG or args.big]
            elif w in TOKENIZERS:
                toks.append(w)
            elif w in MODELS or w in QUANTIZED:
                models.append(w)
            else:
                raise SystemExit(f"--only: unknown name {w!r}; known: {list(TOKENIZERS) + list(MODELS)}")
    for m in models:  # a model's tokenizers must exist
        for t in MODELS[QUANTIZED[m][0] if m in QUANTIZED else m][2]:
            if t not in toks and not tokenizer_path(args.out, t).exists():
                toks.append(t)
    toks = [t for t in TOKENIZERS if t in toks]
    etllm = args.etllm if Path(args.etllm).exists() else None

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if toks:
        make_tokenizers(args.out, toks, etllm, verify, args.force)
    for m in models:
        make_model(args.out, m, verify)
    LOG[f"total (--only {args.only or 'default'}{' --big' if args.big else ''})"] = round(time.time() - t0, 1)
    log_path = args.out / "build_log.json"
    old = json.loads(log_path.read_text()) if log_path.exists() else {}
    old.update(LOG)
    log_path.write_text(json.dumps(old, indent=1) + "\n")
    if FAILURES:
        print(f"\n{len(FAILURES)} CHECK(S) FAILED:")
        for f in FAILURES:
            print(" - " + f)
        return 1
    print("\nALL CHECKS PASSED" if verify else "\ndone (checks skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
