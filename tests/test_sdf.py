"""Signed distance fields (``--method sdf``): NeuS compositing maths, the eikonal term, and small
fits on analytic shapes ray-traced with numpy (no bpy), meshed at level 0 of ``inside_field``.

The shapes sit at world centre (3, -2, 5), scaled by 2.5, in a box of half-size 2.875: a leak of
the trainer's normalised frame (centre 0, half-size 1) into the field's values or the mesh would
be off by metres.  :func:`shape_scene` and :func:`mesh_of` are shared with
tests/test_surface_model.py and tests/test_occupancy_field.py.

Bounds, and why (CPU fit of the draft preset's 300 steps, 16 views of 40x40):
* torus Chamfer <= 1.5% of the ground-truth box diagonal and F-score at 2% >= 0.8: one 64^3
  marching-cubes voxel is 1.6% of that diagonal, so these ask for about a voxel.  Measured with
  seed 0: 0.63% (F 0.99); the initial sphere scores 7.0% (F 0.14), a fit stopped at 200 steps,
  its hole still closed, 2.4% (F 0.69).  inside_field at the ring's core: 0.48 (exact 0.55).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fit_implicit.backend.fitting import metrics
from fit_implicit.backend.fitting.data import PosedImages
from fit_implicit.backend.render.surface import keep_until, neus_optical_depth, Samples
from fit_implicit.backend.fitting.config import make_config
from fit_implicit.backend.fitting.loop import Callbacks, fit
from fit_implicit.shared import cameras

CENTER = np.array([3.0, -2.0, 5.0])
TEST_STEPS = 200       # CPU test fits of spheres (the draft preset's 300, shortened)
SCALE = 2.5
LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])


# ---- analytic shapes (world units) -------------------------------------------------------------
def sphere_sdf(p: np.ndarray) -> np.ndarray:
    """Sphere of radius 0.6 * SCALE at CENTER; p (..., 3) -> (...,)."""
    return np.linalg.norm(p - CENTER, axis=-1) - 0.6 * SCALE


def torus_sdf(p: np.ndarray) -> np.ndarray:
    """Torus around the z axis through CENTER: radii 0.55 and 0.22 (times SCALE)."""
    q = (p - CENTER) / SCALE
    ring = np.sqrt(q[..., 0] ** 2 + q[..., 1] ** 2) - 0.55
    return (np.sqrt(ring ** 2 + q[..., 2] ** 2) - 0.22) * SCALE


def two_colours(p: np.ndarray) -> np.ndarray:
    """Base colour: red above CENTER's z, blue below (sRGB)."""
    up = (p[..., 2] > CENTER[2])[..., None]
    return np.where(up, [0.85, 0.15, 0.1], [0.1, 0.2, 0.85])


def gradient(sdf, p: np.ndarray, h: float = 1e-4) -> np.ndarray:
    e = np.eye(3) * h
    g = np.stack([sdf(p + e[i]) - sdf(p - e[i]) for i in range(3)], -1)
    return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)


def trace(sdf, colour, origins, dirs):
    """Sphere tracing.  Returns shaded rgb (..., 3), albedo (..., 3), hit (...,) bool."""
    t = np.zeros(origins.shape[:-1])
    for _ in range(96):
        t = np.minimum(t + sdf(origins + t[..., None] * dirs), 100.0 * SCALE)
    p = origins + t[..., None] * dirs
    hit = np.abs(sdf(p)) < 1e-3 * SCALE
    n = gradient(sdf, p)
    albedo = np.where(hit[..., None], colour(p), 0.0)
    shade = 0.3 + 0.7 * np.clip(np.sum(n * LIGHT, -1), 0.0, 1.0)
    return albedo * shade[..., None], albedo, hit


def two_roughnesses(p: np.ndarray) -> np.ndarray:
    """Roughness: 0.2 above CENTER's z (glossy), 0.8 below (matte)."""
    return np.where(p[..., 2] > CENTER[2], 0.2, 0.8)


