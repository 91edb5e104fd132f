"""Camera sources (animated camera, a collection, the selection), resumable capture and Cancel,
with real Blender renders through the bpy wheel."""
import os
import time

import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy
from helpers import KeepSubmit

pytestmark = [requires_bpy, pytest.mark.blender]


@pytest.fixture()
def capture():
    from fit_implicit.blender_addon import capture
    return capture


def _scene():
    scene = fresh_scene(width=24, height=16, samples=2)
    add_plane(scene, "Target", size=1.0, material=emission_material("Red", (0.8, 0.1, 0.1)))
    return scene


def _animated_camera(scene):
    """A camera flying along +X from x=-1 (frame 1) to x=+1 (frame 5), lens 30 -> 70 mm."""
    cam = add_camera(scene, "Flying", location=(-1.0, 0.0, 5.0))
    cam.data.lens = 30.0
    cam.keyframe_insert("location", frame=1)
    cam.data.keyframe_insert("lens", frame=1)
    cam.location = (1.0, 0.0, 5.0)
    cam.data.lens = 70.0
    cam.keyframe_insert("location", frame=5)
    cam.data.keyframe_insert("lens", frame=5)
    for fc in _fcurves(cam) + _fcurves(cam.data):
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"
    scene.frame_start, scene.frame_end = 1, 5
    scene.frame_set(3)
    return cam


def _fcurves(idblock):
    """F-curves of an ID's action (Blender 5.0 keeps them in layered channelbags)."""
    action = idblock.animation_data.action
    if hasattr(action, "fcurves") and len(getattr(action, "fcurves", ())):
        return list(action.fcurves)
    from bpy_extras import anim_utils
    bag = anim_utils.action_get_channelbag_for_slot(action, idblock.animation_data.action_slot)
    return list(bag.fcurves)


