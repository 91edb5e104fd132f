"""Operators: Fit (modal with a timer from the UI, blocking from scripts), Cancel, the camera
rig and datasets, and the local backend (start, stop, free GPU memory, open its log).

Both Fit paths drive the same FitSession (fit_session.py); this module only turns its outcome
into reports.  Heavy modules (numpy, the client, capture) are imported on first use.
"""
import time

import bpy

from . import running
from .preferences import (KEY_CLASSES, KeyProblem, backend_address, backend_device, backend_python,
                          backend_sources, connection_kwargs, log_path, prefs)

TIMER_INTERVAL = 0.1


def _session_module():
    from . import fit_session
    return fit_session


def face_limit(max_faces: int) -> int:
    """The Max Faces setting as the Submit takes it: 0 (the backend's default) or at least
    protocol.MIN_FACES; the smaller limits the panel lets through are raised to that."""
    from ._shared import protocol
    return 0 if max_faces <= 0 else max(max_faces, protocol.MIN_FACES)


def _settings_from_scene(scene):
    fs = _session_module()
    p = scene.implicit
    from .capture import fit_settings_from_props
    # A quality never chosen is the backend's to pick (draft on a CPU: FitSession._check_backend).
    preset = p.preset if p.is_property_set("preset") else ""
    return fs.FitSettings(method=p.method, preset=preset, seconds=p.seconds, ring_count=p.ring_count,
                          mesh_resolution=p.mesh_resolution, mesh_opacity=p.mesh_opacity,
                          texture_size=int(p.texture_size), max_faces=face_limit(p.max_faces),
                          smooth=p.smooth_shading, preview_size=p.preview_size, show_preview=p.show_preview,
                          **fit_settings_from_props(p))


def backend_monitor(context, address: str):
    """The status monitor of ``address`` with the preferences' CurveZMQ keys, or None when those
    keys are not usable (preferences.connection_kwargs says why)."""
    from . import status
    from .client import BackendError
    try:
        return status.monitor(address, **connection_kwargs(context))
    except (KeyProblem, BackendError):
        return None


def _answers(context, address: str) -> bool:
    """True when a backend is known to answer at ``address`` (idle or busy)."""
    from . import status
    mon = backend_monitor(context, address)
    return mon is not None and mon.snapshot().state in (status.IDLE, status.BUSY)


def start_local_backend(context, address: str):
    """Start (or find) the backend child process for ``address``; raises BackendProcessError."""
    from . import backend_process
    p = prefs(context)
    proc = backend_process.start(backend_python(p), address, device=backend_device(p),
                                 log_path=log_path(address), source_dirs=backend_sources(p))
    mon = backend_monitor(context, address)
    if mon is not None:
        mon.refresh()
    return proc


_STARTED_EARLY: set[str] = set()     # addresses start_early() has started (or tried) in this Blender session


def start_early(context, address: str, state: str) -> None:
    """Start the local backend when the Implicit tab is shown (the main panel calls this as it
    draws), so that its start-up, about 5 s from launch to a first preview on a GPU
    (docs/benchmarks.md "Start-up"), overlaps the artist choosing cameras and settings instead of
    following the click on Fit.  Only where Fit would start one itself (preferences present, Start
    Automatically and Start When Shown on, a 127.0.0.1 address, ``state`` the status monitor's
    "not running"), and once an address per Blender session: Stop Backend stays stopped, and a
    backend that cannot start is reported by Fit, not retried on every redraw."""
    from . import backend_process, status
    if state != status.NOT_RUNNING or address in _STARTED_EARLY or backend_process.get(address) is not None:
        return
    p = prefs(context)
    if p is None or not p.auto_start or not p.start_when_shown:
        return
    _STARTED_EARLY.add(address)
    try:
        backend_process.local_bind(address)
        start_local_backend(context, address)
    except backend_process.BackendProcessError:
        pass      # Fit tries again and says why (auto_start_failed_text)


