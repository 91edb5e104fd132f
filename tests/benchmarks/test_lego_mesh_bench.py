"""benchmarks/lego_mesh.py (issue 4's textured-mesh PSNR on lego), tested small on the CPU.

* The .glb helpers (no bpy): read back in Blender's frame, images re-encoded under a size cap.
* The scoring chain, with EXACT geometry: the ground-truth mesh of a bpy-generated scene
  (benchmarks/surface_scene.py, 16 + 2 views at 64^2) with a flat base colour, scored by the
  script: its silhouettes must equal the photos' and its pixels the texture's colour (cameras,
  intrinsics, Z-up conversion, importer and the unlit render are right).
* The whole benchmark on that scene: a real draft SDF fit, mesh, textures, Blender render.
Nothing is mocked: real training, real xatlas, real Blender (bpy wheel) in subprocesses.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bpy_helpers import requires_bpy

from helpers import REPO  # noqa: E402
sys.path.insert(0, str(REPO / "benchmarks"))

import lego_mesh as lm  # noqa: E402
from fit_implicit.backend.export import glb  # noqa: E402
from fit_implicit.backend.export import texture as tx  # noqa: E402
from stand_ins import sphere_mesh  # noqa: E402

SCRIPT = str(REPO / "benchmarks" / "lego_mesh.py")


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def gradient_textures(size: int = 64) -> tx.BakedTextures:
    """A smooth colour ramp (base colour) and a wavy tangent-space normal map."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    albedo = np.stack([x, y, 0.5 + 0.4 * np.sin(6 * x)], -1)
    n = np.stack([0.3 * np.sin(8 * x), 0.3 * np.cos(8 * y), np.ones_like(x)], -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)     # noqa: E731
    return tx.BakedTextures(to8(albedo), to8(n * 0.5 + 0.5), None, np.ones((size, size), bool))


# --------------------------------------------------------------------------------------------
# No Blender
# --------------------------------------------------------------------------------------------
def test_glb_reads_back_in_blenders_frame_and_shrinks_under_a_cap(tmp_path):
    verts, faces = sphere_mesh(radius=0.7, n=16)
    verts = verts + np.array([1.0, -2.0, 0.5])                 # off the origin: axis swaps show
    mesh = tx.unwrap(verts.astype(np.float32), faces, size=64, padding=2)
    baked = gradient_textures()
    path = glb.write_textured(tmp_path / "a.glb", mesh, baked)

    got = lm.read_textured_glb(path)
    np.testing.assert_allclose(got["vertices"], mesh.vertices, atol=1e-6)     # Z up, world units
    np.testing.assert_allclose(got["uvs"], mesh.uvs, atol=1e-6)               # v up again
    assert np.array_equal(got["faces"], mesh.faces)
    assert np.array_equal(got["textures"]["albedo"], baked.albedo)
    assert np.array_equal(got["textures"]["normal"], baked.normal)

    before = path.read_bytes()
    assert lm.fit_glb_under(path, len(before) + 1) == [] and path.read_bytes() == before

    # A cap no texture encoding can meet: a clear error naming what to lower.  On the way the
    # file was rewritten with JPEG textures: still a valid glb with the same geometry, colours
    # within a few levels (quality 95).
    with pytest.raises(ValueError, match="lower --faces or --texture-size"):
        lm.fit_glb_under(path, 1000)
    doc, _ = glb.read_glb(path)
    assert [im["mimeType"] for im in doc["images"]] == ["image/jpeg", "image/jpeg"]
    again = lm.read_textured_glb(path)
    np.testing.assert_allclose(again["vertices"], mesh.vertices, atol=1e-6)
    assert np.array_equal(again["faces"], mesh.faces)
    diff = np.abs(again["textures"]["albedo"].astype(int) - baked.albedo.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())


def test_psnr_on_white_and_silhouettes():
    truth = np.zeros((4, 4, 4), np.uint8)                      # fully transparent: white
    black = np.zeros((4, 4, 4), np.uint8)
    black[..., 3] = 255                                        # opaque black
    assert lm.psnr_on_white(truth, truth) == float("inf")
    assert lm.psnr_on_white(black, truth) == pytest.approx(0.0)          # mse 1 on [0, 1]
    half = black.copy()
    half[:2] = 0                                               # top half transparent
    assert lm.psnr_on_white(half, truth) == pytest.approx(10 * np.log10(2))
    assert lm.mask_iou(half, black) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        lm.psnr_on_white(black, black[:2])


def test_score_without_a_fit_says_what_is_missing(tmp_path):
    r = run("score", "--run", str(tmp_path), "--data", str(tmp_path), timeout=120)
    assert r.returncode == 2
    assert "lego.glb is missing: run the fit phase first" in r.stderr


