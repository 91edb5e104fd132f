"""Render passes (albedo, world normals, z-depth) from real Cycles through the bpy wheel, checked
against a plane whose colour, orientation and distance are known; the Submit that carries them."""
import math

import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]

ALBEDO_LINEAR = (0.2, 0.5, 0.8)
DISTANCE = 3.0


def _diffuse_material(rgb):
    import bpy

    mat = bpy.data.materials.new("Known Diffuse")
    if mat.node_tree is None:
        mat.use_nodes = True
    tree = mat.node_tree
    for node in list(tree.nodes):
        tree.nodes.remove(node)
    bsdf = tree.nodes.new("ShaderNodeBsdfDiffuse")
    out = tree.nodes.new("ShaderNodeOutputMaterial")
    bsdf.inputs["Color"].default_value = (*rgb, 1.0)
    tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return mat


def _tilted_scene():
    """A diffuse plane (1.6 x 1.6, so the background shows around it) and a camera at DISTANCE
    in front of it, both turned by the same rotation: the plane's world normal is not the
    camera's axis in world space, and z-depth is DISTANCE everywhere on it while the distance
    along each ray grows towards the corners by up to ~3 %."""
    import bpy
    from mathutils import Euler, Matrix, Vector

    scene = fresh_scene(width=40, height=30, samples=8)
    rot = Euler((math.radians(35.0), math.radians(-20.0), math.radians(50.0)), "XYZ").to_matrix().to_4x4()
    origin = Vector((0.4, -0.7, 1.3))
    plane = add_plane(scene, "Known Plane", size=1.6, material=_diffuse_material(ALBEDO_LINEAR))
    plane.matrix_world = Matrix.Translation(origin) @ rot
    cam = add_camera(scene, "Tilted", lens=35.0)
    cam.matrix_world = Matrix.Translation(origin) @ rot @ Matrix.Translation((0.0, 0.0, DISTANCE))
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    scene.collection.objects.link(sun)
    bpy.context.view_layer.update()
    normal = np.array(rot.to_3x3() @ Vector((0.0, 0.0, 1.0)))
    return scene, cam, normal


def test_passes_match_a_known_plane(tmp_path):
    import bpy

    from blender_addon import capture

    scene, cam, normal = _tilted_scene()
    view_layer = bpy.context.view_layer
    renderer = capture.ViewRenderer(scene, view_layer, str(tmp_path))
    view = renderer.render(cam, passes=True)
    rgba, p = view.rgba, view.passes
    assert set(p) == {"albedo", "normal", "depth"}
    assert p["albedo"].shape == (30, 40, 3) and p["albedo"].dtype == np.uint8
    assert p["normal"].shape == (30, 40, 3) and p["normal"].dtype == np.float32
    assert p["depth"].shape == (30, 40) and p["depth"].dtype == np.float32

    alpha = rgba[..., 3]
    inside, outside = alpha == 255, alpha == 0
    assert inside.sum() > 100 and outside.sum() > 100      # the plane, and background around it

    # Depth: z-depth along the camera's axis, not the distance along the ray.
    z = p["depth"][inside]
    assert np.abs(z / DISTANCE - 1.0).max() < 1e-3, (z.min(), z.max())
    assert np.all(p["depth"][outside] == 0)

    # Normals: world space, unit, within 1 degree; zero off the surface.
    n = p["normal"][inside]
    angle = np.degrees(np.arccos(np.clip(n @ normal, -1.0, 1.0)))
    assert angle.max() < 1.0, angle.max()
    assert np.all(p["normal"][outside] == 0)
    assert abs(normal[2]) < 0.9    # the world normal differs from the camera-space one (0, 0, 1)

    # Albedo: the diffuse colour, sRGB-encoded, within 2/255 (also on partly covered pixels).
    from blender_addon.passes import linear_to_srgb

    want = np.round(linear_to_srgb(np.array(ALBEDO_LINEAR)) * 255.0)
    assert np.abs(p["albedo"][inside].astype(float) - want).max() <= 2
    edge = (alpha > 64) & (alpha < 192)
    assert edge.any()
    assert np.abs(p["albedo"][edge].astype(float) - want).max() <= 6    # 8-bit alpha divides here
    assert np.all(p["albedo"][outside] == 0)


def test_passes_leave_the_beauty_and_the_scene_as_they_were(tmp_path):
    import bpy

    from blender_addon import capture

    scene, cam, _ = _tilted_scene()
    view_layer = bpy.context.view_layer
    groups_before = set(bpy.data.node_groups.keys())
    plain = capture.ViewRenderer(scene, view_layer, str(tmp_path)).render(cam).rgba
    with_passes = capture.ViewRenderer(scene, view_layer, str(tmp_path)).render(cam, passes=True).rgba
    assert np.array_equal(plain, with_passes)
    assert not view_layer.use_pass_z and not view_layer.use_pass_normal and not view_layer.use_pass_diffuse_color
    assert scene.compositing_node_group is None
    assert set(bpy.data.node_groups.keys()) == groups_before
    assert scene.render.use_compositing          # the factory default, put back
    assert not scene.render.film_transparent