def auto_start_failed_text(unreachable, error) -> str:
    """No backend answered, and starting one failed: both, and what to set."""
    text = str(error)
    hint = (" Set Backend Python (a Python with torch and pyzmq) and Backend Folder (the folder that holds "
            "backend/) in the add-on preferences.") if "No module named" in text or "not found" in text else ""
    return f"{_capitalised(str(unreachable))} Starting a local backend failed: {text}.{hint}"


def _auto_start_applies(context, address: str, exc) -> bool:
    from . import backend_process
    p = prefs(context)
    if getattr(exc, "code", "") != "unreachable" or p is None or not p.auto_start:
        return False
    try:
        backend_process.local_bind(address)
    except backend_process.BackendProcessError:
        return False
    return True


def _redraw(context):
    wm = getattr(context, "window_manager", None)
    for window in getattr(wm, "windows", ()):
        if window.screen is None:
            continue
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "IMAGE_EDITOR", "PROPERTIES"}:
                area.tag_redraw()


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _report_result(op, result) -> set:
    if result.status == "done" and getattr(result, "job_id", None) and bpy.context.scene is not None:
        from .render_back import TIME_RANGE_KEY

        scene = bpy.context.scene
        scene["implicit_fit_job"] = result.job_id   # "Render with Field" renders this fit
        if getattr(result, "time_range", ()):        # ... at the instants of its frames (a fit over time)
            scene[TIME_RANGE_KEY] = list(result.time_range)
        elif TIME_RANGE_KEY in scene:
            del scene[TIME_RANGE_KEY]
    if result.status == "done":
        op.report({"INFO"} if result.object is not None else {"WARNING"}, result.message)
        return {"FINISHED"}
    if result.status == "cancelled":
        op.report({"WARNING"}, result.message)
    else:
        op.report({"ERROR"}, result.message)
    return {"CANCELLED"}


