"""The "Implicit" tab of the 3D View sidebar.  Drawing only: every value shown is already there
(scene properties written by the running fit, the status monitor's last snapshot)."""
import textwrap

import bpy

from . import running
from .preferences import backend_address
from .presets import IMPLICIT_MT_fit_presets, IMPLICIT_OT_fit_preset_add

STATUS_ICONS = {"idle": "CHECKMARK", "busy": "SORTTIME", "connecting": "URL",
                "not running": "CANCEL", "version mismatch": "ERROR", "refused": "LOCKED",
                "needs keys": "UNLOCKED", "handshake failed": "LOCKED"}
KEYS_UNUSABLE = "CurveZMQ keys not usable (see the add-on preferences)"
#: The Results entry's line saying where its asset's colours come from (Done's "material")
MATERIAL_TEXT = {"passes": "Material: from Blender's passes (no light baked in)",
                 "estimated": "Material: estimated from the photos, with the light (relightable)",
                 "baked": "Material: baked, the photos' lighting stays in the colours",
                 "points": "Material: the points' own colours"}


def _clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def backend_snapshot(address: str, context=None):
    """(the status monitor's snapshot, "") with the preferences' CurveZMQ keys, or (None, why
    those keys are not usable)."""
    from . import status
    from .client import BackendError
    from .preferences import KeyProblem, connection_kwargs
    try:
        return status.monitor(address, **connection_kwargs(context or bpy.context)).snapshot(), ""
    except (KeyProblem, BackendError) as exc:
        return None, str(exc)


def backend_line(address: str, context=None) -> tuple[str, str]:
    """(text, icon) of the status line; never waits (reads the monitor's snapshot)."""
    from . import backend_process, status
    snap, _ = backend_snapshot(address, context)
    if snap is None:
        return KEYS_UNUSABLE, "ERROR"
    proc = backend_process.get(address)
    if proc is not None and proc.running and snap.state in (status.NOT_RUNNING, status.CONNECTING):
        return "Backend starting (connecting…)", "URL"
    return snap.line, STATUS_ICONS.get(snap.state, "QUESTION")


