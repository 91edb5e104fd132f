"""The wire protocol between the Blender add-on and the backend.

One typed dataclass per message type.  A message travels as ``[header, *arrays]`` (see
:mod:`wire`): the header holds the protocol version ``"v"``, the type ``"type"`` and the
scalar fields; numpy array fields travel as raw frames.

Every received message is validated field by field (type, range, string length, dtype, shape,
finite values, cross-field sizes) before any code sees it; a failure raises
:class:`ProtocolError` whose text names the message type, the field and the problem.  Unknown
header keys are ignored so that newer peers can add optional fields.

Conversation (client = add-on DEALER, server = backend ROUTER)::

    Hello            -> Welcome | Error(version_mismatch)
    Ping             -> Pong                     (heartbeat, answered even while training)
    Submit           -> Accepted, then Progress*, Preview*, MeshResult?, RenderResult*,
                        and exactly one of Done | Failed | Cancelled
    Cancel           -> Ack, then Cancelled (or Done/Failed if it had already ended)
    Status           -> StatusReply
    anything invalid -> Error
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from . import wire
from .wire import DEFAULT_LIMITS, Limits, WireError

#: Bumped on any incompatible change of messages.  Independent of the package version.
PROTOCOL_VERSION = 1

# Caps on what one job may ask for.  Memory stays bounded whatever a peer sends.
MAX_IMAGES = 2000
MAX_IMAGE_SIDE = 8192
MAX_EVAL_CAMERAS = 1000
MAX_STEPS = 1_000_000
MAX_SECONDS = 7 * 24 * 3600.0
MAX_MESH_RESOLUTION = 1024
MAX_VERTICES = 20_000_000
MAX_STRING = 4096
MAX_NAME = 256

METHODS = ("nerf",)
PRESETS = ("draft", "standard", "high")


class ProtocolError(WireError):
    """A message is malformed or not allowed.  ``code`` is a short machine-readable reason."""

    def __init__(self, message: str, code: str = "bad_message"):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Field specifications
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Str:
    max_len: int = MAX_STRING
    choices: tuple[str, ...] | None = None

    def check(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ProtocolError(f"{name}: expected a string, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise ProtocolError(f"{name}: string of {len(value)} characters is longer than {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise ProtocolError(f"{name}: {value[:64]!r} is not one of {', '.join(self.choices)}")
        return value


@dataclass(frozen=True)
class Int:
    lo: int = 0
    hi: int = 2**53

    def check(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{name}: expected an integer, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{name}: {value} is outside [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Float:
    lo: float = -math.inf
    hi: float = math.inf

    def check(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{name}: expected a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ProtocolError(f"{name}: {value} is not a finite number")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{name}: {value} is outside [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Bool:
    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{name}: expected true or false, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Summary:
    """A flat JSON object of short keys to numbers, strings or booleans (reports, stats)."""

    max_items: int = 64

    def check(self, name: str, value: Any) -> dict:
        if not isinstance(value, dict) or len(value) > self.max_items:
            raise ProtocolError(f"{name}: expected an object of at most {self.max_items} entries")
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > 64:
                raise ProtocolError(f"{name}: keys must be strings of at most 64 characters")
            if isinstance(v, str):
                Str(MAX_STRING).check(f"{name}.{k}", v)
            elif isinstance(v, (bool, int)) or v is None:
                pass
            elif isinstance(v, float):
                Float().check(f"{name}.{k}", v)
            else:
                raise ProtocolError(f"{name}.{k}: values must be numbers, strings, booleans or null")
        return dict(value)


Dim = int | str | tuple[int, ...] | None  # exact size | named size | one of | any


@dataclass(frozen=True)
class Array:
    """An ndarray field.  ``shape`` entries: exact int, a symbol shared across fields, a tuple of
    allowed sizes, or None.  Symbols are capped by ``Message.DIM_CAPS``."""

    dtypes: tuple[str, ...]
    shape: tuple[Dim, ...]
    finite: bool = True

    def check(self, name: str, value: Any, dims: dict[str, int], caps: Mapping[str, int]) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise ProtocolError(f"{name}: expected an array, got {type(value).__name__}")
        if value.dtype.name not in self.dtypes:
            raise ProtocolError(f"{name}: dtype {value.dtype.name} is not allowed (expected {' or '.join(self.dtypes)})")
        if value.ndim != len(self.shape):
            raise ProtocolError(f"{name}: expected {len(self.shape)} dimensions, got shape {value.shape}")
        for axis, (want, got) in enumerate(zip(self.shape, value.shape)):
            if isinstance(want, int) and got != want:
                raise ProtocolError(f"{name}: axis {axis} must be {want}, got shape {value.shape}")
            if isinstance(want, tuple) and got not in want:
                raise ProtocolError(f"{name}: axis {axis} must be one of {want}, got shape {value.shape}")
            if isinstance(want, str):
                cap = caps.get(want)
                if cap is not None and got > cap:
                    raise ProtocolError(f"{name}: {want} = {got} is more than the allowed {cap}")
                if dims.setdefault(want, got) != got:
                    raise ProtocolError(f"{name}: {want} = {got} does not match {want} = {dims[want]} of another field")
        if self.finite and value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
            raise ProtocolError(f"{name}: contains NaN or infinite values")
        return value


def spec(s, default=dataclasses.MISSING, default_factory=dataclasses.MISSING):
    kw = {"metadata": {"spec": s}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return field(**kw)


def _empty(shape, dtype):
    return lambda: np.zeros(shape, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type["Message"]] = {}


@dataclass
class Message:
    TYPE: ClassVar[str] = ""
    DIM_CAPS: ClassVar[Mapping[str, int]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    def check(self) -> None:
        """Cross-field checks beyond the per-field specs; raise ProtocolError."""

    def validate(self) -> "Message":
        dims: dict[str, int] = {}
        for f in dataclasses.fields(self):
            s = f.metadata["spec"]
            value = getattr(self, f.name)
            where = f"{self.TYPE}.{f.name}"
            if isinstance(s, Array):
                setattr(self, f.name, s.check(where, value, dims, self.DIM_CAPS))
            else:
                setattr(self, f.name, s.check(where, value))
        self.check()
        return self

    def to_frames(self) -> list:
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        arrays: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.metadata["spec"], Array):
                arrays[f.name] = value
            else:
                header[f.name] = value
        return wire.encode(header, arrays)


def decode_message(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode and validate one message.  Raises ProtocolError (or WireError) with a clear text."""
    header, arrays = wire.decode(frames, limits)
    version = header.get("v")
    mtype = header.get("type")
    if type(version) is not int or version != PROTOCOL_VERSION:  # true and 1.0 are not 1
        raise ProtocolError(
            f"protocol version mismatch: peer speaks {version!r}, this side speaks {PROTOCOL_VERSION}",
            code="version_mismatch",
        )
    cls = _REGISTRY.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        shown = mtype[:64] if isinstance(mtype, str) else mtype
        raise ProtocolError(f"unknown message type {shown!r}", code="unknown_type")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        source = arrays if isinstance(f.metadata["spec"], Array) else header
        if f.name in source:
            kwargs[f.name] = source[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{cls.TYPE}.{f.name}: required field is missing")
    extra_arrays = set(arrays) - {f.name for f in dataclasses.fields(cls)}
    if extra_arrays:
        raise ProtocolError(f"{cls.TYPE}: unexpected array frames {sorted(extra_arrays)}")
    return cls(**kwargs).validate()


# ---- handshake and heartbeat ----------------------------------------------------------------
@dataclass
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    client: str = spec(Str(MAX_NAME), default="")
    protocol: int = spec(Int(0, 2**31), default=PROTOCOL_VERSION)

    def check(self):
        if self.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version mismatch: client speaks {self.protocol}, backend speaks {PROTOCOL_VERSION}",
                code="version_mismatch",
            )


