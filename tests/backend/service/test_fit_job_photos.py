"""Photo captures through the fit job (issue 15).  A fit of opaque photos models its background
(backend/fields/background.py): the job sends it as an EnvironmentResult before Done, stores it
for a client that reattaches, and ``fit-implicit mesh`` writes it beside the mesh.  A fit with
``camera_refine`` on sends the refined cameras as a CamerasResult.  Real training on the CPU,
tiny sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fit_implicit.backend.export.materials import MaterialConfig, environment_rows
from fit_implicit.backend.service import checkpoint
from fit_implicit.backend.service.jobs import JobQueue
from fit_implicit.backend.service.outbox import Outbox
from helpers import make_submit
from fit_implicit.shared import protocol

pytestmark = pytest.mark.timeout(300)

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Smaller batches and tables than the draft preset's: seconds a fit on two busy cores."""
    from fit_implicit.backend.fitting import config

    make_config = config.make_config
    monkeypatch.setattr(config, "make_config", lambda *a, **kw: make_config(
        *a, **{**kw, "target_samples": 1 << 12, "batch_rays": 256, "max_rays": 1 << 11, "occupancy_warmup": 4,
               "background_log2_table": 12, "background_samples": 8}))


def opaque_submit(**settings) -> protocol.Submit:
    """make_submit's spheres in front of a grey-blue wall: every pixel opaque, so the fit
    (background: auto) models what lies outside its box."""
    sub = make_submit(**settings)
    rgba = sub.images.astype(np.float32) / 255.0
    wall = np.float32([0.35, 0.45, 0.6])
    rgb = rgba[..., :3] * rgba[..., 3:] + wall * (1.0 - rgba[..., 3:])
    sub.images = np.concatenate([(rgb * 255.0 + 0.5).astype(np.uint8),
                                 np.full(rgba.shape[:3] + (1,), 255, np.uint8)], axis=-1)
    return sub.validate()


def run_job(tmp_path, submit: protocol.Submit) -> tuple[list, object]:
    from fit_implicit.backend.service.fit_job import run_fit_job

    outbox = Outbox()
    jobs = JobQueue(run_fit_job, outbox, device="cpu", runs_dir=tmp_path, checkpoint_interval=0)
    jobs.start()
    try:
        job, _ = jobs.submit(b"a", submit)
        messages = []
        while not any(isinstance(m, protocol.JOB_END_TYPES) for m in messages):
            messages += [m for _, m in outbox.drain()]
            jobs.join(0.01)
    finally:
        jobs.stop()
        jobs.join(30)
    return messages, job


