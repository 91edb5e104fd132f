"""Camera rig (Fibonacci, held-out views) and transforms.json datasets out and in, in real Blender."""
import json
import math

import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]


def _box_object(scene, name="Box", size=(1.0, 0.6, 0.4), location=(0.3, -0.2, 0.5)):
    import bpy
    me = bpy.data.meshes.new(name)
    sx, sy, sz = (s / 2 for s in size)
    verts = [(x, y, z) for x in (-sx, sx) for y in (-sy, sy) for z in (-sz, sz)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    me.from_pydata(verts, [], faces)
    ob = bpy.data.objects.new(name, me)
    ob.location = location
    scene.collection.objects.link(ob)
    bpy.context.view_layer.update()
    ob.select_set(True)
    return ob


# --------------------------------------------------------------------------------------------
# Fibonacci directions (pure numpy)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hemisphere", [False, True])
@pytest.mark.parametrize("count", [8, 24, 100, 300])
def test_fibonacci_spacing_is_even(count, hemisphere):
    from fit_implicit.shared.cameras import fibonacci_directions
    d = fibonacci_directions(count, hemisphere)
    assert d.shape == (count, 3)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0)
    if hemisphere:
        assert (d[:, 2] > 0).all()
    c = np.clip(d @ d.T, -1, 1)
    np.fill_diagonal(c, -1)
    nearest = np.arccos(c.max(axis=1))
    n_sphere = 2 * count if hemisphere else count
    assert nearest.min() >= 0.85 * math.sqrt(4 * math.pi / n_sphere)   # documented bound
    assert nearest.max() / nearest.min() < 1.2
    assert abs(d.mean(axis=0)[:2]).max() < 0.1                     # balanced around the axis


def test_blender_camera_from_intrinsics_inverts_blender_intrinsics():
    from fit_implicit.shared.cameras import blender_camera_from_intrinsics, blender_intrinsics
    for w, h in ((64, 48), (48, 64), (50, 50)):
        for k in ([50.0, 40.0, 30.0, 20.0], [40.0, 55.0, 20.5, 33.2], [70.0, 70.0, 32.0, 24.0]):
            for fit in (None, "AUTO", "HORIZONTAL", "VERTICAL"):
                bc = blender_camera_from_intrinsics(k, w, h, sensor_fit=fit)
                assert min(bc.pixel_aspect_x, bc.pixel_aspect_y) == 1.0
                assert np.allclose(blender_intrinsics(bc), k, rtol=0, atol=1e-9), (w, h, k, fit)


# --------------------------------------------------------------------------------------------
# Rig
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hemisphere", [True, False])
def test_rig_cameras_look_at_bbox_centre(addon, hemisphere):
    import bpy
    from fit_implicit.blender_addon import capture, rig
    scene = fresh_scene(width=40, height=30)
    box = _box_object(scene)
    count, share = 20, 0.25
    assert bpy.ops.implicit.add_camera_rig(count=count, shape="HEMISPHERE" if hemisphere else "SPHERE",
                                           holdout=share) == {"FINISHED"}
    cams = [ob for ob in bpy.data.objects if ob.get("implicit_rig")]
    assert len(cams) == count
    bbox = capture.world_bbox([box], bpy.context.view_layer.depsgraph)
    centre = bbox.mean(axis=0)
    dists = []
    for ob in cams:
        c2w = np.array(ob.matrix_world, dtype=np.float64)
        eye, axis = c2w[:3, 3], -c2w[:3, 2] / np.linalg.norm(c2w[:3, 2])
        to_c = centre - eye
        off_axis = np.linalg.norm(to_c - np.dot(to_c, axis) * axis)
        assert np.dot(to_c, axis) > 0 and off_axis < 1e-6, (ob.name, off_axis)
        dists.append(np.linalg.norm(to_c))
        if hemisphere:
            assert eye[2] > centre[2]
    assert np.ptp(dists) < 1e-5
    # The selection fills the views but stays inside them.
    k, p = capture.camera_arrays(cams, scene)
    from fit_implicit.shared.cameras import project
    pts = capture.world_points([box], bpy.context.view_layer.depsgraph)
    inside = [project(pts, ki, pi)[0] for ki, pi in zip(k, p)]
    uv = np.concatenate(inside)
    assert uv.min() >= 0 and uv[:, 0].max() <= 40 and uv[:, 1].max() <= 30
    spans = [max((q[:, 0].max() - q[:, 0].min()) / 40, (q[:, 1].max() - q[:, 1].min()) / 30) for q in inside]
    assert max(spans) > 0.8
    # Held-out share and collection; plan_capture trains on the others only.
    held = [ob for ob in cams if ob.get("implicit_holdout")]
    assert len(held) == round(share * count)
    sub = bpy.data.collections["Implicit Held-out"]
    assert set(sub.objects) == set(held) and sub.name in bpy.data.collections["Implicit Rig"].children
    plan = capture.plan_capture(scene, bpy.context.view_layer)
    assert {ob.name for ob in plan.cameras} == {ob.name for ob in cams} - {ob.name for ob in held}
    assert not plan.created_ring
    assert set(capture.scene_cameras(bpy.context.view_layer, include_holdout=True)) == set(cams)
    # A second rig replaces the first.
    assert bpy.ops.implicit.add_camera_rig(count=6, holdout=0.0) == {"FINISHED"}
    assert len([ob for ob in bpy.data.objects if ob.type == "CAMERA"]) == 6
    assert "Implicit Held-out" not in bpy.data.collections


