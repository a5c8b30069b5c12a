"""Multimodal inputs: the parts of a prompt (text, token ids, images, audio, features) that
:meth:`Runner.generate_inputs` and :meth:`Session.generate_inputs` feed in order, and
:class:`AsrRunner` transcribes (the C ``etllm_input``)."""

from __future__ import annotations

import ctypes
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _ffi

PathLike = Union[str, "os.PathLike[str]"]


class Text:
    """Text, tokenized with the model's tokenizer. In an input list a plain ``str`` means
    the same."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"Text takes a str, not {type(text).__name__}")
        self.text = text

    def __repr__(self) -> str:
        return f"Text({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Text) and other.text == self.text


class Tokens:
    """Token ids, fed as they are (``num_bos`` / ``num_eos`` of the config still apply when
    they come first). In an input list a plain ``list`` or ``tuple`` of ints means the
    same."""

    __slots__ = ("ids",)

    def __init__(self, ids: Sequence[int]) -> None:
        if isinstance(ids, (str, bytes)):
            raise TypeError("Tokens takes a sequence of int ids")
        values = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"token id {i!r} is not an int")
            if not 0 <= int(i) < 2**32:
                raise ValueError(f"token id {i} is not a u32")
            values.append(int(i))
        self.ids: List[int] = values

    def __repr__(self) -> str:
        return f"Tokens({self.ids!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokens) and other.ids == self.ids


def _u8_bytes(data: Any, what: str) -> Tuple[bytes, Tuple[int, ...]]:
    """The bytes of a bytes-like object of 8-bit items (bytes, bytearray, a uint8 numpy
    array...), in C order, and its shape."""
    if isinstance(data, str):
        raise TypeError(f"{what} must be bytes, not str")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(data).__name__}") from None
    if view.itemsize != 1:
        raise TypeError(f"{what} must hold 8-bit values (uint8), not {view.format!r} items")
    return view.tobytes(order="C"), tuple(view.shape or (len(view.tobytes()),))


class Image:
    """An image for the model's vision encoder, from exactly one of:

    - ``path``: a file (PNG, JPEG, GIF, BMP or WebP);
    - ``data``: the bytes of such a file (``Image(data=open(p, "rb").read())``);
    - ``pixels``: decoded 8-bit pixels, rows top to bottom, channels interleaved (HWC), with
      ``width``, ``height`` and ``channels`` (1 gray, 2 gray + alpha, 3 RGB, 4 RGBA). A
      numpy ``uint8`` array shaped ``(height, width)`` or ``(height, width, channels)``
      gives them itself.

    The model's image processor (``preprocessor_config.json``) resizes, crops and
    normalizes it. An image that cannot be decoded raises :class:`InvalidMediaError`."""

    __slots__ = ("path", "data", "pixels", "width", "height", "channels")

    def __init__(
        self,
        path: Optional[PathLike] = None,
        *,
        data: Optional[Any] = None,
        pixels: Optional[Any] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        channels: Optional[int] = None,
    ) -> None:
        if sum(x is not None for x in (path, data, pixels)) != 1:
            raise ValueError("Image takes exactly one of path, data or pixels")
        self.path = None if path is None else os.fspath(path)
        self.data = None if data is None else _u8_bytes(data, "Image data")[0]
        self.pixels: Optional[bytes] = None
        self.width = self.height = self.channels = 0
        if pixels is not None:
            raw, shape = _u8_bytes(pixels, "Image pixels")
            if len(shape) in (2, 3):
                height = shape[0] if height is None else height
                width = shape[1] if width is None else width
                channels = (shape[2] if len(shape) == 3 else 1) if channels is None else channels
            if width is None or height is None:
                raise ValueError("Image pixels need width and height (or a (h, w[, c]) array)")
            self.pixels = raw
            self.width, self.height = _u32(width, "width"), _u32(height, "height")
            self.channels = _u32(3 if channels is None else channels, "channels")
        elif (width, height, channels) != (None, None, None):
            raise ValueError("width, height and channels go with pixels")

    def __repr__(self) -> str:
        if self.path is not None:
            return f"Image(path={self.path!r})"
        if self.data is not None:
            return f"Image(data=<{len(self.data)} bytes>)"
        return f"Image(pixels=<{self.width}x{self.height}x{self.channels}>)"


class Audio:
    """Audio, from exactly one of:

    - ``path``: a WAV file (PCM 8/16/24/32-bit or float 32-bit, mono or stereo);
    - ``samples``: float samples in [-1, 1] (a sequence of floats, an ``array('f')``, a
      numpy array), ``channels`` (1, or 2 interleaved, averaged into mono) at
      ``sample_rate`` samples a second (resampled to the model's rate).

    Audio that cannot be decoded raises :class:`InvalidMediaError`."""

    __slots__ = ("path", "samples", "sample_rate", "channels")

    def __init__(
        self,
        path: Optional[PathLike] = None,
        *,
        samples: Optional[Any] = None,
        sample_rate: Optional[int] = None,
        channels: int = 1,
    ) -> None:
        if (path is None) == (samples is None):
            raise ValueError("Audio takes exactly one of path or samples")
        self.path = None if path is None else os.fspath(path)
        self.samples: Optional[np.ndarray] = None
        self.sample_rate = 0
        self.channels = 0
        if samples is not None:
            if sample_rate is None:
                raise ValueError("Audio samples need a sample_rate")
            self.samples = _floats(samples, "Audio samples")
            self.sample_rate = _u32(sample_rate, "sample_rate")
            self.channels = _u32(channels, "channels")
        elif sample_rate is not None:
            raise ValueError("sample_rate goes with samples")

    def __repr__(self) -> str:
        if self.path is not None:
            return f"Audio(path={self.path!r})"
        assert self.samples is not None
        return f"Audio(samples=<{self.samples.size}>, sample_rate={self.sample_rate}, channels={self.channels})"


class Features:
    """Values computed elsewhere for the model's encoder, with their ``sizes`` (outermost
    first): a vision encoder's pixel values (e.g. an image processor's ``pixel_values``,
    ``[3, H, W]`` or ``[1, 3, H, W]``), or for :class:`AsrRunner` log-mel features
    (``[n_mels, frames]``). A numpy array gives its own sizes when ``sizes`` is left out."""

    __slots__ = ("data", "sizes")

    def __init__(self, data: Any, sizes: Optional[Sequence[int]] = None) -> None:
        if sizes is None:
            shape = getattr(data, "shape", None)
            if shape is None:
                raise ValueError("Features need sizes (or a numpy array, which has a shape)")
            sizes = tuple(shape)
        self.sizes: List[int] = [_size(s) for s in sizes]
        self.data = _floats(data, "Features data")

    def __repr__(self) -> str:
        return f"Features(sizes={self.sizes!r})"


Input = Union[Text, Tokens, Image, Audio, Features, str, Sequence[int]]


def _u32(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int")
    if not 0 <= int(v) < 2**32:
        raise ValueError(f"{what} = {v} is not a u32")
    return int(v)


def _size(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0:
        raise ValueError(f"size {v!r} is not an int >= 0")
    return int(v)


def _floats(values: Any, what: str) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be numbers")
    try:
        return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be numbers: {e}") from None


def as_input(item: Any) -> Union[Text, Tokens, Image, Audio, Features]:
    """``item`` as an input object: ``str`` is :class:`Text`, a list or tuple of ints
    :class:`Tokens`."""
    if isinstance(item, (Text, Tokens, Image, Audio, Features)):
        return item
    if isinstance(item, str):
        return Text(item)
    if isinstance(item, (list, tuple)):
        return Tokens(item)
    raise TypeError(
        f"an input is etllm.Text, Tokens, Image, Audio or Features (or a str, or a list of "
        f"token ids), not {type(item).__name__}"
    )


def _fill(c: _ffi.InputC, item: Any, keep: List[Any]) -> None:
    """Sets ``c`` for ``item``; what it points to goes to ``keep``."""
    c.struct_size = ctypes.sizeof(_ffi.InputC)
    if isinstance(item, Text):
        c.kind = _ffi.INPUT_TEXT
        c.text = item.text.encode("utf-8")
        keep.append(c.text)
    elif isinstance(item, Tokens):
        ids = (ctypes.c_uint32 * max(1, len(item.ids)))(*item.ids)
        keep.append(ids)
        c.kind = _ffi.INPUT_TOKENS
        c.tokens = ids
        c.num_tokens = len(item.ids)
    elif isinstance(item, Image):
        if item.path is not None:
            c.kind = _ffi.INPUT_IMAGE_FILE
            c.path = os.fsencode(item.path)
            keep.append(c.path)
        else:
            raw = item.data if item.data is not None else item.pixels
            assert raw is not None
            buf = (ctypes.c_uint8 * max(1, len(raw))).from_buffer_copy(raw.ljust(1, b"\0"))
            keep.append(buf)
            c.bytes = buf
            c.num_bytes = len(raw)
            if item.data is not None:
                c.kind = _ffi.INPUT_IMAGE_ENCODED
            else:
                c.kind = _ffi.INPUT_IMAGE_PIXELS
                c.width, c.height, c.channels = item.width, item.height, item.channels
    elif isinstance(item, Audio):
        if item.path is not None:
            c.kind = _ffi.INPUT_AUDIO_FILE
            c.path = os.fsencode(item.path)
            keep.append(c.path)
        else:
            assert item.samples is not None
            keep.append(item.samples)
            c.kind = _ffi.INPUT_AUDIO_SAMPLES
            c.floats = item.samples.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            c.num_floats = item.samples.size
            c.sample_rate = item.sample_rate
            c.channels = item.channels
    elif isinstance(item, Features):
        sizes = (ctypes.c_size_t * max(1, len(item.sizes)))(*item.sizes)
        keep.extend((sizes, item.data))
        c.kind = _ffi.INPUT_FEATURES
        c.floats = item.data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        c.num_floats = item.data.size
        c.sizes = sizes
        c.num_sizes = len(item.sizes)
    else:  # pragma: no cover - as_input checked it
        raise TypeError(type(item).__name__)


def inputs_to_c(inputs: Any) -> Tuple["ctypes.Array[_ffi.InputC]", int, List[Any]]:
    """The C array of ``inputs`` (a sequence of inputs), its length, and the objects it
    points into (keep them alive during the call)."""
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError("inputs must be a list of inputs (a single str: use [text])")
    items = [as_input(i) for i in inputs]
    arr = (_ffi.InputC * max(1, len(items)))()
    keep: List[Any] = []
    for c, item in zip(arr, items):
        _fill(c, item, keep)
    return arr, len(items), keep


def input_to_c(item: Any) -> Tuple[_ffi.InputC, List[Any]]:
    """One input as the C struct, and the objects it points into."""
    c = _ffi.InputC()
    keep: List[Any] = []
    _fill(c, item, keep)
    return c, keep


__all__ = ["Audio", "Features", "Image", "Input", "Text", "Tokens"]
