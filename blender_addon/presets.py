"""Fit settings presets through Blender's preset system.

A preset is a small Python file in the user's ``scripts/presets/fit_implicit/`` that sets the
``scene.implicit`` values listed in PRESET_SETTINGS.  The menu lists those files (choosing one
runs it through Blender's ``script.execute_preset``); the operator writes one, or deletes the
chosen one (``remove_active``) or a named one (``remove_name``), as Blender's own presets do.
"""
import bpy
from bl_operators.presets import AddPresetBase

PRESET_SUBDIR = "fit_implicit"

#: The scene.implicit settings a preset holds: how to fit, not where (no backend address, camera
#: source or collection: those belong to one machine or one scene).
PRESET_SETTINGS = (
    "method", "preset", "seconds", "ring_count", "preview_size", "show_preview",
    "mesh_resolution", "mesh_opacity", "texture_size", "max_faces", "smooth_shading",
    "render_passes", "resume_renders", "rig_views", "rig_shape", "rig_holdout", "background", "camera_refine",
    "appearance", "encoding", "material_steps",
)


class IMPLICIT_MT_fit_presets(bpy.types.Menu):
    bl_idname = "IMPLICIT_MT_fit_presets"
    bl_label = "Fit Presets"
    preset_subdir = PRESET_SUBDIR
    preset_operator = "script.execute_preset"
    preset_add_operator = "implicit.fit_preset_add"     # a remove button beside each preset
    draw = bpy.types.Menu.draw_preset


class IMPLICIT_OT_fit_preset_add(AddPresetBase, bpy.types.Operator):
    """Save the fit settings as a preset, or remove a preset"""

    bl_idname = "implicit.fit_preset_add"
    bl_label = "Add Fit Preset"
    preset_menu = IMPLICIT_MT_fit_presets.bl_idname
    preset_subdir = PRESET_SUBDIR
    preset_defines = ["implicit = bpy.context.scene.implicit"]
    preset_values = [f"implicit.{name}" for name in PRESET_SETTINGS]


CLASSES = (IMPLICIT_MT_fit_presets, IMPLICIT_OT_fit_preset_add)
