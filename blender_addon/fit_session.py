"""One fit, start to end: capture views, submit, follow the job, import the result.

``FitSession`` is the single code path behind the modal operator (a timer calls ``tick()``),
the blocking operator path and ``fit_scene()`` for scripts.  It touches bpy only from the
thread that calls it (the main thread); ZeroMQ runs in the JobClient's own thread.

    session = FitSession(scene, address, FitSettings(preset="draft"))
    session.begin()                 # checks, cameras, backend handshake; raises FitError
    while not session.tick():       # one render per tick, then drains the client's messages
        time.sleep(0.05)
    session.result                  # FitResult
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import bpy
import numpy as np

from . import capture, dataset_io, importer, ownership, running
from ._shared import cameras, protocol


class FitError(Exception):
    """A fit could not start or did not finish; the text is meant for the user."""

    def __init__(self, message: str, result: "FitResult | None" = None, code: str = ""):
        super().__init__(message)
        self.result = result
        self.code = code          # "unreachable" | "version_mismatch" | "backend" | "keys" | "" (scene problems)


@dataclass
class FitSettings:
    method: str = "nerf"
    preset: str = "standard"              # draft | standard | high; "": the backend's device decides (see CPU_NOTE)
    seconds: float = 0.0                  # training time budget; 0: the preset's step count
    steps: int = 0                        # 0: the preset's default
    mesh_resolution: int = 0              # 0: the preset's default
    mesh_opacity: float = 0.0             # radiance fields' surface level (see protocol.Submit); 0: auto
    texture_size: int = 0                 # side of baked UV textures (albedo, normal, roughness); 0: vertex colours
    max_faces: int = 0                    # most triangles of the imported mesh; 0: the backend's default
    preview_size: int = 128               # longest side of previews; 0: none
    preview_interval: float = 1.0         # seconds between previews
    ring_count: int = 24                  # cameras placed around the selection if there are none
    cameras: list | None = None           # camera objects or names to train on; None: the scene's
    eval_cameras: list | None = None      # camera objects or names the backend renders at the end
    eval_reference: bool = True           # also render the eval cameras in Blender (ground truth)
    eval_holdout: bool = True             # the scene's held-out cameras (rig "Held Out") are eval cameras too
    ring_holdout: int = 1                 # a ring placed by the fit holds out this many more views for evaluation
    check_asset: bool = True              # render the imported asset at the eval cameras and score it (asset_check.py)
    import_mesh: bool = True
    smooth: bool = True
    preview_image: bool = True            # write previews into the image "Implicit Preview"
    show_preview: bool = False            # also show that image in an Image Editor (UI only)
    name: str = ""                        # job name; default: the scene's name
    cancel_timeout: float = 10.0          # seconds to wait for the backend to confirm a cancel
    # Capture (blender_addon/capture.py): camera source, passes, resumable renders.
    source: str = "SCENE"                 # SCENE | SELECTED | COLLECTION | ANIMATION
    source_collection: str = ""           # COLLECTION: its name
    source_camera: str = ""               # ANIMATION: the camera (default: the scene camera)
    frame_range: tuple | None = None      # ANIMATION: (start, end, step); None: the scene's
    passes: bool | None = None            # albedo/normal/depth/roughness passes; None: on for sdf/occupancy
    cache_dir: str | None = ""            # render cache ("": capture.default_cache_dir(); None: off)
    # Photo captures (protocol.Submit, shared/methods.py)
    background: str = "auto"              # auto | on | off: the background model outside the box
    camera_refine: str = "off"            # off | on: each photo's pose refined; the cameras come back
    appearance: bool = False              # each photo's exposure and white balance learnt
    encoding: str = "hashgrid"            # the field's encoding of positions (shared/methods.py ENCODINGS)
    material_steps: int = 0               # photos without passes: steps estimating materials and light (0: off)
    over_time: str = "STILL"              # STILL | EVERY_CAMERA | IN_TURN | RANDOM: a fit over the frame range
                                          # (capture.py OVER_TIME; the range: frame_range, None: the scene's)


CPU_NOTE = ("The backend has no GPU: the Draft preset, a preview in minutes (choose Standard in Field to train "
            "the full recipe, hours on a CPU)")

#: FitSettings fields an imported asset keeps (as JSON in its "implicit_settings" property).
ASSET_SETTINGS = ("method", "preset", "seconds", "steps", "mesh_resolution", "mesh_opacity", "texture_size",
                  "max_faces", "ring_count", "source", "passes", "background", "camera_refine", "appearance",
                  "encoding", "over_time", "material_steps")


@dataclass
class PanelState:
    """What the panel shows of a fit (status line, progress, training numbers); mirrored into
    ``scene.implicit`` when the add-on is registered.  Not the backend's job state
    (backend/service/jobs.py JobState)."""

    # (a list of fields, alike in shape to other dataclasses' lists: not repeated logic)
    status: str = ""
    progress: float = 0.0
    step: int = 0
    loss: float = 0.0
    psnr: float = 0.0
    elapsed: float = 0.0
    eta: float = 0.0
    total_steps: int = 0
    running: bool = False
    note: str = ""                   # what the backend said the user should know (Progress.note)


@dataclass
class FitResult:
    status: str = "running"               # running | done | failed | cancelled
    message: str = ""                     # the final report, for the user
    job_id: str | None = None
    object: Any = None                    # the imported bpy Object, or None
    time_range: tuple = ()                # a fit over time: the frames that are its instants 0 and 1
    mesh: tuple | None = None             # (vertices (V,3) f32 world, faces (F,3) i32, colors (V,3) f32 sRGB)
    summary: dict = field(default_factory=dict)           # Done.summary from the backend
    renders: list = field(default_factory=list)           # eval renders: (H,W,4) uint8 sRGB RGBA or None, by index
    textures: dict = field(default_factory=dict)          # baked UV textures: kind -> (H,W,C) uint8 (TextureResult)
    environment: np.ndarray | None = None                 # the background: (H,2H,3) uint8 sRGB (EnvironmentResult)
    environment_image: Any = None                         # the packed bpy Image made of it (world.py uses it)
    light_image: Any = None                               # the estimated light (MaterialResult): a packed float Image
    albedo_check: Any = None                              # ... the photo and the estimated base colour side by side
    refined_cameras: Any = None                           # the bpy Collection of refined cameras (refined_cameras.py)
    camera_moves: tuple | None = None                     # (moved_deg (N,), moved (N,)) of CamerasResult
    eval_reference: np.ndarray | None = None              # (M,H,W,4) uint8 Blender renders of the eval cameras
    images: np.ndarray | None = None                      # (N,H,W,4) uint8 training views sent
    intrinsics: np.ndarray | None = None                  # (N,4) float64
    poses: np.ndarray | None = None                       # (N,4,4) float64
    aabb: np.ndarray | None = None                        # (2,3) float64
    camera_names: list = field(default_factory=list)
    eval_camera_names: list = field(default_factory=list)
    last_progress: Any = None                             # the last protocol.Progress
    last_preview: np.ndarray | None = None                # (h,w,4) uint8
    previews: int = 0
    timings: dict = field(default_factory=dict)           # stage -> seconds (client wall clock)
    asset_renders: list = field(default_factory=list)     # the imported asset rendered at the eval cameras (H,W,4) uint8
    notes: list = field(default_factory=list)             # what the session chose for the user (e.g. CPU_NOTE)


def default_client_factory(address: str, **keys):
    """``keys``: CurveZMQ keys (preferences.connection_kwargs), none for a plain connection."""
    from .client import JobClient
    return JobClient(address, **keys)


def default_probe(address: str, **keys):
    from .client import probe
    return probe(address, **keys)


HANDSHAKE_CODES = ("refused", "needs keys", "handshake failed")   # client.BackendError.code of a failed CurveZMQ handshake


def _resolve_objects(scene, items) -> list | None:
    if items is None:
        return None
    out = []
    for it in items:
        ob = scene.objects.get(it) if isinstance(it, str) else it
        if ob is None or ob.type != "CAMERA":
            raise FitError(f"'{it}' is not a camera of scene '{scene.name}'.")
        out.append(ob)
    return out


class FitSession:
    def __init__(self, scene, address: str, settings: FitSettings | None = None, *, view_layer=None,
                 client_factory: Callable[[str], Any] | None = None,
                 probe: Callable[[str], Any] | bool = True,
                 on_change: Callable[["FitSession"], None] | None = None, connection: dict | None = None):
        self.scene = scene
        self.view_layer = view_layer if view_layer is not None else (
            bpy.context.view_layer if bpy.context.scene == scene else scene.view_layers[0])
        self.address = address
        self.settings = settings or FitSettings()
        # CurveZMQ keys of the default client and probe; None: the add-on preferences' (at begin()).
        self.connection = connection
        # Looked up when called (not at import) so that tests can swap the module's defaults.
        self.client_factory = client_factory or (
            lambda a: default_client_factory(a, token=ownership.scene_token(scene), **self.keys()))
        self.probe = (lambda a: default_probe(a, **self.keys())) if probe is True else (probe or None)
        self.on_change = on_change
        self.state = PanelState()
        self.result = FitResult()
        from .plot import History
        self.history = History()
        self._plot_version, self._plot_time = 0, 0.0
        self.client = None
        self.plan: capture.CapturePlan | None = None
        self._stage = "new"               # see the stage property
        self._views: list = []            # (camera object, is_eval, frame or None)
        self._photos: dict | None = None  # photo mode: dataset_io.photo_views of the cameras
        self._rendered: list = []
        self._folder: str | None = None
        self._t0 = time.monotonic()
        self._timing_stage: str | None = None
        self._timing_t0 = self._t0
        self._cancel_deadline = 0.0
        self._cancel_reason = ""

    # ---- public -----------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._stage == "finished"

    @property
    def stage(self) -> str:
        """new | render | running | cancelling | checking | finished (one Blender render a tick
        in render and checking; only messages are drained while running)."""
        return self._stage

    def keys(self) -> dict:
        """The CurveZMQ keyword arguments of this session's connections (see ``connection``)."""
        if self.connection is None:
            from .preferences import KeyProblem, connection_kwargs
            try:
                self.connection = connection_kwargs(bpy.context)
            except KeyProblem as exc:
                raise FitError(f"The CurveZMQ keys are not usable: {exc}.", code="keys") from None
        return self.connection

    def begin(self) -> None:
        """Check the scene, place cameras if needed and shake hands with the backend.
        Raises FitError (nothing is left running then)."""
        if self._stage != "new":
            raise RuntimeError("FitSession.begin() can only be called once")
        s = self.settings
        self.keys()
        self._timing("prepare")
        if self._begin_photos():
            return
        try:
            self.plan = capture.plan_capture(
                self.scene, self.view_layer, ring_count=s.ring_count,
                camera_objects=_resolve_objects(self.scene, s.cameras),
                eval_cameras=_resolve_objects(self.scene, s.eval_cameras), source=s.source,
                collection=s.source_collection, camera=s.source_camera, frame_range=s.frame_range,
                passes=capture.passes_by_default(self.scene, s.method) if s.passes is None else s.passes,
                eval_holdout=s.eval_holdout, ring_holdout=s.ring_holdout, over_time=s.over_time)
        except capture.CaptureError as exc:
            raise FitError(str(exc)) from None
        problem = next(filter(None, (photo_image_problem(ob) for ob in self.plan.cameras)), None)
        if problem:
            capture.remove_cameras(self.plan.ring)
            raise FitError(problem)
        if self.probe is not None:
            try:
                self._check_backend()
            except FitError:
                capture.remove_cameras(self.plan.ring)   # leave the scene as it was
                raise
        self._views = [(ob, False, f) for ob, f in zip(self.plan.cameras, self.plan.frames)]
        if s.eval_reference:
            self._views += [(ob, True, None) for ob in self.plan.eval_cameras]
        self._folder = tempfile.mkdtemp(prefix="fit_implicit_")
        self._renderer = capture.ViewRenderer(
            self.scene, self.view_layer, self._folder,
            cache_dir=capture.default_cache_dir() if s.cache_dir == "" else s.cache_dir)
        self.result.camera_names = [ob.name for ob in self.plan.cameras]
        self.result.eval_camera_names = [ob.name for ob in self.plan.eval_cameras]
        self.result.intrinsics, self.result.poses = self.plan.intrinsics, self.plan.poses
        self.result.aabb = self.plan.aabb
        self._stage = "render"
        self._timing("render")
        running.add(self.scene, self)
        self._update(status=f"Rendering {len(self._views)} views", progress=0.0, running=True, note="",
                     step=0, loss=0.0, psnr=0.0, elapsed=0.0)

    def _begin_photos(self) -> bool:
        """Photo mode: when the training cameras are imported photo cameras (``implicit_image``,
        see dataset_io), their photos (masks as alpha, lens distortion) are sent as they are and
        nothing is rendered; there are no passes (lighting stays baked).  Returns False when the
        cameras are to be rendered; raises FitError for a mix of both kinds, a missing photo or
        an unreachable backend."""
        s = self.settings
        cams, frames = self._training_cameras()
        is_photo = [dataset_io.has_photo(ob) for ob in cams]
        if not any(is_photo):
            return False
        if not all(is_photo):
            others = ", ".join(f"'{ob.name}'" for ob, p in zip(cams, is_photo) if not p)
            raise FitError("The training cameras mix photo cameras (imported from a dataset) with cameras to "
                           f"render ({others}): fit one kind at a time. Pick the cameras (Camera source: "
                           "Selected or Collection), or disable the others for rendering.")
        if any(f is not None for f in frames):
            raise FitError(f"Camera '{cams[0].name}' has one photo, not one per frame: pick another camera "
                           "source than Animation to fit photos.")
        eval_cams = _resolve_objects(self.scene, s.eval_cameras) or []
        try:
            capture.check_perspective(cams + eval_cams)
        except capture.CaptureError as exc:
            raise FitError(str(exc)) from None
        problem = next(filter(None, (photo_image_problem(ob) for ob in cams)), None)
        if problem:
            raise FitError(problem)
        if self.probe is not None:
            self._check_backend()
        try:
            photos = dataset_io.photo_views(cams, self.scene)
        except dataset_io.DatasetError as exc:
            raise FitError(str(exc)) from None
        h, w = photos["images"].shape[1:3]
        rw, rh = capture.render_size(self.scene)
        ek, ep = capture.camera_arrays(eval_cams, self.scene)
        self.plan = capture.CapturePlan(
            cameras=cams, intrinsics=photos["intrinsics"], poses=photos["poses"],
            aabb=self._photo_aabb(photos, w, h), width=rw, height=rh, eval_cameras=eval_cams,
            eval_intrinsics=ek, eval_poses=ep, frames=[None] * len(cams), passes=False)
        self._photos, self._views = photos, []
        r = self.result
        r.camera_names, r.eval_camera_names = [ob.name for ob in cams], [ob.name for ob in eval_cams]
        r.intrinsics, r.poses, r.aabb = self.plan.intrinsics, self.plan.poses, self.plan.aabb
        self._stage = "render"
        running.add(self.scene, self)
        sizes = photos["image_sizes"]
        self._update(status=f"Sending {len(cams)} photos of {w} x {h}" if not len(sizes) else
                     f"Sending {len(cams)} photos of {len(np.unique(sizes, axis=0))} sizes, up to {w} x {h}",
                     progress=0.0, running=True, note="",
                     step=0, loss=0.0, psnr=0.0, elapsed=0.0)
        return True

    def _training_cameras(self) -> tuple[list, list]:
        """(camera objects, frames) that plan_capture would train on; ([], []) when the camera
        source is unusable (plan_capture then says why)."""
        s = self.settings
        explicit = _resolve_objects(self.scene, s.cameras)
        if explicit is not None or s.source == "SCENE":
            cams = explicit if explicit is not None else capture.scene_cameras(self.view_layer)
            frames = [None] * len(cams)
        else:
            try:
                cams, frames = capture.source_views(self.scene, self.view_layer, s.source,
                                                    collection=s.source_collection, camera=s.source_camera,
                                                    frame_range=s.frame_range)
            except capture.CaptureError:
                return [], []
        eval_names = {ob.name for ob in (_resolve_objects(self.scene, s.eval_cameras) or [])}
        keep = [(ob, f) for ob, f in zip(cams, frames)
                if (f is not None or not capture.is_holdout(ob)) and ob.name not in eval_names]
        return [ob for ob, _ in keep], [f for _, f in keep]

    def _photo_aabb(self, photos: dict, width: int, height: int) -> np.ndarray:
        """(2, 3) world box of a photo fit: a selected cube Empty's box as drawn, else the padded
        box of the selected meshes, else the region the cameras look at (shared/cameras.py
        looked_at_aabb)."""
        empty = capture.box_empty(self.view_layer)
        if empty is not None:
            return capture.empty_box(empty)
        selected = capture.target_objects(self.view_layer, selected_only=True)
        if selected:
            return capture.padded_aabb(capture.world_bbox(selected, self.view_layer.depsgraph))
        try:
            return cameras.looked_at_aabb(photos["intrinsics"], photos["poses"], width, height)
        except ValueError as exc:
            raise FitError(f"Cannot tell where the photographed object is: {exc}. Select a cube Empty "
                           "(Add > Empty > Cube) or a mesh around the object: its box bounds the fit.") from None

    def tick(self) -> bool:
        """Advance the fit a little (one render, or drain the backend's messages).
        Never raises for job errors: they end the session with status 'failed'.
        Returns True once the session has finished."""
        try:
            if self._stage == "render":
                self._render_next()
            elif self._stage in ("running", "cancelling"):
                self._drain()
            elif self._stage == "checking":
                self._check_next()
        except Exception as exc:  # a bug or an unexpected Blender error: end cleanly, say what
            traceback.print_exc()
            self._finish("failed", f"Fit Implicit failed: {type(exc).__name__}: {exc}")
        return self.finished

    def cancel(self, reason: str = "") -> None:
        """Ask the job to stop; the session ends when the backend confirms (or after a timeout).
        ``reason`` (e.g. "time limit reached") goes into the final message."""
        self._cancel_reason = reason
        if self._stage in ("new", "render"):
            self._finish("cancelled", self._cancelled_text())
        elif self._stage == "checking":     # the fit is done and imported: only the check stops
            self._finish("done", done_text(self.result, self.settings, self.state.psnr))
        elif self._stage == "running":
            self._stage = "cancelling"
            self._cancel_deadline = time.monotonic() + self.settings.cancel_timeout
            self._update(status="Cancelling…")
            try:
                self.client.cancel()
            except Exception as exc:
                self._finish("cancelled", self._cancelled_text(f"could not reach the backend: {exc}"))

    def close(self) -> None:
        """Release everything (idempotent).  A session still running is cancelled first (one
        that is only checking the imported asset ends as done)."""
        if self._stage == "checking":
            self.cancel()
        if not self.finished:
            if self._stage == "running" and self.client is not None:
                try:
                    self.client.cancel()
                except Exception:
                    pass
            self._finish("cancelled", self._cancelled_text())

    def run(self, poll_interval: float = 0.05, timeout: float | None = None) -> FitResult:
        """Blocking loop for scripts and background mode (no event loop there)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.tick():
                if deadline is not None and time.monotonic() > deadline and self._stage == "running":
                    self.cancel(f"time limit of {timeout:g} s reached")
                    deadline = None
                if self._stage in ("running", "cancelling"):
                    time.sleep(poll_interval)
        except KeyboardInterrupt:
            self.cancel()
            end = time.monotonic() + self.settings.cancel_timeout
            while not self.tick() and time.monotonic() < end:
                time.sleep(poll_interval)
            self.close()
            raise
        return self.result

    # ---- stages -----------------------------------------------------------------------------
    def _check_backend(self) -> None:
        try:
            welcome = self.probe(self.address)
        except FitError:
            raise
        except Exception as exc:   # client.BackendError: its code says what went wrong
            code = getattr(exc, "code", "")
            if code in HANDSHAKE_CODES:   # not unreachable: no local backend is started
                raise FitError(_capitalised(str(exc).rstrip(".") + "."), code="keys") from None
            raise FitError(backend_error_text(self.address, str(exc), code),
                           code=code if code in (UNREACHABLE, VERSION_MISMATCH) else "backend") from None
        if not self.settings.preset:    # not chosen: what the backend's device can do in minutes
            cpu = str(getattr(welcome, "device", "") or "").startswith("cpu")
            self.settings.preset = "draft" if cpu else "standard"
            if cpu:
                self.result.notes.append(CPU_NOTE)
        methods = [m for m in str(getattr(welcome, "methods", "") or "").split(",") if m]
        if methods and self.settings.method not in methods:
            raise FitError(f"The backend at {self.address} cannot fit '{self.settings.method}' "
                           f"(it offers: {', '.join(methods)}).")

    def _render_next(self) -> None:
        if self._photos is not None:   # photo mode: nothing to render
            self._submit()
            return
        i = len(self._rendered)
        ob, is_eval, frame = self._views[i]
        try:
            self._rendered.append(self._renderer.render(ob, frame, passes=self.plan.passes and not is_eval, index=i))
        except capture.CaptureError as exc:
            self._finish("failed", str(exc))
            return
        n = len(self._views)
        self._update(status=f"Rendered view {i + 1} of {n}", progress=(i + 1) / n)
        if len(self._rendered) == n:
            self._submit()

    def _times(self, evals: int) -> dict:
        """build_submit's times of a capture over time: each view's, and the current frame's instant
        for the eval cameras (rendered at the current frame) and the mesh; {} for a still capture."""
        plan = self.plan
        if not plan.times:
            return {}
        now = capture.current_instant(self.scene, plan.time_range)
        return {"times": plan.times, "eval_times": [now] * evals, "mesh_time": now}

    def _submit(self) -> None:
        s, plan = self.settings, self.plan
        n = len(plan.cameras)
        photos = self._photos
        if photos is not None:
            images, passes = photos["images"], {}
        else:
            images = np.stack([v.rgba for v in self._rendered[:n]])
            passes = {k: np.stack([v.passes[k] for v in self._rendered[:n]]) for k in self._rendered[0].passes}
        if s.eval_reference and plan.eval_cameras and photos is None:
            self.result.eval_reference = np.stack([v.rgba for v in self._rendered[n:]])
        self._rendered = []
        m = len(plan.eval_cameras)
        self.result.images = images
        self.result.renders = [None] * m
        submit = capture.build_submit(
            images, plan.intrinsics, plan.poses, plan.aabb, name=s.name or self.scene.name,
            method=s.method, preset=s.preset or "standard", steps=s.steps, seconds=s.seconds,
            mesh_resolution=s.mesh_resolution, mesh_opacity=s.mesh_opacity, preview_size=s.preview_size,
            preview_interval=s.preview_interval, eval_intrinsics=plan.eval_intrinsics if m else None,
            eval_poses=plan.eval_poses if m else None,
            eval_sizes=np.tile([plan.width, plan.height], (m, 1)) if m else None, passes=passes,
            texture_size=s.texture_size, max_faces=s.max_faces, lens_models=photos["lens_models"] if photos else None,
            distortion=photos["distortion"] if photos else None, image_sizes=photos["image_sizes"] if photos else None,
            background=s.background, camera_refine=s.camera_refine, appearance=s.appearance, encoding=s.encoding,
            material_steps=0 if passes else s.material_steps, **self._times(m))
        self._timing("upload")
        try:
            self.client = self.client_factory(self.address)
            self.client.start(submit)
        except Exception as exc:   # e.g. client.BackendError: bad address, job too large
            self._finish("failed", backend_error_text(self.address, str(exc), getattr(exc, "code", ""),
                                                      prefix="Could not send the job: "))
            return
        self._stage = "running"
        self._update(status=f"Sending {n} views to the backend", progress=0.0)

    def _drain(self) -> None:
        last_preview = None
        for msg in self.client.poll():
            if self.finished or self._stage == "checking":
                break
            if isinstance(msg, protocol.Preview):
                last_preview = msg
            else:
                self._handle(msg)
        if last_preview is not None and not self.finished:
            self._show_preview(last_preview)
        self._show_plot()
        if self.finished or self._stage == "checking":     # the job ended well (Done)
            return
        if self.client.finished:   # ended client-side: dead backend, lost connection, ...
            err = self.client.error or "the connection to the backend ended without a result"
            if self._stage == "cancelling":
                self._finish("cancelled", self._cancelled_text(err))
            else:
                self._finish("failed", backend_error_text(self.address, err, getattr(self.client, "error_code", "")))
        elif self._stage == "cancelling" and time.monotonic() > self._cancel_deadline:
            self._finish("cancelled", self._cancelled_text("the backend did not confirm in time"))

    def _handle(self, msg) -> None:
        r = self.result
        if isinstance(msg, protocol.Accepted):
            r.job_id = msg.job_id
            r.time_range = tuple(self.plan.time_range) if self.plan is not None else ()
            if msg.position > 0:
                self._timing("queued")
                self._update(status=f"Queued: {msg.position} job(s) ahead")
            else:
                self._timing("train")
                self._update(status="Training…")
        elif isinstance(msg, protocol.Progress):
            r.last_progress = msg
            self._timing(msg.stage)
            if msg.note and msg.note not in r.notes:     # said once by the backend (e.g. checkpoints failing)
                r.notes.append(msg.note)
                print(f"Fit Implicit: backend note: {msg.note}")
                self._update(note="; ".join(n for n in r.notes if n != CPU_NOTE))
            if msg.stage == "train":
                self.history.add(msg.step, msg.loss, msg.psnr)
                self._update(status=progress_text(msg), progress=msg.fraction, step=msg.step,
                             loss=msg.loss, psnr=msg.psnr, elapsed=msg.elapsed, eta=msg.eta,
                             total_steps=msg.total_steps)
            else:   # mesh / render / queued carry no training numbers: keep the last ones
                self._update(status=progress_text(msg), progress=msg.fraction)
        elif isinstance(msg, (protocol.MeshResult, protocol.RenderResult, protocol.EnvironmentResult,
                              protocol.CamerasResult, protocol.MaterialResult)) and not self._valid_result(msg):
            return
        elif isinstance(msg, protocol.TextureResult):
            r.textures[msg.kind] = msg.image     # arrives before its MeshResult
        elif isinstance(msg, protocol.MeshResult):
            r.mesh = (msg.vertices, msg.faces, msg.colors)
            if self.settings.import_mesh and len(msg.faces):
                t = time.monotonic()
                r.object = importer.import_mesh(self.scene, msg.vertices, msg.faces, msg.colors,
                                                name=f"{self.settings.name or 'Implicit'} Mesh",
                                                smooth=self.settings.smooth, uvs=msg.uvs, textures=r.textures)
                r.timings["import"] = r.timings.get("import", 0.0) + time.monotonic() - t
            self._update(status=f"Mesh received: {len(msg.vertices)} vertices, {len(msg.faces)} faces")
        elif isinstance(msg, protocol.CamerasResult):         # after the mesh: named after the asset
            from .refined_cameras import add_refined_cameras
            owner = r.object.name if r.object is not None else (self.settings.name or self.scene.name)
            try:
                size = (r.images.shape[2], r.images.shape[1]) if r.images is not None else None
                r.refined_cameras = add_refined_cameras(self.scene, r.camera_names, msg.poses, msg.moved_deg,
                                                        msg.moved, owner, r.intrinsics, size, msg.focal_scale)
                r.camera_moves = (msg.moved_deg, msg.moved)
            except ValueError as exc:     # not the cameras this session sent: say so, keep the rest
                r.notes.append(f"refined cameras not imported: {exc}")
        elif isinstance(msg, protocol.EnvironmentResult):     # after the mesh: named after the asset
            r.environment = msg.image
            owner = r.object.name if r.object is not None else (self.settings.name or self.scene.name)
            r.environment_image = importer.texture_image(f"{owner} Environment", msg.image, "sRGB")
        elif isinstance(msg, protocol.MaterialResult):        # after the mesh: named after the asset
            owner = r.object.name if r.object is not None else (self.settings.name or self.scene.name)
            r.light_image = importer.light_image(f"{owner} Light", msg.light)
            if msg.view_photo >= 0 and r.images is not None and msg.view_photo < len(r.images):
                side = beside(r.images[msg.view_photo], msg.albedo_view)
                r.albedo_check = importer.texture_image(f"{owner} Albedo beside Photo", side, "sRGB")
        elif isinstance(msg, protocol.RenderResult):
            if msg.index >= len(r.renders):
                r.renders.extend([None] * (msg.index + 1 - len(r.renders)))
            r.renders[msg.index] = msg.image
        elif isinstance(msg, protocol.Done):
            r.summary = dict(msg.summary)
            r.timings["total"] = time.monotonic() - self._t0
            if r.object is not None:
                self._label_asset(r.object)
            if self._can_check():
                self._stage = "checking"
                self._timing("check")
                self._update(status="Rendering the imported asset at the held-out views…")
            else:
                self._finish("done", done_text(r, self.settings, self.state.psnr))
        elif isinstance(msg, protocol.Failed):
            self._finish("failed", backend_error_text(self.address, msg.message, msg.code, prefix="The fit failed: ",
                                                      detail=msg.detail))
        elif isinstance(msg, protocol.Cancelled):
            self._finish("cancelled", self._cancelled_text())
        elif isinstance(msg, protocol.Error):
            self._finish("failed", backend_error_text(self.address, msg.message, msg.code,
                                                      prefix="The backend refused the job: "))
        # Welcome, Pong, Ack and unknown types: nothing to do.

    def _label_asset(self, ob) -> None:
        """The imported asset's origin at its source's (the fitted object's origin; the box's
        centre for several objects or photos) and, as custom properties, how it was made."""
        plan, s, r = self.plan, self.settings, self.result
        targets = plan.targets if plan is not None else []
        try:
            targets = [t for t in targets if t.name in self.scene.objects]     # deleted during the fit: gone
        except ReferenceError:
            targets = []
        if len(targets) == 1:
            origin = targets[0].matrix_world.translation
        elif plan is not None:
            origin = np.asarray(plan.aabb, np.float64).mean(0)
        else:
            origin = None
        if origin is not None:
            importer.place_origin(ob, origin)
        summary = r.summary
        importer.tag_asset(ob, {
            "job_id": r.job_id, "method": s.method, "preset": s.preset, "address": self.address,
            "sources": ", ".join(t.name for t in targets) or None,
            "views": len(plan.cameras) if plan is not None else None,
            "steps": summary.get("steps"), "train_seconds": summary.get("seconds"),
            "train_psnr": summary.get("psnr"), "device": summary.get("device"),
            "faces": summary.get("faces"), "textures": summary.get("textures"),
            "environment": r.environment_image.name if r.environment_image is not None else None,   # world.py
            "light": r.light_image.name if r.light_image is not None else None,                     # world.py
            "albedo_check": r.albedo_check.name if r.albedo_check is not None else None,
            "material": summary.get("material"),     # baked | passes | estimated: where the colours come from
            "seconds_total": round(r.timings.get("total", 0.0), 3),
            "settings": json.dumps({k: getattr(s, k) for k in ASSET_SETTINGS}),
            "fitted_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            # a fit over time: the frames that are its instants 0 and 1, and the instant the mesh shows
            **({"time_range": list(plan.time_range), "mesh_time": summary.get("mesh_time")}
               if plan is not None and plan.time_range else {}),
        })

    def _can_check(self) -> bool:
        """The imported asset can be checked: it exists, and every eval camera (still in the
        scene) has Blender's reference render."""
        r, cams = self.result, self.plan.eval_cameras if self.plan is not None else []
        return (self.settings.check_asset and r.object is not None and r.eval_reference is not None
                and len(cams) == len(r.eval_reference) > 0 and all(ob.name in self.scene.objects for ob in cams))

    def _check_next(self) -> None:
        """Render the imported asset at the next eval camera; after the last, score and finish."""
        from . import asset_check

        r, cams = self.result, self.plan.eval_cameras
        i = len(r.asset_renders)
        r.asset_renders.append(asset_check.render_asset_view(
            self.scene, cams[i], r.object, self.plan.targets, os.path.join(self._folder, f"asset_{i:04d}.png")))
        if len(r.asset_renders) < len(cams):
            self._update(status=f"Rendered the imported asset at held-out view {i + 1} of {len(cams)}")
            return
        refs = list(r.eval_reference)
        entries = asset_check.scores(refs, r.renders, r.asset_renders)
        r.summary.update(entries)
        for key, value in entries.items():       # the figures stay with the asset
            if value is not None:
                r.object[f"implicit_{key}"] = value
        asset_check.show_comparison(refs, r.renders, r.asset_renders)
        self._finish("done", done_text(r, self.settings, self.state.psnr))

    def _valid_result(self, msg) -> bool:
        """Check a result again before it touches the scene (NaN vertices, out-of-range faces,
        mismatched sizes); a bad one fails the fit and nothing of it is imported."""
        try:
            msg.validate()
            return True
        except protocol.ProtocolError as exc:
            self._finish("failed", f"The backend sent a malformed result ({exc}); nothing of it was imported.")
            return False

    def _show_preview(self, msg) -> None:
        self.result.previews += 1
        self.result.last_preview = msg.image
        if self.settings.preview_image:
            image = importer.update_preview_image(msg.image)
            if self.settings.show_preview and self.result.previews == 1:
                show_in_image_editor(image)

    def _show_plot(self, force: bool = False) -> None:
        """Redraw the loss/PSNR plot (at most twice a second; always at the end)."""
        h = self.history
        now = time.monotonic()
        if h.version == self._plot_version or (not force and now - self._plot_time < 0.5):
            return
        self._plot_version, self._plot_time = h.version, now
        from . import plot
        update_plot_image(plot.draw_plot(*h.arrays()))

    def _finish(self, status: str, message: str) -> None:
        if self.finished:
            return
        self._stage = "finished"
        self._timing(None)
        try:
            self._show_plot(force=True)
        except Exception:   # the plot is a nicety: never let it hide the result
            traceback.print_exc()
        r = self.result
        if self.state.note and status in ("done", "failed"):      # what the backend said along the way
            message = f"{message} (Backend: {self.state.note})"
        r.status, r.message = status, message
        r.timings["total"] = time.monotonic() - self._t0
        if status == "done" and r.job_id and getattr(self.scene, "implicit", None) is not None:
            from . import results    # the fit joins this file's Results list
            results.record(self.scene, r.job_id, r.object.name if r.object is not None else (self.settings.name or
                           self.scene.name), self.settings.method, self.settings.preset, r.summary.get("psnr"),
                           asset=r.object, environment=r.environment_image, time_range=r.time_range,
                           light=r.light_image, material=r.summary.get("material", ""), albedo_check=r.albedo_check)
        self._rendered = []
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                traceback.print_exc()
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        running.remove(self.scene, self)
        self._update(status=message, running=False, progress=1.0 if status == "done" else self.state.progress)
        if r.object is not None:
            push_undo_step("Fit Implicit import")

    # ---- helpers ----------------------------------------------------------------------------
    def _cancelled_text(self, detail: str = "") -> str:
        details = [d for d in (self._cancel_reason, detail) if d]
        return f"Cancelled ({'; '.join(details)})." if details else "Cancelled."

    def _timing(self, stage: str | None) -> None:
        now = time.monotonic()
        if stage == self._timing_stage:
            return
        if self._timing_stage is not None:
            t = self.result.timings
            t[self._timing_stage] = t.get(self._timing_stage, 0.0) + now - self._timing_t0
        self._timing_stage, self._timing_t0 = stage, now

    def _update(self, **values) -> None:
        for k, v in values.items():
            setattr(self.state, k, v)
        props = getattr(self.scene, "implicit", None)
        if props is not None:
            for f in fields(PanelState):
                value = getattr(self.state, f.name)
                try:
                    if getattr(props, f.name) != value:
                        setattr(props, f.name, value)
                except (AttributeError, TypeError, ValueError):
                    pass
        if self.on_change is not None:
            self.on_change(self)


