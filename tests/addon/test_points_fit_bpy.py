"""Fit SDF to Points in Blender (issue 16, item 3; blender_addon/points_fit.py): a scan imported as a
mesh of loose, coloured vertices, moved, turned and scaled, is fitted on a real backend (CPU, real
ZeroMQ) and the clean mesh comes back on top of it with its transform.  Real bpy (headless wheel)."""
import sys

import numpy as np
import pytest

from bpy_helpers import REPO, fresh_scene, requires_bpy

sys.path.insert(0, str(REPO / "benchmarks"))
import point_cases  # noqa: E402

pytestmark = [requires_bpy, pytest.mark.blender, pytest.mark.timeout(400)]


def _scan_object(name="Scan"):
    """A sphere scan (benchmarks/point_cases.py) as loose vertices with a colour attribute (red above
    its centre, blue below), placed off the origin, turned and scaled 1.5x."""
    import bpy
    shape = point_cases.sphere()
    pts, _ = point_cases.scan(shape, point_cases.viewpoints(shape, 4, seed=2), rays=48, noise=0.003, seed=2)
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(pts))
    me.vertices.foreach_set("co", pts.astype(np.float32).ravel())
    attr = me.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
    top = pts[:, 2] > shape.box.mean(0)[2]
    rgba = np.where(top[:, None], [0.9, 0.1, 0.1, 1.0], [0.1, 0.1, 0.9, 1.0]).astype(np.float32)
    attr.data.foreach_set("color_srgb", rgba.ravel())
    ob = bpy.data.objects.new(name, me)
    bpy.context.scene.collection.objects.link(ob)
    ob.location, ob.rotation_euler, ob.scale = (2.0, -1.0, 0.5), (0.3, 0.2, 1.0), (1.5, 1.5, 1.5)
    bpy.context.view_layer.objects.active = ob
    bpy.context.view_layer.update()
    return ob, shape


@pytest.fixture(scope="module")
def real_backend():
    from helpers import BackendProcess
    backend = BackendProcess(fake=False, startup_timeout=120)
    yield backend
    backend.close()


@pytest.mark.slow   # one draft fit to ~2,000 points on the CPU, ~30 s
def test_a_scan_comes_back_closed_on_top_of_itself(addon, real_backend):
    import bpy
    fresh_scene()
    source, shape = _scan_object()
    scene = bpy.context.scene
    scene.implicit.address = real_backend.address
    scene.implicit.preset = "draft"
    scene.implicit.points_voxel_size = 0.03
    assert bpy.ops.implicit.fit_points(timeout=300) == {"FINISHED"}
    result = bpy.data.objects["Scan SDF"]
    assert np.allclose(np.array(result.matrix_world), np.array(source.matrix_world))
    me = result.data
    local = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", local)
    local = local.reshape(-1, 3)
    world = local @ np.array(source.matrix_world)[:3, :3].T + np.array(source.matrix_world)[:3, 3]
    centre = np.array(source.matrix_world) @ np.append(shape.box.mean(0), 1.0)
    radius = np.linalg.norm(world - centre[:3], axis=1)
    assert abs(np.median(radius) - 0.6 * 1.5) < 0.02                  # the sphere, where the scan is, 1.5x
    assert len(me.polygons) > 1000
    colours = np.empty(len(me.vertices) * 4, np.float32)
    me.color_attributes[0].data.foreach_get("color_srgb", colours)
    colours = colours.reshape(-1, 4)
    up = local[:, 2] > shape.box.mean(0)[2] + 0.2
    assert colours[up, 0].mean() > 0.7 and colours[up, 2].mean() < 0.3


def test_what_is_sent_and_what_is_refused(addon):
    import bpy
    from fit_implicit.blender_addon import points_fit
    fresh_scene()
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(1.0, 2.0, 3.0))
    cube = bpy.context.active_object
    arrays = points_fit.object_points(cube)
    assert arrays["faces"].shape == (12, 3) and np.allclose(np.abs(arrays["vertices"]), 1.0)   # local frame
    settings = bpy.context.scene.implicit
    settings.points_voxel_size, settings.encoding = 0.1, "siren"
    job = points_fit.points_job(cube, settings)      # the backend turns the voxel size into its resolution
    assert job.voxel_size == pytest.approx(0.1) and job.mesh_resolution == 0 and job.encoding == "siren"
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    with pytest.raises(points_fit.PointsFitError, match="camera object"):
        points_fit.object_points(cam)
    bpy.context.scene.collection.objects.link(cam)
    bpy.context.view_layer.objects.active = cam
    assert not bpy.ops.implicit.fit_points.poll()