def test_animated_camera_gives_one_view_per_frame_with_its_pose_and_lens(capture):
    import bpy

    scene = _scene()
    cam = _animated_camera(scene)
    plan = capture.plan_capture(scene, bpy.context.view_layer, source="ANIMATION", camera="Flying",
                                frame_range=(1, 5, 2))
    assert plan.frames == [1, 3, 5] and [ob.name for ob in plan.cameras] == ["Flying"] * 3
    np.testing.assert_allclose(plan.poses[:, 0, 3], [-1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(plan.poses[:, 2, 3], [5.0, 5.0, 5.0], atol=1e-6)
    # fx = lens * width / sensor_width (AUTO fit, landscape): 30, 50, 70 mm
    np.testing.assert_allclose(plan.intrinsics[:, 0], np.array([30.0, 50.0, 70.0]) * 24 / 36.0, rtol=1e-6)
    assert scene.frame_current == 3              # put back

    # The renders follow the frames: the plane's centre moves left as the camera moves right.
    renderer = capture.ViewRenderer(scene, bpy.context.view_layer, str(_tmp()), cache_dir=None)
    views = renderer.render_all(plan.cameras, plan.frames)
    cols = [np.argwhere(v.rgba[..., 3] > 128)[:, 1].mean() for v in views]
    assert cols[0] > cols[1] > cols[2]
    assert scene.frame_current == 3
    # Default range: the scene's frames.
    plan = capture.plan_capture(scene, bpy.context.view_layer, source="ANIMATION", camera=cam)
    assert plan.frames == [1, 2, 3, 4, 5]
    with pytest.raises(capture.CaptureError, match="frame range"):
        capture.plan_capture(scene, bpy.context.view_layer, source="ANIMATION", camera=cam, frame_range=(5, 1, 1))


def _tmp():
    import tempfile
    return tempfile.mkdtemp(prefix="capture_sources_")


def test_collection_and_selected_sources_give_their_cameras(capture):
    import bpy

    scene = _scene()
    rig = bpy.data.collections.new("My Rig")
    scene.collection.children.link(rig)
    inner = bpy.data.collections.new("Inner")
    rig.children.link(inner)
    a = add_camera(scene, "A", location=(0.0, -3.0, 3.0), rotation=(0.785398, 0.0, 0.0))
    b = add_camera(scene, "B", location=(3.0, 0.0, 3.0), rotation=(0.785398, 0.0, 1.570796))
    c = add_camera(scene, "C", location=(0.0, 0.0, 4.0))
    for ob, coll in ((a, rig), (b, inner)):
        scene.collection.objects.unlink(ob)
        coll.objects.link(ob)
    bpy.context.view_layer.update()
    plan = capture.plan_capture(scene, bpy.context.view_layer, source="COLLECTION", collection="My Rig")
    assert [ob.name for ob in plan.cameras] == ["A", "B"]
    np.testing.assert_allclose(plan.poses[0], np.array(a.matrix_world), atol=1e-6)
    np.testing.assert_allclose(plan.poses[1], np.array(b.matrix_world), atol=1e-6)
    with pytest.raises(capture.CaptureError, match="no collection named 'Nope'"):
        capture.plan_capture(scene, bpy.context.view_layer, source="COLLECTION", collection="Nope")

    for ob in scene.objects:
        ob.select_set(ob.name in ("B", "C"))
    plan = capture.plan_capture(scene, bpy.context.view_layer, source="SELECTED")
    assert [ob.name for ob in plan.cameras] == ["B", "C"]
    np.testing.assert_allclose(plan.poses[1], np.array(c.matrix_world), atol=1e-6)
    for ob in scene.objects:
        ob.select_set(False)
    with pytest.raises(capture.CaptureError, match="No cameras are selected"):
        capture.plan_capture(scene, bpy.context.view_layer, source="SELECTED")


def _count_renders():
    import bpy

    count = [0]

    def on_render(*_args):
        count[0] += 1
    bpy.app.handlers.render_pre.append(on_render)
    return count, lambda: bpy.app.handlers.render_pre.remove(on_render)


def _principled_material(name, roughness):
    import bpy

    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:
        mat.use_nodes = True
    mat.node_tree.nodes["Principled BSDF"].inputs["Roughness"].default_value = roughness
    return mat


def test_resumable_capture_renders_nothing_the_second_time(capture, tmp_path):
    import bpy

    scene = _scene()
    add_plane(scene, "Shiny", size=0.6, location=(0.1, 0.0, 0.1), material=_principled_material("Shiny", 0.4))
    cams = [add_camera(scene, f"Cam{i}", location=(0.2 * i, 0.0, 4.0)) for i in range(3)]
    cache = str(tmp_path / "cache")
    count, stop = _count_renders()
    try:
        first = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
        views1 = first.render_all(cams, passes=True)
        assert count[0] == 3 and first.renders == 3
        again = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
        views2 = again.render_all(cams, passes=True)
        assert count[0] == 3 and again.renders == 0 and again.cache_hits == 3
        for v1, v2 in zip(views1, views2):
            assert v2.cached and np.array_equal(v1.rgba, v2.rgba)
            assert set(v2.passes) == {"albedo", "normal", "depth", "roughness"}
            assert all(np.array_equal(v1.passes[k], v2.passes[k]) for k in v1.passes)
            rough = v2.passes["roughness"]
            emitting = (rough == -1.0) & (v2.rgba[..., 3] == 255)                   # Red has no roughness
            assert np.sum(np.abs(rough - 0.4) < 0.02) > 4 and np.sum(emitting) > 4
        # A cache file from before the roughness pass is a miss: that view is rendered again.
        path = os.path.join(cache, again.key(cams[2], passes=True) + ".npz")
        with np.load(path) as z:
            old = {k: np.array(z[k]) for k in z.files if k != "roughness"}
        np.savez_compressed(path, **old)
        resumed = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
        views = resumed.render_all(cams, passes=True)
        assert resumed.renders == 1 and resumed.cache_hits == 2 and count[0] == 4
        assert not views[2].cached and np.array_equal(views[2].passes["roughness"], views1[2].passes["roughness"])
        with np.load(path) as z:
            assert "roughness" in z.files
        # A moved camera and a changed material are new views; the others are still cached.
        cams[1].location.x += 0.1
        bpy.context.view_layer.update()
        third = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
        third.render_all(cams, passes=True)
        assert third.renders == 1 and count[0] == 5
        bpy.data.materials["Red"].node_tree.nodes["Emission"].inputs["Color"].default_value = (0, 1, 0, 1)
        fourth = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
        fourth.render_all(cams[:1])
        assert fourth.renders == 1
        # Switching a collection off for rendering (e.g. a light rig) is a new scene too.
        lights = bpy.data.collections.new("Lights")
        scene.collection.children.link(lights)
        fifth = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
        lights.hide_render = True
        sixth = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
        assert fifth.key(cams[0]) != sixth.key(cams[0])
    finally:
        stop()


def test_cancel_during_rendering_stops_promptly_and_resumes(capture, tmp_path):
    import bpy

    scene = _scene()
    cams = [add_camera(scene, f"Cam{i}", location=(0.1 * i, 0.0, 4.0)) for i in range(6)]
    cache = str(tmp_path / "cache")
    done = []
    r = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
    t0 = time.monotonic()
    with pytest.raises(capture.CaptureCancelled, match="after 2 of 6"):
        r.render_all(cams, progress=lambda i, n: done.append(i), should_cancel=lambda: len(done) >= 2)
    assert r.renders == 2 and done == [1, 2]
    assert time.monotonic() - t0 < 20
    resumed = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path), cache_dir=cache)
    resumed.render_all(cams)
    assert resumed.cache_hits == 2 and resumed.renders == 4


