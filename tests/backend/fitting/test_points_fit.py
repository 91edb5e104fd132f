"""Signed distance fields fitted to points (fitting/points_trainer.py, issue 16), on the CPU: analytic
shapes scanned from a few viewpoints (benchmarks/point_cases.py: range noise, holes where no
viewpoint looks, outliers), meshed and scored against the true surface (Chamfer distance and
F-score at 1 % of the diagonal, as docs/benchmarks.md).  Each fit runs once (module fixtures) and
serves several tests."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import point_cases  # noqa: E402

from fit_implicit.backend.export.mesh import extract_mesh  # noqa: E402
from fit_implicit.backend.fitting.config import make_config  # noqa: E402
from fit_implicit.backend.fitting.metrics import chamfer  # noqa: E402
from fit_implicit.backend.fitting.point_cloud import make_cloud  # noqa: E402
from fit_implicit.backend.fitting.points_fit import fit_points, points_config  # noqa: E402

STEPS = 200     # 2026-12-07, one thread: the torus 0.252 % / 0.271 % of the diagonal with / without normals (300: 0.25 / 0.28)
NOISE = 0.003           # range noise, world units (the shapes are ~1.5 units across)


def _scan(name, outliers=0.0, seed=0):
    shape = point_cases.SHAPES[name]()
    pts, nrm = point_cases.scan(shape, point_cases.viewpoints(shape, 4, seed=seed), rays=56, noise=NOISE,
                                outliers=outliers, seed=seed)
    return shape, pts, nrm


def _fit(pts, nrm=None, colors=None, steps=STEPS, **settings):
    cfg = points_config("draft", device="cpu", steps=steps, seed=0, points_batch=2048,
                        points_space_batch=2048, **settings)
    model = fit_points(make_cloud(pts, nrm, colors), cfg)
    verts, faces, cols = extract_mesh(model, 96)
    return model, verts, faces, cols


def _score(shape, verts, faces):
    tv, tf = point_cases.truth(shape, 128)
    result = chamfer(tv, tf, verts, faces, samples=40000)
    diag = float(np.linalg.norm(tv.max(0) - tv.min(0)))
    return 100.0 * result["chamfer"] / diag, result["fscore"]


def _closed(faces) -> bool:
    """Every edge is shared by exactly two triangles."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return bool(len(faces)) and bool((counts == 2).all())


@pytest.fixture(scope="module")
def torus_fits():
    """The same noisy partial scan of a torus, fitted with its normals and without (SAL)."""
    shape, pts, nrm = _scan("torus")
    return shape, pts, _fit(pts, nrm), _fit(pts, None)


@pytest.mark.slow   # two 200-step fits, ~65 s on one thread
def test_torus_from_a_noisy_partial_scan_with_and_without_normals(torus_fits):
    """Without normals the fit estimates them (orientation auto).  Measured 2026-12-04 (2 cores, draft
    field, 300 steps): Chamfer 0.25 % / 0.28 % of the diagonal, F-score 1.000 / 0.999; the two
    surfaces 0.27 % apart."""
    shape, pts, (m1, v1, f1, _), (m2, v2, f2, _) = torus_fits
    (c1, fs1), (c2, fs2) = _score(shape, v1, f1), _score(shape, v2, f2)
    apart = chamfer(v1, f1, v2, f2, samples=40000)["chamfer"] / float(np.linalg.norm(v1.max(0) - v1.min(0))) * 100
    print(f"oriented: chamfer {c1:.3f} % F {fs1:.3f}; unoriented: chamfer {c2:.3f} % F {fs2:.3f}; apart {apart:.3f} %")
    assert c1 < 0.5 and fs1 > 0.95
    assert c2 < 0.5 and fs2 > 0.95
    assert apart < 0.5
    assert _closed(f1) and _closed(f2)
    assert "normals" not in m1.meta["points"] and m2.meta["points"]["normals"].startswith("estimated")
    # the mesh lands where the points are: same place and scale (no normalised frame leaks out)
    assert np.allclose(v1.min(0), pts.min(0), atol=0.03) and np.allclose(v1.max(0), pts.max(0), atol=0.03)


