#!/usr/bin/env python3
"""Exports a Llama-architecture checkpoint to a .pte file that EtLlm runs
(docs/tutorials/export-a-model.md).

Run it in an export environment with torch and executorch 1.5.1 (never needed at run
time, and never installed by CI):

    python3 -m venv ~/etllm-export-venv
    ~/etllm-export-venv/bin/pip install -r tools/fixtures/requirements.txt
    ~/etllm-export-venv/bin/python examples/export/export_llama.py \
        --params params.json [--checkpoint consolidated.pth] --out build/my-model

params.json holds the architecture: {"dim": 64, "n_layers": 2, "n_heads": 4,
"n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32, "norm_eps": 1e-5} (Llama's
params.json keys). Without --checkpoint the weights are random (seeded): the export then
runs but its text is noise, which is how tests/fixtures/dyn_xnnpack/model.pte was made
(tools/fixtures/make_fixtures.py).

It writes the export_llm YAML config beside the model and runs
`python -m executorch.extension.llm.export.export_llm --config ...` with these settings:
KV cache inside the model, dynamic shape (chunked prefill), XNNPACK with extended ops,
fp32, BOS/EOS metadata. `--custom-ops` sets `use_sdpa_with_kv_cache` (upstream's
recommendation): the model then calls `llama::update_cache` and `llama::custom_sdpa`,
which ExecuTorch's prebuilt runtime has no kernels for but EtLlm brings its own.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path


def random_checkpoint(params: dict, path: Path, seed: int) -> None:
    """A seeded random state dict for the architecture (norm weights near 1)."""
    import torch
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    model = construct_transformer(ModelArgs(max_seq_len=128, max_context_len=128, **params))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            v = 1.0 + 0.05 * torch.randn(p.shape, generator=g)
        elif name.startswith("tok_embeddings"):
            v = torch.randn(p.shape, generator=g)
        else:
            v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        state[name] = v.to(torch.float32).contiguous()
    torch.save(state, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", required=True, type=Path, help="architecture JSON (Llama params.json)")
    p.add_argument("--checkpoint", type=Path, help="state dict (.pth); default: random weights")
    p.add_argument("--out", required=True, type=Path, help="output folder (model.pte goes there)")
    p.add_argument("--max-seq-len", type=int, default=128, help="most tokens per model call")
    p.add_argument("--max-context-len", type=int, default=128, help="KV-cache length")
    p.add_argument("--bos", type=int, default=1, help="BOS id stored as get_bos_id")
    p.add_argument("--eos", type=int, nargs="+", default=[2], help="EOS ids stored as get_eos_ids")
    p.add_argument("--static-shape", action="store_true", help="no dynamic shape (prefill one token a call)")
    p.add_argument("--portable", action="store_true", help="no XNNPACK (portable kernels only)")
    p.add_argument("--custom-ops", action="store_true",
                   help="use_sdpa_with_kv_cache: upstream's llama:: attention and cache-update ops")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    params = json.loads(args.params.read_text())
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = args.out / "random_checkpoint.pth"
        random_checkpoint(params, ckpt, args.seed)
        print(f"random weights (seed {args.seed}) in {ckpt}", file=sys.stderr)
    pte = args.out / "model.pte"
    metadata = json.dumps({"get_bos_id": args.bos, "get_eos_ids": args.eos})
    yes = lambda b: "true" if b else "false"  # noqa: E731
    config = f"""base:
  model_class: llama3
  params: {json.dumps(str(args.params.resolve()))}
  checkpoint: {json.dumps(str(ckpt.resolve()))}
  metadata: {json.dumps(metadata)}
model:
  use_kv_cache: true
  use_sdpa_with_kv_cache: {yes(args.custom_ops)}
  enable_dynamic_shape: {yes(not args.static_shape)}
  dtype_override: fp32
export:
  max_seq_length: {args.max_seq_len}
  max_context_length: {args.max_context_len}
  output_dir: {json.dumps(str(args.out.resolve()))}
  output_name: {json.dumps(str(pte.resolve()))}
backend:
  xnnpack:
    enabled: {yes(not args.portable)}
    extended_ops: {yes(not args.portable)}
"""
    yaml_path = args.out / "export_llm.yaml"
    yaml_path.write_text(config)
    cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config", str(yaml_path)]
    print("running: " + " ".join(cmd), file=sys.stderr)
    if subprocess.run(cmd, cwd=args.out).returncode != 0 or not pte.exists():
        print("export failed", file=sys.stderr)
        return 1
    print(f"wrote {pte} ({pte.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