def test_fit_session_cancel_while_rendering_leaves_the_rest_unrendered(tmp_path):
    """The modal path renders one view per tick; Cancel between ticks ends the session at once."""
    import bpy

    from fit_implicit.blender_addon import fit_session as fs

    scene = _scene()
    for i in range(5):
        add_camera(scene, f"Cam{i}", location=(0.1 * i, 0.0, 4.0))
    count, stop = _count_renders()
    try:
        s = fs.FitSession(scene, "tcp://127.0.0.1:1", fs.FitSettings(cache_dir=str(tmp_path / "c")), probe=False,
                          client_factory=lambda a: pytest.fail("nothing may be sent after a cancel"))
        s.begin()
        s.tick()
        s.tick()
        s.cancel()
        assert s.finished and s.result.status == "cancelled" and count[0] == 2
        for _ in range(3):
            s.tick()
        assert count[0] == 2
    finally:
        stop()
        bpy.context.view_layer.update()


def test_panel_says_when_lighting_stays_baked_in(capture):
    """Photo cameras (imported datasets) or passes switched off: the colours keep the lighting."""
    from types import SimpleNamespace

    scene = _scene()
    cam = add_camera(scene, "Cam", location=(0.0, 0.0, 4.0))
    on = SimpleNamespace(render_passes="ON", capture_source="SCENE", resume_renders=True)
    assert capture.lighting_note(scene, on) == ""
    assert "baked" in capture.lighting_note(scene, SimpleNamespace(render_passes="OFF"))
    assert "baked" in capture.lighting_note(scene, SimpleNamespace(render_passes="AUTO", method="nerf"))
    assert capture.lighting_note(scene, SimpleNamespace(render_passes="AUTO", method="sdf")) == ""
    cam.data["implicit_image"] = "images/0001.jpg"      # what the transforms.json import sets
    assert "Photos have no albedo pass" in capture.lighting_note(scene, on)
    assert "estimated from the photos" in capture.lighting_note(scene, SimpleNamespace(material_steps=300))
    kw = capture.fit_settings_from_props(SimpleNamespace(
        capture_source="ANIMATION", capture_camera=cam, capture_collection=None, render_passes="OFF",
        resume_renders=False, over_time="IN_TURN"))
    assert kw == {"source": "ANIMATION", "source_collection": "", "source_camera": "Cam", "passes": False,
                  "cache_dir": None, "background": "auto", "camera_refine": "off", "appearance": False,
                  "encoding": "hashgrid", "over_time": "IN_TURN", "material_steps": 0}


def test_fit_session_sends_passes_of_an_animated_camera(tmp_path):
    import bpy

    from fit_implicit.blender_addon import capture
    from fit_implicit.blender_addon import fit_session as fs

    scene = _scene()
    _animated_camera(scene)
    client = KeepSubmit()
    settings = fs.FitSettings(method="nerf", passes=True, source="ANIMATION", source_camera="Flying",
                              frame_range=(1, 5, 2), cache_dir=str(tmp_path / "c"))
    s = fs.FitSession(scene, "tcp://127.0.0.1:1", settings, probe=False, client_factory=lambda a: client)
    s.begin()
    for _ in range(3):
        s.tick()
    sub = client.submit
    assert sub is not None and sub.images.shape == (3, 16, 24, 4)
    assert sub.albedo.shape == (3, 16, 24, 3) and sub.normal.shape == (3, 16, 24, 3)
    assert sub.depth.shape == (3, 16, 24) and sub.roughness.shape == (3, 16, 24)
    assert sub.roughness.dtype == np.float16 and np.all(sub.roughness == -1.0)    # an Emission has none
    covered = sub.images[..., 3] == 255
    np.testing.assert_allclose(sub.depth[covered], 5.0, rtol=1e-3)      # the plane is 5 below the camera
    np.testing.assert_allclose(sub.poses[:, 0, 3], [-1.0, 0.0, 1.0], atol=1e-6)
    s.close()
    scene.render.engine = "BLENDER_WORKBENCH"
    with pytest.raises(capture.CaptureError, match="need the Cycles engine"):
        capture.plan_capture(scene, bpy.context.view_layer, passes=True)
    assert not capture.passes_by_default(scene, "sdf")


