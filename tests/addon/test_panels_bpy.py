"""The sidebar's panels, the settings' tooltips and the fit presets, in the bpy 5.0.1 module.

The bpy module has no windows, so a panel's draw() is called with a layout that records what it
was asked to draw; the names it records are then checked against this Blender (properties of
scene.implicit, registered operators and menus).  Presets go through Blender's own preset
operators, with the user's scripts folder moved into a temporary folder.
"""
from types import SimpleNamespace

import pytest

from bpy_helpers import add_camera, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]

PARENT = "VIEW3D_PT_implicit"
SUB_PANELS = {"VIEW3D_PT_implicit_capture": "Capture", "VIEW3D_PT_implicit_field": "Field",
              "VIEW3D_PT_implicit_mesh": "Mesh & Textures", "VIEW3D_PT_implicit_points": "Points & Scans",
              "VIEW3D_PT_implicit_results": "Results", "VIEW3D_PT_implicit_backend": "Backend"}

# What the single panel drew before it was split: all of it must still be drawn somewhere.
DRAWN_BEFORE = {"address", "method", "preset", "seconds", "ring_count", "mesh_resolution", "mesh_opacity",
                "texture_size", "smooth_shading", "preview_size", "show_preview", "rig_views", "rig_shape",
                "rig_holdout", "capture_source", "capture_collection", "capture_camera", "render_passes",
                "resume_renders"}
OPERATORS_BEFORE = {"implicit.backend_start", "implicit.backend_stop", "implicit.free_memory", "implicit.backend_log",
                    "implicit.add_camera_rig", "implicit.import_transforms", "implicit.export_dataset",
                    "implicit.import_colmap", "implicit.render_back", "implicit.fit"}


class Layout:
    """Stands in for UILayout: every call is recorded (name, args, kwargs), sub-layouts included."""

    def __init__(self, calls=None):
        self.calls = [] if calls is None else calls

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return Layout(self.calls)
        return record


def _draw_all(context) -> list:
    import bpy
    calls = []
    for name in (PARENT, *SUB_PANELS):
        getattr(bpy.types, name).draw(SimpleNamespace(layout=Layout(calls)), context)
    return calls


def test_sub_panels_hang_under_the_fit_implicit_panel(addon):
    import bpy
    from fit_implicit.blender_addon import panels
    parent = getattr(bpy.types, PARENT)
    assert parent.bl_label == "Fit Implicit" and not getattr(parent, "bl_parent_id", "")
    for idname, label in SUB_PANELS.items():
        cls = getattr(bpy.types, idname)       # registered
        assert cls.bl_parent_id == PARENT and cls.bl_label == label
        assert (cls.bl_space_type, cls.bl_region_type, cls.bl_category) == ("VIEW_3D", "UI", "Implicit")
    assert "DEFAULT_CLOSED" in bpy.types.VIEW3D_PT_implicit_backend.bl_options
    # Blender shows sub-panels in the order they were registered: the parent comes first.
    assert [c.bl_idname for c in panels.CLASSES] == [PARENT, *SUB_PANELS]


def test_every_panel_draws_and_nothing_drawn_before_is_lost(addon):
    import bpy
    scene = fresh_scene()
    add_camera(scene)
    props = scene.implicit
    props.address = "tcp://127.0.0.1:1"        # nothing listens there: the status line says so
    drawn, operators, menus = set(), set(), set()
    # Every branch of the drawing code: each camera source, and the radiance field's Surface Level.
    for method, source in (("sdf", "SCENE"), ("nerf", "COLLECTION"), ("sdf", "ANIMATION")):
        props.method, props.capture_source = method, source
        props.address = "" if source == "ANIMATION" else "tcp://127.0.0.1:1"
        calls = _draw_all(bpy.context)
        drawn |= {args[1] for name, args, _ in calls if name == "prop" and args[0] == props}
        operators |= {args[0] for name, args, _ in calls if name == "operator"}
        menus |= {args[0] for name, args, _ in calls if name == "menu"}
    props.address = ""

    setting_names = set(props.bl_rna.properties.keys())
    assert drawn <= setting_names, drawn - setting_names
    assert DRAWN_BEFORE | {"max_faces"} <= drawn, (DRAWN_BEFORE | {"max_faces"}) - drawn
    assert OPERATORS_BEFORE | {"implicit.clear_cache", "implicit.fit_preset_add"} <= operators
    for idname in operators:                    # each one exists in this Blender
        group, _, name = idname.partition(".")
        getattr(getattr(bpy.ops, group), name).get_rna_type()
    assert menus == {"IMPLICIT_MT_fit_presets"} and hasattr(bpy.types, "IMPLICIT_MT_fit_presets")