# --------------------------------------------------------------------------------------------
# Blender
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """16 training + 2 held-out views at 64^2 of three textured objects (Cycles, ~6 s).  The
    benchmark splits transforms_train.json itself (every 8th held out), as on lego."""
    out = tmp_path_factory.mktemp("lego_mesh_scene")
    subprocess.run([sys.executable, "benchmarks/surface_scene.py", "--out", str(out), "--views", "16",
                    "--holdout", "2", "--size", "64", "--samples", "8"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return out


@requires_bpy
@pytest.mark.blender
def test_scoring_is_exact_for_the_true_geometry(scene, tmp_path):
    from surface_fit import read_mesh

    verts, faces = read_mesh(scene / "ground_truth.ply")
    mesh = tx.unwrap(verts.astype(np.float32), faces, size=128, padding=2)
    s = 128
    flat = tx.BakedTextures(np.full((s, s, 3), 200, np.uint8), np.tile(np.array([128, 128, 255], np.uint8), (s, s, 1)),
                            None, np.ones((s, s), bool))
    glb.write_textured(tmp_path / lm.GLB_NAME, mesh, flat)
    (tmp_path / lm.HOLDOUT_JSON).write_text(json.dumps(lm.holdout_doc(scene, 8)))
    r = run("score", "--run", str(tmp_path), "--data", str(scene), "--samples", "8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    score = json.loads((tmp_path / lm.SCORE_JSON).read_text())
    assert [v["name"] for v in score["views"]] == ["r_000", "r_008"]
    # Same geometry, same cameras: the silhouettes agree (measured 1.0000 on both views).
    assert min(v["mask_iou"] for v in score["views"]) > 0.99, score["views"]
    # Unlit: inside the silhouette every pixel is the texture's 8-bit colour, exactly.
    pred = np.asarray(Image.open(tmp_path / lm.SIDE_BY_SIDE))[:, :64]
    covered = np.all(pred != 255, axis=-1)
    assert covered.mean() > 0.1
    values, counts = np.unique(pred[covered], return_counts=True)
    assert values[np.argmax(counts)] == 200 and counts.max() > 0.7 * covered.sum() * 3


@requires_bpy
@pytest.mark.blender
@pytest.mark.slow   # ~50 s on 2 cores: a 150-step draft SDF fit, mesh, textures, Blender renders
def test_fit_then_score_end_to_end(scene, tmp_path):
    out = tmp_path / "run"
    r = run("fit", "--data", str(scene), "--out", str(out), "--method", "sdf", "--preset", "draft",
            "--seconds", "0", "--steps", "150", "--texture-size", "256", "--mesh-resolution", "64", "--device", "cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fit = json.loads((out / lm.FIT_JSON).read_text())
    assert fit["steps"] == 150 and fit["holdout_views"] == 2 and fit["train_views"] == 14
    assert fit["passes"] == [] and fit["lighting_baked"] is True       # photo-only, as on lego
    assert fit["faces"] > 1000 and 0 < fit["export_s"] and fit["texture_size"] == 256
    held = json.loads((out / lm.HOLDOUT_JSON).read_text())
    assert held["files"] == ["train/r_000.png", "train/r_008.png"] and held["width"] == 64
    assert all((out / f).stat().st_size < 16 * 2**20 for f in (lm.GLB_NAME, lm.FIT_JSON, lm.HOLDOUT_JSON))

    r = run("score", "--run", str(out), "--data", str(scene), "--samples", "8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "nerf2mesh" in r.stdout and "target >= 29 dB" in r.stdout     # issue 12: 29 dB from a surface field
    score = json.loads((out / lm.SCORE_JSON).read_text())
    # Bounds for a 20 s draft fit on 64^2 images (measured: 19.8 dB mean, silhouette IoU
    # 0.81 / 0.87; the field's own volume rendering 20.5 dB).  An empty (all white) render
    # scores 13.0 dB on these two views, so 17 dB needs the object in place with roughly its
    # colours; and the exported asset may lose at most 2 dB against the field it came from
    # (measured 0.7 dB): the export + import + render chain keeps what was learnt.
    assert score["mean_psnr"] > 17.0, score
    assert score["mean_psnr"] > fit["field_holdout_psnr"] - 2.0, (score["mean_psnr"], fit["field_holdout_psnr"])
    assert min(v["mask_iou"] for v in score["views"]) > 0.7, score["views"]
    assert score["mean_psnr_vs_field"] is not None
    assert (out / lm.SIDE_BY_SIDE).stat().st_size > 0


@requires_bpy
@pytest.mark.blender
@pytest.mark.slow   # ~40 s on 2 cores: a 200-step draft radiance-field fit, two exports, one Blender score
def test_a_radiance_field_is_exported_at_its_own_level_and_at_extra_ones(scene, tmp_path):
    from fit_implicit.backend.export.iso import CANDIDATES

    out = tmp_path / "run"
    r = run("fit", "--data", str(scene), "--out", str(out), "--method", "nerf", "--preset", "draft",
            "--seconds", "0", "--steps", "200", "--texture-size", "128", "--mesh-resolution", "48", "--device", "cpu",
            "--no-field-renders", "--extra-levels", "0.2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fit = json.loads((out / lm.FIT_JSON).read_text())
    assert fit["mesh_opacity"] in CANDIDATES and fit["extra_levels"] == [0.2]    # chosen from the renders
    level = out / "level_0.2"
    extra = json.loads((level / lm.FIT_JSON).read_text())
    assert extra["mesh_opacity"] == 0.2 and extra["faces"] > 100
    assert (level / lm.GLB_NAME).stat().st_size > 0 and (level / lm.HOLDOUT_JSON).exists()
    r = run("score", "--run", str(level), "--data", str(scene), "--samples", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((level / lm.SCORE_JSON).read_text())["mean_psnr"] > 13.0   # white: 13.0 dB


def test_extra_levels_are_checked(tmp_path):
    for args, message in ((["--extra-levels", "0.2,1.5"], "opacities in (0, 1)"),
                          (["--extra-levels", "0.3", "--method", "sdf"], "--extra-levels cuts radiance fields")):
        r = run("fit", "--data", str(REPO / "tests"), "--out", str(tmp_path), *args, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