class _SidebarPanel:
    """Where every panel of the add-on lives: the "Implicit" tab of the 3D View's sidebar."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Implicit"


class VIEW3D_PT_implicit(_SidebarPanel, bpy.types.Panel):
    """The backend's status, Fit / Cancel and the running fit's progress; the settings are in
    the sub-panels below."""

    bl_label = "Fit Implicit"
    bl_idname = "VIEW3D_PT_implicit"

    def draw(self, context):
        layout = self.layout
        props = context.scene.implicit
        busy = running.active_session(context.scene) is not None
        address = backend_address(context, None)

        text, icon = backend_line(address, context)
        layout.label(text=text, icon=icon)
        snap, problem = backend_snapshot(address, context)
        from . import status
        if snap is not None and not busy:
            from .operators import start_early
            start_early(context, address, snap.state)
        why = problem or (snap.detail if snap is not None and snap.state in status.KEY_STATES else "")
        for line in textwrap.wrap(why[:1].upper() + why[1:], 60):
            layout.label(text=line)

        if busy:
            layout.operator("implicit.cancel", icon="CANCEL")
        else:
            layout.operator("implicit.fit", icon="PLAY")

        if busy or props.status:
            draw_progress(layout.box(), props)


class VIEW3D_PT_implicit_capture(_SidebarPanel, bpy.types.Panel):
    """Which cameras the fit renders, the render passes, and datasets in and out."""

    bl_label = "Capture"
    bl_idname = "VIEW3D_PT_implicit_capture"
    bl_parent_id = VIEW3D_PT_implicit.bl_idname

    def draw(self, context):
        layout = self.layout
        props = context.scene.implicit
        layout.enabled = running.active_session(context.scene) is None

        box = layout.box()
        box.label(text="Cameras & Datasets", icon="OUTLINER_OB_CAMERA")
        row = box.row(align=True)
        row.prop(props, "rig_views", text="Views")
        row.prop(props, "rig_shape", text="")
        box.prop(props, "rig_holdout")
        op = box.operator("implicit.add_camera_rig", icon="CAMERA_DATA")
        op.count, op.shape, op.holdout = props.rig_views, props.rig_shape, props.rig_holdout
        box.prop(props, "capture_source", text="Source")
        if props.capture_source == "COLLECTION":
            box.prop(props, "capture_collection", text="")
        elif props.capture_source == "ANIMATION":
            box.prop(props, "capture_camera", text="")
        box.prop(props, "over_time")
        if props.capture_source == "ANIMATION" or props.over_time != "STILL":
            sc = context.scene
            box.label(text=f"Frames {sc.frame_start}-{sc.frame_end}, step {sc.frame_step}", icon="TIME")
        row = box.row(align=True)
        row.operator("implicit.import_transforms", text="Import", icon="IMPORT")
        row.operator("implicit.export_dataset", text="Export", icon="EXPORT")
        row = box.row(align=True)
        row.operator("implicit.import_colmap", text="COLMAP", icon="IMPORT")
        row.operator("implicit.import_capture", text="LLFF / NeuS", icon="IMPORT")
        row = box.row(align=True)
        row.operator("implicit.render_back", text="Render with Field", icon="RENDER_STILL").animation = False
        row.operator("implicit.render_back", text="Animation", icon="RENDER_ANIMATION").animation = True
        row = box.row(align=True)      # the fitted field beside the .blend (saved_fields.py)
        row.operator("implicit.save_field", text="Save Field", icon="FILE_TICK")
        row.operator("implicit.restore_field", text="Give Field Back", icon="FILE_REFRESH")

        col = layout.column(heading="Photos", align=True)
        col.prop(props, "background")
        col.prop(props, "camera_refine")
        col.prop(props, "appearance")
        col.prop(props, "material_steps")
        layout.prop(props, "render_passes", text="Passes")
        from .capture import lighting_note
        note = lighting_note(context.scene, props)
        if note:
            layout.label(text=note, icon="INFO")
        row = layout.row(align=True)
        row.prop(props, "resume_renders", icon="FILE_REFRESH")
        row.operator("implicit.clear_cache", icon="TRASH")


class VIEW3D_PT_implicit_field(_SidebarPanel, bpy.types.Panel):
    """What is fitted, for how long, and the live previews; the presets of all fit settings."""

    bl_label = "Field"
    bl_idname = "VIEW3D_PT_implicit_field"
    bl_parent_id = VIEW3D_PT_implicit.bl_idname

    def draw(self, context):
        layout = self.layout
        props = context.scene.implicit
        layout.enabled = running.active_session(context.scene) is None

        row = layout.row(align=True)        # Blender's usual preset row: menu, add, remove
        row.menu(IMPLICIT_MT_fit_presets.bl_idname, text=IMPLICIT_MT_fit_presets.bl_label)
        row.operator(IMPLICIT_OT_fit_preset_add.bl_idname, text="", icon="ADD")
        row.operator(IMPLICIT_OT_fit_preset_add.bl_idname, text="", icon="REMOVE").remove_active = True

        col = layout.column()
        col.prop(props, "method")
        col.prop(props, "preset")
        col.prop(props, "encoding")
        col.prop(props, "seconds")
        col.prop(props, "ring_count")
        row = col.row(align=True)
        row.prop(props, "preview_size")
        row.prop(props, "show_preview", text="", icon="IMAGE_DATA")


class VIEW3D_PT_implicit_mesh(_SidebarPanel, bpy.types.Panel):
    """The mesh and textures the fit brings back."""

    bl_label = "Mesh & Textures"
    bl_idname = "VIEW3D_PT_implicit_mesh"
    bl_parent_id = VIEW3D_PT_implicit.bl_idname
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        props = context.scene.implicit
        layout.enabled = running.active_session(context.scene) is None

        col = layout.column()
        col.prop(props, "mesh_resolution")
        if props.method == "nerf":      # surface fields mesh their own zero level
            col.prop(props, "mesh_opacity")     # 0: Auto (see its description)
        col.prop(props, "max_faces")            # 0: Auto (see its description)
        col.prop(props, "texture_size")
        col.prop(props, "smooth_shading")


class VIEW3D_PT_implicit_points(_SidebarPanel, bpy.types.Panel):
    """Fit SDF to Points: a scan, a point cloud or a broken mesh -> a clean, closed mesh on top of it."""

    bl_label = "Points & Scans"
    bl_idname = "VIEW3D_PT_implicit_points"
    bl_parent_id = VIEW3D_PT_implicit.bl_idname
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        props = context.scene.implicit
        col = layout.column()
        col.prop(props, "points_detail", slider=True, text="Fill Holes / Keep Detail")
        col.prop(props, "points_voxel_size")
        col.prop(props, "preset")
        col.prop(props, "encoding")
        layout.operator("implicit.fit_points", icon="OUTLINER_OB_POINTCLOUD")


class VIEW3D_PT_implicit_backend(_SidebarPanel, bpy.types.Panel):
    """Where the backend is, and the local one's controls."""

    bl_label = "Backend"
    bl_idname = "VIEW3D_PT_implicit_backend"
    bl_parent_id = VIEW3D_PT_implicit.bl_idname
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        props = context.scene.implicit
        address = backend_address(context, None)

        col = layout.column()
        col.enabled = running.active_session(context.scene) is None
        col.prop(props, "address", text="Address")
        if not props.address.strip():
            col.label(text=f"Using {address}", icon="URL")
        row = layout.row(align=True)
        row.operator("implicit.backend_start", text="Start", icon="PLAY")
        row.operator("implicit.backend_stop", text="Stop", icon="PAUSE")
        row.operator("implicit.free_memory", text="Free GPU", icon="TRASH")
        row.operator("implicit.backend_log", text="", icon="TEXT")