def test_every_setting_and_preference_has_a_tooltip(addon):
    from fit_implicit.blender_addon.preferences import ImplicitPreferences
    from fit_implicit.blender_addon.properties import ImplicitSceneSettings
    for cls in (ImplicitSceneSettings, ImplicitPreferences):
        names = list(cls.__annotations__)
        assert len(names) > 5
        missing = [n for n in names if not cls.bl_rna.properties[n].description.strip()]
        assert not missing, (cls.__name__, missing)
    max_faces = ImplicitSceneSettings.bl_rna.properties["max_faces"]
    assert (max_faces.default, max_faces.hard_min, max_faces.soft_max) == (0, 0, 2_000_000)
    assert "Auto" in max_faces.description and "200,000" in max_faces.description


def test_a_saved_preset_brings_the_fit_settings_back(addon, tmp_path, monkeypatch):
    import bpy
    from fit_implicit.blender_addon.presets import PRESET_SETTINGS, PRESET_SUBDIR
    monkeypatch.setenv("BLENDER_USER_RESOURCES", str(tmp_path))   # where user presets are written
    props = fresh_scene().implicit
    chosen = {"method": "nerf", "preset": "high", "seconds": 90.0, "ring_count": 12, "preview_size": 256,
              "show_preview": False, "mesh_resolution": 384, "mesh_opacity": 0.25, "texture_size": "2048",
              "max_faces": 50_000, "smooth_shading": False, "render_passes": "ON", "resume_renders": False,
              "rig_views": 40, "rig_shape": "SPHERE", "rig_holdout": 0.25, "background": "off",
              "camera_refine": "on", "appearance": True, "encoding": "siren", "material_steps": 400}
    assert set(chosen) == set(PRESET_SETTINGS)
    for name, value in chosen.items():
        setattr(props, name, value)
    props.address = "tcp://10.0.0.1:5599"

    assert bpy.ops.implicit.fit_preset_add(name="Glossy Test") == {"FINISHED"}
    folder = tmp_path / "scripts" / "presets" / PRESET_SUBDIR
    files = list(folder.glob("*.py"))
    assert len(files) == 1 and "implicit.max_faces = 50000" in files[0].read_text()
    assert str(folder) in bpy.utils.preset_paths(PRESET_SUBDIR)      # the menu lists it
    assert "address" not in files[0].read_text()

    for name in PRESET_SETTINGS:                 # everything back to its default, the address changed
        props.property_unset(name)
    props.address = "tcp://10.0.0.2:5599"
    assert props.method != "nerf" and props.max_faces == 0
    assert bpy.ops.script.execute_preset(filepath=str(files[0]), menu_idname="IMPLICIT_MT_fit_presets") == {"FINISHED"}
    for name, value in chosen.items():
        assert getattr(props, name) == (pytest.approx(value) if isinstance(value, float) else value), name
    assert props.address == "tcp://10.0.0.2:5599"     # a preset says how to fit, not where

    # The panel's remove button deletes the preset last chosen.
    assert bpy.types.IMPLICIT_MT_fit_presets.bl_label == "Glossy Test"
    assert bpy.ops.implicit.fit_preset_add(remove_active=True) == {"FINISHED"}
    assert not list(folder.glob("*.py"))
    for name in (*PRESET_SETTINGS, "address"):   # the scene as it was, for the tests after this one
        props.property_unset(name)