class IMPLICIT_OT_fit(bpy.types.Operator):
    """Render the scene's views, fit a neural field on the backend and import the mesh"""

    bl_idname = "implicit.fit"
    bl_label = "Fit Implicit"
    bl_options = {"REGISTER"}

    address: bpy.props.StringProperty(
        name="Address", description="Backend address; empty: the scene's or the preferences'",
        default="", options={"SKIP_SAVE"})
    timeout: bpy.props.FloatProperty(
        name="Timeout", description="Blocking mode only: cancel after this many seconds (0: never)",
        default=0.0, min=0.0, options={"SKIP_SAVE"})

    _session = None
    _timer = None
    _starting = None          # a backend started automatically, until it listens
    _start_deadline = 0.0

    @classmethod
    def poll(cls, context):
        if context.scene is None:
            return False
        if running.active_session(context.scene) is not None:
            cls.poll_message_set("A fit is already running in this scene")
            return False
        return True

    def _new_session(self, context, on_change=None):
        fs = _session_module()
        scene = context.scene
        address = self.address.strip() or backend_address(context, scene)
        session = fs.FitSession(scene, address, _settings_from_scene(scene),
                                view_layer=context.view_layer, on_change=on_change)
        session.begin()   # raises FitError with a message for the user
        for note in session.result.notes:
            self.report({"INFO"}, note)
        return session

    # ---- blocking path: scripts, background mode ---------------------------------------------
    def execute(self, context):
        from .backend_process import BackendProcessError
        fs = _session_module()
        try:
            try:
                session = self._new_session(context)
            except fs.FitError as exc:
                address = self.address.strip() or backend_address(context, context.scene)
                if not _auto_start_applies(context, address, exc):
                    raise
                try:
                    start_local_backend(context, address).wait_ready(timeout=120)
                except BackendProcessError as err:
                    raise fs.FitError(auto_start_failed_text(exc, err)) from None
                context.view_layer.update()   # the ring cameras of the first try were removed
                session = self._new_session(context)
        except (fs.FitError, BackendProcessError) as exc:
            self.report({"ERROR"}, _capitalised(str(exc)))
            return {"CANCELLED"}
        try:
            result = session.run(timeout=self.timeout or None)
        finally:
            session.close()
        return _report_result(self, result)

    # ---- interactive path: a timer drives the same session --------------------------------------
    def invoke(self, context, event):
        from .backend_process import BackendProcessError
        fs = _session_module()
        self._starting = None
        try:
            # bpy.context, not `context`: the invoke context must not be kept past invoke().
            self._session = self._new_session(context, on_change=lambda s: _redraw(bpy.context))
        except fs.FitError as exc:
            address = self.address.strip() or backend_address(context, context.scene)
            if not _auto_start_applies(context, address, exc):
                self.report({"ERROR"}, _capitalised(str(exc)))
                return {"CANCELLED"}
            self._unreachable = exc
            try:   # the timer waits for it to listen: the UI stays responsive meanwhile
                self._starting = start_local_backend(context, address)
            except BackendProcessError as err:
                self.report({"ERROR"}, auto_start_failed_text(exc, err))
                return {"CANCELLED"}
            self._start_deadline = time.monotonic() + 120.0
            context.scene.implicit.status = "Starting the backend…"
        wm = context.window_manager
        self._timer = wm.event_timer_add(TIMER_INTERVAL, window=context.window)
        wm.modal_handler_add(self)
        self.report({"INFO"}, "Starting the backend, then Fit Implicit (Esc cancels)" if self._starting
                    else "Fit Implicit started (Esc cancels)")
        return {"RUNNING_MODAL"}

    def _wait_for_backend(self, context) -> set | None:
        """Modal step while an automatically started backend comes up; a set ends the operator."""
        from .backend_process import BackendProcessError
        fs = _session_module()
        try:
            if not self._starting.ready():
                if time.monotonic() < self._start_deadline:
                    return None
                raise BackendProcessError(f"the backend did not start listening within 120 s; see its log: "
                                          f"{self._starting.log_path}")
            self._starting = None
            context.view_layer.update()   # the ring cameras of the first try were removed
            self._session = self._new_session(context, on_change=lambda s: _redraw(bpy.context))
            return None
        except (BackendProcessError, fs.FitError) as exc:
            text = auto_start_failed_text(self._unreachable, exc) if isinstance(exc, BackendProcessError) \
                else _capitalised(str(exc))
            context.window_manager.event_timer_remove(self._timer)
            context.scene.implicit.status = text
            self.report({"ERROR"}, text)
            return {"CANCELLED"}

    def modal(self, context, event):
        if getattr(self, "_starting", None) is not None:
            if event.type == "ESC" and event.value == "PRESS":
                context.window_manager.event_timer_remove(self._timer)
                context.scene.implicit.status = "Cancelled."
                return {"CANCELLED"}
            if event.type != "TIMER":
                return {"PASS_THROUGH"}
            ended = self._wait_for_backend(context)
            return ended if ended is not None else {"PASS_THROUGH"}
        session = self._session
        if event.type == "ESC" and event.value == "PRESS":
            session.cancel()
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        if not session.tick():      # one render, or one drain of the backend's messages
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        session.close()
        _redraw(context)
        return _report_result(self, session.result)

    def cancel(self, context):
        # Blender ends the operator (file load, quit): stop the job and clean up.
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
        if self._session is not None:
            self._session.close()


