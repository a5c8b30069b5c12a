"""Server: the OpenAI-compatible HTTP server over a runner's model, in this process."""

from __future__ import annotations

import ctypes
from typing import Any, Optional

from . import _ffi
from ._errors import check
from ._runner import Runner


class Server:
    """An OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
    ``/v1/models``, ``/health``, ``/metrics``; see docs/server.md) over ``runner``'s model,
    serving on threads of its own from construction until :meth:`stop` or :meth:`close`.
    Any OpenAI client talks to it::

        with etllm.Server(runner, port=0, parallel=4) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
            client.chat.completions.create(model="etllm", messages=[...])

    ``port=0`` picks a free port (:attr:`port` tells which). ``parallel`` slots keep that
    many conversations' KV caches (requests run one at a time on the model); ``queue_size``
    requests may wait, one more is answered 503; ``context_length`` (0: the model's) caps
    prompt plus output; ``api_key`` requires ``Authorization: Bearer KEY`` on every route
    but ``/health``; ``shutdown_timeout`` is how long requests may go on after :meth:`stop`
    before they are cancelled. The server keeps the model loaded after the runner is
    closed. A port in use raises :class:`ServerError`; options out of range raise
    :class:`InvalidArgumentError`. The model runs without holding the GIL."""

    def __init__(
        self,
        runner: Runner,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        parallel: int = 1,
        queue_size: int = 64,
        context_length: int = 0,
        api_key: Optional[str] = None,
        model_name: str = "etllm",
        max_body_bytes: int = 8 << 20,
        shutdown_timeout: float = 10.0,
        log_requests: bool = False,
    ) -> None:
        self._ptr: Optional[int] = None
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {port}")
        for name, value in (("parallel", parallel), ("queue_size", queue_size),
                            ("context_length", context_length)):
            if not 0 <= value < 2**32:
                raise ValueError(f"{name} must be in 0..2**32-1, not {value}")
        if not 0 <= shutdown_timeout * 1000 < 2**32:
            raise ValueError(f"shutdown_timeout must be 0 or more seconds, not {shutdown_timeout}")
        options = _ffi.lib.etllm_server_options_default()
        options.host = host.encode("utf-8")
        options.port = port
        options.parallel = parallel
        options.queue_size = queue_size
        options.context_length = context_length
        options.api_key = api_key.encode("utf-8") if api_key else None
        options.model_name = model_name.encode("utf-8")
        options.max_body_bytes = max_body_bytes
        options.shutdown_timeout_ms = int(shutdown_timeout * 1000)
        options.log_requests = log_requests
        self._host = host
        out = ctypes.c_void_p()
        check(_ffi.lib.etllm_server_start(runner._p(), ctypes.byref(options), ctypes.byref(out)))
        self._ptr = out.value

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError("the server is closed")
        return self._ptr

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(_ffi.lib.etllm_server_port(self._p()))

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, for a client's base URL (add ``/v1`` for OpenAI's)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stops accepting, lets running and queued requests finish for
        ``shutdown_timeout``, cancels the rest and returns when the server has ended. A
        second call does nothing."""
        check(_ffi.lib.etllm_server_stop(self._p()))

    def close(self) -> None:
        """Stops the server (as :meth:`stop`) and frees it; a second call does nothing."""
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            _ffi.lib.etllm_server_free(ptr)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
