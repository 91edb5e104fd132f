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