def test_a_fit_of_opaque_photos_sends_its_background_as_an_environment_image(tmp_path, capsys, monkeypatch):
    from fit_implicit.backend import cli
    from fit_implicit.backend.export import mesh
    from fit_implicit.backend.export.environment import environment_height

    submit = opaque_submit(steps=40, texture_size=0, mesh_opacity=0.3)     # a fixed level: no search
    messages, job = run_job(tmp_path / "runs", submit)
    done = messages[-1]
    assert isinstance(done, protocol.Done), messages[-1]
    environments = [m for m in messages if isinstance(m, protocol.EnvironmentResult)]
    assert len(environments) == 1
    image = environments[0].image
    height = environment_height(submit.intrinsics, "cpu")      # 69 rows for these 16-pixel photos
    assert image.shape == (height, 2 * height, 3) and image.dtype == np.uint8
    kinds = [m.TYPE for m in messages if m.TYPE in checkpoint.STORED_TYPES]
    assert kinds[-2:] == ["environment", "done"]            # after the mesh, before Done
    assert done.summary["environment_height"] == height and done.summary["environment_width"] == 2 * height
    # What it shows all around is the wall it learnt: not black, bluer than it is red, as the wall.
    mean = image.reshape(-1, 3).mean(0)
    assert mean.min() > 15 and mean[0] < mean[1] < mean[2], mean
    # Kept for a client that reattaches.
    stored = checkpoint.stored_messages(tmp_path / "runs" / job.id)
    assert [m.TYPE for m in stored][-2:] == ["environment", "done"]
    np.testing.assert_array_equal(stored[-2].image, image)

    # fit-implicit mesh writes it beside the mesh, as the job sent it (the same height).  40 steps
    # leave no surface to mesh: a tetrahedron stands in for the marching cubes' mesh.
    tetrahedron = (np.float32([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                   np.int32([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]), np.full((4, 3), 0.5, np.float32))
    monkeypatch.setattr(mesh, "extract_mesh", lambda *a, **kw: tetrahedron)
    out = tmp_path / "asset" / "room.ply"
    assert cli.main(["mesh", str(tmp_path / "runs" / job.id), "--out", str(out), "--texture-size", "0",
                     "--mesh-resolution", "16", "--environment-height", str(height), "--device", "cpu"]) == 0
    written = np.asarray(Image.open(tmp_path / "asset" / "room_environment.png"))
    assert written.shape == image.shape
    assert np.abs(written.astype(int) - image.astype(int)).max() <= 1
    assert (out.is_file() and f"environment: the background, {2 * height}x{height} equirectangular"
            in capsys.readouterr().out)


def test_a_fit_of_transparent_photos_sends_no_environment(tmp_path):
    messages, _ = run_job(tmp_path, make_submit(steps=6, texture_size=0, mesh_opacity=0.3))
    assert isinstance(messages[-1], protocol.Done)
    assert not any(isinstance(m, protocol.EnvironmentResult) for m in messages)
    assert "environment_height" not in messages[-1].summary


def test_the_environment_height_follows_the_device_and_the_photos():
    from fit_implicit.backend.export.environment import environment_height

    def k(fy):
        return np.array([[fy, fy, 8.0, 8.0]])

    assert environment_height(k(1111.0), "cuda:0") == 512 and environment_height(k(1111.0), "cpu") == 256
    assert environment_height(k(50.0), "cuda") == 158              # ceil(pi * 50): a row per photo pixel
    assert environment_height(k(1.0), "cuda") == 16                # never fewer
    assert environment_height(None, "cpu") == 256 and environment_height(None, "mps") == 512


def test_a_fit_that_refines_its_cameras_sends_them_back_in_the_capture_frame(tmp_path):
    """Submit.camera_refine "on" (and the other photo settings) reach the fit; the refined poses
    come back in the Submit's order and frame, rigid, each near its original, with how far it
    moved; they are stored for a client that reattaches and counted in Done's summary."""
    submit = make_submit(n=5, steps=30, texture_size=0, mesh_opacity=0.3, camera_refine="on", background="off",
                         appearance=True)
    messages, job = run_job(tmp_path, submit)
    done = messages[-1]
    assert isinstance(done, protocol.Done), done
    cams = [m for m in messages if isinstance(m, protocol.CamerasResult)]
    assert len(cams) == 1 and cams[0].poses.shape == (5, 4, 4)
    got = cams[0]
    assert not any(isinstance(m, protocol.EnvironmentResult) for m in messages)     # background off
    # rigid, in the capture's frame: each camera within a few degrees and a small shift of its own
    rel = np.einsum("nji,njk->nik", submit.poses[:, :3, :3], got.poses[:, :3, :3])
    skew = np.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], 1)
    angles = np.degrees(np.arctan2(np.linalg.norm(skew, axis=1) / 2, (np.trace(rel, axis1=1, axis2=2) - 1) / 2))
    np.testing.assert_allclose(angles, got.moved_deg, atol=0.01)
    assert angles.max() < 5.0 and np.linalg.norm(got.poses[:, :3, 3] - submit.poses[:, :3, 3], axis=1).max() < 0.2
    np.testing.assert_allclose(np.linalg.norm(got.poses[:, :3, 3] - submit.poses[:, :3, 3], axis=1), got.moved,
                               atol=1e-5)
    assert got.moved_deg.max() > 0.01        # it did refine something
    assert done.summary["cameras_refined"] == 5 and done.summary["camera_max_rotation_deg"] == pytest.approx(
        angles.max(), abs=0.01)
    stored = [m.TYPE for m in checkpoint.stored_messages(tmp_path / job.id)]
    assert stored[-2:] == ["cameras", "done"]