def shape_scene(sdf, colour=lambda p: np.broadcast_to([0.8, 0.6, 0.3], p.shape), count: int = 16,
                size: int = 40, ss: int = 2, passes: tuple = (), roughness=two_roughnesses) -> PosedImages:
    """Views on a ring around the shape (elevations -20, 15, 50 deg), RGBA with alpha masks;
    ``passes`` among "albedo", "normal", "depth", "roughness" adds those supervision passes
    (backend/fitting/data.py's passes; roughness from ``roughness(points)``, -1 where no sub-pixel hit)."""
    pos = cameras.ring_positions(CENTER, 4.2 * SCALE, count, elevations_deg=(-20.0, 15.0, 50.0))
    poses = np.stack([cameras.look_at(p, CENTER) for p in pos])
    k = cameras.intrinsics_from_fov(0.7, size, size)
    images, albedos, normals, depths, roughs = [], [], [], [], []
    for pose in poses:
        o, d = cameras.pixel_rays(k * ss, pose, size * ss, size * ss)
        rgb, alb, hit = trace(sdf, colour, o, d)
        a = hit.astype(np.float64)[..., None]

        def down(x):
            return x.reshape(size, ss, size, ss, -1).mean((1, 3))

        alpha = down(a)
        straight = down(rgb * a) / np.maximum(alpha, 1e-9)
        images.append(np.concatenate([straight, alpha], -1))
        albedos.append(down(alb * a) / np.maximum(alpha, 1e-9))
        # normal and z-depth at the hit points, averaged over the sub-pixels that hit
        t = np.zeros(o.shape[:-1])
        for _ in range(96):
            t = np.minimum(t + sdf(o + t[..., None] * d), 100.0 * SCALE)
        n = down(gradient(sdf, o + t[..., None] * d) * a)
        normals.append(n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9) * (alpha > 0))
        z = t[..., None] * (d @ -pose[:3, 2])[..., None]
        depths.append((down(z * a) / np.maximum(alpha, 1e-9))[..., 0])
        r = down(roughness(o + t[..., None] * d)[..., None] * a) / np.maximum(alpha, 1e-9)
        roughs.append(np.where(alpha > 0, r, -1.0)[..., 0])
    images = (np.clip(np.stack(images), 0, 1) * 255 + 0.5).astype(np.uint8)
    aabb = np.stack([CENTER - 1.15 * SCALE, CENTER + 1.15 * SCALE])
    passes = {name: value for name, value in (
        ("albedo", (np.clip(np.stack(albedos), 0, 1) * 255 + 0.5).astype(np.uint8)),
        ("normal", np.stack(normals).astype(np.float32)),
        ("depth", np.stack(depths).astype(np.float32)),
        ("roughness", np.stack(roughs).astype(np.float32))) if name in passes}
    ks = np.repeat(k[None], count, 0)
    return PosedImages(images, ks, poses, aabb, [f"view_{i}" for i in range(count)], passes=passes)


