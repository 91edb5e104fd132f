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
    Submit           -> Accepted, then Progress*, Preview*, TextureResult*, MeshResult?, MaterialResult?
                        (fits that estimated materials), RenderResult*, CamerasResult? (fits that
                        refined the cameras), EnvironmentResult? (fits that modelled the background),
                        and exactly one of
                        Done | Failed | Cancelled
    Cancel           -> Ack, then Cancelled (or Done/Failed if it had already ended)
    Status           -> StatusReply
    Attach           -> Attached, then the job's stored results and what follows (or Error unknown_job)
    FreeMemory       -> Ack | Error(busy)       (empty the GPU memory cache between jobs)
    RenderJob        -> Accepted, then Progress*, RenderResult* (one per camera), and one of
                        Done | Failed | Cancelled   (renders of the model a fit job saved)
    PointsJob        -> Accepted, then Progress*, MeshResult, and one of Done | Failed | Cancelled
                        (a signed distance field fitted to points or to a mesh's surface)
    anything invalid -> Error
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from . import wire
from .methods import BACKGROUND_MODES, CAMERA_REFINE_MODES, ENCODINGS, METHODS, POINTS_ORIENTATIONS, PRESETS
from .wire import DEFAULT_LIMITS, Limits, WireError

#: Bumped on any incompatible change of messages.  Independent of the package version.
PROTOCOL_VERSION = 11           # 5: EnvironmentResult; 6: Submit.background/camera_refine/appearance, CamerasResult;
                                # 7: PointsJob; 8: Submit.encoding, PointsJob.encoding and voxel_size,
                                #    CamerasResult.focal_scale; 9: times (Submit.times, eval_times and
                                #    mesh_time, RenderJob.times, MeshJob.time); 10: MeshJob.track_times,
                                #    MeshResult.track_times and tracks; 11: Submit.material_steps,
                                #    TextureResult "metallic", MaterialResult

# Caps on what one job may ask for.  Memory stays bounded whatever a peer sends.
MAX_IMAGES = 2000
MAX_IMAGE_SIDE = 8192
MAX_EVAL_CAMERAS = 1000
MAX_STEPS = 1_000_000
MAX_SECONDS = 7 * 24 * 3600.0
MAX_MESH_RESOLUTION = 1024
MAX_VERTICES = 20_000_000
MAX_TEXTURE_SIDE = 8192
MAX_POINTS = 50_000_000         # PointsJob.points (backend/fitting/point_cloud.py has the same cap)
MAX_ENVIRONMENT_HEIGHT = 4096   # EnvironmentResult: rows of the equirectangular image (twice as many columns)
MIN_TEXTURE_SIDE = 16
TEXTURE_AUTO = 1                # Submit.texture_size: the side chosen from the cameras' footprint
MIN_FACES = 100                 # smallest Submit.max_faces other than 0
TEXTURE_KINDS = ("albedo", "normal", "roughness", "metallic")
MAX_MATERIAL_STEPS = 100_000    # Submit.material_steps
MAX_LIGHT_HEIGHT = 512          # MaterialResult.light: rows of the estimated light (twice as many columns)
MAX_STRING = 4096
MAX_NAME = 256
MAX_RUN_JSON = 16 << 20         # ModelFile / StoreModel: a run's run.json (its cameras included)
MAX_MODEL_BYTES = 1 << 31       # ModelFile / StoreModel: a run's model.pt (the wire's cap for one array)
MAX_TRACK_TIMES = 10_000        # MeshJob.track_times: instants one mesh is followed through
MAX_TRACK_POINTS = 1 << 27      # MeshResult.tracks: instants x vertices (12 bytes each: 1.5 GiB)



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


def _in_range(name: str, value, lo, hi):
    if not lo <= value <= hi:
        raise ProtocolError(f"{name}: {value} is outside [{lo}, {hi}]")
    return value


@dataclass(frozen=True)
class Int:
    lo: int = 0
    hi: int = 2**53

    def check(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{name}: expected an integer, got {type(value).__name__}")
        return _in_range(name, value, self.lo, self.hi)


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
        return _in_range(name, value, self.lo, self.hi)


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
    """The handshake.  ``token``: the client's secret (16-64 hex digits; "" for none): the jobs
    it submits are its own, and only a connection that says the same token may see their ids
    (Status, Pong), attach to them, cancel them, render, mesh or fetch their models.  A client
    without a token owns its jobs through its one connection only."""

    TYPE: ClassVar[str] = "hello"
    client: str = spec(Str(MAX_NAME), default="")
    protocol: int = spec(Int(0, 2**31), default=PROTOCOL_VERSION)
    token: str = spec(Str(64), default="")

    def check(self):
        if self.token and (len(self.token) < 16 or any(c not in "0123456789abcdef" for c in self.token)):
            raise ProtocolError("hello.token: expected 16 to 64 lowercase hexadecimal digits")
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
        "N": MAX_IMAGES, "H": MAX_IMAGE_SIDE, "W": MAX_IMAGE_SIDE, "M": MAX_EVAL_CAMERAS, "L": MAX_IMAGES,
        "S": MAX_IMAGES, "T": MAX_IMAGES, "ET": MAX_EVAL_CAMERAS,
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
    # Radiance fields: the opacity a ray gains crossing one voxel where the mesh surface lies
    # (backend/export/iso.py); 0: chosen per field.  Surface fields mesh their own zero level.
    mesh_opacity: float = spec(Float(0.0, 0.99), default=0.0)
    # Side of the baked UV textures (TextureResult*); 0: vertex colours only, no UVs; TEXTURE_AUTO:
    # chosen by the backend from the object's size and the cameras' footprint (backend/export/texture.py).
    texture_size: int = spec(Int(0, MAX_TEXTURE_SIDE), default=0)
    # Most triangles of the mesh sent back (decimated to it); 0: the backend's default (200,000 when
    # textured: backend/export/texture.py MAX_FACES; marching cubes' own count otherwise).
    max_faces: int = spec(Int(0, MAX_VERTICES), default=0)
    preview_size: int = spec(Int(0, 1024), default=128)            # longest side; 0: no previews
    preview_interval: float = spec(Float(0.05, 3600.0), default=1.0)
    eval_intrinsics: np.ndarray = spec(Array(("float64", "float32"), ("M", 4)), default_factory=_empty((0, 4), np.float64))
    eval_poses: np.ndarray = spec(Array(("float64", "float32"), ("M", 4, 4)), default_factory=_empty((0, 4, 4), np.float64))
    # eval_sizes[i] = (width, height) in pixels, the order of cameras.image_size()
    eval_sizes: np.ndarray = spec(Array(("int32", "int64"), ("M", 2)), default_factory=_empty((0, 2), np.int32))
    # Optional render passes (scene mode), each empty (first axis 0) or (N, H, W, ...) of images:
    # albedo: sRGB-encoded diffuse base colour; normal: WORLD-space unit normals, 0 where no surface;
    # depth: z-depth along the camera's viewing axis in world units, 0 where no surface.
    albedo: np.ndarray = spec(Array(("uint8",), (None, None, None, 3)), default_factory=_empty((0, 0, 0, 3), np.uint8))
    normal: np.ndarray = spec(Array(("float32", "float16"), (None, None, None, 3)), default_factory=_empty((0, 0, 0, 3), np.float32))
    depth: np.ndarray = spec(Array(("float32", "float16"), (None, None, None)), default_factory=_empty((0, 0, 0), np.float32))
    # roughness: the material's roughness in [0, 1] (Principled BSDF "Roughness"), NO_ROUGHNESS
    # (-1) where there is no surface or the material has no roughness to read.
    roughness: np.ndarray = spec(Array(("float32", "float16"), (None, None, None)),
                                 default_factory=_empty((0, 0, 0), np.float32))
    # Optional lens distortion, empty (pinhole cameras) or one row per image: lens_models[i] is a
    # shared.cameras.LENS_MODELS code (0 PINHOLE, 1 OPENCV, 2 OPENCV_FISHEYE), distortion[i] its
    # (k1, k2, k3, k4, p1, p2) (see shared.cameras.distort).  Training bends rays through it.
    lens_models: np.ndarray = spec(Array(("uint8", "int32", "int64"), ("L",)), default_factory=_empty((0,), np.int32))
    distortion: np.ndarray = spec(Array(("float64", "float32"), ("L", 6)), default_factory=_empty((0, 6), np.float64))
    # Photos of different sizes (pad_images): empty (every image is W x H), or image_sizes[i] =
    # (width, height) of image i, stored top-left in its W x H slot; the rest is padding.
    image_sizes: np.ndarray = spec(Array(("int32", "int64"), ("S", 2)), default_factory=_empty((0, 2), np.int32))
    # Photo captures (shared/methods.py): the background model outside the box (auto: photos
    # without alpha, or a camera inside the box); each photo's pose refined while fitting (the
    # refined cameras come back as a CamerasResult); each photo's exposure and white balance learnt.
    background: str = spec(Str(8, BACKGROUND_MODES), default="auto")
    camera_refine: str = spec(Str(8, CAMERA_REFINE_MODES), default="off")
    appearance: bool = spec(Bool(), default=False)
    # The field's encoding of positions (shared/methods.py ENCODINGS; backend/fields/encodings.py)
    encoding: str = spec(Str(16, ENCODINGS), default="hashgrid")
    # A scene that moves (backend/fields/motion.py): empty (one instant), or times[i] in [0, 1], the
    # instant image i shows; eval_times likewise for the eval cameras (empty: mesh_time); the
    # mesh (and its textures) come back at mesh_time.
    times: np.ndarray = spec(Array(("float64", "float32"), ("T",)), default_factory=_empty((0,), np.float64))
    eval_times: np.ndarray = spec(Array(("float64", "float32"), ("ET",)), default_factory=_empty((0,), np.float64))
    mesh_time: float = spec(Float(0.0, 1.0), default=0.0)
    # Photos without passes: estimate base colour, roughness and metallic textures and the light
    # that lit them on the textured mesh (backend/export/materials.py), this many steps; 0: off (the
    # textures keep the photos' lighting).  Needs textures, a still scene and no passes; the light
    # comes back in a MaterialResult.
    material_steps: int = spec(Int(0, MAX_MATERIAL_STEPS), default=0)

    def check(self):
        n = self.images.shape[0]
        if n < 1:
            raise ProtocolError("submit.images: at least one image is needed")
        if self.images.shape[1] < 1 or self.images.shape[2] < 1:
            raise ProtocolError(f"submit.images: images of {self.images.shape[2]}x{self.images.shape[1]} pixels "
                                "are empty (at least 1x1 is needed)")
        check_cameras("submit", self.intrinsics, self.poses)
        check_cameras("submit.eval", self.eval_intrinsics, self.eval_poses)
        sizes = self.image_sizes
        if len(sizes) and (len(sizes) != n or sizes.min() < 1 or (sizes[:, 0] > self.images.shape[2]).any()
                           or (sizes[:, 1] > self.images.shape[1]).any()):
            raise ProtocolError(f"submit.image_sizes: expected none or {n} rows of (width, height) within the "
                                f"images' {self.images.shape[2]}x{self.images.shape[1]}")
        if np.any(self.aabb[1] <= self.aabb[0]):
            raise ProtocolError("submit.aabb: every max must be larger than its min")
        if self.eval_sizes.size and (self.eval_sizes.min() < 1 or self.eval_sizes.max() > MAX_IMAGE_SIDE):
            raise ProtocolError(f"submit.eval_sizes: sizes must be in [1, {MAX_IMAGE_SIDE}]")
        check_passes(self)
        check_lenses("submit", self.lens_models, self.distortion, n)
        check_mesh_settings("submit", self.max_faces, self.texture_size)
        check_times("submit.times", self.times, n)
        check_times("submit.eval_times", self.eval_times, len(self.eval_poses))
        if self.material_steps:
            if not self.texture_size:
                raise ProtocolError("submit.material_steps: materials are estimated on a textured mesh: set "
                                    "texture_size too")
            passes = [name for name in PASS_NAMES if getattr(self, name).shape[0]]
            if passes:
                raise ProtocolError(f"submit.material_steps: the job has Blender's passes ({', '.join(passes)}), "
                                    "whose textures are already free of lighting: estimate materials only "
                                    "from photos without passes")
            if len(self.times):
                raise ProtocolError("submit.material_steps: materials are estimated for a still scene, not a "
                                    "scene that moves (times)")


def pad_images(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Images (or passes) of possibly different sizes in one block, each top-left, zero-padded to
    the largest; returns it and the (N, 2) int64 ``width, height`` of each (Submit.image_sizes)."""
    sizes = np.array([[a.shape[1], a.shape[0]] for a in arrays], np.int64)
    if (sizes == sizes[0]).all():
        return np.stack(arrays), sizes
    out = np.zeros((len(arrays), int(sizes[:, 1].max()), int(sizes[:, 0].max())) + arrays[0].shape[2:],
                   arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0], :a.shape[1]] = a
    return out, sizes


NORMAL_TOLERANCE = 0.05   # |length - 1| allowed for a nonzero normal of a Submit
#: The optional per-pixel passes of a Submit (scene mode), by their one name on both sides, with
#: their per-image trailing shape and the dtype they have in memory and in pass files (the wire
#: also takes float16 for the float ones):
#: "albedo" (H, W, 3) uint8 sRGB-encoded diffuse base colour (blender_addon/passes.py: the BSDF's base
#:          colour times (1 - metallic) (1 - transmission), without the specular layer's share);
#: "normal" (H, W, 3) float32 WORLD-space unit normals, 0 where there is no surface;
#: "depth"  (H, W)    float32 z-depth along the camera's viewing axis (world units), 0: no surface;
#: "roughness" (H, W) float32 material roughness in [0, 1], NO_ROUGHNESS (-1) where it has no value.
PASS_DTYPES = {"albedo": np.uint8, "normal": np.float32, "depth": np.float32, "roughness": np.float32}
PASS_NAMES = tuple(PASS_DTYPES)
NO_ROUGHNESS = -1.0       # a roughness pixel without a value
SOLID_ALPHA = 250         # alpha (of 255) from which a pixel is all surface: outline pixels below it mix in the
                          # background, and their passes (one sample's depth, say) hold the surface only in part


def check_passes(msg: "Submit") -> None:
    """Each pass is empty or matches the images' N, H, W; normals are unit (or 0); depth >= 0;
    roughness in [0, 1] or NO_ROUGHNESS."""
    nhw = msg.images.shape[:3]
    for name in PASS_NAMES:
        value = getattr(msg, name)
        if value.shape[0] == 0:
            continue
        if value.shape[:3] != nhw:
            raise ProtocolError(f"submit.{name}: shape {value.shape} does not match the images' "
                                f"{nhw[0]} x {nhw[1]} x {nhw[2]} (send an empty array for no {name})")
    for i in range(msg.normal.shape[0]):   # one image at a time: bounded temporary memory
        length = np.linalg.norm(msg.normal[i].astype(np.float32), axis=-1)
        bad = (length > 0) & (np.abs(length - 1.0) > NORMAL_TOLERANCE)
        if bad.any():
            raise ProtocolError(f"submit.normal: image {i} has {int(bad.sum())} normals that are neither "
                                f"unit length (within {NORMAL_TOLERANCE}) nor zero")
    if msg.depth.size and float(msg.depth.min()) < 0:
        raise ProtocolError("submit.depth: depths must be >= 0 (0 where there is no surface)")
    for i in range(msg.roughness.shape[0]):
        r = msg.roughness[i]
        bad = ((r < 0) | (r > 1)) & (r != NO_ROUGHNESS)
        if bad.any():
            raise ProtocolError(f"submit.roughness: image {i} has {int(bad.sum())} values outside [0, 1] that are "
                                f"not {NO_ROUGHNESS} (no value)")


LENS_MODEL_COUNT = 3          # shared.cameras.LENS_MODELS
MAX_DISTORTION = 10.0         # |coefficient|; real lenses stay far below


def check_lenses(where: str, models: np.ndarray, distortion: np.ndarray, n: int) -> None:
    """Lens rows: none, or one per image, with known model codes and bounded coefficients."""
    if len(models) not in (0, n):
        raise ProtocolError(f"{where}.lens_models: {len(models)} lenses for {n} images (send none or one per image)")
    if models.size and (models.min() < 0 or models.max() >= LENS_MODEL_COUNT):
        raise ProtocolError(f"{where}.lens_models: codes must be 0 (PINHOLE), 1 (OPENCV) or 2 (OPENCV_FISHEYE)")
    if distortion.size and np.abs(distortion).max() > MAX_DISTORTION:
        raise ProtocolError(f"{where}.distortion: coefficients must be within +-{MAX_DISTORTION}")


def check_times(where: str, times: np.ndarray, n: int | None = None) -> None:
    """None, or one instant in [0, 1] for each of ``n`` views (None: any number of instants)."""
    if len(times) and not (np.isfinite(times).all() and times.min() >= 0 and times.max() <= 1):
        raise ProtocolError(f"{where}: instants must be in [0, 1]")
    if n is not None and len(times) not in (0, n):
        raise ProtocolError(f"{where}: expected none or {n} instants in [0, 1], one per view")


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
    note: str = spec(Str(), default="")              # something the user should know, said once (e.g. no checkpoints)


@dataclass
class Preview(Message):
    TYPE: ClassVar[str] = "preview"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"H": MAX_IMAGE_SIDE, "W": MAX_IMAGE_SIDE}
    job_id: str = spec(Str(MAX_NAME))
    image: np.ndarray = spec(Array(("uint8",), ("H", "W", 4)))     # sRGB RGBA, top row first
    step: int = spec(Int(0, 2**53), default=0)


@dataclass
class MeshResult(Message):
    """A triangle mesh in the submit's world frame.  ``colors`` are sRGB in [0, 1].

    Textured meshes (Submit.texture_size > 0) also carry per-vertex ``uvs`` (V, 2) in [0, 1] (v up,
    Blender's convention; the mesh is split at UV seams, welding equal positions undoes that) and
    unit ``normals`` (V, 3) (smooth, the frame the normal map was baked in); both are empty
    (first axis 0) otherwise.
    """

    TYPE: ClassVar[str] = "mesh"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"V": MAX_VERTICES, "F": 2 * MAX_VERTICES,
                                             "U": MAX_VERTICES, "NV": MAX_VERTICES,
                                             "T": MAX_TRACK_TIMES, "TV": MAX_VERTICES}
    job_id: str = spec(Str(MAX_NAME))
    vertices: np.ndarray = spec(Array(("float32",), ("V", 3)))
    faces: np.ndarray = spec(Array(("int32",), ("F", 3)))
    colors: np.ndarray = spec(Array(("float32",), ("V", 3)))
    uvs: np.ndarray = spec(Array(("float32",), ("U", 2)), default_factory=_empty((0, 2), np.float32))
    normals: np.ndarray = spec(Array(("float32",), ("NV", 3)), default_factory=_empty((0, 3), np.float32))
    # MeshJob.track_times answered: the instants, and every vertex's world position at each
    # (T, V, 3); none (T = 0) otherwise
    track_times: np.ndarray = spec(Array(("float32",), ("T",)), default_factory=_empty((0,), np.float32))
    tracks: np.ndarray = spec(Array(("float32",), ("T", "TV", 3)), default_factory=_empty((0, 0, 3), np.float32))

    def check(self):
        if len(self.track_times) and self.tracks.shape[1] != len(self.vertices):
            raise ProtocolError(f"mesh.tracks: {self.tracks.shape[1]} vertices a row for a mesh of {len(self.vertices)}")
        if self.tracks.size > 3 * MAX_TRACK_POINTS:
            raise ProtocolError(f"mesh.tracks: {self.tracks.shape[0]} instants x {self.tracks.shape[1]} vertices is "
                                f"more than the allowed {MAX_TRACK_POINTS}")
        check_times("mesh.track_times", self.track_times)
        if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= len(self.vertices)):
            raise ProtocolError(f"mesh.faces: indices must be in [0, {len(self.vertices)})")
        if self.colors.size and (self.colors.min() < 0 or self.colors.max() > 1):
            raise ProtocolError("mesh.colors: values must be in [0, 1]")
        for name in ("uvs", "normals"):
            value = getattr(self, name)
            if len(value) not in (0, len(self.vertices)):
                raise ProtocolError(f"mesh.{name}: {len(value)} rows for {len(self.vertices)} vertices "
                                    "(send none or one per vertex)")
        if self.uvs.size and (self.uvs.min() < 0 or self.uvs.max() > 1):
            raise ProtocolError("mesh.uvs: values must be in [0, 1]")
        if self.normals.size:
            length = np.linalg.norm(self.normals, axis=1)
            if np.any(np.abs(length - 1.0) > 0.01):
                raise ProtocolError("mesh.normals: every normal must have unit length (within 0.01)")


@dataclass
class TextureResult(Message):
    """One baked UV texture of the job's mesh (sent before its MeshResult).

    ``image`` (H, W, C) uint8, top row first: "albedo" C = 3 or 4, sRGB-encoded base colour;
    "normal" C = 3, tangent-space normal map (OpenGL +Y, Non-Color); "roughness" and "metallic"
    C = 1, linear (Non-Color; metallic only where materials were estimated, Submit.material_steps).
    ``lighting_baked`` says whether the albedo still holds the lighting.
    """

    TYPE: ClassVar[str] = "texture"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"H": MAX_TEXTURE_SIDE, "W": MAX_TEXTURE_SIDE}
    job_id: str = spec(Str(MAX_NAME))
    kind: str = spec(Str(16, TEXTURE_KINDS))
    image: np.ndarray = spec(Array(("uint8",), ("H", "W", (1, 3, 4))))
    lighting_baked: bool = spec(Bool(), default=True)

    def check(self):
        channels = {"albedo": (3, 4), "normal": (3,), "roughness": (1,), "metallic": (1,)}[self.kind]
        if self.image.shape[2] not in channels:
            raise ProtocolError(f"texture.image: a {self.kind} texture needs {' or '.join(map(str, channels))} "
                                f"channels, got {self.image.shape[2]}")
        if self.image.shape[0] < 1 or self.image.shape[1] < 1:
            raise ProtocolError("texture.image: the image is empty")


@dataclass
class RenderResult(Message):
    TYPE: ClassVar[str] = "render"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"H": MAX_IMAGE_SIDE, "W": MAX_IMAGE_SIDE}
    job_id: str = spec(Str(MAX_NAME))
    index: int = spec(Int(0, MAX_EVAL_CAMERAS))
    image: np.ndarray = spec(Array(("uint8",), ("H", "W", 4)))     # sRGB RGBA, top row first


@dataclass
class EnvironmentResult(Message):
    """The background a fit modelled (what lies outside its box, backend/fields/background.py),
    seen from the box's centre, as an equirectangular image for Blender's World; sent once after
    the fit's other results, before Done, and only by fits that modelled the background.

    ``image`` (H, W, 3) uint8 sRGB, W = 2 H, top row first: row i looks at elevation
    pi/2 - pi (i + 0.5) / H (the top row straight up, +Z), column j at azimuth
    atan2(y, x) = pi - 2 pi (j + 0.5) / W: the left edge looks down -X, a quarter across +Y, the
    middle +X, three quarters -Y.  That is how Blender's Environment Texture node (equirectangular)
    maps an image onto the World (checked with Cycles: tests/addon/test_environment_bpy.py)."""

    TYPE: ClassVar[str] = "environment"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"H": MAX_ENVIRONMENT_HEIGHT, "W": 2 * MAX_ENVIRONMENT_HEIGHT}
    job_id: str = spec(Str(MAX_NAME))
    image: np.ndarray = spec(Array(("uint8",), ("H", "W", 3)))

    def check(self):
        h, w = self.image.shape[:2]
        if h < 1:
            raise ProtocolError("environment.image: the image is empty")
        if w != 2 * h:
            raise ProtocolError(f"environment.image: an equirectangular image is twice as wide as it is high, "
                                f"got {w}x{h}")


@dataclass
class MaterialResult(Message):
    """What estimating the materials (Submit.material_steps; backend/export/materials.py) found
    besides the textures, sent once after the mesh, before Done.

    ``light``: the estimated light, linear radiance (HDR, not clipped), (H, W, 3) float32, W = 2 H,
    top row first, mapped onto directions as EnvironmentResult's image (Blender's World,
    equirectangular).  ``albedo_view``: the estimated base colour on the mesh, unlit, as the camera
    of photo ``view_photo`` sees it ((h, w, 4) uint8 sRGB, straight alpha, top row first; the photo
    scaled down by a whole factor where it is large), for showing beside that photo; empty (and
    ``view_photo`` -1) when there is none."""

    TYPE: ClassVar[str] = "material"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"H": MAX_LIGHT_HEIGHT, "W": 2 * MAX_LIGHT_HEIGHT,
                                             "VH": MAX_IMAGE_SIDE, "VW": MAX_IMAGE_SIDE}
    job_id: str = spec(Str(MAX_NAME))
    light: np.ndarray = spec(Array(("float32",), ("H", "W", 3)))
    albedo_view: np.ndarray = spec(Array(("uint8",), ("VH", "VW", 4)), default_factory=_empty((0, 0, 4), np.uint8))
    view_photo: int = spec(Int(-1, MAX_IMAGES), default=-1)

    def check(self):
        h, w = self.light.shape[:2]
        if h < 1 or w != 2 * h:
            raise ProtocolError(f"material.light: an equirectangular image is twice as wide as it is high, got {w}x{h}")
        if self.light.min() < 0:
            raise ProtocolError("material.light: radiance must not be negative")
        if (self.albedo_view.size > 0) != (self.view_photo >= 0):
            raise ProtocolError("material.albedo_view: send a view with the photo it shows (view_photo >= 0), or "
                                "neither")


@dataclass
class CamerasResult(Message):
    """The training cameras as the fit refined them (Submit.camera_refine "on"), sent once after
    the mesh, before Done.  ``poses[i]`` is the Submit's camera i, camera-to-world in the same
    world frame and convention as Submit.poses (the refinement keeps the capture's frame and
    scale: backend/fitting/camera_refine.py); ``moved_deg[i]`` how far it turned (degrees) and
    ``moved[i]`` how far its centre moved (world units)."""

    TYPE: ClassVar[str] = "cameras"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"N": MAX_IMAGES}
    job_id: str = spec(Str(MAX_NAME))
    poses: np.ndarray = spec(Array(("float64", "float32"), ("N", 4, 4)))
    moved_deg: np.ndarray = spec(Array(("float64", "float32"), ("N",)))
    moved: np.ndarray = spec(Array(("float64", "float32"), ("N",)))
    # The focal length's factor when it was refined too (camera_refine "focal"; every photo's), else 1
    focal_scale: float = spec(Float(0.25, 4.0), default=1.0)

    def check(self):
        if len(self.poses) < 1:
            raise ProtocolError("cameras.poses: at least one camera is needed")
        check_cameras("cameras", np.zeros((0, 4)), self.poses)
        if np.any(self.moved_deg < 0) or np.any(self.moved_deg > 180) or np.any(self.moved < 0):
            raise ProtocolError("cameras.moved_deg / moved: expected angles in [0, 180] degrees and distances >= 0")


MAX_RENDER_PIXELS = 1 << 32     # all views of one RenderJob together


@dataclass
class RenderJob(Message):
    """Render views of a field fitted earlier: the model that fit job ``fit_job_id`` saved in its
    folder (backend/service/paths.py).  Cameras as in Submit: ``intrinsics[i] = (fx, fy, cx, cy)`` (OpenCV
    pixel frame), ``poses[i]`` rigid camera-to-world (Blender convention), ``sizes[i] = (width,
    height)``.  One RenderResult per camera comes back, ``index`` = i, in order, then Done."""

    TYPE: ClassVar[str] = "render_job"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"M": MAX_EVAL_CAMERAS, "MT": MAX_EVAL_CAMERAS}
    fit_job_id: str = spec(Str(64))
    intrinsics: np.ndarray = spec(Array(("float64", "float32"), ("M", 4)))
    poses: np.ndarray = spec(Array(("float64", "float32"), ("M", 4, 4)))
    sizes: np.ndarray = spec(Array(("int32", "int64"), ("M", 2)))
    name: str = spec(Str(MAX_NAME), default="")
    # A field over time: empty (every camera at the instant 0), or the instant of each camera
    times: np.ndarray = spec(Array(("float64", "float32"), ("MT",)), default_factory=_empty((0,), np.float64))

    def check(self):
        if len(self.poses) < 1:
            raise ProtocolError("render_job: at least one camera is needed")
        check_cameras("render_job", self.intrinsics, self.poses)
        check_times("render_job.times", self.times, len(self.poses))
        if self.sizes.min() < 1 or self.sizes.max() > MAX_IMAGE_SIDE:
            raise ProtocolError(f"render_job.sizes: sizes must be in [1, {MAX_IMAGE_SIDE}]")
        pixels = int(np.prod(self.sizes.astype(np.int64), axis=1).sum())
        if pixels > MAX_RENDER_PIXELS:
            raise ProtocolError(f"render_job.sizes: {pixels} pixels in all is more than the {MAX_RENDER_PIXELS} "
                                "allowed in one job; send the views in several jobs")


@dataclass
class PointsJob(Message):
    """Fit a signed distance field to points (a scan, a point cloud) or to a mesh's surface, and
    send back a clean, closed mesh in the same frame and units (issue 16; backend/service/points_job.py).

    Either ``points`` (P, 3) (with optional ``normals``, one unit vector a point, and ``colors``,
    sRGB 0-255) or a mesh, ``vertices`` (V, 3) and ``faces`` (F, 3) triangles, whose surface the
    backend samples; never both.  ``detail``: 0 fills holes smoothly .. 1 keeps every detail;
    ``orientation``: auto (use the normals where given; a mesh's where its winding is
    consistent), oriented, unoriented (sign-agnostic).  ``mesh_resolution``: marching-cubes grid
    along the longest side (0: the preset's); ``max_faces``: decimate to at most this many (0: no).
    """

    TYPE: ClassVar[str] = "points_job"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"P": MAX_POINTS, "PN": MAX_POINTS, "PC": MAX_POINTS,
                                             "V": MAX_VERTICES, "F": 2 * MAX_VERTICES}
    points: np.ndarray = spec(Array(("float32", "float64"), ("P", 3), finite=False),   # NaN rows: dropped, counted
                              default_factory=_empty((0, 3), np.float32))
    normals: np.ndarray = spec(Array(("float32", "float64"), ("PN", 3), finite=False),
                               default_factory=_empty((0, 3), np.float32))
    colors: np.ndarray = spec(Array(("uint8",), ("PC", 3)), default_factory=_empty((0, 3), np.uint8))
    vertices: np.ndarray = spec(Array(("float32", "float64"), ("V", 3)), default_factory=_empty((0, 3), np.float32))
    faces: np.ndarray = spec(Array(("int32", "int64"), ("F", 3)), default_factory=_empty((0, 3), np.int32))
    name: str = spec(Str(MAX_NAME), default="")
    preset: str = spec(Str(32, PRESETS), default="standard")
    steps: int = spec(Int(0, MAX_STEPS), default=0)
    seconds: float = spec(Float(0.0, MAX_SECONDS), default=0.0)
    detail: float = spec(Float(0.0, 1.0), default=0.5)
    orientation: str = spec(Str(16, POINTS_ORIENTATIONS), default="auto")
    encoding: str = spec(Str(16, ENCODINGS), default="hashgrid")     # as Submit.encoding
    # The mesh's voxels, in the points' units (as Voxel Remesh); 0: mesh_resolution.  The backend
    # turns it into a resolution in its own box (the points and a margin) and refuses a job whose
    # voxels are too small for MAX_MESH_RESOLUTION before fitting.
    voxel_size: float = spec(Float(0.0, 1e9), default=0.0)
    mesh_resolution: int = spec(Int(0, MAX_MESH_RESOLUTION), default=0)
    max_faces: int = spec(Int(0, MAX_VERTICES), default=0)
    mesh_samples: int = spec(Int(0, MAX_POINTS), default=0)        # points sampled on a sent mesh; 0: the backend's

    def check(self):
        has_points, has_mesh = len(self.points) > 0, len(self.vertices) > 0 or len(self.faces) > 0
        if has_points == has_mesh:
            raise ProtocolError("points_job: send either points or a mesh (vertices and faces), "
                                + ("not both" if has_points else "got neither"))
        for name in ("normals", "colors"):
            rows = len(getattr(self, name))
            if rows not in (0, len(self.points)):
                raise ProtocolError(f"points_job.{name}: {rows} rows for {len(self.points)} points (send none or one a point)")
        if has_mesh:
            if not len(self.faces):
                raise ProtocolError("points_job.faces: the mesh has no faces")
            if self.faces.min() < 0 or self.faces.max() >= len(self.vertices):
                raise ProtocolError(f"points_job.faces: indices must be in [0, {len(self.vertices)})")
        check_mesh_settings("points_job", self.max_faces, 0)


def check_mesh_settings(where: str, max_faces: int, texture_size: int) -> None:
    """The values between the Int ranges' ends that Submit and MeshJob refuse alike."""
    if 0 < max_faces < MIN_FACES:
        raise ProtocolError(f"{where}.max_faces: {max_faces} is not 0 (the backend's default) or at least {MIN_FACES}")
    if 0 < texture_size < MIN_TEXTURE_SIDE and texture_size != TEXTURE_AUTO:
        raise ProtocolError(f"{where}.texture_size: {texture_size} is not 0 (no textures), {TEXTURE_AUTO} "
                            f"(chosen from the cameras) or in [{MIN_TEXTURE_SIDE}, {MAX_TEXTURE_SIDE}]")


@dataclass
class MeshJob(Message):
    """Mesh a field fitted earlier again (the model fit job ``fit_job_id`` saved, or one given
    back with StoreModel), with other mesh settings: answered like a fit's end (TextureResult*
    where textured, one MeshResult, then Done).  Settings as in Submit; 0 = the fit's own."""

    TYPE: ClassVar[str] = "mesh_job"
    fit_job_id: str = spec(Str(64))
    mesh_resolution: int = spec(Int(0, MAX_MESH_RESOLUTION), default=0)
    mesh_opacity: float = spec(Float(0.0, 0.99), default=0.0)
    texture_size: int = spec(Int(0, MAX_TEXTURE_SIDE), default=0)
    max_faces: int = spec(Int(0, MAX_VERTICES), default=0)
    name: str = spec(Str(MAX_NAME), default="")
    time: float = spec(Float(0.0, 1.0), default=0.0)     # a field over time: the instant to mesh
    # a field over time: also where each vertex of that mesh is at these instants (MeshResult.tracks;
    # backend/export/tracks.py): one mesh, moving
    track_times: np.ndarray = spec(Array(("float64", "float32"), ("T",)), default_factory=_empty((0,), np.float64))

    DIM_CAPS: ClassVar[Mapping[str, int]] = {"T": MAX_TRACK_TIMES}

    def check(self):
        check_mesh_settings("mesh_job", self.max_faces, self.texture_size)
        check_times("mesh_job.track_times", self.track_times)


@dataclass
class FetchModel(Message):
    """Ask for the fitted model of fit job ``fit_job_id`` (to keep it beside a .blend): answered
    with ModelFile, or Error(code="unknown_job") when this backend has no model for it."""

    TYPE: ClassVar[str] = "fetch_model"
    fit_job_id: str = spec(Str(64))


@dataclass
class ModelFile(Message):
    """A fitted model as the backend saves it (backend/fitting/runs.py): the UTF-8 bytes of
    run.json and the bytes of model.pt (tensors only; loaded with weights_only, never unpickled),
    as uint8 arrays (frames, not the header).  The reply to FetchModel; the same two travel back
    in StoreModel."""

    TYPE: ClassVar[str] = "model_file"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"J": MAX_RUN_JSON, "B": MAX_MODEL_BYTES}
    run_json: np.ndarray = spec(Array(("uint8",), ("J",)))
    weights: np.ndarray = spec(Array(("uint8",), ("B",)))
    fit_job_id: str = spec(Str(64), default="")


@dataclass
class StoreModel(Message):
    """Give the backend a model kept elsewhere (a ModelFile's run_json and weights), for
    RenderJob and MeshJob after its own copy expired or on another backend: answered with
    Ack(request="store_model", job_id=the id to use as fit_job_id), or Error(code="bad_model")."""

    TYPE: ClassVar[str] = "store_model"
    DIM_CAPS: ClassVar[Mapping[str, int]] = {"J": MAX_RUN_JSON, "B": MAX_MODEL_BYTES}
    run_json: np.ndarray = spec(Array(("uint8",), ("J",)))
    weights: np.ndarray = spec(Array(("uint8",), ("B",)))
    name: str = spec(Str(MAX_NAME), default="")

    def check(self):
        if self.weights.size < 4 or self.run_json.size < 2:
            raise ProtocolError("store_model: run_json and weights must not be empty")


@dataclass
class Done(Message):
    TYPE: ClassVar[str] = "done"
    job_id: str = spec(Str(MAX_NAME))
    summary: dict = spec(Summary(), default_factory=dict)


@dataclass
class Failed(Message):
    """The job failed.  ``message``: what happened, as the backend words it for any client.

    ``code`` (optional, "" when the failure has none; no version bump: older peers ignore it):
    what kind of failure, for clients that word it their own way: "out_of_memory" (the GPU ran
    out of memory; the backend is ready for the next job), "shutdown" (the backend stopped while
    the job ran or waited).  A client that ends a job itself (blender_addon/client.py) sets its
    own codes, or the code of the Error that refused the job.
    ``detail`` (optional, ""): when ``message`` adds the backend's advice to the failure, the
    failure's own words without it (e.g. torch's "CUDA out of memory. Tried to allocate ..."),
    for clients that give their own advice by ``code``.
    """

    TYPE: ClassVar[str] = "failed"
    job_id: str = spec(Str(MAX_NAME))
    message: str = spec(Str(MAX_STRING), default="")
    code: str = spec(Str(64), default="")
    detail: str = spec(Str(MAX_STRING), default="")


@dataclass
class JobRef(Message):
    """A message that names one job and says nothing else (no TYPE of its own: not sent as is)."""

    job_id: str = spec(Str(MAX_NAME))


@dataclass
class Cancelled(JobRef):
    TYPE: ClassVar[str] = "cancelled"


@dataclass
class Cancel(JobRef):
    TYPE: ClassVar[str] = "cancel"


@dataclass
class Attach(JobRef):
    """Reattach to a job by id (after a disconnect or a backend restart): the backend answers
    Attached, resends the job's stored results (TextureResult*, MeshResult, RenderResult*,
    EnvironmentResult, then its end if it ended) and sends what follows to this client.  Results
    are kept until an expiry (--keep-hours)."""

    TYPE: ClassVar[str] = "attach"


@dataclass
class Attached(Message):
    TYPE: ClassVar[str] = "attached"
    job_id: str = spec(Str(MAX_NAME))
    state: str = spec(Str(16, ("queued", "running", "done", "failed", "cancelled")), default="queued")
    position: int = spec(Int(0, 2**31), default=0)   # jobs ahead of it while queued


@dataclass
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    request: str = spec(Str(32))
    job_id: str = spec(Str(MAX_NAME), default="")


@dataclass
class Status(Message):
    TYPE: ClassVar[str] = "status"


@dataclass
class FreeMemory(Message):
    """Release the GPU memory the backend keeps cached between jobs (torch.cuda.empty_cache()).
    Answered with Ack(request="free_memory"), or Error(code="busy") while a job runs or waits."""

    TYPE: ClassVar[str] = "free_memory"


@dataclass
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    state: str = spec(Str(16, ("idle", "busy")), default="idle")
    running_job: str = spec(Str(MAX_NAME), default="")
    queued_jobs: str = spec(Str(MAX_STRING), default="")   # comma-separated job ids, oldest first
    device: str = spec(Str(MAX_NAME), default="")
    # ``serve --gpus``/``--workers``: each worker's name, device and state ("w0 cuda:0 busy, w1 cuda:1 idle",
    # "(restarted 1x)" after one that died); one in-process worker otherwise.  No version bump: older peers
    # ignore it.  ``running_job`` then lists the asking client's running jobs, comma-separated.
    workers: str = spec(Str(MAX_STRING), default="")


@dataclass
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str = spec(Str(64), default="bad_message")
    message: str = spec(Str(MAX_STRING), default="")
    in_reply_to: str = spec(Str(64), default="")


JOB_END_TYPES = (Done, Failed, Cancelled)


def error_for(exc: Exception, frames: Sequence | None = None) -> Error:
    """The Error reply for a rejected message (``frames``: the message as received, to name
    its type if its header says one); the text is truncated to fit the protocol."""
    code = getattr(exc, "code", "bad_message")
    return Error(code=str(code)[:64], message=str(exc)[:MAX_STRING], in_reply_to=peek_type(frames or [])[:64])


def peek_type(frames: Sequence) -> str:
    """The 'type' a message's header names, if it can be read ("" otherwise)."""
    try:
        head = bytes(getattr(frames[0], "buffer", frames[0]))
        if len(head) <= 65536:
            kind = json.loads(head).get("type")
            return kind[:64] if isinstance(kind, str) else ""
    except Exception:   # noqa: BLE001 - it is already known to be malformed
        pass
    return ""


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)
