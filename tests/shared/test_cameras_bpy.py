"""shared.cameras against Blender's own projection, for every camera setting that changes it.

The reference is ``bpy_extras.object_utils.world_to_camera_view`` (normalised coordinates,
y up); in pixels of the OpenCV frame: u = x * W, v = (1 - y) * H.
"""
import itertools

import numpy as np
import pytest

from bpy_helpers import add_camera, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]

TOL_PX = 1e-3

CONFIGS = list(itertools.product(
    ("AUTO", "HORIZONTAL", "VERTICAL"),          # sensor fit
    ((640, 480), (480, 640)),                    # landscape, portrait
    ((1.0, 1.0), (1.0, 1.5), (2.0, 1.0)),        # pixel aspect x, y
    ((0.0, 0.0), (0.12, -0.07)),                 # lens shift
    (100, 37),                                   # resolution %
))


def _blender_pixels(scene, cam, points):
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    from fit_implicit.shared import cameras
    w, h = cameras.image_size(_capture().blender_camera(cam, scene))
    out = []
    for p in points:
        x, y, _ = world_to_camera_view(scene, cam, Vector(p))
        out.append((x * w, (1.0 - y) * h))
    return np.array(out)


def _capture():
    from fit_implicit.blender_addon import capture
    return capture


def _points_in_front(cam, rng, n=40):
    """World points inside (and a little outside) the view, 1 to 20 units in front."""
    m = np.array(cam.matrix_world.normalized(), dtype=np.float64)
    depth = rng.uniform(1.0, 20.0, n)
    local = np.stack([rng.uniform(-0.6, 0.6, n) * depth, rng.uniform(-0.6, 0.6, n) * depth, -depth], axis=1)
    return local @ m[:3, :3].T + m[:3, 3]


def _check(scene, cam, rng):
    from fit_implicit.shared import cameras
    capture = _capture()
    k = capture.camera_intrinsics(cam, scene)
    pose = capture.camera_pose(cam)
    pts = _points_in_front(cam, rng)
    ours, depth = cameras.project(pts, k, pose)
    assert np.all(depth > 0)
    ref = _blender_pixels(scene, cam, pts)
    err = np.abs(ours - ref).max()
    assert err < TOL_PX, f"max error {err:.2e} px"
    return err


@pytest.mark.parametrize("fit,size,aspect,shift,percent", CONFIGS)
def test_intrinsics_match_blender_projection(fit, size, aspect, shift, percent):
    scene = fresh_scene()
    r = scene.render
    r.resolution_x, r.resolution_y = size
    r.pixel_aspect_x, r.pixel_aspect_y = aspect
    r.resolution_percentage = percent
    cam = add_camera(scene, location=(1.0, -2.0, 0.5), rotation=(1.2, 0.1, 0.4), lens=35.0)
    cam.data.sensor_fit = fit
    cam.data.sensor_width, cam.data.sensor_height = 36.0, 20.0
    cam.data.shift_x, cam.data.shift_y = shift
    _check(scene, cam, np.random.default_rng(CONFIGS.index((fit, size, aspect, shift, percent))))


@pytest.mark.parametrize("scale", [(2.0, 2.0, 2.0), (0.5, 3.0, 1.5)])
def test_camera_with_scale_in_matrix_world(scale):
    scene = fresh_scene()
    scene.render.resolution_x, scene.render.resolution_y = 800, 600
    cam = add_camera(scene, location=(-3.0, 4.0, 2.0), rotation=(1.0, -0.2, 2.5), lens=28.0)
    cam.scale = scale
    cam.data.shift_x = 0.05
    import bpy
    bpy.context.view_layer.update()
    pose = _capture().camera_pose(cam)
    assert np.allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-9)
    assert np.allclose(pose[:3, 3], cam.matrix_world.translation, atol=1e-6)
    _check(scene, cam, np.random.default_rng(7))


def test_parented_camera_under_scaled_empty():
    import bpy
    scene = fresh_scene()
    parent = bpy.data.objects.new("Rig", None)
    scene.collection.objects.link(parent)
    parent.scale = (3.0, 3.0, 3.0)
    parent.location = (1.0, 2.0, 3.0)
    parent.rotation_euler = (0.3, 0.2, 0.1)
    cam = add_camera(scene, location=(0.0, -1.0, 0.3), rotation=(1.4, 0.0, 0.2))
    cam.parent = parent
    bpy.context.view_layer.update()
    _check(scene, cam, np.random.default_rng(3))


def test_non_perspective_camera_is_rejected():
    scene = fresh_scene()
    cam = add_camera(scene)
    cam.data.type = "ORTHO"
    capture = _capture()
    with pytest.raises(capture.CaptureError, match="orthographic.*perspective"):
        capture.camera_arrays([cam], scene)