@dataclass
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    protocol: int = spec(Int(0, 2**31), default=PROTOCOL_VERSION)
    server: str = spec(Str(MAX_NAME), default="")
    device: str = spec(Str(MAX_NAME), default="")
    methods: str = spec(Str(MAX_NAME), default=",".join(METHODS))


@dataclass
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    seq: int = spec(Int(0, 2**53), default=0)


@dataclass
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    seq: int = spec(Int(0, 2**53), default=0)
    state: str = spec(Str(16, ("idle", "busy")), default="idle")
    running_job: str = spec(Str(MAX_NAME), default="")
    queued: int = spec(Int(0, 2**31), default=0)


# ---- jobs -----------------------------------------------------------------------------------
@dataclass
class Submit(Message):
    """A fit job: posed RGBA images plus settings.

    Cameras: ``intrinsics[i] = (fx, fy, cx, cy)`` in pixels, OpenCV pixel frame (origin at the
    top-left corner of the top-left pixel, v down); ``poses[i]`` is camera-to-world in Blender's
    camera convention (looks down -Z, +Y up), rotation orthonormal, no scale.  ``aabb`` is the
    world-space box (min row, max row) that holds the object; the field is fitted inside it and
    the mesh comes back in the same world frame.  ``eval_*`` (optional, same conventions) are
    extra cameras rendered after the fit; one RenderResult comes back per eval camera.
    """

    TYPE: ClassVar[str] = "submit"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {
        "N": MAX_IMAGES, "H": MAX_IMAGE_SIDE, "W": MAX_IMAGE_SIDE, "M": MAX_EVAL_CAMERAS,
    }
    images: np.ndarray = spec(Array(("uint8",), ("N", "H", "W", (3, 4))))
    intrinsics: np.ndarray = spec(Array(("float64", "float32"), ("N", 4)))
    poses: np.ndarray = spec(Array(("float64", "float32"), ("N", 4, 4)))
    aabb: np.ndarray = spec(Array(("float64", "float32"), (2, 3)))
    name: str = spec(Str(MAX_NAME), default="")
    method: str = spec(Str(32, METHODS), default="nerf")
    preset: str = spec(Str(32, PRESETS), default="standard")
    steps: int = spec(Int(0, MAX_STEPS), default=0)                 # 0: the preset's default
    seconds: float = spec(Float(0.0, MAX_SECONDS), default=0.0)     # 0: no time budget
    mesh_resolution: int = spec(Int(0, MAX_MESH_RESOLUTION), default=0)  # 0: preset; no mesh if < 0 never
    preview_size: int = spec(Int(0, 1024), default=128)            # longest side; 0: no previews
    preview_interval: float = spec(Float(0.05, 3600.0), default=1.0)
    eval_intrinsics: np.ndarray = spec(Array(("float64", "float32"), ("M", 4)), default_factory=_empty((0, 4), np.float64))
    eval_poses: np.ndarray = spec(Array(("float64", "float32"), ("M", 4, 4)), default_factory=_empty((0, 4, 4), np.float64))
    # eval_sizes[i] = (width, height) in pixels, the order of cameras.image_size()
    eval_sizes: np.ndarray = spec(Array(("int32", "int64"), ("M", 2)), default_factory=_empty((0, 2), np.int32))

    def check(self):
        n = self.images.shape[0]
        if n < 1:
            raise ProtocolError("submit.images: at least one image is needed")
        if self.images.shape[1] < 1 or self.images.shape[2] < 1:
            raise ProtocolError(f"submit.images: images of {self.images.shape[2]}x{self.images.shape[1]} pixels "
                                "are empty (at least 1x1 is needed)")
        check_cameras("submit", self.intrinsics, self.poses)
        check_cameras("submit.eval", self.eval_intrinsics, self.eval_poses)
        if np.any(self.aabb[1] <= self.aabb[0]):
            raise ProtocolError("submit.aabb: every max must be larger than its min")
        if self.eval_sizes.size and (self.eval_sizes.min() < 1 or self.eval_sizes.max() > MAX_IMAGE_SIDE):
            raise ProtocolError(f"submit.eval_sizes: sizes must be in [1, {MAX_IMAGE_SIDE}]")