@pytest.mark.slow   # the command line end to end: one fit, ~30 s
def test_fit_points_command_cleans_a_scan_with_outliers_into_a_coloured_closed_mesh(tmp_path):
    """A coloured PLY scan of a sphere (red top half, blue bottom half) with 5 % outliers scattered
    over 1.5x its box, through `fit-implicit fit-points`: the outliers are filtered, the mesh is one
    closed surface in the scan's frame near the true sphere, coloured like the points nearest to it.
    Measured 2026-12-04 (2 cores, 300 steps): Chamfer 0.30 % of the diagonal, F-score 0.98 (200 steps,
    2026-12-07: 0.325 %, F 0.960, too near the bound)."""
    import trimesh

    from fit_implicit.backend.fitting.runs import load_run

    shape, pts, nrm = _scan("sphere", outliers=0.05, seed=1)
    centre = shape.box.mean(0)
    colours = np.where((pts[:, 2] > centre[2])[:, None], [220, 30, 30], [30, 30, 220]).astype(np.uint8)
    head = ("ply\nformat binary_little_endian 1.0\nelement vertex %d\nproperty double x\nproperty double y\n"
            "property double z\nproperty float nx\nproperty float ny\nproperty float nz\nproperty uchar red\n"
            "property uchar green\nproperty uchar blue\nend_header\n" % len(pts))
    rec = np.zeros(len(pts), [("p", "<f8", 3), ("n", "<f4", 3), ("c", "u1", 3)])
    rec["p"], rec["n"], rec["c"] = pts, nrm, colours
    (tmp_path / "scan.ply").write_bytes(head.encode() + rec.tobytes())
    out = tmp_path / "clean.ply"
    run = subprocess.run([sys.executable, "-m", "fit_implicit.backend.cli", "fit-points", str(tmp_path / "scan.ply"),
                          "--out", str(out), "--device", "cpu", "--preset", "draft", "--steps", "300",
                          "--voxel-size", "0.02", "--set", "points_batch=2048", "--set", "points_space_batch=2048",
                          "--run", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "with normals, with colours" in run.stdout and "outliers removed" in run.stdout and "mesh:" in run.stdout
    mesh = trimesh.load(out, process=False)                     # the written file, as another program reads it
    verts, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    c, fs = _score(shape, verts, faces)
    print(f"chamfer {c:.3f} % F {fs:.3f}")
    assert c < 0.5 and fs > 0.95 and _closed(faces)
    model = load_run(tmp_path / "run", device="cpu")
    assert model.meta["points"]["outliers_removed"] > 0.04 * len(pts)        # the 5 %, and some sparse surface
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    top, bottom = verts[:, 2] > centre[2] + 0.2, verts[:, 2] < centre[2] - 0.2
    assert colours[top, 0].mean() > 0.7 and colours[top, 2].mean() < 0.3
    assert colours[bottom, 2].mean() > 0.7 and colours[bottom, 0].mean() < 0.3
    # the kept field meshes again with `mesh`; its default textures need cameras, which it has not
    again = [sys.executable, "-m", "fit_implicit.backend.cli", "mesh", str(tmp_path / "run"), "--device", "cpu",
             "--mesh-resolution", "48", "--out"]
    told = subprocess.run(again + [str(tmp_path / "a.ply")], capture_output=True, text=True, timeout=300)
    assert told.returncode == 2 and "a fit to points has none" in told.stderr
    assert subprocess.run(again + [str(tmp_path / "b.ply"), "--texture-size", "0"], timeout=300).returncode == 0


# Measured 2026-12-05 (2 cores, the scan above, 300 steps; the hash grid: 0.25 %, F 1.000):
# siren 0.39 % / F 0.990, fourier (scale 2) 0.26 % / 1.000, positional 0.81 % / 0.861 (its finest octaves
# ripple the surface).  Bounds: (Chamfer % of the diagonal, F-score@1 %).  The positional encoding, the
# weakest for surfaces, is left to tests/backend/fields/test_encodings.py (its SDF starts as the sphere,
# its radiance field trains): its fit here cost ~75 s of make test for a loose bound.  The Fourier fit has
# settled by 150 steps (2026-12-07, one thread: 150 steps 0.259 % / F 1.000, 200 0.255 %; its steps cost
# three times the SIREN's), the SIREN has not (150: 1.34 %, 200: 0.63 %).
# Bounds: (steps, Chamfer % of the diagonal, F-score@1 %).
ENCODING_BOUNDS = {"siren": (300, 0.6, 0.97), "fourier": (150, 0.45, 0.98)}


@pytest.mark.slow   # two fits, ~110 s on one thread
def test_the_torus_with_each_other_encoding_and_a_run_that_keeps_it(tmp_path):
    """The setting ``encoding`` on a fit to points: each encoding recovers the torus; a saved run
    reloads with its encoding (the Fourier frequencies are drawn once and kept)."""
    from fit_implicit.backend.fitting.runs import load_run, save_run

    shape, pts, nrm = _scan("torus")
    for encoding, (steps, bound, fbound) in ENCODING_BOUNDS.items():
        model, verts, faces, _ = _fit(pts, nrm, encoding=encoding, steps=steps)
        c, fs = _score(shape, verts, faces)
        print(f"{encoding}: chamfer {c:.3f} % F {fs:.3f}")
        assert c < bound and fs > fbound and _closed(faces), encoding
        if encoding == "fourier":
            save_run(model, tmp_path / "run")
            again = load_run(tmp_path / "run", device="cpu")
            assert again.config.field.encoding == "fourier"
            x = torch.rand(256, 3) * 2 - 1
            with torch.no_grad():
                assert torch.equal(again.field.value(x), model.field.value(x))


def test_bad_settings_and_clouds_are_refused_clearly():
    shape, pts, _ = _scan("sphere")
    with pytest.raises(ValueError, match="no usable normals"):
        fit_points(make_cloud(pts), make_config("sdf", "draft", device="cpu", steps=1, points_orientation="oriented"))
    with pytest.raises(ValueError, match="points_detail must be in"):
        make_config("sdf", "draft", device="cpu", points_detail=2.0)
    with pytest.raises(ValueError, match="method sdf"):
        fit_points(make_cloud(pts), make_config("nerf", "draft", device="cpu", steps=1))
    few = pts[:20] + np.random.default_rng(0).normal(0, 1, (20, 3))
    with pytest.raises(ValueError, match="too few"):
        fit_points(make_cloud(few), make_config("sdf", "draft", device="cpu", steps=1))