def test_rig_without_selection_reports(addon):
    import bpy
    fresh_scene()
    with pytest.raises(RuntimeError, match="Select the object"):
        bpy.ops.implicit.add_camera_rig(count=4)


def test_plan_capture_skips_holdout_in_explicit_lists(addon):
    import bpy
    from fit_implicit.blender_addon import capture
    scene = fresh_scene()
    _box_object(scene)
    a = add_camera(scene, "A", location=(0, 0, 6))
    b = add_camera(scene, "B", location=(0, 0, 7))
    b["implicit_holdout"] = True
    plan = capture.plan_capture(scene, bpy.context.view_layer, camera_objects=[a, b])
    assert [ob.name for ob in plan.cameras] == ["A"]
    assert [ob.name for ob in capture.scene_cameras(bpy.context.view_layer)] == ["A"]


# --------------------------------------------------------------------------------------------
# transforms.json round trip
# --------------------------------------------------------------------------------------------
CONFIGS = [  # (resolution, pixel aspect x, y)
    ((40, 30), 1.0, 1.0),
    ((30, 40), 1.0, 1.0),      # portrait: AUTO fits vertically
    ((40, 30), 1.0, 1.3),      # non-square pixels
    ((36, 44), 1.4, 1.0),
]
CAMERA_SETTINGS = [  # (sensor fit, shift x, shift y, lens)
    ("AUTO", 0.0, 0.0, 35.0),
    ("HORIZONTAL", 0.1, -0.05, 50.0),
    ("VERTICAL", -0.07, 0.12, 28.0),
    ("AUTO", 0.2, 0.15, 60.0),
]


def _camera_scene(res, pax, pay, percentage=100):
    import bpy
    scene = fresh_scene(width=res[0], height=res[1], samples=1)
    scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = pax, pay
    scene.render.resolution_percentage = percentage
    rng = np.random.default_rng(3)
    cams = []
    for i, (fit, sx, sy, lens) in enumerate(CAMERA_SETTINGS):
        ob = add_camera(scene, f"Cam{i}", location=tuple(rng.normal(size=3) * 3 + [0, 0, 4]),
                        rotation=tuple(rng.uniform(-0.5, 0.5, size=3)), lens=lens)
        ob.data.sensor_fit, ob.data.shift_x, ob.data.shift_y = fit, sx, sy
        ob.data.sensor_width, ob.data.sensor_height = 36.0, 20.0
        cams.append(ob)
    cams[-1]["implicit_holdout"] = True
    bpy.context.view_layer.update()
    return scene, cams