class VIEW3D_PT_implicit_results(_SidebarPanel, bpy.types.Panel):
    """The fits of this file (blender_addon/results.py) and what can be done with one later."""

    bl_label = "Results"
    bl_idname = "VIEW3D_PT_implicit_results"
    bl_parent_id = VIEW3D_PT_implicit.bl_idname
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        from .results import selected
        layout = self.layout
        props = context.scene.implicit
        layout.template_list("IMPLICIT_UL_results", "", props, "results", props, "results_index", rows=3)
        entry = selected(context.scene)
        col = layout.column(align=True)
        col.enabled = entry is not None and running.active_session(context.scene) is None
        row = col.row(align=True)
        row.operator("implicit.result_render", text="Render This", icon="RENDER_STILL")
        row.operator("implicit.result_remesh", text="Re-mesh", icon="MOD_REMESH")
        entry = props.results[props.results_index] if 0 <= props.results_index < len(props.results) else None
        if entry is not None and entry.time_last > entry.time_first:      # a fit over time
            row = col.row(align=True)
            row.operator("implicit.result_mesh_over_time", text="Mesh a Frame", icon="RENDER_ANIMATION").kind = "SEQUENCE"
            row.operator("implicit.result_mesh_over_time", text="One Moving Mesh", icon="SHAPEKEY_DATA").kind = "SHAPE_KEYS"
        row = col.row(align=True)
        op = row.operator("implicit.save_field", text="Save Field", icon="FILE_TICK")
        op.fit_job = entry.job_id if entry is not None else ""
        row.operator("implicit.result_forget", text="Forget", icon="X")
        col.operator("implicit.use_environment", icon="WORLD")     # greyed out, saying why, without a background
        row = col.row(align=True)
        row.operator("implicit.use_light", icon="LIGHT_SUN")        # greyed out, saying why, without one
        row.operator("implicit.show_albedo", text="Albedo", icon="IMAGE_REFERENCE")
        col.operator("implicit.light_from_file", icon="FILE_IMAGE")  # a light estimated with the materials (CLI)
        if entry is not None:
            layout.label(text=f"{entry.created}  job {entry.job_id}", icon="TIME")
            if entry.field_folder:
                layout.label(text=f"Saved: {entry.field_folder}", icon="FILE_FOLDER")
            if entry.environment is not None:
                layout.label(text=f"Background: {entry.environment.name}", icon="IMAGE_DATA")
            if entry.material:
                layout.label(text=MATERIAL_TEXT.get(entry.material, entry.material), icon="MATERIAL")


def draw_progress(box, props):
    box.progress(text=props.status or "…", factor=props.progress, type="BAR")
    if not props.step:
        return
    plot = bpy.data.images.get("Fit Implicit Plot")
    if plot is not None and plot.preview is not None:
        box.template_icon(icon_value=plot.preview.icon_id, scale=6.0)
    row = box.row()
    total = f" / {props.total_steps}" if props.total_steps else ""
    row.label(text=f"Step {props.step}{total}")
    row.label(text=f"Loss {props.loss:.4f}", icon="KEYTYPE_KEYFRAME_VEC")    # orange curve
    row = box.row()
    row.label(text=f"Elapsed {_clock(props.elapsed)}", icon="TIME")
    row.label(text=f"PSNR {props.psnr:.2f} dB", icon="KEYTYPE_BREAKDOWN_VEC")  # blue curve
    if props.running and props.eta > 0:
        box.label(text=f"About {_clock(props.eta)} left", icon="PREVIEW_RANGE")
    for i, line in enumerate(textwrap.wrap(props.note, 60)[:4]):
        box.label(text=line, icon="INFO" if i == 0 else "BLANK1")


# Parent first; Blender shows the sub-panels in this order.
CLASSES = (VIEW3D_PT_implicit, VIEW3D_PT_implicit_capture, VIEW3D_PT_implicit_field,
           VIEW3D_PT_implicit_mesh, VIEW3D_PT_implicit_points, VIEW3D_PT_implicit_results, VIEW3D_PT_implicit_backend)


# --------------------------------------------------------------------------------------------
# Redraw the panel when the backend's status changes (the monitor runs in its own thread)
# --------------------------------------------------------------------------------------------
_seen = {"version": -1}


def _redraw_on_status_change():
    from . import status
    version = status.versions()
    if version != _seen["version"]:
        _seen["version"] = version
        wm = bpy.context.window_manager
        for window in getattr(wm, "windows", ()):
            for area in (window.screen.areas if window.screen else ()):
                if area.type in {"VIEW_3D", "PREFERENCES"}:
                    area.tag_redraw()
    return 0.5


def register_timers():
    if not bpy.app.timers.is_registered(_redraw_on_status_change):
        bpy.app.timers.register(_redraw_on_status_change, first_interval=0.5, persistent=True)


def unregister_timers():
    from . import status
    if bpy.app.timers.is_registered(_redraw_on_status_change):
        bpy.app.timers.unregister(_redraw_on_status_change)
    status.close_all()