def test_photo_settings_are_checked_on_the_wire():
    with pytest.raises(protocol.ProtocolError, match="submit.camera_refine: 'maybe' is not one of off, on"):
        make_submit(camera_refine="maybe")
    with pytest.raises(protocol.ProtocolError, match="submit.background: 'sky' is not one of auto, on, off"):
        make_submit(background="sky")
    with pytest.raises(protocol.ProtocolError, match="submit.appearance: expected true or false"):
        make_submit(appearance=1)


def test_a_fit_that_estimates_materials_sends_metallic_and_the_light(tmp_path):
    """Submit.material_steps (issue 19): after the bake, base colour, roughness and metallic are
    estimated from the photos with the light (backend/export/materials.py: its accuracy is
    tested there, on a Cycles scene); the job sends the three textures marked free of lighting,
    then after the mesh a MaterialResult: the light (linear, twice as wide as high, positive) and
    the base colour as photo 0's camera sees it (the mesh where the photo shows the object); it
    says where the material came from in Done's summary and stores the result for a client that
    reattaches."""
    submit = make_submit(n=6, steps=120, texture_size=32, mesh_resolution=32, mesh_opacity=0.05, background="off",
                         material_steps=40)
    messages, job = run_job(tmp_path, submit)
    done = messages[-1]
    assert isinstance(done, protocol.Done), done
    textures = {m.kind: m for m in messages if isinstance(m, protocol.TextureResult)}
    assert {"albedo", "roughness", "metallic"} <= set(textures)
    assert textures["metallic"].image.shape == (32, 32, 1)
    assert not any(t.lighting_baked for t in textures.values())
    found = [m for m in messages if isinstance(m, protocol.MaterialResult)]
    assert len(found) == 1
    light = found[0].light
    rows = environment_rows(MaterialConfig().light_rows)      # the bins upsampled, the sun drawn in
    assert light.dtype == np.float32 and light.shape == (rows, 2 * rows, 3) and light.min() > 0
    view = found[0].albedo_view
    assert found[0].view_photo == 0 and view.shape == (16, 16, 4)
    covered, photo = view[..., 3] > 128, submit.images[0, ..., 3] > 128
    assert covered.any() and (covered & photo).sum() >= 0.5 * covered.sum()
    types = [m.TYPE for m in messages if m.TYPE in checkpoint.STORED_TYPES]
    assert types.index("material") == types.index("mesh") + 1
    summary = done.summary
    assert summary["material"] == "estimated" and summary["material_steps"] == 40
    assert np.linalg.norm(json.loads(summary["light_direction"])) == pytest.approx(1.0, abs=1e-3)
    assert 0 < summary["light_share"] <= 1
    stored = [m.TYPE for m in checkpoint.stored_messages(tmp_path / job.id)]
    assert "material" in stored


def test_material_settings_are_checked_on_the_wire():
    with pytest.raises(protocol.ProtocolError, match="submit.material_steps: materials are estimated on a textured mesh"):
        make_submit(material_steps=10, texture_size=0)
    sub = make_submit(texture_size=32)
    sub.albedo = sub.images[..., :3].copy()
    sub.material_steps = 10
    with pytest.raises(protocol.ProtocolError, match=r"the job has Blender's passes \(albedo\)"):
        sub.validate()
    with pytest.raises(protocol.ProtocolError, match="not a scene that moves"):
        make_submit(material_steps=10, texture_size=32, times=np.linspace(0, 1, 4))
    with pytest.raises(protocol.ProtocolError, match="material.light: an equirectangular image is twice as wide"):
        protocol.MaterialResult(job_id="j", light=np.ones((4, 4, 3), np.float32)).validate()
    with pytest.raises(protocol.ProtocolError, match="material.light: radiance must not be negative"):
        protocol.MaterialResult(job_id="j", light=-np.ones((4, 8, 3), np.float32)).validate()
    with pytest.raises(protocol.ProtocolError, match="material.light: contains NaN"):
        protocol.MaterialResult(job_id="j", light=np.full((4, 8, 3), np.nan, np.float32)).validate()
    with pytest.raises(protocol.ProtocolError, match="material.albedo_view: send a view with the photo it shows"):
        protocol.MaterialResult(job_id="j", light=np.ones((4, 8, 3), np.float32),
                                albedo_view=np.zeros((2, 2, 4), np.uint8)).validate()
