"""EtLlm: run decoder-only LLMs exported to ExecuTorch ``.pte`` files.

A thin layer over EtLlm's C ABI (``libetllm.so``, bundled with the package)::

    import etllm

    runner = etllm.Runner("model.pte", "tokenizer.json")
    config = etllm.GenerationConfig(max_new_tokens=32, temperature=0, num_bos=1, echo=False)
    for piece in runner.stream("Once upon a time", config):
        print(piece, end="", flush=True)

A multimodal export (``vision_encoder``, ``token_embedding``, ``text_decoder``) takes a
prompt of text and images with :meth:`Runner.generate_inputs`::

    runner.generate_inputs(["USER: ", etllm.Image("cat.png"), "\\nDescribe. ASSISTANT:"],
                           max_new_tokens=32, temperature=0)

(a plain ``str`` in the list is :class:`Text`, a list of ints :class:`Tokens`), and
:class:`AsrRunner` transcribes speech with a Whisper export
(``etllm.AsrRunner("whisper.pte", "tokenizer.json").transcribe("speech.wav").text``).

``runner.session()`` opens a :class:`Session`: another conversation over the same loaded
model, whose state saves to bytes (:meth:`Session.save`) and loads into a session of the
same model, in this process or another (:meth:`Session.load`).
"""

from __future__ import annotations

from . import _ffi
from ._config import GenerationConfig, Stats
from ._errors import (
    BusyError,
    ChatTemplateError,
    ContextFullError,
    ERROR_CLASSES,
    EtLlmError,
    ExecutorchRuntimeError,
    FileAccessError,
    GrammarError,
    InvalidArgumentError,
    InvalidMediaError,
    InvalidModelError,
    InvalidStateError,
    InvalidTokenizerError,
    InvalidUtf8Error,
    IoManagerError,
    NotFoundError,
    NotLoadedError,
    NullArgumentError,
    PanicError,
    SamplerError,
    ServerError,
    StructSizeError,
    TokenizerError,
    UnsupportedModelError,
    status_name,
)
from ._io_manager import IoManager, ModelInfo, ModelMetadata, Step, TensorInfo, last_row
from ._multimodal import Audio, Features, Image, Text, Tokens
from ._runner import Piece, Runner
from ._server import Server
from ._session import Session
from ._tokenizer import TextStream, Tokenizer
from ._chat import ChatTemplate, Conversation
from ._asr import AsrRunner, Transcript

__version__: str = _ffi.lib.etllm_version().decode()
EXECUTORCH_VERSION: str = _ffi.lib.etllm_executorch_version().decode()

__all__ = [
    "AsrRunner", "Audio", "BusyError", "ChatTemplate", "ChatTemplateError", "ContextFullError", "Conversation",
    "ERROR_CLASSES", "EXECUTORCH_VERSION", "EtLlmError", "ExecutorchRuntimeError",
    "Features", "FileAccessError", "GenerationConfig", "GrammarError", "Image", "InvalidArgumentError",
    "InvalidMediaError", "InvalidModelError",
    "InvalidStateError", "InvalidTokenizerError", "InvalidUtf8Error", "IoManager", "IoManagerError", "ModelInfo",
    "ModelMetadata", "NotFoundError", "NotLoadedError", "NullArgumentError", "PanicError",
    "Piece", "Runner", "SamplerError", "Server", "ServerError", "Session", "Stats", "Step", "StructSizeError", "TensorInfo",
    "Text", "TextStream", "Tokenizer", "TokenizerError", "Tokens", "Transcript", "UnsupportedModelError", "last_row",
    "status_name",
]