# --------------------------------------------------------------------------------------------
# Photo cameras, live preview and plot images
# --------------------------------------------------------------------------------------------
PLOT_IMAGE = "Fit Implicit Plot"


def push_undo_step(message: str) -> bool:
    """Make what a fit added to the scene (the imported mesh, its origin, materials and tags) one
    step of Blender's undo history, so that Ctrl+Z takes it away.  The Fit operator cannot carry
    the UNDO option (it is modal and the scene changes long after it starts), so the session
    pushes the step itself once the import is complete.  Skipped where there is no window or the
    push is not allowed (Blender started with --background); True when a step was pushed."""
    if getattr(bpy.context, "window", None) is None or not bpy.ops.ed.undo_push.poll():
        return False
    try:
        bpy.ops.ed.undo_push(message=message)
    except RuntimeError:
        return False
    return True


def photo_image_problem(camera_object) -> str | None:
    """For a camera imported from a photo dataset (it has the ``implicit_image`` property), a
    sentence saying why its photo is missing; None when it has one (or is not a photo camera)."""
    data = camera_object.data
    if data is None or "implicit_image" not in data:
        return None
    for bg in data.background_images:
        img = bg.image
        if img is None:
            continue
        if img.packed_file is not None or img.source == "GENERATED":
            return None
        path = bpy.path.abspath(img.filepath, library=img.library)
        if img.source in ("FILE", "SEQUENCE") and os.path.isfile(path):
            return None
        return (f"Camera '{camera_object.name}' has no image: its background image file {path} was not found. "
                "Re-import the dataset, or set the camera's background image (Camera properties > Background Images).")
    return (f"Camera '{camera_object.name}' has no image: it came from a photo dataset "
            f"({data['implicit_image']}) but has no background image. Re-import the dataset, or add the photo "
            "as the camera's background image (Camera properties > Background Images).")


