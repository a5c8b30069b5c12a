"""Decode tokens/s of upstream ExecuTorch's TextLLMRunner (its Python binding), to compare
with `etllm generate --json` on the same .pte in the same session.

Needs the export venv (torch + executorch 1.5.1; see tools/fixtures/README.md), never CI:

    /root/etllm-export-venv/bin/python tools/bench/upstream_decode.py MODEL.pte TOKENIZER.json TEMPERATURE RUNS

Prints {"upstream_decode_tok_s": median over RUNS (after one warm-up run), ...} to stderr
(upstream prints the generated text to stdout itself). Upstream generates 101 - 1 = 100
tokens for max_new_tokens=101, samples with its fixed top-p 0.9 at temperature > 0, and its
token callback is left out because the binding raises UnicodeDecodeError on pieces that
split a UTF-8 character. Upstream's kernels for the `llama::` custom ops
(libcustom_ops_aot_lib) are loaded first, so models exported with
`use_sdpa_with_kv_cache` run too, on upstream's own kernels.
"""
import sys, json
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama:: kernels)
from executorch.extension.llm.runner import TextLLMRunner, GenerationConfig
model, tok, temp, runs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
r = TextLLMRunner(model, tok)
rates = []
for i in range(runs + 1):
    out = {}
    cfg = GenerationConfig(max_new_tokens=101, temperature=temp, echo=False, num_bos=1)
    r.generate("Once upon a time", cfg, None, lambda s: out.update(s=s))
    s = out["s"]
    gen = s.num_generated_tokens
    dt = (s.inference_end_ms - s.prompt_eval_end_ms) / 1000.0
    if i > 0:
        rates.append(gen / dt)
    r.reset()
rates.sort()
print(json.dumps({"upstream_decode_tok_s": rates[len(rates) // 2], "generated": gen}), file=sys.stderr)
