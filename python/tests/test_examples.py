"""The Python examples run (so they cannot rot), and the package works from its install."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import etllm
from conftest import EXAMPLES, TOKENIZER, model, reference


def run_example(script, *args):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )


def test_generate_example_streams_the_reference_text():
    case = reference("dyn_xnnpack")["cases"][3]
    out = run_example("generate.py", model("dyn_xnnpack"), str(TOKENIZER), "--prompt", case["prompt"],
                      "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    want = etllm.Tokenizer(TOKENIZER).decode(case["prompt_ids"][1:] + case["greedy_ids"][:8])
    assert out.stdout == want + "\n"
    assert json.loads(out.stderr.strip().splitlines()[-1])["generated_tokens"] == 8


def test_custom_kv_cache_example_matches_the_builtin_on_both_layouts():
    for name, manager in (("dyn_xnnpack", "KvInModelManager"), ("static_attention", "StaticAttentionManager")):
        out = run_example("custom_kv_cache.py", model(name), str(TOKENIZER), "--max-new-tokens", "40")
        assert out.returncode == 0, out.stderr
        assert f"{manager}: 40 tokens, same as the built-in manager" in out.stderr


def test_chat_example_rewinds_and_regenerates_the_same_reply():
    out = run_example("chat.py", model("dyn_xnnpack"), str(TOKENIZER), "--template",
                      str(EXAMPLES.parent / "data" / "compact_chat.jinja"), "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "ok: 4 messages; the rewound turn regenerated the same reply" in out.stderr
    replies = [line for line in out.stdout.splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 3 and replies[1] == replies[2] and len(replies[1]) > len("assistant: ")


def test_package_imports_without_any_environment_variable(tmp_path):
    # A clean environment and a folder outside the source tree: what a user gets after
    # `pip install ./python`.
    code = ("import etllm, os, sys; "
            "print(etllm.__file__); print(etllm._ffi._library_path()); print(etllm.__version__)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    package_file, library, version = out.stdout.split("\n")[:3]
    package_dir = os.path.dirname(package_file)
    assert library == os.path.join(package_dir, "_lib", "libetllm.so")
    assert os.path.isfile(library) and version == etllm.__version__
    assert package_dir.startswith(sys.prefix), "etllm should be imported from the installed environment"


def test_package_ships_type_hints():
    assert os.path.isfile(os.path.join(os.path.dirname(etllm.__file__), "py.typed"))
