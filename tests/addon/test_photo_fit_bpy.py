"""Fit Implicit on imported photos (issue 5 §3): cameras imported from a transforms.json are
fitted from their photos, not from Blender renders.

Real bpy (headless wheel), the add-on's own import and FitSession, a real backend process
training on the CPU over real ZeroMQ.  The dataset is tests/synthetic.py's analytic scene (two
spheres at a world offset and scale) written as PNGs + transforms.json without an "aabb": the
fitting box comes from the cameras alone.
"""
import numpy as np
import pytest

import synthetic
from bpy_helpers import fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]

VIEWS, SIZE = 12, 32


def _import(folder, **kwargs):
    import bpy
    from fit_implicit.blender_addon import dataset_io
    synthetic.write_transforms(folder, count=VIEWS, size=SIZE, with_aabb=False, **kwargs)
    scene = fresh_scene(width=8, height=8)
    cams, warnings = dataset_io.import_transforms(scene, str(folder / "transforms.json"))
    bpy.context.view_layer.update()   # as after the import operator: the view layer sees the cameras
    assert len(cams) == VIEWS and not warnings, warnings
    return scene, cams


class _RenderCounter:
    """Counts Blender renders (bpy.app.handlers.render_pre) while in use."""

    def __enter__(self):
        import bpy
        self.count = 0
        bpy.app.handlers.render_pre.append(self._on_render)
        return self

    def _on_render(self, *_args):
        self.count += 1

    def __exit__(self, *exc):
        import bpy
        bpy.app.handlers.render_pre.remove(self._on_render)


@pytest.fixture(scope="module")
def real_backend():
    from helpers import BackendProcess
    backend = BackendProcess(fake=False, startup_timeout=120)
    yield backend
    backend.close()


@pytest.mark.slow   # one real fit: 32-40 s measured on 2 shared cores
def test_photos_are_fitted_without_rendering(tmp_path, real_backend):
    from fit_implicit.blender_addon import fit_session
    scene, cams = _import(tmp_path)
    with _RenderCounter() as renders:
        try:
            r = fit_session.fit_scene(scene, real_backend.address, preset="draft", steps=150,
                                      mesh_resolution=32, preview_size=0, timeout=240)
        except fit_session.FitError as exc:
            pytest.fail(f"{exc}\n--- backend log ---\n{real_backend.log()[-3000:]}")
    assert renders.count == 0, "photo cameras must not be rendered"
    # What was sent: the photos themselves, at their own size, with the cameras' poses.
    assert r.images.shape == (VIEWS, SIZE, SIZE, 4)
    ks, poses = synthetic.camera_rig(VIEWS, SIZE)
    order = [int(name.split("_")[1]) for name in r.camera_names]      # cameras go by name: r_0, r_1, r_10...
    assert sorted(order) == list(range(VIEWS))
    assert np.allclose(r.intrinsics, ks[order], rtol=1e-5)
    assert np.allclose(r.poses, poses[order], atol=1e-5 * synthetic.CENTER.max() * 4)   # Blender's float32 matrices
    first = order.index(0)
    assert np.array_equal(r.images[first], synthetic.render(ks[0], poses[0], SIZE, SIZE))  # the photo, as written
    # The box found from the cameras holds the spheres (their box: centre +- 1.0 * SCALE).
    big = synthetic.spheres()[0]
    assert np.all(r.aabb[0] < synthetic.CENTER - 1.0 * synthetic.SCALE), r.aabb
    assert np.all(r.aabb[1] > synthetic.CENTER + 1.0 * synthetic.SCALE), r.aabb
    verts, faces, _colors = r.mesh
    assert len(faces) > 50 and r.object is not None
    # The mesh lands on the spheres, in world units: its centre within 10 % of the scene scale of
    # the pair's box centre, its extent within 20 % of the scale of the pair's extent.
    lo = np.min([s.center - s.radius for s in synthetic.spheres()], axis=0)
    hi = np.max([s.center + s.radius for s in synthetic.spheres()], axis=0)
    vlo, vhi = verts.min(axis=0), verts.max(axis=0)
    print(f"mesh box {vlo.round(2)}..{vhi.round(2)}, spheres' box {lo.round(2)}..{hi.round(2)}, "
          f"PSNR {r.summary.get('psnr')}, timings {r.timings}")
    assert np.abs(0.5 * (vlo + vhi) - 0.5 * (lo + hi)).max() < 0.1 * synthetic.SCALE, (vlo, vhi)
    assert np.abs((vhi - vlo) - (hi - lo)).max() < 0.2 * synthetic.SCALE, (vlo, vhi)
    # Most of the mesh is near a sphere's surface (the big one holds most of it).
    dist = np.min([np.abs(np.linalg.norm(verts - s.center, axis=1) - s.radius) for s in synthetic.spheres()], 0)
    assert np.median(dist) < 0.05 * synthetic.SCALE, np.median(dist)
    assert np.linalg.norm(verts - big.center, axis=1).min() < big.radius


