"""Framing: one message = [JSON header frame, *raw array frames].

The header is a small UTF-8 JSON object.  Its key ``"arrays"`` lists, in frame order, the
name, dtype and shape of every array that follows; each array travels as one raw,
C-contiguous, little-endian frame.  Encoding hands numpy's own buffers to ZeroMQ (no copy),
and decoding wraps the received frame buffers with ``np.frombuffer`` (no copy).

Nothing here trusts the peer: the header size, the number of frames, every dtype, every
shape and every frame length are checked against :class:`Limits` before anything is built.
There is no pickle and no eval anywhere in this module.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

#: dtypes allowed on the wire, by their canonical little-endian names.
ALLOWED_DTYPES = ("uint8", "uint16", "int32", "uint32", "int64", "float16", "float32", "float64")


class WireError(ValueError):
    """A message could not be decoded or failed validation.  The text says what was wrong."""


@dataclass(frozen=True)
class Limits:
    """Caps applied to every received message before anything is allocated."""

    max_header_bytes: int = 256 * 1024
    max_frames: int = 64
    max_array_bytes: int = 1 << 31          # 2 GiB for one array (e.g. a stack of images)
    max_total_bytes: int = 1 << 32          # 4 GiB for one whole message
    max_ndim: int = 6


DEFAULT_LIMITS = Limits()


def _as_wire_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise WireError(f"array {name!r}: dtype {arr.dtype} cannot be sent (allowed: {', '.join(ALLOWED_DTYPES)})")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def encode(header: Mapping[str, Any], arrays: Mapping[str, Any] | None = None) -> list:
    """Build the frames of one message.

    Args:
        header: JSON-serialisable mapping (must not contain the key ``"arrays"``).
        arrays: name -> array-like; sent in insertion order as raw frames.
    Returns:
        ``[header_bytes, buffer, buffer, ...]`` ready for ``socket.send_multipart(frames, copy=False)``.
    """
    if "arrays" in header:
        raise WireError("header key 'arrays' is reserved for the array table")
    frames: list = [b""]
    table = []
    for name, value in (arrays or {}).items():
        arr = _as_wire_array(name, value)
        table.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
        # memoryview of the array itself: ZeroMQ sends from it without copying.
        frames.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    full = dict(header)
    full["arrays"] = table
    try:
        frames[0] = json.dumps(full, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except ValueError as exc:
        raise WireError(f"header is not valid JSON (NaN or infinity are not allowed): {exc}") from exc
    return frames


def _frame_buffer(frame: Any) -> memoryview:
    """A read-only byte view of a received frame (bytes, memoryview or zmq.Frame)."""
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer without copying
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise WireError(f"frame of type {type(frame).__name__} is not a byte buffer") from exc
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse frames into ``(header, arrays)``, validating every size before use.

    Returned arrays are read-only views of the frame memory.
    Raises:
        WireError: with a message naming the first problem found.
    """
    if not frames:
        raise WireError("empty message: expected a header frame")
    if len(frames) > limits.max_frames:
        raise WireError(f"message has {len(frames)} frames; at most {limits.max_frames} are accepted")
    head = _frame_buffer(frames[0])
    if len(head) > limits.max_header_bytes:
        raise WireError(f"header is {len(head)} bytes; at most {limits.max_header_bytes} are accepted")
    try:
        header = json.loads(bytes(head).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise WireError(f"header is not valid UTF-8 JSON: {exc}") from exc
    except RecursionError as exc:  # e.g. b"[[[[..." nested deeper than the parser's stack
        raise WireError("header JSON is nested too deeply") from exc
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    table = header.pop("arrays", [])
    if not isinstance(table, list):
        raise WireError("header field 'arrays' must be a list")
    if len(table) != len(frames) - 1:
        raise WireError(f"header declares {len(table)} arrays but the message carries {len(frames) - 1} data frames")

    arrays: dict[str, np.ndarray] = {}
    total = 0
    for i, entry in enumerate(table):
        name, dtype, shape = _check_entry(i, entry, limits)
        if name in arrays:
            raise WireError(f"array {name!r} appears twice")
        nbytes = dtype.itemsize * math.prod(shape)
        if nbytes > limits.max_array_bytes:
            raise WireError(f"array {name!r} would be {nbytes} bytes; at most {limits.max_array_bytes} are accepted")
        total += nbytes
        if total > limits.max_total_bytes:
            raise WireError(f"message arrays add up to more than {limits.max_total_bytes} bytes")
        buf = _frame_buffer(frames[i + 1])
        if len(buf) != nbytes:
            raise WireError(
                f"array {name!r}: dtype {dtype.name} shape {tuple(shape)} needs {nbytes} bytes, frame has {len(buf)}"
            )
        arr = np.frombuffer(buf, dtype=dtype) if nbytes else np.zeros(0, dtype=dtype)
        arr.flags.writeable = False   # zmq.Frame buffers are writable; bytes ones are not: be uniform
        arrays[name] = arr.reshape(shape)
    return header, arrays


def _reject_constant(token: str):
    raise ValueError(f"{token} is not allowed in a header")


def _check_entry(i: int, entry: Any, limits: Limits) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise WireError(f"array table entry {i} must be an object")
    name, dtype_name, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    if not isinstance(name, str) or not (0 < len(name) <= 64):
        raise WireError(f"array table entry {i}: 'name' must be a string of 1 to 64 characters")
    if dtype_name not in ALLOWED_DTYPES:
        raise WireError(f"array {name!r}: dtype {dtype_name!r} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise WireError(f"array {name!r}: shape must be a list of at most {limits.max_ndim} sizes")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
        raise WireError(f"array {name!r}: shape {shape!r} must hold non-negative integers")
    return name, np.dtype(dtype_name).newbyteorder("<"), tuple(shape)