class IMPLICIT_OT_fit_points(bpy.types.Operator):
    """Fit a signed distance field to the active object's points or surface and import a clean, closed mesh with
    its transform"""

    bl_idname = "implicit.fit_points"
    bl_label = "Fit SDF to Points"
    bl_options = {"REGISTER", "UNDO"}

    address: bpy.props.StringProperty(name="Address", default="", options={"SKIP_SAVE"},
                                      description="Backend address; empty: the scene's or the preferences'")
    timeout: bpy.props.FloatProperty(name="Timeout", default=0.0, min=0.0, options={"SKIP_SAVE"},
                                     description="Blocking mode only: give up after this many seconds (0: never)")

    _fit = None
    _timer = None

    @staticmethod
    def _module():
        from . import points_fit     # numpy and the client load on first use
        return points_fit

    @classmethod
    def poll(cls, context):
        ob = context.active_object
        if ob is None or ob.type not in ("MESH", "POINTCLOUD"):
            cls.poll_message_set("Select a mesh or point-cloud object")
            return False
        return True

    def _new_fit(self, context):
        """The PointsFit, after starting a local backend when none answers and the preferences'
        Auto Start allows it (as Fit Implicit does; here the wait blocks, up to 120 s); None after
        reporting why it cannot run."""
        from .backend_process import BackendProcessError
        from .client import BackendError

        pf = self._module()
        address = self.address.strip() or backend_address(context)
        try:
            try:
                return pf.PointsFit(context, context.active_object, address)
            except BackendError as exc:
                if not _auto_start_applies(context, address, exc):
                    raise
                try:
                    start_local_backend(context, address).wait_ready(timeout=120)
                except BackendProcessError as err:
                    raise BackendError(auto_start_failed_text(exc, err), exc.code) from None
                return pf.PointsFit(context, context.active_object, address)
        except (pf.PointsFitError, BackendError, KeyProblem) as exc:
            self.report({"ERROR"}, _capitalised(str(exc)))
            return None

    def _end(self, fit) -> set:
        if fit.error:
            self.report({"ERROR"}, f"Fit SDF to Points: {fit.error}")
            return {"CANCELLED"}
        self.report({"INFO"}, fit.status)
        return {"FINISHED"}

    def execute(self, context):
        fit = self._new_fit(context)
        if fit is None:
            return {"CANCELLED"}
        fit.run(self.timeout or None)
        return self._end(fit)

    def invoke(self, context, event):
        self._fit = self._new_fit(context)
        if self._fit is None:
            return {"CANCELLED"}
        self._fit.start()
        self._timer = context.window_manager.event_timer_add(0.2, window=context.window)
        context.window_manager.modal_handler_add(self)
        context.workspace.status_text_set(self._fit.status)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        if event.type == "ESC":
            self._fit.cancel()
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        done = self._fit.tick()
        context.workspace.status_text_set(None if done else self._fit.status)
        if not done:
            return {"RUNNING_MODAL"}
        context.window_manager.event_timer_remove(self._timer)
        return self._end(self._fit)


class IMPLICIT_OT_cancel(bpy.types.Operator):
    """Cancel the running fit"""

    bl_idname = "implicit.cancel"
    bl_label = "Cancel Fit"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return running.active_session(context.scene) is not None

    def execute(self, context):
        session = running.active_session(context.scene)
        if session is None:
            self.report({"WARNING"}, "No fit is running")
            return {"CANCELLED"}
        session.cancel()
        self.report({"INFO"}, "Cancelling the fit…")
        return {"FINISHED"}


# --------------------------------------------------------------------------------------------
# Camera rig, datasets in and out
# --------------------------------------------------------------------------------------------
RIG_SHAPES = (
    ("HEMISPHERE", "Hemisphere", "Views from above the object's centre only"),
    ("SPHERE", "Sphere", "Views from every side, below included"),
)


class IMPLICIT_OT_add_camera_rig(bpy.types.Operator):
    """Add cameras evenly spread around the selection, all looking at its centre"""

    bl_idname = "implicit.add_camera_rig"
    bl_label = "Add Camera Rig"
    bl_options = {"REGISTER", "UNDO"}

    count: bpy.props.IntProperty(name="Views", default=24, min=1, max=1000)
    shape: bpy.props.EnumProperty(name="Shape", items=RIG_SHAPES, default="HEMISPHERE")
    holdout: bpy.props.FloatProperty(
        name="Held Out", description="Share of the views held out for evaluation (never trained on)",
        default=0.1, min=0.0, max=0.9, subtype="FACTOR")
    replace: bpy.props.BoolProperty(name="Replace Rig", description="Delete the cameras of earlier rigs",
                                    default=True)

    @classmethod
    def poll(cls, context):
        return context.scene is not None and context.view_layer is not None

    def execute(self, context):
        from . import capture, rig
        try:
            created = rig.add_camera_rig(context.scene, context.view_layer, count=self.count,
                                         hemisphere=self.shape == "HEMISPHERE",
                                         holdout_share=self.holdout, replace=self.replace)
        except capture.CaptureError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        held = sum(1 for ob in created if capture.is_holdout(ob))
        self.report({"INFO"}, f"Added {len(created)} cameras ({held} held out)")
        return {"FINISHED"}