def check_cameras(where: str, intrinsics: np.ndarray, poses: np.ndarray) -> None:
    """Positive focal lengths, homogeneous rigid camera-to-world matrices."""
    if intrinsics.size and np.any(intrinsics[:, :2] <= 0):
        raise ProtocolError(f"{where}.intrinsics: focal lengths must be positive")
    if not poses.size:
        return
    if not np.allclose(poses[:, 3], [0, 0, 0, 1], atol=1e-6):
        raise ProtocolError(f"{where}.poses: the last row of every pose must be (0, 0, 0, 1)")
    r = poses[:, :3, :3].astype(np.float64)
    gram = np.einsum("nji,njk->nik", r, r)
    if not np.allclose(gram, np.eye(3), atol=1e-3) or np.any(np.linalg.det(r) < 0):
        raise ProtocolError(f"{where}.poses: rotations must be orthonormal and right-handed (remove scale first)")


@dataclass
class Accepted(Message):
    TYPE: ClassVar[str] = "accepted"
    job_id: str = spec(Str(MAX_NAME))
    position: int = spec(Int(0, 2**31), default=0)   # jobs ahead of this one in the queue


@dataclass
class Progress(Message):
    TYPE: ClassVar[str] = "progress"
    job_id: str = spec(Str(MAX_NAME))
    stage: str = spec(Str(32), default="train")     # queued | train | mesh | render
    step: int = spec(Int(0, 2**53), default=0)
    total_steps: int = spec(Int(0, 2**53), default=0)
    loss: float = spec(Float(), default=0.0)
    psnr: float = spec(Float(), default=0.0)
    elapsed: float = spec(Float(0.0), default=0.0)
    eta: float = spec(Float(0.0), default=0.0)
    fraction: float = spec(Float(0.0, 1.0), default=0.0)