def beside(photo: np.ndarray, view: np.ndarray, grey: float = 0.5) -> np.ndarray:
    """(h, 2 w, 3) uint8: the photo (h', w', 4) uint8, scaled down by the whole factor that gives
    the view's size, and the view (h, w, 4) uint8 side by side, both over mid grey (straight alpha)."""
    f = max(1, round(photo.shape[1] / view.shape[1]))
    small = photo[::f, ::f][:view.shape[0], :view.shape[1]]
    canvas = np.zeros(view.shape[:2] + (4,), np.uint8)
    canvas[:small.shape[0], :small.shape[1]] = small
    out = []
    for image in (canvas, view):
        rgba = image.astype(np.float32) / 255.0
        out.append(rgba[..., :3] * rgba[..., 3:] + grey * (1.0 - rgba[..., 3:]))
    return (np.concatenate(out, axis=1) * 255.0 + 0.5).astype(np.uint8)


def show_in_image_editor(image) -> bool:
    """Show ``image`` in an Image Editor: an open one, else a new window (no windows: nothing).
    Returns True if it is shown somewhere."""
    wm = bpy.context.window_manager
    windows = list(getattr(wm, "windows", ()))
    for window in windows:
        for area in (window.screen.areas if window.screen else ()):
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = image
                area.tag_redraw()
                return True
    if bpy.app.background or not windows:
        return False
    try:   # a new window, like Blender's own "Render: New Window"
        with bpy.context.temp_override(window=windows[0]):
            bpy.ops.wm.window_new()
        area = wm.windows[-1].screen.areas[0]
        area.type = "IMAGE_EDITOR"
        area.spaces.active.image = image
        return True
    except (RuntimeError, AttributeError, IndexError):
        traceback.print_exc()
        return False


