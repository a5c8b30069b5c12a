#!/usr/bin/env python3
"""Speech to text (Whisper layout: methods `encoder`, `text_decoder`): EtLlm's `AsrRunner`
(over ctypes) against a raw ExecuTorch loop, on the same `.pte`, interleaved in one run.

The executorch 1.5.1 wheel exposes no ASR / Seq2Seq runner in Python (its
`executorch.extension.llm.runner` has TextLLMRunner and MultimodalRunner only; no
`extension/asr`; `_llm_runner.pyi` has no ASR class), so the baseline is the loop upstream's
C++ AsrRunner runs, written with ExecuTorch's Python runtime (`executorch.runtime`):
transformers' `WhisperFeatureExtractor` for the log-mel features, `encoder` once, then
`text_decoder` one token per call (the decoder prompt first, then argmax) until
<|endoftext|> or n tokens.

    # the bench-scale model (once; ~2.5 min on 2 cores): whisper-tiny's shape (d_model 384, 4 + 4
    # layers, 6 heads, vocabulary 51,865, decoder context 448), random weights
    /root/etllm-export-venv/bin/python tools/bench/asr.py make [--out /work/bench-models]

    /root/etllm-export-venv/bin/python tools/bench/asr.py run \\
        --model-dir tests/fixtures/whisper --rounds 9 --tokens 40 --threads 1
    /root/etllm-export-venv/bin/python tools/bench/asr.py run \\
        --model-dir /work/bench-models/whisper_bench --rounds 7 --tokens 64 --threads 1

Needs the export venv and the built library (target/release/libetllm.so or ETLLM_LIBRARY).
Never CI; no timed assertion.

How it runs
  Two worker processes, loaded once and kept: `raw` (torch, executorch.runtime,
  transformers, soundfile; fd 1 at /dev/null) and `etllm` (PYTHONPATH=python; etllm and
  numpy only). One computes at a time. Same thread count on both (--threads: ExecuTorch's
  pool via portable_lib._unsafe_reset_threadpool, plus torch's and OMP_NUM_THREADS on the
  raw side, which the feature extractor's torch STFT uses).

  Raw loop, per run (time.perf_counter):
      [t0] soundfile.read(wav) -> WhisperFeatureExtractor(samples)["input_features"] [t1]
      encoder.execute([features]) [t2]
      text_decoder.execute([[tok]], hidden, [pos]) for each decoder-prompt token, argmax
      of the last -> first token [t3]; then one call + argmax per token [t4]
  EtLlm: AsrRunner.transcribe(Audio(wav) | Features(log-mel), language="en",
  max_new_tokens=n) (greedy), timed by its own stats (microseconds):
      inference_start -> prompt_eval_end: WAV decode + log-mel (in Rust) + encoder;
      prompt_eval_end -> first_token: the decoder prompt; first_token -> inference_end:
      the rest.
  Reported (medians over rounds, ratios per round then the median; > 1 = EtLlm faster):
    encoder, audio in: EtLlm (WAV -> encoder output) against raw (t0 -> t2: soundfile +
      WhisperFeatureExtractor + encoder); the feature extractor's time (t1 - t0) on its own;
    encoder, features in: EtLlm given transformers' log-mel as Features (encoder only,
      plus copying the features in) against raw t2 - t1;
    decode tokens/s: (tokens - 1) / (first token -> end) on both.
  Order per round: raw, EtLlm-from-WAV, raw, EtLlm-from-features (EtLlm first in odd
  rounds), after two untimed warm-up runs per side. The decoder prompt is
  <|startoftranscript|><|en|><|transcribe|><|notimestamps|> on both (EtLlm builds it from
  language="en"); the first run checks that both produce the same tokens.
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
sys.path.insert(0, str(HERE))

import multimodal as mmb  # noqa: E402  (corpus, BPE training, worker plumbing)

BENCH_NAME = "whisper_bench"
BENCH_MODEL = {
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}
BENCH_MAX_SEQ_LEN = 448
BPE_SIZE = 50_257  # as Whisper's multilingual vocabulary: 50,257 BPE ids, then the specials
BENCH_SECONDS = 10.0


def timestamp_tokens() -> list[str]:
    return [f"<|{i * 0.02:.2f}|>" for i in range(1501)]


def make_wav(path: Path, seconds: float) -> None:
    """A speech-like 16 kHz mono 16-bit WAV: a harmonic voice whose f0 glides, a 3 Hz
    syllable envelope, a quiet chirp and noise (the fixture's speech16k recipe, longer)."""
    import numpy as np

    sys.path.insert(0, str(FIXTURES))
    import make_whisper as mw

    rng = np.random.default_rng(4321)
    n = int(seconds * mw.SR)
    t = np.arange(n, dtype=np.float64) / mw.SR
    phase = 2 * np.pi * (120.0 * t + 8.0 * np.sin(0.7 * t) + 5.0 * t * t / seconds)
    voice = sum((0.8 / k) * np.sin(k * phase) * (1.0 if k in (2, 3, 7) else 0.5) for k in range(1, 12))
    env = 0.5 * (1 - np.cos(2 * np.pi * 3.0 * t))
    chirp = 0.15 * np.sin(2 * np.pi * (300.0 * t + 0.5 * (2700.0 / seconds) * t * t))
    x = 0.25 * voice * env + chirp + 0.01 * rng.standard_normal(n)
    pcm = mw.to_i16(x / np.max(np.abs(x)) * 0.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mw.riff([(b"fmt ", mw.fmt_chunk(1, 1, mw.SR, 16)), (b"data", pcm.tobytes())]))


def make_bench(root: Path, work: Path | None) -> int:
    """/ROOT/whisper_bench with the fixture script's building blocks
    (tools/fixtures/make_whisper.py: config, random weights, generation config, feature
    extractor, optimum-executorch's ASR exporter) at whisper-tiny's shape. The tokenizer is
    a byte-level BPE of 50,257 ids trained on the bench corpus (multimodal.py's), then
    Whisper's special tokens in Whisper's order (99 languages, tasks, <|notimestamps|>, 1,501
    timestamps): 51,865 ids, whisper-tiny's vocabulary. Random weights; the proj_out row of
    <|endoftext|> is zero, so that neither side stops early."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(FIXTURES))
    import make_whisper as mw
    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    out = root / BENCH_NAME
    out.mkdir(parents=True, exist_ok=True)
    work = work or Path(tempfile.mkdtemp(prefix="etllm-whisper-bench-"))
    t_start = time.time()
    mw.OUT = out
    mw.MODEL = dict(BENCH_MODEL)
    mw.MAX_SEQ_LEN = BENCH_MAX_SEQ_LEN
    mw.LANGS = list(LANGUAGES)[:99]  # whisper-tiny's 99 (yue came with large-v3)

    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        corpus = mmb.build_corpus(root)
        t0 = time.time()
        tok = mmb.train_bpe(corpus, BPE_SIZE, [])
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in mw.special_tokens() + timestamp_tokens()])
        tok.save(str(tok_path))
        print(f"tokenizer: {tok.get_vocab_size()} ids, trained in {time.time() - t0:.0f} s", flush=True)
    tok = Tokenizer.from_file(str(tok_path))
    vocab = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in mw.special_tokens()}
    assert vocab == 51_865 and ids["<|endoftext|>"] == 50_257, (vocab, ids["<|endoftext|>"])
    assert ids["<|startoftranscript|>"] == 50_258 and ids["<|notimestamps|>"] == 50_363, ids
    sot, eot = ids["<|startoftranscript|>"], ids["<|endoftext|>"]
    prompt = [sot, ids["<|en|>"], ids["<|transcribe|>"], ids["<|notimestamps|>"]]

    wav = out / "audio" / "speech10s.wav"
    make_wav(wav, BENCH_SECONDS)

    from transformers import WhisperForConditionalGeneration

    cfg = mw.whisper_config(vocab, ids)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    mw.random_weights(model, seed=1, gain=2.0, quiet_rows=[], eos_row=eot, eos_gain=0.0)
    mdir = work / "hf_model"
    if mdir.exists():
        shutil.rmtree(mdir)
    mdir.mkdir(parents=True)
    model.generation_config = mw.make_generation_config(ids)
    model.save_pretrained(str(mdir))
    tok.save(str(mdir / "tokenizer.json"))
    (mdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "WhisperTokenizer", "model_max_length": BENCH_MAX_SEQ_LEN,
        "unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "add_prefix_space": False}, indent=1) + "\n")
    fe = mw.feature_extractor()
    fe.save_pretrained(str(mdir))
    for fn in ("config.json", "generation_config.json", "preprocessor_config.json"):
        shutil.copy(mdir / fn, out / fn)

    from optimum.exporters.executorch import main_export

    edir = work / "export"
    if edir.exists():
        shutil.rmtree(edir)
    t0 = time.time()
    main_export(str(mdir), "automatic-speech-recognition", "xnnpack", str(edir),
                max_seq_len=BENCH_MAX_SEQ_LEN)
    t_export = time.time() - t0
    shutil.copy(edir / "model.pte", out / "model.pte")
    print(f"exported {out / 'model.pte'} ({(out / 'model.pte').stat().st_size:,} bytes) in "
          f"{t_export:.0f} s", flush=True)

    # The .pte against eager transformers: encoder output and 8 greedy tokens.
    import soundfile as sf
    from executorch.runtime import Runtime

    samples, sr = sf.read(str(wav), dtype="float32")
    feats = fe(samples, sampling_rate=sr, return_tensors="np")["input_features"][0]
    ref = mw.eager_greedy(model, feats, prompt, eot, n_new=8)
    prog = Runtime.get().load_program(str(out / "model.pte"))
    enc_m, dec_m = prog.load_method("encoder"), prog.load_method("text_decoder")
    h = enc_m.execute([torch.from_numpy(feats)[None]])[0]
    enc_diff = float((h[0] - ref["enc"]).abs().max())
    toks, pos = [], 0
    for tid in prompt:
        lg = dec_m.execute([torch.tensor([[tid]]), h, torch.tensor([pos])])[0]
        pos += 1
    first_diff = float((lg[0, -1] - ref["steps"][0]).abs().max())
    while len(toks) < 8:
        toks.append(int(lg[0, -1].argmax()))
        lg = dec_m.execute([torch.tensor([[toks[-1]]]), h, torch.tensor([pos])])[0]
        pos += 1
    want = ref["new"]
    ok = toks == want and enc_diff < 1e-3 and first_diff < 1e-3
    verdict = "equal" if toks == want else f"DIFFER {toks} vs {want}"
    print(f"check: encoder max |diff| {enc_diff:.2e}, first-step logits {first_diff:.2e}, "
          f"greedy 8 {verdict}", flush=True)
    info = {
        "what": "bench-scale Whisper (random weights) for tools/bench/asr.py",
        "model": BENCH_MODEL, "vocab_size": vocab, "max_seq_len": BENCH_MAX_SEQ_LEN,
        "pte_bytes": (out / "model.pte").stat().st_size, "export_seconds": round(t_export, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "check": {"encoder_max_abs_diff": enc_diff, "first_logits_max_abs_diff": first_diff,
                  "greedy_equal": toks == ref["new"]},
        "audio": "audio/speech10s.wav", "prompt_ids": prompt, "eot_id": eot,
    }
    (out / "bench.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


class RawSide:
    def __init__(self, spec):
        import torch

        torch.set_num_threads(spec["threads"])
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(spec["threads"])
        assert portable_lib._threadpool_get_thread_count() == spec["threads"]
        from executorch.runtime import Runtime
        from transformers import WhisperFeatureExtractor

        self.torch = torch
        prog = Runtime.get().load_program(spec["model"])
        self.enc = prog.load_method("encoder")
        self.dec = prog.load_method("text_decoder")
        self.fe = WhisperFeatureExtractor.from_pretrained(spec["model_dir"])
        self.wav = spec["wav"]
        import numpy as np

        np.save(spec["mel_file"], self.features()[0].numpy().astype(np.float32))

    def features(self):
        import soundfile as sf

        samples, sr = sf.read(self.wav, dtype="float32")
        if samples.ndim == 2:
            samples = samples.mean(axis=1)
        return self.fe(samples, sampling_rate=sr, return_tensors="pt")["input_features"]

    def run(self, job):
        torch = self.torch
        t0 = time.perf_counter()
        feats = self.features()
        t1 = time.perf_counter()
        h = self.enc.execute([feats])[0]
        t2 = time.perf_counter()
        pos = 0
        for tid in job["prompt"]:
            lg = self.dec.execute([torch.tensor([[tid]], dtype=torch.long), h,
                                   torch.tensor([pos], dtype=torch.long)])[0]
            pos += 1
        toks = [int(lg[0, -1].argmax())]
        t3 = time.perf_counter()
        while len(toks) < job["n"] and toks[-1] != job["eot"]:
            lg = self.dec.execute([torch.tensor([[toks[-1]]], dtype=torch.long), h,
                                   torch.tensor([pos], dtype=torch.long)])[0]
            pos += 1
            toks.append(int(lg[0, -1].argmax()))
        t4 = time.perf_counter()
        if toks[-1] == job["eot"]:
            toks.pop()  # as EtLlm's Transcript.tokens: the end-of-text token excluded
            n_steps = len(toks)  # the call that produced <|endoftext|> is still a step
        else:
            n_steps = len(toks) - 1
        return {"features_s": t1 - t0, "enc_s": t2 - t1, "prompt_s": t3 - t2,
                "decode_tps": n_steps / (t4 - t3) if t4 > t3 and n_steps > 0 else None,
                "tokens": toks}


class EtllmSide:
    def __init__(self, spec):
        import numpy as np

        import etllm

        self.etllm = etllm
        self.asr = etllm.AsrRunner(spec["model"], spec["tokenizer"], num_threads=spec["threads"])
        self.wav = spec["wav"]
        self.mel = np.load(spec["mel_file"])

    def run(self, job):
        e = self.etllm
        audio = e.Audio(self.wav) if job["input"] == "wav" else e.Features(self.mel)
        t0 = time.perf_counter()
        tr = self.asr.transcribe(audio, language="en", max_new_tokens=job["n"])
        wall = time.perf_counter() - t0
        s = tr.stats
        n_steps = s.num_generated_tokens - 1
        span = (s.inference_end_us - s.first_token_us) / 1e6
        return {"enc_s": (s.prompt_eval_end_us - s.inference_start_us) / 1e6,
                "prompt_s": (s.first_token_us - s.prompt_eval_end_us) / 1e6,
                "decode_tps": n_steps / span if span > 0 and n_steps > 0 else None,
                "tokens": list(tr.tokens), "generated": s.num_generated_tokens, "wall_s": wall}


def worker(side: str) -> int:
    rd, wr = mmb.proto_streams()
    obj = None
    for line in rd:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "init":
                obj = (RawSide if side == "raw" else EtllmSide)(msg["spec"])
                res = {"ok": True}
            else:
                res = {"ok": True, **obj.run(msg["job"])}
        except Exception as ex:  # noqa: BLE001
            import traceback

            res = {"ok": False, "error": f"{type(ex).__name__}: {ex}", "trace": traceback.format_exc()}
        wr.write(json.dumps(res) + "\n")
    return 0


class Worker(mmb.Worker):
    def __init__(self, side, python, env, log):
        self.side = side
        self.p = subprocess.Popen([python, __file__, "worker", side], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                  cwd=str(REPO))


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def setup_of(model_dir: Path) -> dict:
    if (model_dir / "bench.json").exists():
        b = json.loads((model_dir / "bench.json").read_text())
        return {"wav": str(model_dir / b["audio"]), "prompt": b["prompt_ids"], "eot": b["eot_id"]}
    ref = json.loads((model_dir / "reference.json").read_text())
    sp = ref["special_tokens"]
    return {"wav": str(model_dir / "audio" / "speech16k.wav"),
            "prompt": [sp["<|startoftranscript|>"], sp["<|en|>"], sp["<|transcribe|>"],
                       sp["<|notimestamps|>"]],
            "eot": sp["<|endoftext|>"]}


def run_bench(args) -> int:
    model_dir = Path(args.model_dir).resolve()
    setup = setup_of(model_dir)
    n, threads = args.tokens, args.threads
    tmp = Path(tempfile.mkdtemp(prefix="etllm-asr-bench-"))
    spec = {"model": str(model_dir / "model.pte"), "tokenizer": str(model_dir / "tokenizer.json"),
            "model_dir": str(model_dir), "threads": threads, "wav": setup["wav"],
            "mel_file": str(tmp / "mel.npy")}
    lib = args.etllm_library or os.environ.get("ETLLM_LIBRARY") or str(REPO / "target" / "release" / "libetllm.so")
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ETLLM_LIBRARY")}
    raw_env = dict(base_env, OMP_NUM_THREADS=str(threads))
    et_env = dict(base_env, PYTHONPATH=str(REPO / "python"), ETLLM_LIBRARY=lib,
                  OMP_NUM_THREADS=str(threads))
    log = open(tmp / "workers.log", "w")
    raw = Worker("raw", args.python, raw_env, log)
    raw.call({"cmd": "init", "spec": spec})
    et = None
    for _ in range(3):
        try:
            et = Worker("etllm", args.python, et_env, log)
            et.call({"cmd": "init", "spec": spec})
            break
        except SystemExit as ex:
            print(f"etllm worker failed to start ({ex}); retrying", file=sys.stderr)
            et = None
            time.sleep(20)
    if et is None:
        raise SystemExit("could not start the etllm worker")
    rjob = {"prompt": setup["prompt"], "eot": setup["eot"], "n": n}

    for inp in ("wav", "features"):  # warm-up
        raw.call({"cmd": "run", "job": dict(rjob, n=min(n, 8))})
        et.call({"cmd": "run", "job": {"n": min(n, 8), "input": inp}})
    r = raw.call({"cmd": "run", "job": rjob})
    ew = et.call({"cmd": "run", "job": {"n": n, "input": "wav"}})
    ef = et.call({"cmd": "run", "job": {"n": n, "input": "features"}})
    same_f = ef["tokens"] == r["tokens"]
    n_raw = len(r["tokens"])
    agree_w = sum(a == b for a, b in zip(ew["tokens"], r["tokens"]))
    wav_verdict = "the same tokens" if ew["tokens"] == r["tokens"] else f"{agree_w} of {n_raw} equal"
    check = (f"greedy: raw loop {n_raw} tokens; EtLlm from features "
             f"{'the same tokens' if same_f else 'DIFFERENT tokens'}; EtLlm from the WAV (its own "
             f"log-mel) {wav_verdict}")
    print(check, flush=True)

    keys = ("raw_feat", "raw_enc", "raw_audio_enc", "raw_prompt", "raw_dec", "et_wav_enc",
            "et_feat_enc", "et_prompt", "et_dec", "ratio_audio_enc", "ratio_enc", "ratio_dec")
    rows = {k: [] for k in keys}
    lengths = []
    for rnd in range(args.rounds):
        et_first = rnd % 2 == 1
        res = {}
        for inp in ("wav", "features"):
            pair = [("et", inp), ("raw", inp)] if et_first else [("raw", inp), ("et", inp)]
            for side, i in pair:
                if side == "raw":
                    res[("raw", i)] = raw.call({"cmd": "run", "job": rjob})
                else:
                    res[("et", i)] = et.call({"cmd": "run", "job": {"n": n, "input": i}})
        rw, rf, ew, ef = res[("raw", "wav")], res[("raw", "features")], res[("et", "wav")], res[("et", "features")]
        lengths.append((len(rw["tokens"]), len(ew["tokens"]), len(ef["tokens"])))
        raw_feat = statistics.mean([rw["features_s"], rf["features_s"]])
        raw_enc = statistics.mean([rw["enc_s"], rf["enc_s"]])
        raw_audio_enc = statistics.mean([rw["features_s"] + rw["enc_s"], rf["features_s"] + rf["enc_s"]])
        raw_dec = statistics.mean([rw["decode_tps"], rf["decode_tps"]])
        et_dec = statistics.mean([ew["decode_tps"], ef["decode_tps"]])
        vals = {"raw_feat": raw_feat, "raw_enc": raw_enc, "raw_audio_enc": raw_audio_enc,
                "raw_prompt": statistics.mean([rw["prompt_s"], rf["prompt_s"]]), "raw_dec": raw_dec,
                "et_wav_enc": ew["enc_s"], "et_feat_enc": ef["enc_s"],
                "et_prompt": statistics.mean([ew["prompt_s"], ef["prompt_s"]]), "et_dec": et_dec,
                "ratio_audio_enc": raw_audio_enc / ew["enc_s"], "ratio_enc": raw_enc / ef["enc_s"],
                "ratio_dec": et_dec / raw_dec}
        for k, v in vals.items():
            rows[k].append(v)
        print(f"round {rnd}: audio->encoder ms raw {1e3 * raw_audio_enc:.1f} (features "
              f"{1e3 * raw_feat:.1f}) etllm {1e3 * ew['enc_s']:.1f}; encoder only raw "
              f"{1e3 * raw_enc:.1f} etllm {1e3 * ef['enc_s']:.1f}; decode tok/s raw {raw_dec:.1f} "
              f"etllm {et_dec:.1f}", flush=True)
    raw.close()
    et.close()
    log.close()
    m = {k: statistics.median(v) for k, v in rows.items()}
    ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
    lines = [
        f"model: {model_dir}  threads: {threads}  max tokens: {n}  rounds: {args.rounds}",
        check,
        f"tokens per run (raw, EtLlm wav, EtLlm features): {sorted(set(lengths))}",
        f"audio -> encoder output  raw {ms(m['raw_audio_enc'])} (of which soundfile + "
        f"WhisperFeatureExtractor {ms(m['raw_feat'])}) | EtLlm {ms(m['et_wav_enc'])} (x{m['ratio_audio_enc']:.2f})",
        f"encoder only (log-mel given)  raw {ms(m['raw_enc'])} | EtLlm {ms(m['et_feat_enc'])} (x{m['ratio_enc']:.2f})",
        f"decoder prompt ({len(setup['prompt'])} tokens)  raw {ms(m['raw_prompt'])} | EtLlm {ms(m['et_prompt'])}",
        f"decode tok/s  raw {m['raw_dec']:.2f} | EtLlm {m['et_dec']:.2f} (x{m['ratio_dec']:.2f})",
        "(ratios: medians of per-round ratios; > 1 = EtLlm faster)",
    ]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model_dir": str(model_dir), "threads": threads, "tokens": n, "rounds": args.rounds,
            "check": check, "lengths": lengths, "medians": m, "rounds_data": rows}, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="build the bench-scale Whisper under --out")
    mk.add_argument("--out", type=Path, default=Path("/work/bench-models"))
    mk.add_argument("--work", type=Path, default=None)
    rn = sub.add_parser("run", help="the benchmark")
    rn.add_argument("--model-dir", required=True,
                    help="model.pte + tokenizer.json + preprocessor_config.json + reference.json "
                         "(the fixture) or bench.json (make's output)")
    rn.add_argument("--rounds", type=int, default=7)
    rn.add_argument("--tokens", type=int, default=40)
    rn.add_argument("--threads", type=int, default=1)
    rn.add_argument("--python", default=DEFAULT_PY)
    rn.add_argument("--etllm-library", default=None)
    rn.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cmd == "make":
        return make_bench(args.out, args.work)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
