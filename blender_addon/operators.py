"""Operators: Fit (modal with a timer from the UI, blocking from scripts) and Cancel.

Both paths drive the same FitSession (fit_session.py); this module only turns its outcome
into reports.  Heavy modules (numpy, the client, capture) are imported on first use.
"""
import bpy

from . import running
from .preferences import backend_address

TIMER_INTERVAL = 0.1


def _session_module():
    from . import fit_session
    return fit_session


def _settings_from_scene(scene):
    fs = _session_module()
    p = scene.implicit
    return fs.FitSettings(preset=p.preset, seconds=p.seconds, ring_count=p.ring_cameras,
                          mesh_resolution=p.mesh_resolution, smooth=p.smooth_shading)


def _redraw(context):
    wm = getattr(context, "window_manager", None)
    for window in getattr(wm, "windows", ()):
        if window.screen is None:
            continue
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "IMAGE_EDITOR", "PROPERTIES"}:
                area.tag_redraw()


def _report_result(op, result) -> set:
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
        return session

    # ---- blocking path: scripts, background mode ---------------------------------------------
    def execute(self, context):
        fs = _session_module()
        try:
            session = self._new_session(context)
        except fs.FitError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        try:
            result = session.run(timeout=self.timeout or None)
        finally:
            session.close()
        return _report_result(self, result)

    # ---- interactive path: a timer drives the same session --------------------------------------
    def invoke(self, context, event):
        fs = _session_module()
        try:
            # bpy.context, not `context`: the invoke context must not be kept past invoke().
            self._session = self._new_session(context, on_change=lambda s: _redraw(bpy.context))
        except fs.FitError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        wm = context.window_manager
        self._timer = wm.event_timer_add(TIMER_INTERVAL, window=context.window)
        wm.modal_handler_add(self)
        self.report({"INFO"}, "Fit Implicit started (Esc cancels)")
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
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
                                            progress=lambda i, n: wm.progress_update(i / max(n, 1)))
        except (capture.CaptureError, dataset_io.DatasetError, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        finally:
            wm.progress_end()
        self.report({"INFO"}, f"Exported {out['train']} training and {out['test']} held-out views to {folder}")
        return {"FINISHED"}


class IMPLICIT_OT_import_transforms(bpy.types.Operator):
    """Import a transforms.json (instant-ngp / nerfstudio / NeRF) as cameras with background images"""

    bl_idname = "implicit.import_transforms"
    bl_label = "Import transforms.json"
    bl_options = {"REGISTER", "UNDO"}

    filepath: bpy.props.StringProperty(name="File", subtype="FILE_PATH", options={"SKIP_SAVE"})
    filter_glob: bpy.props.StringProperty(default="*.json", options={"HIDDEN"})
    backgrounds: bpy.props.BoolProperty(name="Background Images", default=True)
    set_resolution: bpy.props.BoolProperty(
        name="Set Resolution", default=True,
        description="Set the scene's resolution and pixel aspect from the dataset (needed for exact intrinsics)")

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        from . import dataset_io
        if not self.filepath:
            self.report({"ERROR"}, "Choose a transforms.json file")
            return {"CANCELLED"}
        try:
            created, warnings = dataset_io.import_transforms(
                context.scene, bpy.path.abspath(self.filepath), backgrounds=self.backgrounds,
                set_resolution=self.set_resolution)
        except (dataset_io.DatasetError, OSError, ValueError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for text in warnings[:5]:
            self.report({"WARNING"}, text)
        self.report({"INFO"}, f"Imported {len(created)} cameras")
        return {"FINISHED"}