def update_plot_image(rgba: np.ndarray):
    """Write the plot into the Image "Fit Implicit Plot" and into its preview icon (the panel draws
    the icon; the image opens full size in an Image Editor)."""
    image = importer.image_from_rgba(PLOT_IMAGE, rgba)
    preview = image.preview_ensure()
    if preview is not None:
        h, w = rgba.shape[:2]
        preview.image_size = (w, h)
        preview.image_pixels_float.foreach_set(
            np.ascontiguousarray(rgba[::-1], dtype=np.float32).ravel() / np.float32(255.0))
    return image


# --------------------------------------------------------------------------------------------
# Texts for the user
# --------------------------------------------------------------------------------------------
# The codes the texts below depend on: client.BackendError.code and the code of the Failed the
# client makes up ("unreachable", "version_mismatch"), Failed.code of the backend ("out_of_memory").
UNREACHABLE, VERSION_MISMATCH, OUT_OF_MEMORY = "unreachable", "version_mismatch", "out_of_memory"
START_HINT = "Start the backend with:  fit-implicit serve --bind {address}"
OUT_OF_MEMORY_ADVICE = ("The GPU ran out of memory: lower the preset (e.g. Draft), render fewer or smaller views, "
                        "or use Free GPU Memory if another job left memory behind.")


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def backend_error_text(address: str, error: str, code: str = "", prefix: str = "", detail: str = "") -> str:
    """The user's sentence for a failure of the backend or of the connection to it, by its
    ``code`` alone: a version mismatch as the client words it (with what to install), an
    unreachable backend with how to start one, a GPU out of memory with what to change (its
    ``detail``, Failed.detail, instead of the backend's own advice); else ``prefix`` + the text."""
    if code == OUT_OF_MEMORY:
        error = detail or error
    text = (error or "no reason given").strip()
    if not text.endswith((".", "?", "!")):
        text += "."
    if code == VERSION_MISMATCH:
        return _capitalised(text)
    if code == UNREACHABLE:
        return _capitalised(text) + " " + START_HINT.format(address=address)
    if code == OUT_OF_MEMORY:
        text += " " + OUT_OF_MEMORY_ADVICE
    return prefix + text if prefix else _capitalised(text)