class IMPLICIT_OT_export_dataset(bpy.types.Operator):
    """Render the scene's cameras and write them as a transforms.json dataset
    (instant-ngp / nerfstudio / NeRF-synthetic layout)"""

    bl_idname = "implicit.export_dataset"
    bl_label = "Export Dataset"
    bl_options = {"REGISTER"}

    directory: bpy.props.StringProperty(name="Folder", subtype="DIR_PATH", options={"SKIP_SAVE"})
    render: bpy.props.BoolProperty(name="Render Images", default=True,
                                   description="Render every camera; off: write the cameras only")

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        from . import capture, dataset_io
        if not self.directory:
            self.report({"ERROR"}, "Choose a folder to export the dataset to")
            return {"CANCELLED"}
        folder = bpy.path.abspath(self.directory)
        wm = context.window_manager
        wm.progress_begin(0, 1)
        try:
            out = dataset_io.export_dataset(context.scene, context.view_layer, folder, render=self.render,
                                            progress=lambda i, n: wm.progress_update(i / max(n, 1)),
                                            over_time=context.scene.implicit.over_time)
        except (capture.CaptureError, dataset_io.DatasetError, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        finally:
            wm.progress_end()
        self.report({"INFO"}, f"Exported {out['train']} training and {out['test']} held-out views to {folder}")
        return {"FINISHED"}


def _import_cameras(op, chosen: str, missing: str, load) -> set[str]:
    """The body of a dataset import operator: ``missing`` when nothing is ``chosen``, else
    ``load()`` -> (cameras, warnings) (dataset_io.import_transforms / import_colmap) and a report
    of its first warnings and the number of cameras it created, or of why it failed."""
    from . import dataset_io
    if not chosen:
        op.report({"ERROR"}, missing)
        return {"CANCELLED"}
    try:
        created, warnings = load()
    except (dataset_io.DatasetError, OSError, ValueError) as exc:
        op.report({"ERROR"}, str(exc))
        return {"CANCELLED"}
    for text in warnings[:5]:
        op.report({"WARNING"}, text)
    op.report({"INFO"}, f"Imported {len(created)} cameras")
    return {"FINISHED"}


class _CameraImport:
    """What the two dataset imports share: their options and the file browser (a mix-in: Blender
    registers the annotations of a mix-in with the operator)."""

    bl_options = {"REGISTER", "UNDO"}

    backgrounds: bpy.props.BoolProperty(name="Background Images", default=True)
    set_resolution: bpy.props.BoolProperty(
        name="Set Resolution", default=True,
        description="Set the scene's resolution and pixel aspect from the dataset (needed for exact intrinsics)")

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}


class IMPLICIT_OT_import_transforms(_CameraImport, bpy.types.Operator):
    """Import a transforms.json (instant-ngp / nerfstudio / NeRF) as cameras with background images"""

    bl_idname = "implicit.import_transforms"
    bl_label = "Import transforms.json"

    filepath: bpy.props.StringProperty(name="File", subtype="FILE_PATH", options={"SKIP_SAVE"})
    filter_glob: bpy.props.StringProperty(default="*.json", options={"HIDDEN"})

    def execute(self, context):
        from . import dataset_io
        return _import_cameras(
            self, self.filepath, "Choose a transforms.json file",
            lambda: dataset_io.import_transforms(context.scene, bpy.path.abspath(self.filepath),
                                                 backgrounds=self.backgrounds, set_resolution=self.set_resolution))


