"""Starts `etllm serve` for the server tests (test_server.py).

    with run_server(cli, "--parallel", "2") as server:
        httpx.get(server.url + "/health")

`run_server` starts the CLI with `--port 0`, waits for its one stdout line
`listening on http://HOST:PORT` and yields a `ServerProcess`. On exit it sends SIGTERM and
asserts that the server exits with code 0 within a bound. The server's stderr goes to a
temporary file; every failure message built here (and `ServerProcess.stderr()`) shows it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

LISTENING = "listening on "
# A server that starts (the built-in model loads in well under a second) or stops (the
# default --shutdown-timeout is 10 s; the tests' requests end sooner) slower than this is
# broken.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class ServerProcess:
    """A running `etllm serve`: `url` is its base URL (no trailing slash)."""

    def __init__(self, proc: subprocess.Popen, url: str, stderr_path: Path):
        self.proc = proc
        self.url = url
        self.stderr_path = stderr_path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Sends `sig` (once, if the server still runs) and waits for it to exit; returns
        the exit code. Fails when the server does not exit within `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"etllm serve did not exit within {timeout} s of signal {sig}; "
                f"stderr:\n{self.stderr()}"
            ) from None

    def assert_running(self) -> None:
        code = self.proc.poll()
        assert code is None, f"etllm serve exited with {code}; stderr:\n{self.stderr()}"


def _read_listening_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line, read without blocking past `timeout`."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no 'listening on' line within {timeout} s")
            if not selector.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError("stdout closed before a line")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


@contextlib.contextmanager
def run_server(cli: str, *args: str, env: Optional[dict] = None,
               quiet: bool = True) -> Iterator[ServerProcess]:
    """Runs `cli serve --port 0 [--quiet] ARGS...` for the `with` block; on exit, SIGTERM
    and an assertion that it exited with 0 (skipped when the test stopped it already)."""
    command = [cli, "serve", "--port", "0", *(["--quiet"] if quiet else []), *args]
    stderr_file = tempfile.NamedTemporaryFile(
        prefix="etllm-serve-", suffix=".stderr", delete=False)
    stderr_path = Path(stderr_file.name)
    full_env = dict(os.environ)
    # A key in the tests' environment would change which routes need one.
    full_env.pop("ETLLM_API_KEY", None)
    full_env.update(env or {})
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file,
                            stdin=subprocess.DEVNULL, env=full_env)
    stderr_file.close()
    server: Optional[ServerProcess] = None
    try:
        try:
            line = _read_listening_line(proc, START_TIMEOUT)
        except (TimeoutError, EOFError) as e:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5 if isinstance(e, EOFError) else 0.1)
            raise AssertionError(
                f"{' '.join(command)}: {e} (exit code {proc.poll()}); stderr:\n{stderr_path.read_text(errors='replace')}"
            ) from None
        assert line.startswith(LISTENING + "http://"), (
            f"unexpected first stdout line {line!r}; "
            f"stderr:\n{stderr_path.read_text(errors='replace')}")
        server = ServerProcess(proc, line[len(LISTENING):].strip(), stderr_path)
        yield server
        code = server.stop()
        assert code == 0, f"etllm serve exited with {code} after SIGTERM; stderr:\n{server.stderr()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(OSError):
            stderr_path.unlink()