@pytest.mark.parametrize("res,pax,pay", CONFIGS)
def test_transforms_round_trip(tmp_path, addon, res, pax, pay):
    import bpy
    from fit_implicit.blender_addon import capture, dataset_io
    scene, cams = _camera_scene(res, pax, pay)
    want_k, want_p = capture.camera_arrays(cams, scene)
    names = [ob.name for ob in cams]
    out = dataset_io.export_dataset(scene, bpy.context.view_layer, str(tmp_path), render=False)
    assert out["train"] == 3 and out["test"] == 1
    train = json.loads((tmp_path / "transforms_train.json").read_text())
    test = json.loads((tmp_path / "transforms_test.json").read_text())
    assert [f["file_path"] for f in train["frames"]] == ["train/r_000", "train/r_001", "train/r_002"]
    assert [f["file_path"] for f in test["frames"]] == ["test/r_000"]
    frame = train["frames"][1]
    assert np.allclose([frame["fl_x"], frame["fl_y"], frame["cx"], frame["cy"]], want_k[1])
    assert (frame["w"], frame["h"]) == res
    assert math.isclose(frame["camera_angle_x"], 2 * math.atan(res[0] / 2 / want_k[1][0]))
    assert np.allclose(frame["transform_matrix"], want_p[1])

    for file, idx in (("transforms_train.json", [0, 1, 2]), ("transforms_test.json", [3]),
                      ("transforms.json", [0, 1, 2, 3])):
        scene2 = fresh_scene(width=7, height=5)
        created, warnings = dataset_io.import_transforms(scene2, str(tmp_path / file))
        assert len(created) == len(idx)
        assert (scene2.render.resolution_x, scene2.render.resolution_y) == res
        got_k, got_p = capture.camera_arrays(created, scene2)
        assert np.allclose(got_k, want_k[idx], rtol=1e-6, atol=1e-5), (got_k, want_k[idx])
        assert np.allclose(got_p, want_p[idx], rtol=0, atol=1e-5)
        assert not [w for w in warnings if "pixel aspect" in w or "sizes" in w]
    assert names


def test_import_global_fov_distortion_and_backgrounds(tmp_path, addon):
    import bpy
    from fit_implicit.blender_addon import capture, dataset_io
    scene = fresh_scene(width=8, height=8)
    img = bpy.data.images.new("src", 20, 10)
    img.filepath_raw = str(tmp_path / "a.png")
    img.file_format = "PNG"
    img.save()
    c2w = np.eye(4)
    c2w[:3, 3] = (1, 2, 3)
    doc = {"camera_angle_x": 1.0, "camera_model": "OPENCV", "k1": 0.1, "k2": -0.02, "p1": 0.001,
           "p2": 0.0, "k4": 0.003,
           "frames": [{"file_path": "./a", "transform_matrix": c2w.tolist()},
                      {"file_path": "a.png", "transform_matrix": c2w.tolist(), "fl_x": 30.0,
                       "fl_y": 25.0, "cx": 9.0, "cy": 6.0, "w": 20, "h": 10}]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    assert bpy.ops.implicit.import_transforms(filepath=str(tmp_path / "transforms.json")) == {"FINISHED"}
    created = sorted(dataset_io.bpy.data.collections[dataset_io.IMPORT_COLLECTION].objects, key=lambda o: o.name)
    assert len(created) == 2
    k, p = capture.camera_arrays(created, scene)
    fx = 10 / math.tan(0.5)
    assert np.allclose(k[0], [fx, fx, 10, 5], atol=1e-5)
    # The second frame's pixel aspect differs from the first's: reported, fy follows the first.
    assert np.allclose(k[1][[0, 2, 3]], [30, 9, 6], atol=1e-5)
    cam = created[0].data
    assert cam["camera_model"] == "OPENCV" and math.isclose(cam["k1"], 0.1) and math.isclose(cam["k4"], 0.003)
    assert cam.show_background_images and cam.background_images[0].image.size[:] == (20, 10)


def test_exported_dataset_loads_in_backend(tmp_path, addon):
    pytest.importorskip("torch")
    import bpy
    from fit_implicit.backend.fitting.data import load_transforms
    from fit_implicit.blender_addon import capture, dataset_io
    scene, cams = _camera_scene((24, 18), 1.0, 1.25, percentage=50)   # renders 12 x 9
    grey = emission_material("Grey", (0.2, 0.2, 0.2))
    add_plane(scene, "P", size=2.0, location=(0, 0, 0), material=grey)
    want_k, want_p = capture.camera_arrays(cams, scene)
    out = dataset_io.export_dataset(scene, bpy.context.view_layer, str(tmp_path), render=True)
    assert (tmp_path / "train" / "r_000.png").is_file() and (tmp_path / "test" / "r_000.png").is_file()
    data = load_transforms(tmp_path)                      # picks transforms_train.json
    assert len(data) == out["train"] == 3 and data.images.shape[1:] == (9, 12, 4)
    assert np.allclose(data.intrinsics, want_k[:3], rtol=1e-9, atol=1e-9)
    assert np.allclose(data.poses, want_p[:3], atol=1e-9)
    assert np.allclose(data.aabb, json.loads((tmp_path / "transforms.json").read_text())["aabb"])
    test = load_transforms(tmp_path / "transforms_test.json")
    assert len(test) == 1 and np.allclose(test.intrinsics, want_k[3:])
    combined = json.loads((tmp_path / "transforms.json").read_text())
    assert combined["test_filenames"] == ["test/r_000.png"] and len(combined["frames"]) == 4