class IMPLICIT_OT_import_colmap(_CameraImport, bpy.types.Operator):
    """Import a COLMAP model (cameras and images, text or binary) as cameras with background images"""

    bl_idname = "implicit.import_colmap"
    bl_label = "Import COLMAP Model"

    directory: bpy.props.StringProperty(
        name="Model Folder", subtype="DIR_PATH", options={"SKIP_SAVE"},
        description="Folder with cameras and images .txt or .bin (or a project folder with sparse/0)")
    image_dir: bpy.props.StringProperty(
        name="Images", subtype="DIR_PATH", options={"SKIP_SAVE"},
        description="Folder of the photos; empty: images/ next to the model")
    points: bpy.props.BoolProperty(
        name="Sparse Points", default=True,
        description="Import the model's points3D as a point cloud object (colours and reprojection error)")

    def execute(self, context):
        from . import dataset_io
        return _import_cameras(
            self, self.directory, "Choose the folder of a COLMAP model (cameras and images, .txt or .bin)",
            lambda: dataset_io.import_colmap(
                context.scene, bpy.path.abspath(self.directory),
                image_dir=bpy.path.abspath(self.image_dir) if self.image_dir else None,
                backgrounds=self.backgrounds, set_resolution=self.set_resolution, points=self.points))


class IMPLICIT_OT_import_capture(_CameraImport, bpy.types.Operator):
    """Import an LLFF capture (poses_bounds.npy with images_N) or an IDR/NeuS one (cameras_sphere.npz
    with images and masks) as cameras with background images"""

    bl_idname = "implicit.import_capture"
    bl_label = "Import LLFF / NeuS Capture"

    directory: bpy.props.StringProperty(
        name="Capture Folder", subtype="DIR_PATH", options={"SKIP_SAVE"},
        description="Folder with poses_bounds.npy or cameras_sphere.npz (or one of its images_N folders)")

    def execute(self, context):
        from . import dataset_io
        return _import_cameras(
            self, self.directory, "Choose the folder of an LLFF or IDR/NeuS capture",
            lambda: dataset_io.import_capture(context.scene, bpy.path.abspath(self.directory),
                                              backgrounds=self.backgrounds, set_resolution=self.set_resolution))


# --------------------------------------------------------------------------------------------
# The backend: start, stop, free GPU memory, log
# --------------------------------------------------------------------------------------------
LOG_TEXT = "Fit Implicit Backend Log"


class IMPLICIT_OT_backend_start(bpy.types.Operator):
    """Start a backend on this machine (fit-implicit serve) at the backend address"""

    bl_idname = "implicit.backend_start"
    bl_label = "Start Backend"
    bl_options = {"REGISTER"}

    wait: bpy.props.BoolProperty(name="Wait", description="Block until the backend listens (scripts)",
                                 default=False, options={"SKIP_SAVE"})

    def execute(self, context):
        from . import backend_process
        address = backend_address(context, context.scene)
        if _answers(context, address) and backend_process.get(address) is None:
            self.report({"INFO"}, f"A backend is already running at {address}")
            return {"FINISHED"}
        try:
            proc = start_local_backend(context, address)
            if self.wait:
                proc.wait_ready(timeout=120)
        except backend_process.BackendProcessError as exc:
            self.report({"ERROR"}, _capitalised(str(exc)))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Backend {'running' if self.wait else 'starting'} at {address} (log: {proc.log_path})")
        return {"FINISHED"}