def _moving_target_scene():
    """A red plane gliding along +X from x=-1 (frame 1) to x=+1 (frame 5) under three still cameras."""
    scene = _scene()
    plane = scene.objects["Target"]
    plane.location = (-1.0, 0.0, 0.0)
    plane.keyframe_insert("location", frame=1)
    plane.location = (1.0, 0.0, 0.0)
    plane.keyframe_insert("location", frame=5)
    for fc in _fcurves(plane):
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"
    for i, x in enumerate((-0.5, 0.0, 0.5)):
        add_camera(scene, f"Cam{i}", location=(x, 0.0, 6.0))
    scene.frame_start, scene.frame_end = 1, 5
    scene.frame_set(2)
    return scene


def test_a_capture_over_time_sends_each_view_with_its_instant(tmp_path):
    """Issue 17 item 1: the frame range with the scene's cameras, one camera a frame in turn or every
    camera at every frame; each view rendered at its frame and sent with its instant in [0, 1]."""
    import json

    import bpy

    from fit_implicit.blender_addon import capture, dataset_io
    from fit_implicit.blender_addon import fit_session as fs

    scene = _moving_target_scene()
    layer = bpy.context.view_layer
    plan = capture.plan_capture(scene, layer, over_time="EVERY_CAMERA")
    assert len(plan.cameras) == 15 and plan.frames == [f for f in range(1, 6) for _ in range(3)]
    assert plan.times == [(f - 1) / 4 for f in plan.frames] and plan.time_range == (1, 5)
    client = KeepSubmit()
    settings = fs.FitSettings(method="nerf", over_time="IN_TURN", cache_dir=None, eval_reference=False)
    s = fs.FitSession(scene, "tcp://127.0.0.1:1", settings, probe=False, client_factory=lambda a: client)
    s.begin()
    for _ in range(6):
        s.tick()
    sub = client.submit
    assert sub is not None and sub.images.shape[0] == 5
    np.testing.assert_allclose(sub.times, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(sub.poses[:, 0, 3], [-0.5, 0.0, 0.5, -0.5, 0.0])     # the cameras in turn
    assert sub.mesh_time == 0.25                        # the current frame (2): where the asset lands
    # each view shows the plane where it was at its frame: its centre moves right in the world
    centre_x = [sub.poses[i, 0, 3] + (np.argwhere(sub.images[i, ..., 3] > 128)[:, 1].mean() - 11.5) / 24 * 36 / 50 * 6
                for i in range(5)]
    assert np.all(np.diff(centre_x) > 0.3), centre_x
    s.close()
    assert scene.frame_current == 2
    # a dataset over time: D-NeRF's layout, each frame with its instant
    scene.objects["Cam2"]["implicit_holdout"] = True
    out = dataset_io.export_dataset(scene, layer, str(tmp_path / "ds"), over_time="IN_TURN", render=False)
    assert out["train"] == 5 and out["test"] == 5
    doc = json.loads((tmp_path / "ds" / "transforms_train.json").read_text())
    assert [f["time"] for f in doc["frames"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [f["camera"] for f in doc["frames"]] == ["Cam0", "Cam1", "Cam0", "Cam1", "Cam0"]
    assert scene.frame_current == 2
    # clear errors: one frame is no clip; more views than a fit takes
    scene.frame_end = 1
    with pytest.raises(capture.CaptureError, match="needs at least two frames"):
        capture.plan_capture(scene, layer, over_time="IN_TURN")
    scene.frame_end = 1500             # 2 cameras (Cam2 is held out) x 1500 frames
    with pytest.raises(capture.CaptureError, match="raise the frame step"):
        capture.plan_capture(scene, layer, over_time="EVERY_CAMERA")