def progress_text(p) -> str:
    if p.stage == "train":
        total = f"/{p.total_steps}" if p.total_steps else ""
        eta = f", {p.eta:.0f} s left" if p.eta > 0 else ""
        return f"Training step {p.step}{total}: loss {p.loss:.4f}, PSNR {p.psnr:.2f} dB{eta}"
    return {"mesh": "Extracting the mesh…", "render": "Rendering evaluation views…",
            "texture": "Baking textures…", "refine": "Refining the mesh against the views…",
            "environment": "Rendering the background as an environment image…",
            "queued": "Queued…"}.get(p.stage, f"{p.stage.capitalize()}…")


def done_text(r: FitResult, s: FitSettings, psnr: float = 0.0) -> str:
    text = f"Fit finished in {r.timings.get('total', 0.0):.1f} s"
    psnr = r.summary.get("psnr", psnr)
    if isinstance(psnr, (int, float)) and not isinstance(psnr, bool) and psnr > 0:
        text += f" (PSNR {psnr:.2f} dB)"
    background = (f" Its background is the image '{r.environment_image.name}' (Results > Use Background as World)."
                  if r.environment_image is not None else "")
    if r.refined_cameras is not None and r.camera_moves is not None:
        from .refined_cameras import moved_text
        background += " " + moved_text(*r.camera_moves, r.refined_cameras)
    if r.object is not None:
        from .asset_check import check_text
        check = check_text(r.summary)
        return text + f": imported '{r.object.name}'." + (f" {check}" if check else "") + background
    if r.mesh is not None and not len(r.mesh[1]):
        return text + (", but the mesh is empty: nothing dense enough was found. "
                       "Train longer, or check that the cameras see the object.") + background
    if r.mesh is not None:
        return text + f": mesh of {len(r.mesh[0])} vertices (not imported)." + background
    return text + (", but no mesh came back." if s.import_mesh else ".") + background


