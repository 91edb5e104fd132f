"""Renders back: novel views of a fitted field from a Blender camera, or along its animation.

A :class:`RenderBackSession` sends one RenderJob (the cameras of the chosen frames) to the
backend, which renders the model the fit job saved; each RenderResult is written as a PNG
(``<folder>/<prefix><frame:04d>.png``, sRGB RGBA) as it arrives and the views are loaded into
one Image datablock (a SEQUENCE for an animation, shown frame by frame in the Image Editor).

Like FitSession, one code path serves the modal operator (a timer calls :meth:`tick`) and
scripts / background mode (:meth:`run` blocks).  bpy is touched on the main thread only; the
ZeroMQ conversation runs in the client's thread.  No torch here.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import numpy as np

from . import capture, modal, ownership
from ._shared import protocol

IMAGE_NAME = "Fit Implicit Render"
SCENE_JOB_KEY = "implicit_fit_job"      # the last finished fit's job id (set by the Fit operator)
TIME_RANGE_KEY = "implicit_time_range"  # ... and, a fit over time, its first and last frames (instants 0, 1)


class RenderBackError(Exception):
    """Renders back cannot start or failed; the text tells the user why."""


def camera_views(scene, camera_object, frames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The camera at each scene frame: intrinsics (M, 4) float64, poses (M, 4, 4) float64 rigid
    camera-to-world, sizes (M, 2) int32 (width, height).  The current frame is restored."""
    if camera_object is None or camera_object.type != "CAMERA":
        raise RenderBackError("Select a camera (or set the scene camera) to render the field from.")
    capture.check_perspective([camera_object])
    width, height = capture.render_size(scene)
    if width < 1 or height < 1:
        raise RenderBackError(f"The render size {width} x {height} is empty: check the output resolution.")
    current = scene.frame_current
    ks, poses = [], []
    try:
        for frame in frames:
            scene.frame_set(int(frame))
            ks.append(capture.camera_intrinsics(camera_object, scene))
            poses.append(capture.camera_pose(camera_object))
    finally:
        scene.frame_set(current)
    return np.stack(ks), np.stack(poses), np.full((len(ks), 2), (width, height), np.int32)


def write_png(path: str, rgba: np.ndarray) -> None:
    """(H, W, 4) uint8 sRGB RGBA, top row first -> an 8-bit RGBA PNG, through Blender."""
    h, w = rgba.shape[:2]
    img = bpy.data.images.new("_implicit_png", w, h, alpha=True)
    try:
        img.pixels.foreach_set((rgba[::-1].astype(np.float32) / 255.0).ravel())
        img.filepath_raw = path
        img.file_format = "PNG"
        img.save()
    finally:
        bpy.data.images.remove(img)


@dataclass
class RenderBackResult:
    status: str = "running"                   # running | done | failed | cancelled
    message: str = ""
    job_id: str | None = None
    files: list = field(default_factory=list)     # written PNG paths, in frame order
    frames: list = field(default_factory=list)    # scene frame of each view
    image: object = None                           # the bpy Image (SEQUENCE for several frames)


