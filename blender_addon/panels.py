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