# ---- meshes --------------------------------------------------------------------------------------
def grid_values(fn, aabb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """fn on an n^3 grid over aabb: values (n, n, n) and spacing (3,)."""
    axes = [np.linspace(aabb[0][i], aabb[1][i], n) for i in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return fn(pts).reshape(n, n, n), (aabb[1] - aabb[0]) / (n - 1)


def mesh_of(fn, aabb: np.ndarray, n: int, level: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of ``fn`` (world points (M, 3) -> (M,)) at ``level``: world vertices, faces."""
    from skimage.measure import marching_cubes

    values, spacing = grid_values(fn, aabb, n)
    verts, faces, _, _ = marching_cubes(values, level, spacing=tuple(spacing))
    return verts + aabb[0], faces


def model_mesh(model, n: int = 64):
    """Level 0 of the fitted field's inside_field (positive inside)."""
    def fn(p):
        return model.inside_field(torch.from_numpy(p).float().to(model.device)).cpu().numpy()
    return mesh_of(fn, model.aabb, n)


def surface_scores(model, sdf, n: int = 64, threshold_share: float = 0.01) -> dict:
    """Chamfer / F-score of the fitted surface against the analytic one (both meshed), the
    distances as shares of the ground-truth box diagonal."""
    gt_v, gt_f = mesh_of(lambda p: -sdf(p), model.aabb, 128)
    v, f = model_mesh(model, n)
    diag = float(np.linalg.norm(gt_v.max(0) - gt_v.min(0)))
    s = metrics.chamfer(gt_v, gt_f, v, f, samples=20000, threshold=threshold_share * diag)
    return {"chamfer_share": s["chamfer"] / diag, "fscore": s["fscore"], "diag": diag}


# ---- tests -------------------------------------------------------------------------------------
def test_neus_opacity_of_a_plane_matches_the_logistic_cdf():
    # A ray crossing the plane sdf = 1 - t head on (cos = -1): NeuS's opacity up to distance t
    # is 1 - Phi(s * sdf(t)) / Phi(s * sdf(0)), whatever the step.
    inv_s = torch.tensor(20.0)
    for delta in (0.01, 0.05):
        t = torch.arange(0.0, 2.0, delta) + 0.5 * delta
        tau = neus_optical_depth(1.0 - t, torch.full_like(t, -1.0), delta, inv_s, cos_anneal=1.0)
        transmittance = torch.exp(-tau.cumsum(0))
        expected = torch.sigmoid(inv_s * (1.0 - (t + 0.5 * delta))) / torch.sigmoid(inv_s * 1.0)
        assert torch.allclose(transmittance, expected, atol=1e-5)
    # leaving the surface (sdf increasing along the ray) adds no opacity
    tau = neus_optical_depth(torch.linspace(-1, 1, 50), torch.ones(50), 0.04, inv_s)
    assert torch.all(tau == 0)
    # deep inside the optical depth stays finite (no 0/0)
    tau = neus_optical_depth(torch.tensor([-50.0]), torch.tensor([-1.0]), 0.01, torch.tensor(1e4))
    assert torch.isfinite(tau).all() and tau.item() > 50


def test_keep_until_drops_samples_behind_the_first_stop():
    counts = torch.tensor([3, 0, 4])
    ray = torch.tensor([0, 0, 0, 2, 2, 2, 2])
    stop = torch.tensor([False, True, True, False, False, True, False])
    s = keep_until(Samples(torch.arange(7.0), torch.zeros(7, 3), ray, counts), stop)
    assert s.t.tolist() == [0.0, 1.0, 3.0, 4.0, 5.0] and s.counts.tolist() == [2, 0, 3]


def test_eikonal_term_makes_gradients_unit():
    """An SDF whose gradients start far from unit (random weights on its value output: mean
    | |grad| - 1 | above 0.3) reaches below 0.05 (mean over the box) from the eikonal term alone."""
    from fit_implicit.backend.fields.hashgrid import HashGridConfig
    from fit_implicit.backend.fields.sdf import SdfField, SurfaceFieldConfig

    torch.manual_seed(0)
    field = SdfField(SurfaceFieldConfig(grid=HashGridConfig(levels=4, log2_table=12, max_res=64), hidden=32))
    with torch.no_grad():
        field.geometry_net[-1].weight[:1].normal_(0.0, 0.5)
    x = torch.rand(2048, 3) * 2 - 1

    def deviation():
        with torch.no_grad():
            g = field.geometry_with_derivatives(x, 0.01)[2]
        return float((g.norm(dim=-1) - 1).abs().mean())

    assert deviation() > 0.3, deviation()
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    for _ in range(100):
        g = field.geometry_with_derivatives(torch.rand(512, 3) * 2 - 1, 0.01)[2]
        loss = ((g.norm(dim=-1) - 1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert deviation() < 0.05, deviation()


@pytest.fixture(scope="module")
def torus_model():
    data = shape_scene(torus_sdf, count=16, size=40)
    # the draft preset's 300 steps: opening the hole takes longer than fitting a sphere
    cfg = make_config("sdf", "draft", device="cpu", preview_size=0, seed=0)
    return fit(data, cfg)


@pytest.mark.slow   # a CPU fit of ~30 s
def test_torus_fit_reaches_the_chamfer_bound(torus_model):
    scores = surface_scores(torus_model, torus_sdf, threshold_share=0.02)
    assert scores["chamfer_share"] <= 0.015 and scores["fscore"] >= 0.8, scores
    # the hole is open: the centre of the torus is outside
    inside = torus_model.inside_field(torch.tensor(CENTER[None], dtype=torch.float32))
    assert inside.item() < 0
    # inside_field is minus the signed distance in world units (roughly, a fit's SDF is no exact
    # distance): at the ring's core, 0.22 * SCALE = 0.55 inside
    core = torch.tensor((CENTER + [0.55 * SCALE, 0, 0])[None], dtype=torch.float32)
    assert 0.3 < torus_model.inside_field(core).item() < 0.8


def test_methods_are_listed_everywhere():
    from fit_implicit.backend.cli import build_parser
    from fit_implicit.shared import protocol

    for method in ("nerf", "sdf", "occupancy"):
        assert method in protocol.METHODS
        cfg = make_config(method, "draft", device="cpu")
        assert cfg.method == method
        args = build_parser().parse_args(["fit", "data", "--out", "run", "--method", method])
        assert args.method == method
    with pytest.raises(ValueError, match="method 'voxels' is not one of nerf, sdf, occupancy"):
        make_config("voxels", "draft", device="cpu")
    assert math.isclose(make_config("sdf", "draft", device="cpu").occupancy.occupancy_decay, 0.5)


def test_cli_fits_and_saves_an_sdf_run(tmp_path):
    """``fit-implicit fit --method sdf`` writes a run that loads back as an SDF."""
    import json

    import synthetic
    from fit_implicit.backend.cli import main
    from fit_implicit.backend.fitting.runs import load_run

    synthetic.write_transforms(tmp_path / "data", count=6, size=20)
    rc = main(["fit", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--method", "sdf",
               "--preset", "draft", "--steps", "3", "--device", "cpu"])
    assert rc == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["method"] == "sdf"
    model = load_run(tmp_path / "run", device="cpu")
    assert model.method == "sdf" and model.meta["steps"] == 3
    assert model.inside_field(torch.tensor(synthetic.CENTER[None], dtype=torch.float32)).item() > 0


def test_surface_settings_out_of_range_are_named():
    data = shape_scene(sphere_sdf, count=2, size=8)
    for key, value, words in (("start_levels", 0, "start_levels must be in"),
                              ("eikonal_weight", -1.0, "eikonal_weight must not be negative"),
                              ("init_radius", 1.5, "init_radius must be in")):
        with pytest.raises(ValueError, match=words):     # refused by make_config, before any fit
            fit(data, make_config("sdf", "draft", device="cpu", preview_size=0, **{key: value}))


def test_supervision_passes_reach_the_losses():
    """With albedo, normal, depth and roughness passes every pass term is active:
    each is positive for the initial sphere (which is not this torus) and training takes them."""
    from fit_implicit.backend.fitting.surface_trainer import SurfaceTrainer

    torch.manual_seed(0)
    data = shape_scene(torus_sdf, count=4, size=16, passes=("albedo", "normal", "depth", "roughness"))
    assert np.allclose(np.linalg.norm(data.passes["normal"][data.images[..., 3] == 255], axis=-1), 1, atol=1e-3)
    cfg = make_config("sdf", "draft", device="cpu", preview_size=0, albedo_weight=1.0, normal_weight=1.0,
                      depth_weight=1.0, roughness_weight=1.0, batch_rays=256)
    trainer = SurfaceTrainer(data, cfg)
    assert trainer.passes == ["albedo", "normal", "depth", "roughness"]
    assert trainer.model.meta["lighting_baked"] is False and trainer.model.meta["roughness"] is True
    trainer.update_step(0, 0.0)
    o, d, rgba, passes = trainer.sampler.sample_passes(512)
    out = trainer.model.trace_surface(o, d, normals=True, albedo=True, roughness=True)
    alone = {}
    for key in ("albedo", "normal", "depth", "roughness"):
        alone[key] = float(trainer._pass_losses(out, {key: passes[key]}, rgba[:, 3]).detach())
    assert all(v > 1e-3 for v in alone.values()), alone
    for step in range(3):
        trainer.update_step(step, step / cfg.steps)
        loss, _, samples = trainer.step()
        assert torch.isfinite(loss) and samples > 0


@pytest.mark.slow   # a CPU fit of ~15 s
def test_a_roughness_pass_gives_a_roughness_texture_on_the_right_faces():
    """A sphere glossy on top (roughness 0.2) and matte below (0.8), with a roughness pass (-1
    off the object): the fitted field's roughness head learns the halves, and the baked
    roughness texture carries them onto the mesh's faces (within 0.1 away from the seam)."""
    from fit_implicit.backend.export import texture as tx

    data = shape_scene(sphere_sdf, count=12, size=32, passes=("roughness",))
    assert (data.passes["roughness"][data.images[..., 3] == 0] == -1).all()
    cfg = make_config("sdf", "draft", device="cpu", preview_size=0, steps=TEST_STEPS, seed=0)
    model = fit(data, cfg)
    assert model.meta["roughness"] is True and model.meta["lighting_baked"] is True
    verts, faces = model_mesh(model, 48)
    mesh, baked = tx.texture_mesh(model, verts.astype(np.float32), faces.astype(np.int64), 128, padding=2)
    assert baked.roughness is not None and baked.roughness.shape == (128, 128, 1)
    centre = mesh.vertices[mesh.faces].mean(1)
    got = tx.sample_texture(baked.roughness, mesh.uvs[mesh.faces].mean(1))[:, 0] / 255.0
    height = (centre[:, 2] - CENTER[2]) / (0.6 * SCALE)
    top, bottom = height > 0.3, height < -0.3
    assert top.sum() > 50 and bottom.sum() > 50
    assert abs(np.median(got[top]) - 0.2) < 0.1 and abs(np.median(got[bottom]) - 0.8) < 0.1, \
        (np.median(got[top]), np.median(got[bottom]))
    assert np.mean(np.abs(got[top] - 0.2) < 0.15) > 0.9 and np.mean(np.abs(got[bottom] - 0.8) < 0.15) > 0.9
    # without the pass there is no roughness estimate, so no roughness texture
    plain = fit(shape_scene(sphere_sdf, count=4, size=8), make_config("sdf", "draft", device="cpu",
                                                                      preview_size=0, steps=2))
    assert "roughness" not in plain.surface_attributes(centre[:4].astype(np.float32))


@pytest.mark.slow   # three methods x 40 CPU steps
@pytest.mark.parametrize("method", ["sdf", "occupancy", "nerf"])
def test_a_fit_resumed_from_a_checkpoint_ends_where_the_whole_fit_ends(method):
    """Every method checkpoints and resumes (a killed backend loses at most the last interval):
    20 steps in one go and 8 + 12 steps resumed from the state taken at step 8 give the same
    weights (same seed, CPU, the RNG state travels with the checkpoint)."""
    data = shape_scene(sphere_sdf, count=6, size=16, ss=1)
    cfg = make_config(method, "draft", device="cpu", steps=20, preview_size=0, seed=3)

    class Keep(Callbacks):
        state = None

        def on_checkpoint(self, step, state):
            if step == 8:       # a copy, as a checkpoint file is: state() holds the live tensors
                self.state = copy.deepcopy(state())

    keep = Keep()
    whole = fit(data, cfg, keep)
    assert keep.state is not None and keep.state["step"] == 8
    resumed = fit(data, cfg, resume=keep.state)
    assert resumed.meta["resumed_from_step"] == 8 and resumed.meta["steps"] == 20
    for (name, a), b in zip(whole.field.state_dict().items(), resumed.field.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
