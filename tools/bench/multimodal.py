#!/usr/bin/env python3
"""Image + text generation: EtLlm (`etllm.Runner.generate_inputs` / `prefill_inputs`, over
ctypes) against upstream ExecuTorch's `MultimodalRunner` (the executorch 1.5.1 wheel's Python
binding, C++ runner underneath), on the same `.pte` (upstream's multimodal layout:
`vision_encoder`, `token_embedding`, `text_decoder`), interleaved in the same run.

    # the bench-scale model (once; ~4 min on 2 cores): a Llava with a CLIP ViT at 224 px, patch 14
    # (256 image rows) and a Llama text model with a 32,000-token vocabulary
    /root/etllm-export-venv/bin/python tools/bench/multimodal.py make [--out /work/bench-models]

    # the benchmark (the committed toy fixture, then the bench-scale model)
    /root/etllm-export-venv/bin/python tools/bench/multimodal.py run \\
        --model-dir tests/fixtures/multimodal --rounds 9 --tokens 80 --threads 1
    /root/etllm-export-venv/bin/python tools/bench/multimodal.py run \\
        --model-dir /work/bench-models/llava_bench --rounds 7 --tokens 128 --threads 1

Needs the export venv (torch, executorch 1.5.1, transformers 5.0.0rc1, optimum-executorch
1.1.0; see tools/fixtures/README.md) and the built library (target/release/libetllm.so, or
ETLLM_LIBRARY). Never CI; no timed assertion.

How it runs
  Two worker processes, each loaded once and kept for the whole run: `upstream` (imports
  torch and executorch; fd 1 points at /dev/null, since the runner prints the text itself)
  and `etllm` (PYTHONPATH=python, ETLLM_LIBRARY=...; imports only etllm and numpy). They
  never share a process (each has its own ExecuTorch and XNNPACK). The parent sends each a
  job at a time, so only one of them computes at any moment. Both get the same thread count
  (--threads: ExecuTorch's pool; on upstream's side also torch's and OMP_NUM_THREADS, for
  the CLIP image processor's sake).

  The prompt is the fixture's layout: token ids of "<s>USER: ", one image, token ids of the
  rest ("\\nDescribe.ASSISTANT:" etc.), given as token ids to both (so that the tokenizers
  cannot differ). One run, on either side:
      reset; prefill(prefix tokens);
      [t0] prefill(image) [t1];                      -> encoder time = t1 - t0
      [t2] generate(suffix tokens, greedy, max_new_tokens=n, echo off) [t3]
  Upstream: MultimodalRunner.prefill([make_token_input]) / prefill([make_image_input(
  pixel_values)]) / generate([make_token_input], GenerationConfig(temperature=0,
  max_new_tokens=n, echo=False)) without a token callback (the binding raises
  UnicodeDecodeError on split UTF-8 pieces). Its pixel_values come from transformers'
  CLIPImageProcessor (PIL decode, bicubic resize, crop, normalize), computed in the same
  run before the timed prefill and timed separately ("preprocessing").
  EtLlm: Runner.prefill_inputs([Tokens]) / prefill_inputs([Image(path)]) (the PNG/JPEG is
  decoded, resized, cropped and normalized in Rust: that is inside its encoder time) or
  prefill_inputs([Features(pixel_values)]) (the same CLIPImageProcessor output as
  upstream's: encoder time on equal inputs) / generate_inputs([Tokens], temperature=0,
  max_new_tokens=n, echo=False).

  Encoder time = vision_encoder + the prefill of its image rows through text_decoder
  (both runners do both inside the image prefill call), wall clock around the call.
  Decode rate: each round runs every side twice, with max_new_tokens n and 2, after the
  same prefill; decode tokens/s = (n - 2) / (t3 - t2 at n  -  t3 - t2 at 2), i.e. n - 2
  decode steps (token_embedding + text_decoder + sampling + detokenizing) with the suffix
  prefill, the first token and the per-call costs cancelled out. The same wall-clock
  measure on both sides (upstream's own stats are whole milliseconds, too coarse for the
  toy model); each side's own stats-based rate (steps / (inference_end - prompt_eval_end)
  or (first_token)) is reported as well.
  Order: per round, upstream n, EtLlm n, upstream 2, EtLlm 2 (EtLlm first in odd rounds);
  EtLlm's image is the file in one of its two runs and the pixel values in the other,
  alternating by round. Two untimed warm-up runs per side first. Ratios are EtLlm /
  upstream per round (times: upstream / EtLlm, so > 1 means EtLlm faster), then the median.

  Checked, not timed: after the warm-up, both produce the same n greedy tokens (upstream's
  printed bytes against upstream's own printing rule applied to EtLlm's token ids) when
  EtLlm gets the same pixel values; from the image file, EtLlm's own JPEG decoding may differ
  from PIL's by a level here and there, which on a random-weight model can flip a later
  token (the first differing token is reported). A timed run that stops early (EOS) is
  reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO / "tools" / "fixtures"
DEFAULT_PY = "/root/etllm-export-venv/bin/python"

# ---------------------------------------------------------------------------
# Bench-scale model
# ---------------------------------------------------------------------------

BENCH_NAME = "llava_bench"
BENCH_IMAGE_SIZE = 224
BENCH_PATCH = 14
BENCH_MAX_LENGTH = 512
BENCH_VISION = dict(
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_channels=3,
    image_size=BENCH_IMAGE_SIZE,
    patch_size=BENCH_PATCH,
    projection_dim=384,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
BENCH_TEXT = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=BENCH_MAX_LENGTH,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)
BENCH_VOCAB = 32_000  # 31,999 byte-level BPE ids (<pad> <s> </s> first) + <image>
BENCH_PROMPT = ["<s>USER: ", "<image>", "\nDescribe the picture in detail.ASSISTANT:"]
CORPUS_MB = 48


def build_corpus(root: Path) -> Path:
    """Training text for the bench tokenizers (no network, no extra packages): the *.py of
    this Python's stdlib (tests excluded), /usr/share/common-licenses/*, then the *.py of
    transformers and torch in the export venv (sorted paths), CORPUS_MB MB in all."""
    import sysconfig

    path = root / "tokenizers" / "bench_corpus.txt"
    if path.exists():
        return path
    std = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted((p for p in std.rglob("*.py") if not (set(p.relative_to(std).parts[:-1]) & skip)),
                   key=lambda p: str(p.relative_to(std)))
    files += sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    import torch
    import transformers

    for mod in (transformers, torch):
        base = Path(mod.__file__).parent
        files += sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)
    parts, size = [], 0
    for p in files:
        t = p.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\x00", "")
        parts.append(t)
        size += len(t)
        if size > CORPUS_MB * 1_000_000:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def train_bpe(corpus: Path, vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer with its regex, no prefix
    space; ByteLevel decoder; no post-processor) of vocab_size ids, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(corpus)], trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def make_bench_image(path: Path) -> None:
    """A 640x480 'photo': gradients, sines and seeded noise, JPEG quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(20241206)
    h, w = 480, 640
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / (w - 1)
    g = 255.0 * y / (h - 1)
    b = 128.0 + 100.0 * np.sin((x + 2.0 * y) / 23.0) * np.cos(x / 57.0)
    a = np.stack([r, g, b], axis=-1) + rng.normal(0.0, 14.0, size=(h, w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB").save(
        path, format="JPEG", quality=90)


def make_bench(root: Path, work: Path | None) -> int:
    """/ROOT/llava_bench: the fixture script's own building blocks (tools/fixtures/
    make_multimodal.py: config, processor, random init, upstream's exporter with its local-
    image patch) with bench-scale settings; random weights, lm_head's EOS row zeroed (so
    that neither runner stops early)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(FIXTURES))
    import make_multimodal as mm
    import torch
    from tokenizers import AddedToken

    out = root / BENCH_NAME
    out.mkdir(parents=True, exist_ok=True)
    work = work or Path(tempfile.mkdtemp(prefix="etllm-llava-bench-"))
    t_start = time.time()
    # Bench settings into the fixture module (its functions read these globals).
    mm.OUT = out
    mm.IMAGE_SIZE, mm.PATCH_SIZE, mm.MAX_LENGTH = BENCH_IMAGE_SIZE, BENCH_PATCH, BENCH_MAX_LENGTH
    mm.VISION, mm.TEXT = dict(BENCH_VISION), dict(BENCH_TEXT)
    mm.EXPORT_EXAMPLE_IMAGE = "images/photo.jpg"
    make_bench_image(out / "images" / "photo.jpg")

    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        corpus = build_corpus(root)
        t0 = time.time()
        tok = train_bpe(corpus, BENCH_VOCAB - 1, ["<pad>", "<s>", "</s>"])
        tok.add_special_tokens([AddedToken(mm.IMAGE_TOKEN, special=True, normalized=False)])
        tok.save(str(tok_path))
        print(f"tokenizer: {tok.get_vocab_size()} ids, trained in {time.time() - t0:.0f} s", flush=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    image_id = tok.token_to_id(mm.IMAGE_TOKEN)
    assert tok.get_vocab_size() == BENCH_VOCAB and image_id == BENCH_VOCAB - 1
    assert [tok.token_to_id(s) for s in ("<pad>", "<s>", "</s>")] == [0, 1, 2]

    image_processor = mm.make_image_processor()
    image_processor.save_pretrained(out)
    processor = mm.make_processor(image_processor, mm.make_hf_tokenizer())
    config = mm.make_config(BENCH_VOCAB, image_id)
    torch.manual_seed(0)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).eval()
    mm.random_init_(model, seed=7, out_gain=4.0)
    with torch.no_grad():
        model.lm_head.weight[mm.EOS_ID].zero_()
    hf_dir = work / "hf_model"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)
    shutil.copyfile(out / "preprocessor_config.json", hf_dir / "preprocessor_config.json")

    case = {"name": "bench", "inputs": [
        {"type": "text", "text": BENCH_PROMPT[0]},
        {"type": "image", "file": "images/photo.jpg"},
        {"type": "text", "text": BENCH_PROMPT[2]},
    ]}
    layout = mm.case_layout(case, tok, image_processor)
    n_img = (BENCH_IMAGE_SIZE // BENCH_PATCH) ** 2

    export_dir = work / "export"
    if export_dir.exists():
        shutil.rmtree(export_dir)
    export_dir.mkdir(parents=True)
    exp = mm.export(hf_dir, export_dir)
    shutil.copyfile(export_dir / "model.pte", out / "model.pte")
    print(f"exported {out / 'model.pte'} ({(out / 'model.pte').stat().st_size:,} bytes) in "
          f"{exp['seconds']:.0f} s", flush=True)

    # The .pte against eager transformers: first-step logits and 8 greedy tokens.
    ref = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    first, greedy, _ = mm.eager_greedy(ref, layout["expanded_ids"], layout["pixel_values"], 8)
    pm = mm.PteModel(out / "model.pte")
    p_first, p_toks, _ = mm.pte_run(pm, layout, 8, "pieces")
    diff = float((p_first - first).abs().max())
    ok = p_toks == greedy and diff < 1e-3
    print(f"check: .pte first-step logits max |diff| vs eager {diff:.2e}; greedy 8 "
          f"{'equal' if p_toks == greedy else f'DIFFER {p_toks} vs {greedy}'}", flush=True)
    pieces = layout["pieces"]
    info = {
        "what": "bench-scale Llava (random weights) for tools/bench/multimodal.py",
        "vision": BENCH_VISION, "text": BENCH_TEXT, "vocab_size": BENCH_VOCAB,
        "image_token_id": image_id, "image_rows": n_img, "max_length": BENCH_MAX_LENGTH,
        "pte_bytes": (out / "model.pte").stat().st_size,
        "export_seconds": round(exp["seconds"], 1), "total_seconds": round(time.time() - t_start, 1),
        "check": {"first_logits_max_abs_diff": diff, "greedy_equal": p_toks == greedy},
        "prompt": {"prefix_ids": pieces[0]["token_ids"], "image": "images/photo.jpg",
                   "suffix_ids": pieces[2]["token_ids"]},
    }
    (out / "bench.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


def proto_streams():
    """(read, write) for the parent's protocol; fd 1 then points at /dev/null (upstream's
    runner prints its text there)."""
    w = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return sys.stdin, w


def capture_fd1(fn):
    """Runs fn with fd 1 going to a temp file; returns (fn's result, bytes written)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        try:
            res = fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return res, f.read()


class UpstreamSide:
    def __init__(self, spec):
        import torch

        torch.set_num_threads(spec["threads"])
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(spec["threads"])
        assert portable_lib._threadpool_get_thread_count() == spec["threads"]
        from executorch.extension.llm.runner import MultimodalRunner
        from transformers import CLIPImageProcessor

        self.proc = CLIPImageProcessor.from_pretrained(spec["model_dir"])
        self.runner = MultimodalRunner(spec["model"], spec["tokenizer"])
        self.image = spec["image"]
        pv = self.pixel_values()
        import numpy as np

        np.save(spec["pv_file"], pv[0].numpy().astype(np.float32))

    def pixel_values(self):
        from PIL import Image

        with Image.open(self.image) as im:
            return self.proc(images=im, return_tensors="pt")["pixel_values"]

    def run(self, job):
        from executorch.extension.llm.runner import (GenerationConfig, make_image_input,
                                                     make_token_input)

        r = self.runner
        r.reset()
        t = time.perf_counter()
        pv = self.pixel_values()
        t_pre = time.perf_counter() - t
        r.prefill([make_token_input(job["prefix"])])
        t0 = time.perf_counter()
        r.prefill([make_image_input(pv[0].contiguous())])
        t1 = time.perf_counter()
        stats = []
        cfg = GenerationConfig(echo=False, max_new_tokens=job["n"], temperature=0.0)

        def gen():
            t2 = time.perf_counter()
            r.generate([make_token_input(job["suffix"])], cfg, None, stats.append)
            return t2, time.perf_counter()

        if job.get("capture"):
            (t2, t3), printed = capture_fd1(gen)
            printed = printed.split(b"PyTorchObserver ")[0]
            printed = printed[:-1] if printed.endswith(b"\n") else printed
        else:
            t2, t3 = gen()
            printed = None
        s = json.loads(stats[0].to_json_string())
        steps = s["generated_tokens"]  # n - 1 decode steps (the first token is the prefill's)
        span = (s["inference_end_ms"] - s["prompt_eval_end_ms"]) / 1e3
        return {"enc_s": t1 - t0, "gen_s": t3 - t2, "preproc_s": t_pre,
                "tokens": steps + 1, "stats_decode_tps": steps / span if span > 0 else None,
                "printed": printed.hex() if printed is not None else None}


class EtllmSide:
    def __init__(self, spec):
        import numpy as np

        import etllm

        self.etllm = etllm
        self.runner = etllm.Runner(spec["model"], spec["tokenizer"], num_threads=spec["threads"])
        self.image = spec["image"]
        self.pv = np.load(spec["pv_file"])

    def run(self, job):
        e = self.etllm
        r = self.runner
        r.reset()
        r.prefill_inputs([e.Tokens(job["prefix"])], num_bos=0)
        img = e.Image(self.image) if job["image"] == "file" else e.Features(self.pv)
        t0 = time.perf_counter()
        r.prefill_inputs([img], num_bos=0)
        t1 = time.perf_counter()
        ids = []
        cb = (lambda p: p.token_id is not None and ids.append(p.token_id)) if job.get("capture") else None
        t2 = time.perf_counter()
        r.generate_inputs([e.Tokens(job["suffix"])], temperature=0.0, max_new_tokens=job["n"],
                          echo=False, num_bos=0, token_callback=cb)
        t3 = time.perf_counter()
        s = r.last_stats
        return {"enc_s": t1 - t0, "gen_s": t3 - t2, "tokens": s.num_generated_tokens,
                "stats_decode_tps": s.decode_tokens_per_second or None,
                "ids": ids if cb else None}


def worker(side: str) -> int:
    rd, wr = proto_streams()
    obj = None
    for line in rd:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "init":
                obj = (UpstreamSide if side == "upstream" else EtllmSide)(msg["spec"])
                res = {"ok": True}
            else:
                res = {"ok": True, **obj.run(msg["job"])}
        except Exception as ex:  # noqa: BLE001 - reported to the parent
            import traceback

            res = {"ok": False, "error": f"{type(ex).__name__}: {ex}",
                   "trace": traceback.format_exc()}
        wr.write(json.dumps(res) + "\n")
    return 0


class Worker:
    def __init__(self, side, python, env, log):
        self.side = side
        self.p = subprocess.Popen([python, __file__, "worker", side], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                  cwd=str(REPO))

    def call(self, msg):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{self.side} worker died (see its log)")
        res = json.loads(line)
        if not res["ok"]:
            raise SystemExit(f"{self.side} worker: {res['error']}\n{res.get('trace', '')}")
        return res

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def byte_level_decoder() -> dict:
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def upstream_printing(tokenizer: Path, ids: list[int]) -> bytes:
    """What upstream's runner prints for these tokens (extension/llm/runner/util.h
    safe_printf: each token's bytes, except one-byte pieces that are neither printable nor
    whitespace); byte-level BPE tokenizers only."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    u2b = byte_level_decoder()
    out = b""
    for t in ids:
        s = tok.id_to_token(t)
        piece = bytes(u2b[ch] for ch in s) if all(ch in u2b for ch in s) else s.encode()
        if len(piece) == 1 and not (0x20 <= piece[0] <= 0x7E or 0x09 <= piece[0] <= 0x0D):
            continue
        out += piece
    return out


def prompt_of(model_dir: Path) -> dict:
    """Prefix ids, image file, suffix ids: the fixture's one_image case, or bench.json's."""
    if (model_dir / "bench.json").exists():
        p = json.loads((model_dir / "bench.json").read_text())["prompt"]
        return {"prefix": p["prefix_ids"], "image": str(model_dir / p["image"]),
                "suffix": p["suffix_ids"]}
    ref = json.loads((model_dir / "reference.json").read_text())
    case = next(c for c in ref["cases"] if c["name"] == "one_image")
    ins = case["inputs"]
    assert [i["type"] for i in ins] == ["text", "image", "text"]
    return {"prefix": ins[0]["token_ids"], "image": str(model_dir / ins[1]["file"]),
            "suffix": ins[2]["token_ids"]}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def run_bench(args) -> int:
    model_dir = Path(args.model_dir).resolve()
    model, tokenizer = model_dir / "model.pte", model_dir / "tokenizer.json"
    prompt = prompt_of(model_dir)
    n, threads = args.tokens, args.threads
    tmp = Path(tempfile.mkdtemp(prefix="etllm-mm-bench-"))
    pv_file = tmp / "pixel_values.npy"
    spec = {"model": str(model), "tokenizer": str(tokenizer), "model_dir": str(model_dir),
            "threads": threads, "image": prompt["image"], "pv_file": str(pv_file)}
    lib = args.etllm_library or os.environ.get("ETLLM_LIBRARY") or str(REPO / "target" / "release" / "libetllm.so")
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ETLLM_LIBRARY")}
    up_env = dict(base_env, OMP_NUM_THREADS=str(threads))
    et_env = dict(base_env, PYTHONPATH=str(REPO / "python"), ETLLM_LIBRARY=lib,
                  OMP_NUM_THREADS=str(threads))
    log = open(tmp / "workers.log", "w")
    up = Worker("upstream", args.python, up_env, log)
    up.call({"cmd": "init", "spec": spec})  # writes the pixel values file
    et = None
    for attempt in range(3):  # the library may be being rebuilt: retry a failed load
        try:
            et = Worker("etllm", args.python, et_env, log)
            et.call({"cmd": "init", "spec": spec})
            break
        except SystemExit as ex:
            print(f"etllm worker failed to start ({ex}); retrying", file=sys.stderr)
            time.sleep(20)
    if et is None:
        raise SystemExit("could not start the etllm worker")
    base = {"prefix": prompt["prefix"], "suffix": prompt["suffix"]}

    # Warm-up (untimed), then the correctness check on n tokens.
    for img in ("file", "pv"):
        et.call({"cmd": "run", "job": dict(base, n=min(n, 8), image=img)})
        up.call({"cmd": "run", "job": dict(base, n=min(n, 8))})
    u = up.call({"cmd": "run", "job": dict(base, n=n, capture=True)})
    printed = bytes.fromhex(u["printed"])
    verdicts = []
    for img in ("pv", "file"):
        e = et.call({"cmd": "run", "job": dict(base, n=n, image=img, capture=True)})
        ids = e["ids"]
        same = upstream_printing(tokenizer, ids) == printed and u["tokens"] == e["tokens"] == n
        if same:
            verdicts.append(f"EtLlm from {img}: the same {n} tokens")
            continue
        # The first token whose bytes no longer match what upstream printed.
        k = next((i for i in range(len(ids) + 1)
                  if not printed.startswith(upstream_printing(tokenizer, ids[:i]))), len(ids) + 1)
        verdicts.append(f"EtLlm from {img}: {'DIFFERENT' if img == 'pv' else 'different'} "
                        f"from token {k - 1} on ({e['tokens']} tokens; upstream {u['tokens']})")
    check = f"greedy {n} tokens against upstream's printed text: " + "; ".join(verdicts)
    print(check, flush=True)

    rows = {k: [] for k in ("up_enc", "et_enc_file", "et_enc_pv", "up_pre", "up_dec", "et_dec",
                            "up_stats_dec", "et_stats_dec", "enc_ratio_file", "enc_ratio_pv",
                            "dec_ratio")}
    early = []
    for rnd in range(args.rounds):
        et_first = rnd % 2 == 1
        img_n, img_2 = ("file", "pv") if rnd % 2 == 0 else ("pv", "file")
        res = {}
        for length in (n, 2):
            order = [("et", et), ("up", up)] if et_first else [("up", up), ("et", et)]
            for name, w in order:
                job = dict(base, n=length)
                if name == "et":
                    job["image"] = img_n if length == n else img_2
                res[(name, length)] = w.call({"cmd": "run", "job": job})
        for key, r in res.items():
            if r["tokens"] != key[1]:
                early.append(f"round {rnd}: {key[0]} made {r['tokens']} of {key[1]} tokens")
        un, u2, en, e2 = res[("up", n)], res[("up", 2)], res[("et", n)], res[("et", 2)]
        up_dec = (un["tokens"] - u2["tokens"]) / (un["gen_s"] - u2["gen_s"])
        et_dec = (en["tokens"] - e2["tokens"]) / (en["gen_s"] - e2["gen_s"])
        up_enc = statistics.mean([un["enc_s"], u2["enc_s"]])
        et_file = en["enc_s"] if img_n == "file" else e2["enc_s"]
        et_pv = en["enc_s"] if img_n == "pv" else e2["enc_s"]
        rows["up_enc"].append(up_enc)
        rows["et_enc_file"].append(et_file)
        rows["et_enc_pv"].append(et_pv)
        rows["up_pre"].append(statistics.mean([un["preproc_s"], u2["preproc_s"]]))
        rows["up_dec"].append(up_dec)
        rows["et_dec"].append(et_dec)
        rows["up_stats_dec"].append(un["stats_decode_tps"])
        rows["et_stats_dec"].append(en["stats_decode_tps"])
        rows["enc_ratio_file"].append(up_enc / et_file)
        rows["enc_ratio_pv"].append(up_enc / et_pv)
        rows["dec_ratio"].append(et_dec / up_dec)
        print(f"round {rnd}: encoder ms upstream {1e3 * up_enc:.2f} etllm file {1e3 * et_file:.2f} "
              f"pv {1e3 * et_pv:.2f}; decode tok/s upstream {up_dec:.1f} etllm {et_dec:.1f}",
              flush=True)
    up.close()
    et.close()
    log.close()

    m = {k: med(v) for k, v in rows.items()}
    summary = {
        "model_dir": str(model_dir), "threads": threads, "tokens": n, "rounds": args.rounds,
        "prompt_rows": len(prompt["prefix"]) + len(prompt["suffix"]), "check": check,
        "early_stops": early, "medians": m,
        "ranges": {k: [min(v), max(v)] for k, v in rows.items() if v and None not in v},
        "rounds_data": rows,
    }
    ms = lambda s: f"{1e3 * s:.2f} ms"  # noqa: E731
    lines = [
        f"model: {model_dir}  threads: {threads}  tokens: {n}  rounds: {args.rounds}",
        check,
        f"encoder (image prefill)  upstream {ms(m['up_enc'])} | EtLlm from file {ms(m['et_enc_file'])} "
        f"(x{m['enc_ratio_file']:.2f}) | EtLlm from pixel values {ms(m['et_enc_pv'])} (x{m['enc_ratio_pv']:.2f})",
        f"upstream's CLIPImageProcessor (not in its encoder time): {ms(m['up_pre'])}",
        f"decode tok/s  upstream {m['up_dec']:.1f} | EtLlm {m['et_dec']:.1f} (x{m['dec_ratio']:.2f}); "
        f"from their own stats: upstream {m['up_stats_dec']:.1f}, EtLlm {m['et_stats_dec']:.1f}",
        "(ratios: medians of per-round ratios; > 1 = EtLlm faster)",
    ] + [f"early stop: {x}" for x in early]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="build the bench-scale Llava under --out")
    mk.add_argument("--out", type=Path, default=Path("/work/bench-models"))
    mk.add_argument("--work", type=Path, default=None, help="scratch dir (HF folder, export)")
    rn = sub.add_parser("run", help="the benchmark")
    rn.add_argument("--model-dir", required=True,
                    help="model.pte + tokenizer.json + preprocessor_config.json + reference.json "
                         "(the fixture) or bench.json (make's output)")
    rn.add_argument("--rounds", type=int, default=7)
    rn.add_argument("--tokens", type=int, default=64, help="max_new_tokens of the long runs")
    rn.add_argument("--threads", type=int, default=1)
    rn.add_argument("--python", default=DEFAULT_PY, help="the export venv's python (both workers)")
    rn.add_argument("--etllm-library", default=None)
    rn.add_argument("--json", default=None, help="write the summary and every round here")
    args = ap.parse_args()
    if args.cmd == "make":
        return make_bench(args.out, args.work)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