@dataclass
class Preview(Message):
    TYPE: ClassVar[str] = "preview"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"H": MAX_IMAGE_SIDE, "W": MAX_IMAGE_SIDE}
    job_id: str = spec(Str(MAX_NAME))
    image: np.ndarray = spec(Array(("uint8",), ("H", "W", 4)))     # sRGB RGBA, top row first
    step: int = spec(Int(0, 2**53), default=0)


@dataclass
class MeshResult(Message):
    """A triangle mesh in the submit's world frame.  ``colors`` are sRGB in [0, 1]."""

    TYPE: ClassVar[str] = "mesh"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"V": MAX_VERTICES, "F": 2 * MAX_VERTICES}
    job_id: str = spec(Str(MAX_NAME))
    vertices: np.ndarray = spec(Array(("float32",), ("V", 3)))
    faces: np.ndarray = spec(Array(("int32",), ("F", 3)))
    colors: np.ndarray = spec(Array(("float32",), ("V", 3)))

    def check(self):
        if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= len(self.vertices)):
            raise ProtocolError(f"mesh.faces: indices must be in [0, {len(self.vertices)})")
        if self.colors.size and (self.colors.min() < 0 or self.colors.max() > 1):
            raise ProtocolError("mesh.colors: values must be in [0, 1]")


@dataclass
class RenderResult(Message):
    TYPE: ClassVar[str] = "render"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"H": MAX_IMAGE_SIDE, "W": MAX_IMAGE_SIDE}
    job_id: str = spec(Str(MAX_NAME))
    index: int = spec(Int(0, MAX_EVAL_CAMERAS))
    image: np.ndarray = spec(Array(("uint8",), ("H", "W", 4)))     # sRGB RGBA, top row first


@dataclass
class Done(Message):
    TYPE: ClassVar[str] = "done"
    job_id: str = spec(Str(MAX_NAME))
    summary: dict = spec(Summary(), default_factory=dict)


@dataclass
class Failed(Message):
    TYPE: ClassVar[str] = "failed"
    job_id: str = spec(Str(MAX_NAME))
    message: str = spec(Str(MAX_STRING), default="")


@dataclass
class Cancelled(Message):
    TYPE: ClassVar[str] = "cancelled"
    job_id: str = spec(Str(MAX_NAME))


@dataclass
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    job_id: str = spec(Str(MAX_NAME))


@dataclass
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    request: str = spec(Str(32))
    job_id: str = spec(Str(MAX_NAME), default="")


@dataclass
class Status(Message):
    TYPE: ClassVar[str] = "status"


@dataclass
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    state: str = spec(Str(16, ("idle", "busy")), default="idle")
    running_job: str = spec(Str(MAX_NAME), default="")
    queued_jobs: str = spec(Str(MAX_STRING), default="")   # comma-separated job ids, oldest first
    device: str = spec(Str(MAX_NAME), default="")


@dataclass
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str = spec(Str(64), default="bad_message")
    message: str = spec(Str(MAX_STRING), default="")
    in_reply_to: str = spec(Str(64), default="")


JOB_END_TYPES = (Done, Failed, Cancelled)


def error_for(exc: Exception, in_reply_to: str = "") -> Error:
    """The Error reply for a rejected message; the text is truncated to fit the protocol."""
    code = getattr(exc, "code", "bad_message")
    return Error(code=str(code)[:64], message=str(exc)[:MAX_STRING], in_reply_to=in_reply_to[:64])


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)
