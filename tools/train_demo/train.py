#!/usr/bin/env python3
"""Train EtLlm's bundled demo model: a small llama-style model on the King James Bible.

Run ONLY by hand, in the export venv (the one tools/fixtures/README.md sets up). Never in CI.

    /root/etllm-export-venv/bin/python tools/train_demo/train.py            # everything
    /root/etllm-export-venv/bin/python tools/train_demo/train.py --stage export   # from the saved checkpoint

Stages (each reads what the previous one left in --work):
  corpus    apt-get download the Debian packages bible-kjv-text and bible-kjv (4.38), unpack them
            with dpkg-deb and print the whole text with the package's own `bible` program.
  tokenizer train a byte-level BPE tokenizer on that text.
  train     train the model (fixed seeds; checkpoints every CKPT_EVERY steps, so a stopped run
            still leaves a usable model; --resume continues from the last one).
  export    export_llm (the fixture script's flow: XNNPACK + extended_ops, KV cache, dynamic
            shape, fp32), eager-PyTorch reference.json, sample texts; write models/demo/.

Settings are the constants below; tools/train_demo/README.md records a run's results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "models" / "demo"
DEFAULT_WORK = Path("/tmp/etllm-train-demo")

# --- corpus -----------------------------------------------------------------------------
DEB_PACKAGES = ["bible-kjv-text=4.38", "bible-kjv=4.38"]
VAL_EVERY = 50  # every 50th chapter is held out for validation

# --- tokenizer ----------------------------------------------------------------------------
VOCAB_SIZE = 2048
SPECIAL = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
BOS_ID = 1
EOS_IDS = [2]

# --- model (executorch.examples.models.llama Transformer) ---------------------------------
MODEL_PARAMS = {
    "dim": 128,
    "n_layers": 6,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "multiple_of": 32,
    "norm_eps": 1e-5,
}
MAX_SEQ_LEN = 256
MAX_CONTEXT_LEN = 256

# --- training -----------------------------------------------------------------------------
SEED = 1234
SEQ_LEN = 256  # training window (= the exported context)
BATCH = 16  # windows per step: 4,096 tokens
STEPS = 1800
WARMUP = 100
LR = 3e-3
MIN_LR = 3e-4
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
INIT_STD = 0.02
EVAL_EVERY = 250
EVAL_BATCHES = 16
CKPT_EVERY = 250
THREADS = 1

# --- reference ----------------------------------------------------------------------------
PROMPTS = ["Once upon a time", "In the beginning", "And the LORD said unto Moses,"]
N_GREEDY = 32


def sh(cmd, **kw):
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


# ==========================================================================================
# corpus
# ==========================================================================================

VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def stage_corpus(work: Path) -> None:
    deb = work / "deb"
    if deb.exists():
        shutil.rmtree(deb)
    deb.mkdir(parents=True)
    sh(["apt-get", "download", *DEB_PACKAGES], cwd=deb)
    root = deb / "root"
    for f in sorted(deb.glob("*.deb")):
        sh(["dpkg-deb", "-x", str(f), str(root)])
    raw = subprocess.run(
        [str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    # One verse a line, "Ge1:1 In the beginning ...". A chapter becomes one document: its
    # verses, one a line, without the references.
    chapters: list[list[str]] = []
    key = None
    for line in raw.splitlines():
        m = VERSE.match(line)
        if not m:
            # continuation of a long verse (should not happen with -f, but be safe)
            if line.strip() and chapters:
                chapters[-1][-1] += " " + line.strip()
            continue
        k = (m.group(1), m.group(2))
        if k != key:
            chapters.append([])
            key = k
        chapters[-1].append(m.group(4).strip())
    docs = ["\n".join(v) for v in chapters]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    (work / "train.json").write_text(json.dumps(train))
    (work / "val.json").write_text(json.dumps(val))
    n_chars = sum(len(d) for d in docs)
    info = {"packages": DEB_PACKAGES, "chapters": len(docs), "verses": sum(len(c) for c in chapters),
            "chars": n_chars, "train_chapters": len(train), "val_chapters": len(val)}
    (work / "corpus.json").write_text(json.dumps(info, indent=1))
    print(f"corpus: {info}")
    assert len(docs) == 1189, len(docs)  # chapters in the KJV


# ==========================================================================================
# tokenizer
# ==========================================================================================


def stage_tokenizer(work: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    train = json.loads((work / "train.json").read_text())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # No post_processor: the runner adds BOS itself.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i, s
    path = work / "tokenizer.json"
    path.write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    t2 = Tokenizer.from_file(str(path))
    sample = "Once upon a time, in the beginning."
    assert t2.decode(t2.encode(sample).ids) == sample
    n = sum(len(t2.encode(d).ids) for d in train[:100])
    c = sum(len(d) for d in train[:100])
    print(f"tokenizer: vocab {VOCAB_SIZE}, {c / n:.2f} chars/token on 100 chapters")


def encode_docs(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for enc in tok.encode_batch(docs):
        out.append(BOS_ID)
        out.extend(enc.ids)
        out.extend(EOS_IDS)
    return out


# ==========================================================================================
# model
# ==========================================================================================


def model_args(*, use_kv_cache: bool, dynamic: bool, full_logits: bool):
    from executorch.examples.models.llama.model_args import ModelArgs

    return ModelArgs(
        max_seq_len=MAX_SEQ_LEN,
        max_context_len=MAX_CONTEXT_LEN,
        max_batch_size=1,
        use_kv_cache=use_kv_cache,
        use_sdpa_with_kv_cache_op=False,
        enable_dynamic_shape=dynamic,
        generate_full_logits=full_logits,
        **MODEL_PARAMS,
    )


def build(full_logits: bool):
    from executorch.examples.models.llama.llama_transformer import construct_transformer

    return construct_transformer(model_args(use_kv_cache=False, dynamic=False, full_logits=full_logits))


def init_weights(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    n_layers = MODEL_PARAMS["n_layers"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):  # residual projections (GPT-2 style)
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD / math.sqrt(2 * n_layers))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, STEPS - WARMUP)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * min(1.0, t)))


def stage_train(work: Path, resume: bool, max_minutes: float | None) -> None:
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    torch.set_num_threads(THREADS)
    random.seed(SEED)
    torch.manual_seed(SEED)
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    train_ids = torch.tensor(encode_docs(tok, json.loads((work / "train.json").read_text())))
    val_ids = torch.tensor(encode_docs(tok, json.loads((work / "val.json").read_text())))
    print(f"train tokens {len(train_ids):,}, val tokens {len(val_ids):,}", flush=True)

    model = build(full_logits=True)
    init_weights(model, SEED)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS,
    )
    gen = torch.Generator().manual_seed(SEED)
    step = 0
    log: list[dict] = []
    elapsed_before = 0.0
    ckpt = work / "train_state.pt"
    if resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, log, elapsed_before = st["step"], st["log"], st["elapsed"]
        print(f"resumed at step {step}", flush=True)

    def batch(ids, n, g):
        ix = torch.randint(0, len(ids) - SEQ_LEN - 1, (n,), generator=g)
        x = torch.stack([ids[i: i + SEQ_LEN] for i in ix.tolist()])
        y = torch.stack([ids[i + 1: i + 1 + SEQ_LEN] for i in ix.tolist()])
        return x, y

    def evaluate():
        model.eval()
        g = torch.Generator().manual_seed(999)  # the same windows every time
        tot = 0.0
        with torch.no_grad():
            for _ in range(EVAL_BATCHES):
                x, y = batch(val_ids, BATCH, g)
                tot += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        model.train()
        return tot / EVAL_BATCHES

    def save(final=False):
        st = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
              "step": step, "log": log, "elapsed": elapsed_before + time.time() - t0}
        torch.save(st, ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, work / "checkpoint.pth")
        (work / "params.json").write_text(json.dumps(MODEL_PARAMS))
        (work / "train_log.json").write_text(json.dumps(
            {"step": step, "params": n_params, "elapsed_s": st["elapsed"], "log": log,
             "finished": final}, indent=1))

    model.train()
    t0 = time.time()
    ema = None
    while step < STEPS:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        x, y = batch(train_ids, BATCH, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        step += 1
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % 25 == 0 or step == 1:
            el = elapsed_before + time.time() - t0
            print(f"step {step} loss {lv:.4f} (ema {ema:.4f}) lr {lr_at(step - 1):.2e} "
                  f"{el:.0f}s {step * BATCH * SEQ_LEN / max(el, 1e-9):.0f} tok/s", flush=True)
        if step % EVAL_EVERY == 0 or step == STEPS:
            v = evaluate()
            log.append({"step": step, "train_loss_ema": round(ema, 4), "train_loss": round(lv, 4),
                        "val_loss": round(v, 4), "elapsed_s": round(elapsed_before + time.time() - t0)})
            print(f"== step {step} val {v:.4f} train(ema) {ema:.4f}", flush=True)
        if step % CKPT_EVERY == 0 or step == STEPS:
            save(final=step == STEPS)
        if max_minutes is not None and (elapsed_before + time.time() - t0) > max_minutes * 60:
            print(f"stopping at step {step}: time budget of {max_minutes} min spent", flush=True)
            if not log or log[-1]["step"] != step:
                v = evaluate()
                log.append({"step": step, "train_loss_ema": round(ema, 4), "train_loss": round(lv, 4),
                            "val_loss": round(v, 4), "elapsed_s": round(elapsed_before + time.time() - t0)})
            save()
            return
    save(final=True)


# ==========================================================================================
# export + reference
# ==========================================================================================


def export_llm(work: Path, out_pte: Path) -> None:
    metadata = json.dumps({"get_bos_id": BOS_ID, "get_eos_ids": EOS_IDS})
    cfg = f"""base:
  model_class: llama3
  params: {json.dumps(str(work / "params.json"))}
  checkpoint: {json.dumps(str(work / "checkpoint.pth"))}
  metadata: {json.dumps(metadata)}