# --------------------------------------------------------------------------------------------
# Script entry point
# --------------------------------------------------------------------------------------------
def fit_scene(scene_or_context=None, address: str | None = None, *, view_layer=None,
              timeout: float | None = None, client_factory=None, probe=True,
              **settings) -> FitResult:
    """Fit the scene and import the mesh, blocking until the job ends.

    Args:
        scene_or_context: a Scene or a Context (default ``bpy.context``).
        address: the backend address; None: the scene override, else the add-on preferences,
            else tcp://127.0.0.1:5599.
        timeout: seconds after which the job is cancelled; None: no limit.
        **settings: FitSettings fields (preset, seconds, steps, mesh_resolution, cameras,
            eval_cameras, ring_count, preview_size, ...).
    Returns:
        FitResult with status 'done'.
    Raises:
        FitError (``.result`` holds what came back) if the fit could not start, failed or
        was cancelled.
    """
    ctx = bpy.context if scene_or_context is None else scene_or_context
    if isinstance(ctx, bpy.types.Scene):
        scene = ctx
    else:
        scene, view_layer = ctx.scene, view_layer or ctx.view_layer
    if address is None:
        from .preferences import backend_address
        address = backend_address(bpy.context, scene)
    try:
        cfg = FitSettings(**settings)
    except TypeError as exc:
        raise FitError(f"Unknown fit setting: {exc}") from None
    session = FitSession(scene, address, cfg, view_layer=view_layer, client_factory=client_factory,
                         probe=probe)
    session.begin()
    try:
        result = session.run(timeout=timeout)
    finally:
        session.close()
    if result.status != "done":
        raise FitError(result.message, result)
    return result
