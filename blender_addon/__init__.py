"""Fit Implicit: fit a neural field to the scene's rendered views and import the mesh back.

Registration only; numpy, the ZeroMQ client and the capture code load on first use.
Scripts can call :func:`blender_addon.fit_session.fit_scene` (installed: ``bl_ext.<repo>.fit_implicit``).
"""
import bpy

from . import operators, panels, preferences, presets, properties, render_back, render_cache, results, saved_fields, world

classes = (
    preferences.ImplicitPreferences,
    *results.CLASSES,             # its PropertyGroup before the scene settings that hold a list of it
    properties.ImplicitSceneSettings,
    operators.IMPLICIT_OT_fit,
    operators.IMPLICIT_OT_fit_points,
    operators.IMPLICIT_OT_cancel,
    operators.IMPLICIT_OT_add_camera_rig,
    operators.IMPLICIT_OT_export_dataset,
    operators.IMPLICIT_OT_import_transforms,
    operators.IMPLICIT_OT_import_colmap,
    operators.IMPLICIT_OT_import_capture,
    *render_back.CLASSES,
    *saved_fields.CLASSES,
    *world.CLASSES,
    *render_cache.CLASSES,
    *presets.CLASSES,
    *operators.BACKEND_CLASSES,
    *panels.CLASSES,
)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    properties.register_properties()
    panels.register_timers()


def unregister():
    from . import running
    for session in running.all_sessions():
        session.close()
    panels.unregister_timers()
    properties.unregister_properties()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