def test_passes_need_cycles(tmp_path):
    import bpy

    from blender_addon import capture

    scene, cam, _ = _tilted_scene()
    scene.render.engine = "BLENDER_WORKBENCH"
    with pytest.raises(capture.CaptureError, match="Cycles"):
        capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path)).render(cam, passes=True)
    assert not bpy.context.view_layer.use_pass_z


def test_submit_carries_the_passes_through_the_wire(tmp_path):
    """build_submit -> frames -> decode -> backend.data.from_submit gives the same passes."""
    import bpy

    from backend.data import from_submit
    from blender_addon import capture
    from shared import protocol

    scene, cam, _ = _tilted_scene()
    view = capture.ViewRenderer(scene, bpy.context.view_layer, str(tmp_path)).render(cam, passes=True)
    k, p = capture.camera_arrays([cam], scene)
    stacked = {name: value[None] for name, value in view.passes.items()}
    msg = capture.build_submit(view.rgba[None], k, p, [[-1, -1, -1], [1, 1, 1]], passes=stacked)
    got = protocol.decode_message([bytes(f) for f in msg.to_frames()])
    data = from_submit(got)
    assert np.array_equal(data.passes["albedo"], stacked["albedo"])
    assert np.array_equal(data.passes["depth"], stacked["depth"])
    assert np.abs(data.passes["normal"] - stacked["normal"]).max() < 1e-3     # sent as float16


def test_exported_dataset_with_passes_loads_in_the_backend(tmp_path):
    """dataset_io.export_dataset(passes=True) -> transforms.json with pass files -> load_transforms."""
    import bpy

    from backend.data import load_transforms
    from blender_addon import capture, dataset_io

    scene, cam, normal = _tilted_scene()
    view_layer = bpy.context.view_layer
    dataset_io.export_dataset(scene, view_layer, str(tmp_path / "ds"), camera_objects=[cam], passes=True,
                              aabb=[[-1, -2, -1], [2, 1, 3]])
    data = load_transforms(tmp_path / "ds")
    direct = capture.ViewRenderer(scene, view_layer, str(tmp_path)).render(cam, passes=True)
    assert np.array_equal(data.images[0], direct.rgba)
    assert np.array_equal(data.passes["albedo"][0], direct.passes["albedo"])
    assert np.array_equal(data.passes["depth"][0], direct.passes["depth"])
    inside = direct.rgba[..., 3] == 255
    cos = data.passes["normal"][0][inside] @ normal
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 1.0
    assert np.all(data.passes["normal"][0][direct.rgba[..., 3] == 0] == 0)


@pytest.mark.slow
def test_surface_scene_and_relight_benchmarks_run_small(tmp_path):
    """benchmarks/surface_scene.py writes a dataset with passes that agrees with its ground-truth
    mesh; benchmarks/relight.py ranks an asset coloured by the albedo pass above a grey one
    under the novel light.  Both run as the lead runs them (subprocesses)."""
    import json
    import subprocess
    import sys

    from backend.data import RaySampler, load_transforms
    from bpy_helpers import REPO

    out = tmp_path / "scene"
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                       timeout=600)
    proc = run("benchmarks/surface_scene.py", "--out", str(out), "--views", "10", "--holdout", "2",
               "--size", "64", "--samples", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "scene.json").read_text())
    assert info["train"] == 10 and info["test"] == 2 and (out / "scene.blend").is_file()
    data = load_transforms(out / "transforms_train.json")
    assert set(data.passes) == {"albedo", "normal", "depth"}
    verts = _ply_vertices(out / "ground_truth.ply")
    assert np.allclose(verts.min(0), info["ground_truth"]["bbox"][0], atol=1e-5)
    o, d, _, p = RaySampler(data, "cpu").sample_passes(4000)
    hit = (o + p["depth"] * d)[p["depth"][:, 0] > 0].numpy()
    nearest = np.array([np.min(np.linalg.norm(verts - x, axis=1)) for x in hit[:400]])
    assert np.median(nearest) < 0.03          # the depth pass lands on the ground-truth surface

    ply = str(out / "ground_truth.ply")
    proc = run("benchmarks/relight.py", "--scene", str(out / "scene.blend"), "--asset", f"grey={ply}",
               "--asset", f"albedo={ply}", "--albedo-from", f"albedo={out / 'transforms_train.json'}",
               "--size", "48", "--samples", "4", "--out", str(tmp_path / "relight"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "relight" / "relight.json").read_text())["assets"]
    assert res["albedo"]["novel"] > res["grey"]["novel"] + 2.0, res


def _ply_vertices(path):
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    n = int(raw[:end].split(b"element vertex ")[1].split(b"\n")[0])
    return np.frombuffer(raw[end:end + 12 * n], "<f4").reshape(-1, 3)