model:
  use_kv_cache: true
  use_sdpa_with_kv_cache: false
  enable_dynamic_shape: true
  dtype_override: fp32
export:
  max_seq_length: {MAX_SEQ_LEN}
  max_context_length: {MAX_CONTEXT_LEN}
  output_dir: {json.dumps(str(work))}
  output_name: {json.dumps(str(out_pte))}
backend:
  xnnpack:
    enabled: true
    extended_ops: true
"""
    y = work / "export.yaml"
    y.write_text(cfg)
    if out_pte.exists():
        out_pte.unlink()
    with open(work / "export.log", "w") as lf:
        r = subprocess.run([sys.executable, "-m", "executorch.extension.llm.export.export_llm",
                            "--config", str(y)], stdout=lf, stderr=subprocess.STDOUT, cwd=str(work))
    if r.returncode != 0 or not out_pte.exists():
        print((work / "export.log").read_text()[-6000:])
        raise RuntimeError("export_llm failed")


def fmt7(x: float) -> float:
    return float(f"{x:.7g}")


def stage_export(work: Path, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(THREADS)
    out.mkdir(parents=True, exist_ok=True)
    pte = out / "model.pte"
    export_llm(work, pte)
    shutil.copy(work / "tokenizer.json", out / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))

    sd = torch.load(work / "checkpoint.pth")
    model = build(full_logits=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if k.endswith(".weight")] and not unexpected, (missing, unexpected)
    model.eval()
    torch.set_grad_enabled(False)

    cases = []
    for p in PROMPTS:
        ids = [BOS_ID] + tok.encode(p).ids
        seq = list(ids)
        greedy, margins, first = [], [], None
        for _ in range(N_GREEDY):
            logits = model(torch.tensor([seq])).reshape(-1, VOCAB_SIZE)[-1]
            if first is None:
                first = logits.clone()
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits))
            greedy.append(nxt)
            seq.append(nxt)
        top = torch.topk(first, 10)
        print(f"greedy {p!r} -> {tok.decode(greedy)!r} (min margin {min(margins):.4f})")
        cases.append({
            "prompt": p,
            "prompt_ids": ids,
            "greedy_ids": greedy,
            "greedy_first_eos_index": next((i for i, t in enumerate(greedy) if t in EOS_IDS), None),
            "greedy_min_top2_margin": fmt7(min(margins)),
            "first_logits_top": [[int(i), fmt7(float(v))] for v, i in zip(top.values, top.indices)],
            "first_logits": [fmt7(float(v)) for v in first],
        })
    cfg = dict(MODEL_PARAMS, max_seq_len=MAX_SEQ_LEN, max_context_len=MAX_CONTEXT_LEN, bos_id=BOS_ID,
               eos_ids=EOS_IDS, use_kv_cache=True, enable_dynamic_shape=True, xnnpack=True,
               xnnpack_extended_ops=True, trained="tools/train_demo/train.py")
    ref = {"model": "demo", "config": cfg,
           "reference_source": "eager PyTorch, non-KV-cache Transformer, full-sequence forward per step",
           "cases": cases}
    (out / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    # Check the .pte against the eager reference with the ExecuTorch pybindings.
    from executorch.runtime import Runtime

    prog = Runtime.get().load_program(str(pte))
    for c in cases:
        m = prog.load_method("forward")
        new, pos, got = list(c["prompt_ids"]), 0, []
        for i in range(N_GREEDY):
            o = m.execute([torch.tensor([new]), torch.tensor([pos])])[0].reshape(-1)
            if i == 0:
                err = float((o - torch.tensor(c["first_logits"])).abs().max())
                print(f".pte first-logits max abs diff {err:.2e}")
                assert err < 1e-3, err
            pos += len(new)
            nxt = int(torch.argmax(o))
            got.append(nxt)
            new = [nxt]
        assert got == c["greedy_ids"], (c["prompt"], got, c["greedy_ids"])
    print(f".pte reproduces the eager greedy ids for {len(cases)} prompts; {pte} is {pte.stat().st_size:,} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "corpus", "tokenizer", "train", "export"], default="all")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop training (and save) once this much wall time is spent")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    stages = ["corpus", "tokenizer", "train", "export"] if a.stage == "all" else [a.stage]
    for s in stages:
        t = time.time()
        print(f"=== stage {s}", flush=True)
        if s == "corpus":
            stage_corpus(a.work)
        elif s == "tokenizer":
            stage_tokenizer(a.work)
        elif s == "train":
            stage_train(a.work, a.resume, a.max_minutes)
        else:
            stage_export(a.work, a.out)
        print(f"=== stage {s} took {time.time() - t:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