class IMPLICIT_OT_backend_stop(bpy.types.Operator):
    """Stop the backend started from Blender (its running job is cancelled)"""

    bl_idname = "implicit.backend_stop"
    bl_label = "Stop Backend"
    bl_options = {"REGISTER"}

    wait: bpy.props.BoolProperty(name="Wait", description="Block until it exited (scripts)", default=False,
                                 options={"SKIP_SAVE"})

    def execute(self, context):
        import threading
        from . import backend_process
        address = backend_address(context, context.scene)
        proc = backend_process.get(address)
        if proc is None or not proc.running:
            backend_process.stop(address)   # forget one that already exited
            if _answers(context, address):
                self.report({"WARNING"}, f"The backend at {address} was not started from Blender: "
                                         "stop it where it runs")
            else:
                self.report({"WARNING"}, f"No backend started from Blender is running at {address}")
            return {"CANCELLED"}
        if self.wait:
            code = backend_process.stop(address)
            self.report({"INFO"}, f"Backend stopped (exit code {code})")
        else:   # it may take a few seconds to stop its job: not on the UI thread
            threading.Thread(target=backend_process.stop, args=(address,), daemon=True).start()
            self.report({"INFO"}, "Stopping the backend…")
        mon = backend_monitor(context, address)
        if mon is not None:
            mon.refresh()
        return {"FINISHED"}


# The operators below open alike (bl_idname, bl_label, bl_options, execute): Blender's boilerplate.
class IMPLICIT_OT_free_memory(bpy.types.Operator):
    """Ask the backend to release the GPU memory it keeps cached between jobs"""

    bl_idname = "implicit.free_memory"
    bl_label = "Free GPU Memory"
    bl_options = {"REGISTER"}

    def execute(self, context):
        from . import status
        from ._shared import protocol
        fs = _session_module()
        from .client import BackendError
        address = backend_address(context, context.scene)
        try:
            keys = connection_kwargs(context)
        except KeyProblem as exc:
            self.report({"ERROR"}, f"The CurveZMQ keys are not usable: {exc}")
            return {"CANCELLED"}
        snap = status.monitor(address, **keys).snapshot()
        if snap.state in status.KEY_STATES:
            self.report({"ERROR"}, _capitalised(snap.detail))
            return {"CANCELLED"}
        if snap.state == status.NOT_RUNNING:
            self.report({"ERROR"}, fs.backend_error_text(address, f"no backend answered at {address} — is it running?",
                                                         fs.UNREACHABLE))
            return {"CANCELLED"}
        try:
            reply = status.request(address, protocol.FreeMemory(), timeout=3.0, **keys)
        except (protocol.WireError, BackendError) as exc:   # their code says what went wrong
            self.report({"ERROR"}, fs.backend_error_text(address, str(exc), getattr(exc, "code", "")))
            return {"CANCELLED"}
        if isinstance(reply, protocol.Ack):
            self.report({"INFO"}, "The backend released its cached GPU memory")
            return {"FINISHED"}
        text = getattr(reply, "message", "") or f"unexpected reply {reply.TYPE!r}"
        self.report({"WARNING"}, f"GPU memory was not freed: {text}")
        return {"CANCELLED"}


class IMPLICIT_OT_backend_log(bpy.types.Operator):
    """Open the log of the backend started from Blender in a Text Editor"""

    bl_idname = "implicit.backend_log"
    bl_label = "Backend Log"
    bl_options = {"REGISTER"}

    def execute(self, context):
        import os
        address = backend_address(context, context.scene)
        path = log_path(address)
        if not os.path.isfile(path):
            self.report({"WARNING"}, f"No backend was started from Blender for {address} yet (no log at {path})")
            return {"CANCELLED"}
        text = bpy.data.texts.get(LOG_TEXT) or bpy.data.texts.new(LOG_TEXT)
        with open(path, encoding="utf-8", errors="replace") as f:
            text.from_string(f.read()[-200_000:])
        for window in getattr(context.window_manager, "windows", ()):
            for area in (window.screen.areas if window.screen else ()):
                if area.type == "TEXT_EDITOR":
                    area.spaces.active.text = text
                    break
        self.report({"INFO"}, f"Backend log loaded into the text '{LOG_TEXT}' ({path})")
        return {"FINISHED"}


BACKEND_CLASSES = (IMPLICIT_OT_backend_start, IMPLICIT_OT_backend_stop, IMPLICIT_OT_free_memory,
                   IMPLICIT_OT_backend_log, *KEY_CLASSES)