class RenderBackSession:
    """Render ``frames`` of ``camera_object`` with the field of fit job ``fit_job_id``.

    Args:
        folder: where the PNGs go (created).  prefix: file name start (default: the camera's name).
        client_factory: ``address -> JobClient``-like object (tests may pass their own).
        connection: CurveZMQ keys of the default client (preferences.connection_kwargs); None:
            the add-on preferences' (read at begin()).
    """

    def __init__(self, scene, camera_object, fit_job_id: str, address: str, folder: str, *, frames=None,
                 prefix: str | None = None, client_factory=None, connection: dict | None = None,
                 time_range: tuple | None = None):
        self.scene, self.camera, self.address = scene, camera_object, address
        self.fit_job_id = (fit_job_id or "").strip()
        self.folder = Path(folder)
        self.frames = [int(f) for f in (frames if frames is not None else [scene.frame_current])]
        self.prefix = prefix if prefix is not None else f"{bpy.path.clean_name(camera_object.name)}_"
        self.time_range = tuple(time_range) if time_range else None     # a fit over time: (first, last) frame
        self.connection = connection
        self.client_factory = client_factory or (
            lambda a: _render_client(a, token=ownership.scene_token(scene), **self.connection))
        self.result = RenderBackResult(frames=list(self.frames))
        self.client = None
        self._received: dict[int, str] = {}

    @property
    def finished(self) -> bool:
        return self.result.status != "running"

    def begin(self) -> None:
        """Check the inputs and send the job.  Raises RenderBackError with a message for the user."""
        if not self.fit_job_id:
            raise RenderBackError("No fitted field to render: run Fit Implicit first (or give its job id).")
        if self.connection is None:
            from .preferences import KeyProblem, connection_kwargs
            try:
                self.connection = connection_kwargs(bpy.context)
            except KeyProblem as exc:
                raise RenderBackError(f"The CurveZMQ keys are not usable: {exc}.") from None
        if not self.frames:
            raise RenderBackError("No frames to render: check the scene's frame range.")
        if len(self.frames) > protocol.MAX_EVAL_CAMERAS:
            raise RenderBackError(f"{len(self.frames)} frames are more than the {protocol.MAX_EVAL_CAMERAS} "
                                  "one job can render: shorten the frame range.")
        k, poses, sizes = camera_views(self.scene, self.camera, self.frames)
        job = protocol.RenderJob(fit_job_id=self.fit_job_id, intrinsics=k, poses=poses, sizes=sizes,
                                 name=self.camera.name[:protocol.MAX_NAME])
        if self.time_range:     # each frame at its instant of the fit (clamped to the fitted range)
            first, last = self.time_range
            job.times = np.clip((np.asarray(self.frames, np.float64) - first) / max(last - first, 1), 0.0, 1.0)
        try:
            job.validate()
        except protocol.ProtocolError as exc:
            raise RenderBackError(f"Cannot render these views: {exc}") from None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RenderBackError(f"Cannot write renders to {self.folder}: {exc.strerror or exc}") from None
        try:
            self.client = self.client_factory(self.address)
            self.client.start(job)
        except Exception as exc:   # BackendError: bad address, invalid job
            self.client = None
            raise RenderBackError(f"Could not send the render job to {self.address}: {exc}") from None

    def tick(self) -> bool:
        """Handle what the backend sent; True once the job ended (then ``result`` is final)."""
        if self.finished or self.client is None:
            return True
        for msg in self.client.poll():
            self._handle(msg)
        return self.finished

    def run(self, timeout: float | None = None, poll_interval: float = 0.05) -> RenderBackResult:
        """Blocking path (scripts, background mode): tick until the job ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.tick():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                self._finish("cancelled", f"Renders back took longer than {timeout:g} s and were cancelled.")
                break
            time.sleep(poll_interval)
        return self.result

    def cancel(self) -> None:
        if self.client is not None:
            self.client.cancel()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # ---- messages -----------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        r = self.result
        if isinstance(msg, protocol.Accepted):
            r.job_id = msg.job_id
        elif isinstance(msg, protocol.RenderResult):
            if 0 <= msg.index < len(self.frames) and msg.image.shape[2] == 4:
                path = str(self.folder / f"{self.prefix}{self.frames[msg.index]:04d}.png")
                write_png(path, np.asarray(msg.image))
                self._received[msg.index] = path
        elif isinstance(msg, protocol.Done):
            missing = [self.frames[i] for i in range(len(self.frames)) if i not in self._received]
            if missing:
                self._finish("failed", f"The backend sent no render for frame(s) {missing[:10]}.")
            else:
                self._finish("done", f"Rendered {len(self.frames)} view(s) of the field to {self.folder}")
        elif isinstance(msg, protocol.Failed):
            self._finish("failed", f"Renders back failed: {msg.message}")
        elif isinstance(msg, protocol.Cancelled):
            self._finish("cancelled", "Renders back were cancelled.")

    def _finish(self, status: str, message: str) -> None:
        if self.finished:
            return
        r = self.result
        r.files = [self._received[i] for i in sorted(self._received)]
        if r.files:
            r.image = load_image(r.files, len(self.frames) > 1, self.frames[0])
        r.status, r.message = status, message
        self.close()


def load_image(files: list[str], sequence: bool, first_frame: int):
    """The PNGs as the Image datablock IMAGE_NAME (an image SEQUENCE when ``sequence``), reloaded
    if it exists.  Byte PNGs are sRGB."""
    old = bpy.data.images.get(IMAGE_NAME)
    if old is not None:
        bpy.data.images.remove(old)
    img = bpy.data.images.load(files[0], check_existing=False)
    img.name = IMAGE_NAME
    img.colorspace_settings.name = "sRGB"
    if sequence:
        img.source = "SEQUENCE"
    img["implicit_frames"] = first_frame
    return img


def _render_client(address: str, **keys):
    from .client import JobClient

    class RenderClient(JobClient):
        """JobClient for a RenderJob (JobClient.start sizes a Submit's images; a RenderJob has none)."""

        def start(self, job) -> None:
            if self._thread is not None:
                raise RuntimeError("this client has already started a job; make a new one")
            job.validate()
            self._launch(job)

    return RenderClient(address, **keys)


def default_folder(scene) -> str:
    """``<blend folder or temp>/fit_implicit_renders``."""
    base = bpy.path.abspath("//") if bpy.data.filepath else os.path.join(bpy.app.tempdir or "/tmp", "")
    return os.path.join(base, "fit_implicit_renders")


# --------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------
class IMPLICIT_OT_render_back(bpy.types.Operator):
    """Render the selected camera's view (or its animation) with the fitted field, as PNG images
    loaded into the "Fit Implicit Render" image"""

    bl_idname = "implicit.render_back"
    bl_label = "Render with Field"
    bl_options = {"REGISTER"}

    animation: bpy.props.BoolProperty(name="Animation", default=False,
                                      description="Render every frame of the scene's frame range")
    directory: bpy.props.StringProperty(name="Folder", subtype="DIR_PATH", default="", options={"SKIP_SAVE"},
                                        description="Where the PNGs go; empty: fit_implicit_renders next to the .blend")
    fit_job: bpy.props.StringProperty(name="Fit Job", default="", options={"SKIP_SAVE"},
                                      description="Job id of the fit to render; empty: the last finished fit")
    address: bpy.props.StringProperty(name="Address", default="", options={"SKIP_SAVE"},
                                      description="Backend address; empty: the scene's or the preferences'")
    timeout: bpy.props.FloatProperty(name="Timeout", default=0.0, min=0.0, options={"SKIP_SAVE"},
                                     description="Blocking mode only: cancel after this many seconds (0: never)")

    _session = None
    _timer = None

    @classmethod
    def poll(cls, context):
        return context.scene is not None

    def _new_session(self, context) -> RenderBackSession:
        from .preferences import backend_address

        scene = context.scene
        ob = context.active_object if getattr(context, "active_object", None) is not None \
            and context.active_object.type == "CAMERA" else scene.camera
        frames = range(scene.frame_start, scene.frame_end + 1, max(1, scene.frame_step)) if self.animation \
            else [scene.frame_current]
        folder = bpy.path.abspath(self.directory) if self.directory else default_folder(scene)
        session = RenderBackSession(scene, ob, self.fit_job or str(scene.get(SCENE_JOB_KEY, "")),
                                    self.address.strip() or backend_address(context, scene), folder,
                                    frames=list(frames),
                                    time_range=None if self.fit_job else scene.get(TIME_RANGE_KEY))
        session.begin()
        return session

    def _report(self, result) -> set:
        if result.status == "done":
            self.report({"INFO"}, result.message)
            return {"FINISHED"}
        self.report({"WARNING"} if result.status == "cancelled" else {"ERROR"}, result.message)
        return {"CANCELLED"}

    def execute(self, context):
        try:
            session = self._new_session(context)
        except (RenderBackError, capture.CaptureError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        try:
            result = session.run(timeout=self.timeout or None)
        finally:
            session.close()
        return self._report(result)

    def invoke(self, context, event):
        try:
            self._session = self._new_session(context)
        except (RenderBackError, capture.CaptureError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return modal.start(self, context, "Rendering with the field (Esc cancels)")

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS":
            self._session.cancel()
            return {"RUNNING_MODAL"}
        if event.type != "TIMER" or not self._session.tick():
            return {"PASS_THROUGH"}
        modal.stop(self, context)
        r = self._session.result
        _show_in_image_editor(context, r.image, len(r.files), r.frames[0] if r.frames else 1)
        return self._report(self._session.result)

    def cancel(self, context):
        modal.stop(self, context)


def _show_in_image_editor(context, image, count: int, first_frame: int) -> None:
    """Show the renders in an open Image Editor, if there is one (nothing to do headless); a
    sequence plays along the scene's frames."""
    if image is None:
        return
    for window in getattr(context.window_manager, "windows", ()):
        for area in window.screen.areas if window.screen else ():
            if area.type == "IMAGE_EDITOR":
                space = area.spaces.active
                space.image = image
                if image.source == "SEQUENCE":
                    space.image_user.frame_duration = count
                    space.image_user.frame_start = first_frame
                    space.image_user.use_auto_refresh = True
                area.tag_redraw()
                return


CLASSES = (IMPLICIT_OT_render_back,)