def test_photo_aabb_from_cameras_holds_the_scene():
    from fit_implicit.shared import cameras     # the rule of photo fits (fit_session._photo_aabb)
    ks, poses = synthetic.camera_rig(VIEWS, SIZE)
    box = cameras.looked_at_aabb(ks, poses, SIZE, SIZE)
    assert np.allclose(0.5 * (box[0] + box[1]), synthetic.CENTER, atol=1e-6)
    # 10.5 away, half field of view 0.35 rad: half-size 10.5 * tan(0.35) = 3.83
    assert np.allclose(box[1] - box[0], 2 * 4.2 * synthetic.SCALE * np.tan(0.35), rtol=1e-6)
    with pytest.raises(ValueError, match="do not meet"):
        cameras.looked_at_aabb(ks[:1], poses[:1], SIZE, SIZE)


def test_a_selected_cube_empty_sets_the_box(tmp_path):
    """The artist's box for a photo fit (issue 15): a cube Empty, moved, turned and scaled, is
    the box as drawn, whatever meshes or cameras say."""
    import math

    import bpy
    from fit_implicit.blender_addon import fit_session
    scene, _ = _import(tmp_path)
    empty = bpy.data.objects.new("Box", None)
    empty.empty_display_type = "CUBE"
    empty.empty_display_size = 0.5
    scene.collection.objects.link(empty)
    empty.location, empty.scale, empty.rotation_euler = (1.0, 2.0, 3.0), (2.0, 1.0, 1.0), (0.0, 0.0, math.pi / 2)
    bpy.context.view_layer.update()
    session = fit_session.FitSession(scene, "tcp://127.0.0.1:9", probe=False)
    empty.select_set(False)
    cams_box = session._photo_aabb({"intrinsics": synthetic.camera_rig(VIEWS, SIZE)[0],
                                   "poses": synthetic.camera_rig(VIEWS, SIZE)[1]}, SIZE, SIZE)
    assert np.allclose(0.5 * (cams_box[0] + cams_box[1]), synthetic.CENTER, atol=1e-6)
    empty.select_set(True)
    box = session._photo_aabb({}, SIZE, SIZE)
    # turned a quarter about Z: its long (x, 2 x 0.5) side lies along Y
    assert np.allclose(box, [[0.5, 1.0, 2.5], [1.5, 3.0, 3.5]], atol=1e-6), box


def test_missing_photo_names_the_camera(tmp_path):
    from fit_implicit.blender_addon import fit_session
    scene, cams = _import(tmp_path)
    (tmp_path / "images" / "r_3.png").unlink()
    with _RenderCounter() as renders, pytest.raises(fit_session.FitError) as info:
        fit_session.FitSession(scene, "tcp://127.0.0.1:9", probe=False).begin()
    text = str(info.value)
    assert f"Camera '{cams[3].name}'" in text and "r_3.png" in text and "not found" in text, text
    assert renders.count == 0


def test_missing_mask_names_the_camera(tmp_path):
    """dataset_io.photo_views' errors become FitErrors."""
    from fit_implicit.blender_addon import fit_session
    scene, cams = _import(tmp_path)
    cams[5].data["implicit_mask"] = str(tmp_path / "masks" / "r_5.png")
    with pytest.raises(fit_session.FitError, match=f"mask of camera '{cams[5].name}' is missing"):
        fit_session.FitSession(scene, "tcp://127.0.0.1:9", probe=False).begin()


def test_photo_and_rendered_cameras_do_not_mix(tmp_path):
    from bpy_helpers import add_camera
    from fit_implicit.blender_addon import fit_session
    scene, _cams = _import(tmp_path)
    add_camera(scene, "Rendered Cam", location=(0.0, 0.0, 20.0))
    with pytest.raises(fit_session.FitError, match=r"mix photo cameras .* \('Rendered Cam'\)"):
        fit_session.FitSession(scene, "tcp://127.0.0.1:9", probe=False).begin()


def test_photo_submit_carries_the_lens(tmp_path):
    """Distortion of the dataset's cameras reaches the Submit (a stand-in client keeps it:
    no backend needed to check what would be sent)."""
    import json

    import bpy
    from fit_implicit.blender_addon import fit_session

    from helpers import KeepSubmit

    path = synthetic.write_transforms(tmp_path, count=VIEWS, size=SIZE, with_aabb=False)
    doc = json.loads(path.read_text())
    doc.update(camera_model="OPENCV", k1=0.05, k2=-0.01, p1=0.001, p2=0.0)
    path.write_text(json.dumps(doc))
    from fit_implicit.blender_addon import dataset_io
    scene = fresh_scene(width=8, height=8)
    dataset_io.import_transforms(scene, str(path))
    bpy.context.view_layer.update()
    kept = []
    session = fit_session.FitSession(scene, "tcp://127.0.0.1:9", probe=False,
                                     client_factory=lambda a: kept.append(KeepSubmit(a)) or kept[-1])
    session.begin()
    with _RenderCounter() as renders:
        session.tick()
    session.close()
    sub = kept[0].submit
    assert renders.count == 0 and sub.images.shape == (VIEWS, SIZE, SIZE, 4)
    assert sub.lens_models.tolist() == [1] * VIEWS
    assert np.allclose(sub.distortion, [[0.05, -0.01, 0.0, 0.0, 0.001, 0.0]] * VIEWS)
    assert sub.albedo.shape[0] == 0 and sub.normal.shape[0] == 0   # photos have no passes
