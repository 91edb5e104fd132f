"""The "Implicit" tab of the 3D View sidebar.  Drawing only."""
import bpy

from . import running
from .preferences import backend_address


class VIEW3D_PT_implicit(bpy.types.Panel):
    bl_label = "Fit Implicit"
    bl_idname = "VIEW3D_PT_implicit"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Implicit"

    def draw(self, context):
        layout = self.layout
        props = context.scene.implicit
        busy = running.active_session(context.scene) is not None

        col = layout.column()
        col.enabled = not busy
        col.prop(props, "address", text="Address")
        if not props.address.strip():
            col.label(text=f"Using {backend_address(context, None)}", icon="URL")
        col.prop(props, "preset")
        col.prop(props, "seconds")
        col.prop(props, "ring_cameras")
        col.prop(props, "mesh_resolution")
        col.prop(props, "smooth_shading")

        box = layout.box()
        box.enabled = not busy
        box.label(text="Cameras & Datasets", icon="OUTLINER_OB_CAMERA")
        row = box.row(align=True)
        row.prop(props, "rig_views", text="Views")
        row.prop(props, "rig_shape", text="")
        box.prop(props, "rig_holdout")
        op = box.operator("implicit.add_camera_rig", icon="CAMERA_DATA")
        op.count, op.shape, op.holdout = props.rig_views, props.rig_shape, props.rig_holdout
        row = box.row(align=True)
        row.operator("implicit.import_transforms", text="Import", icon="IMPORT")
        row.operator("implicit.export_dataset", text="Export", icon="EXPORT")

        if busy:
            layout.operator("implicit.cancel", icon="CANCEL")
        else:
            layout.operator("implicit.fit", icon="PLAY")

        if busy or props.status:
            box = layout.box()
            box.progress(text=props.status or "…", factor=props.progress, type="BAR")
            if props.step:
                row = box.row()
                row.label(text=f"Step {props.step}")
                row.label(text=f"PSNR {props.psnr:.2f}")
                row = box.row()
                row.label(text=f"Loss {props.loss:.4f}")
                row.label(text=f"{props.elapsed:.0f} s")


CLASSES = (VIEW3D_PT_implicit,)
