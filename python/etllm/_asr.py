"""AsrRunner: speech to text with encoder-decoder exports (Whisper)."""

from __future__ import annotations

import ctypes
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

from . import _ffi
from ._config import GenerationConfig, Stats
from ._errors import check, error_for
from ._multimodal import Audio, Features, input_to_c
from ._runner import PathLike, Piece, TokenCallback, _c_callbacks, _ids_array  # noqa: F401 (Piece: TokenCallback names it)


@dataclass
class Transcript:
    """What :meth:`AsrRunner.transcribe` returns: the ``text`` (special tokens left out),
    the generated ``tokens`` (the end-of-text token excluded) and the ``stats``
    (``num_prompt_tokens`` is the encoder's output length; ``prompt_eval_end_us`` marks the
    end of the encoder)."""

    text: str
    tokens: List[int] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


class AsrRunner:
    """A speech-to-text model (upstream's ASR layout: ``encoder`` and ``text_decoder``
    methods, as optimum-executorch exports Whisper) with its tokenizer.

    ``AsrRunner(model_path, tokenizer_path)`` loads both; a decoder-only model raises
    :class:`UnsupportedModelError`. ``preprocessor_config`` is the feature extractor's
    settings (a Whisper ``preprocessor_config.json``); without it,
    ``preprocessor_config.json`` beside the model, else beside the tokenizer, is used if
    there is one, else Whisper's (80 mel bands, 16 kHz, 30 s). ``num_threads`` sizes
    ExecuTorch's process-wide thread pool (``None`` keeps it); ``data_path`` /
    ``data_paths`` name external data files (``.ptd``), as for :class:`Runner`.

    One call at a time (another meanwhile raises :class:`BusyError`), except :meth:`stop`,
    which works from any thread. Use it as a context manager, or :meth:`close` it, to free
    it at once::

        with etllm.AsrRunner("whisper.pte", "tokenizer.json") as asr:
            print(asr.transcribe("speech.wav", language="en").text)
    """

    def __init__(
        self,
        model_path: PathLike,
        tokenizer_path: PathLike,
        *,
        num_threads: Optional[int] = None,
        preprocessor_config: Optional[PathLike] = None,
        data_path: Optional[PathLike] = None,
        data_paths: Optional[Sequence[PathLike]] = None,
    ) -> None:
        self._ptr: Optional[int] = None
        options = _ffi.lib.etllm_asr_options_default()
        if num_threads is not None:
            if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
                raise ValueError("num_threads must be an int >= 0 or None")
            options.num_threads = num_threads
        if preprocessor_config is not None:
            options.preprocessor_config = os.fsencode(preprocessor_config)
        if data_path is not None and data_paths is not None:
            raise ValueError("give data_path or data_paths, not both")
        if isinstance(data_paths, (str, bytes, os.PathLike)):
            raise ValueError("data_paths must be a list of paths (use data_path for one)")
        paths = [data_path] if data_path is not None else list(data_paths or [])
        encoded = [os.fsencode(p) for p in paths]
        path_array = (ctypes.c_char_p * max(1, len(encoded)))(*encoded)
        options.data_paths = ctypes.cast(path_array, ctypes.POINTER(ctypes.c_char_p))
        options.num_data_paths = len(encoded)
        out = ctypes.c_void_p()
        check(
            _ffi.lib.etllm_asr_open(
                os.fsencode(model_path), os.fsencode(tokenizer_path), ctypes.byref(options),
                ctypes.byref(out),
            )
        )
        self._ptr = out.value

    def _p(self) -> int:
        if self._ptr is None:
            raise ValueError("the AsrRunner is closed")
        return self._ptr

    def transcribe(
        self,
        audio: Union[Audio, Features, PathLike],
        *,
        language: Optional[str] = None,
        translate: bool = False,
        decoder_prompt: Optional[Sequence[int]] = None,
        config: Optional[GenerationConfig] = None,
        token_callback: Optional[TokenCallback] = None,
        **overrides: Any,
    ) -> Transcript:
        """Transcribes ``audio``: an :class:`Audio` (a WAV file, or samples at any rate),
        :class:`Features` (log-mel features as the encoder takes them, ``[n_mels, frames]``)
        or the path of a WAV file. The audio is padded or cut to the model's window (30 s
        for Whisper); the encoder runs once and the decoder a token at a time until its
        end-of-text token, ``max_new_tokens`` or its context.

        ``language`` is Whisper's code (``"en"``, ``"fr"``...); ``None`` detects it from the
        decoder's first step. ``translate=True`` translates into English.
        ``decoder_prompt`` (token ids) replaces the whole decoder prompt (start token,
        language, task, ``<|notimestamps|>``). ``config`` (default: greedy, until the end of
        text) and keyword overrides of it apply their sampling fields (``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``seed``, ``repetition_penalty``),
        ``max_new_tokens``, ``ignore_eos`` and ``stop_token_ids``.

        ``token_callback(piece)`` gets each text piece (a :class:`Piece`; special tokens
        are left out); returning ``True`` stops. Audio that cannot be decoded raises
        :class:`InvalidMediaError`, and the runner stays usable."""
        if isinstance(audio, (str, bytes, os.PathLike)):
            audio = Audio(os.fsdecode(audio))
        if not isinstance(audio, (Audio, Features)):
            raise TypeError(
                f"audio must be an etllm.Audio, etllm.Features or a WAV path, not {type(audio).__name__}"
            )
        c_audio, keep_audio = input_to_c(audio)
        opts = _ffi.lib.etllm_transcribe_options_default()
        opts.translate = bool(translate)
        keep_opts: List[Any] = []
        if language is not None:
            if not isinstance(language, str):
                raise TypeError("language must be a str or None")
            opts.language = language.encode("utf-8")
            keep_opts.append(opts.language)
        if decoder_prompt is not None:
            if isinstance(decoder_prompt, (str, bytes)):
                raise TypeError("decoder_prompt must be a sequence of token ids")
            prompt_ids = list(decoder_prompt)
            c_ids = _ids_array(prompt_ids)
            keep_opts.append(c_ids)
            opts.decoder_prompt = c_ids
            opts.num_decoder_prompt = len(prompt_ids)
        if config is None:
            config = GenerationConfig(temperature=0.0, echo=False)
        elif not isinstance(config, GenerationConfig):
            raise TypeError("config must be an etllm.GenerationConfig")
        if overrides:
            config = dataclasses.replace(config, **overrides)
        cfg, keep_cfg = config._to_c()
        c_token, _c_stats, _pieces, errors = _c_callbacks(token_callback, None)
        text = ctypes.c_void_p()
        tokens = ctypes.POINTER(ctypes.c_uint32)()
        n = ctypes.c_size_t()
        out = _ffi.lib.etllm_stats_default()
        status = _ffi.lib.etllm_asr_transcribe(
            self._p(), ctypes.byref(c_audio), ctypes.byref(opts), ctypes.byref(cfg), c_token,
            None, ctypes.byref(text), ctypes.byref(tokens), ctypes.byref(n), ctypes.byref(out),
        )
        del keep_audio, keep_opts, keep_cfg
        err = error_for(status) if status != 0 else None
        # Take the outputs first: they are freed whatever is raised.
        transcript_text = _ffi.take_string(text)
        ids: List[int] = []
        if tokens:
            try:
                ids = list(tokens[: n.value])
            finally:
                _ffi.lib.etllm_buffer_free(ctypes.cast(tokens, ctypes.c_void_p))
        if errors:
            raise errors[0]
        if err is not None:
            raise err
        return Transcript(transcript_text, ids, Stats(out))

    def stop(self) -> None:
        """Asks a running :meth:`transcribe` to end before its next decoder step; any
        thread."""
        check(_ffi.lib.etllm_asr_stop(self._p()))

    def close(self) -> None:
        """Frees it now (otherwise it is freed when garbage-collected). Further calls raise
        ValueError."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _ffi.lib.etllm_asr_free(ptr)

    def __enter__(self) -> "AsrRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return "<etllm.AsrRunner (closed)>" if self._ptr is None else "<etllm.AsrRunner>"


__all__ = ["AsrRunner", "Transcript"]
