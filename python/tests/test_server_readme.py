"""The README's server section, run as written: the `serve` command's arguments, the curl
block and the openai block, against `etllm serve` on a free port (8080 in the README is
replaced by that port)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

from conftest import REPO
from server_util import run_server


def section_blocks(lang: str):
    text = (REPO / "README.md").read_text()
    section = text.split("## The server (OpenAI-compatible)", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def serve_arguments():
    """The README's `cargo run --release -- serve ...` arguments, port dropped."""
    (serve,) = [b for b in section_blocks("sh") if " serve " in b]
    args = shlex.split(serve.split(" -- serve ", 1)[1])
    i = args.index("--port")
    return args[:i] + args[i + 2:]


def test_readme_serve_command_curl_and_openai_blocks_run(cli: str) -> None:
    (curl,) = [b for b in section_blocks("sh") if b.startswith("curl")]
    (client,) = section_blocks("python")
    with run_server(cli, *serve_arguments()) as server:
        port = str(server.port)
        out = subprocess.run(["bash", "-c", curl.replace("8080", port)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        answer = json.loads(out)
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] <= 24

        run = subprocess.run([sys.executable, "-c", client.replace("8080", port)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        streamed, person = run.stdout.rstrip("\n").rsplit("\n", 1)
        assert streamed.strip()
        assert isinstance(json.loads(person)["name"], str)
