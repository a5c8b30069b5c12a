"""Exceptions: one class per C status, all deriving from :class:`EtLlmError`."""

from __future__ import annotations

from typing import Dict, Type

from . import _ffi


class EtLlmError(Exception):
    """An error reported by the EtLlm C library.

    Attributes:
        status: the C ``etllm_status`` code (an ``int``).
        status_name: its name, e.g. ``"ETLLM_ERR_CONTEXT_FULL"``.
        message: the library's message (``etllm_last_error_message()``).
    """

    status: int = -1

    def __init__(self, message: str, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        self.status_name = status_name(self.status)
        self.message = message
        super().__init__(f"{self.status_name} ({self.status}): {message}")


class NullArgumentError(EtLlmError):
    status = 1


class InvalidUtf8Error(EtLlmError):
    status = 2


class InvalidArgumentError(EtLlmError, ValueError):
    status = 3


class StructSizeError(EtLlmError):
    status = 4


class FileAccessError(EtLlmError):
    status = 5


class InvalidModelError(EtLlmError):
    status = 6


class UnsupportedModelError(EtLlmError):
    status = 7


class InvalidTokenizerError(EtLlmError):
    status = 8


class TokenizerError(EtLlmError):
    status = 9


class ContextFullError(EtLlmError):
    status = 10


class ExecutorchRuntimeError(EtLlmError):
    status = 11


class IoManagerError(EtLlmError):
    status = 12


class NotLoadedError(EtLlmError):
    status = 13


class BusyError(EtLlmError):
    status = 14


class NotFoundError(EtLlmError):
    status = 15


class PanicError(EtLlmError):
    status = 16


class SamplerError(EtLlmError):
    status = 17


class ChatTemplateError(EtLlmError):
    status = 18


class GrammarError(EtLlmError):
    """The config's grammar failed to compile (the compiler's message included), or the
    grammar engine failed during generation."""

    status = 19


class InvalidStateError(EtLlmError):
    """A saved session state was refused: not a state, truncated or corrupt, from another
    model, or refused by the KV-cache manager. The session keeps the state it had."""

    status = 20


class ServerError(EtLlmError):
    """The HTTP server could not start (its address cannot be bound, e.g. the port is in
    use) or failed while serving."""

    status = 21


class InvalidMediaError(EtLlmError, ValueError):
    """An image or audio input could not be used: not a supported format (images: PNG,
    JPEG, GIF, BMP, WebP; audio: WAV), corrupt or truncated, or a layout EtLlm does not
    take (more than two audio channels, no samples). Nothing changed: the runner, session
    or :class:`AsrRunner` stays usable."""

    status = 22


ERROR_CLASSES: Dict[int, Type[EtLlmError]] = {
    cls.status: cls
    for cls in (
        NullArgumentError,
        InvalidUtf8Error,
        InvalidArgumentError,
        StructSizeError,
        FileAccessError,
        InvalidModelError,
        UnsupportedModelError,
        InvalidTokenizerError,
        TokenizerError,
        ContextFullError,
        ExecutorchRuntimeError,
        IoManagerError,
        NotLoadedError,
        BusyError,
        NotFoundError,
        PanicError,
        SamplerError,
        ChatTemplateError,
        GrammarError,
        InvalidStateError,
        ServerError,
        InvalidMediaError,
    )
}


def status_name(status: int) -> str:
    """The C name of a status code, e.g. ``"ETLLM_ERR_BUSY"`` (``"unknown status"`` if none)."""
    return _ffi.lib.etllm_status_name(int(status)).decode("utf-8")


def error_for(status: int, message: str | None = None) -> EtLlmError:
    """The exception for a non-OK status (message: the thread's last error message)."""
    if message is None:
        message = _ffi.lib.etllm_last_error_message().decode("utf-8", "replace")
    cls = ERROR_CLASSES.get(status, EtLlmError)
    return cls(message, status)


def check(status: int) -> None:
    """Raises the matching exception unless ``status`` is ``ETLLM_OK``."""
    if status != 0:
        raise error_for(status)
