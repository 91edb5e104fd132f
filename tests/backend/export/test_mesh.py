"""Mesh extraction on analytic fields (world coordinates, winding, colours, floaters, cavities)
and mesh files read back with small independent readers."""
import types

import numpy as np
import pytest
import torch
from torch import nn

from fit_implicit.backend.export.cleanup import euler_characteristic, is_watertight, signed_volume
from fit_implicit.backend.export.iso import DEFAULT_OPACITY, iso_level
from fit_implicit.backend.export.files import write_mesh
from fit_implicit.backend.export.mesh import extract_mesh
from fit_implicit.backend.fitting.model import FittedField
from fit_implicit.backend.render.occupancy_grid import OccupancyGrid
from fit_implicit.backend.fitting.config import make_config
from fit_implicit.shared.color import srgb_to_linear
from mesh_files import read_glb, read_obj, read_ply

AABB = np.array([[7.0, -7.0, -1.0], [13.0, -1.0, 5.0]])       # centre (10, -4, 2), half-size 3
CENTER_N = torch.tensor([0.5 / 3.0, 0.0, 0.0])                 # sphere centre, normalised
RADIUS_N = 0.6                                                 # normalised; 1.8 world
SPHERE_CENTER = np.array([10.5, -4.0, 2.0])
SPHERE_RADIUS = 1.8


class AnalyticField(nn.Module):
    """Density crossing the iso-level exactly on a sphere; red where x > centre, blue elsewhere.
    Optionally a floater and an interior cavity."""

    def __init__(self, floater=False, cavity=False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.floater, self.cavity = floater, cavity

    def density(self, x):
        r = (x - CENTER_N).norm(dim=-1)
        sigma = iso_level() * torch.exp(20.0 * (RADIUS_N - r))
        if self.cavity:
            sigma = torch.where(r < 0.3, torch.zeros_like(sigma), sigma)
        if self.floater:
            sigma = torch.where((x - torch.tensor([-0.8, -0.8, -0.8])).norm(dim=-1) < 0.04, 1e3, sigma)
        return sigma

    def forward(self, x, d):
        red = (x[:, 0] > CENTER_N[0]).float()
        rgb = torch.stack([red, torch.zeros_like(red), 1.0 - red], dim=-1)
        return self.density(x), rgb


def analytic_model(**kw):
    # the level the analytic density is built around (the automatic choice is tested in test_iso.py)
    cfg = make_config(preset="draft", device="cpu", march_steps=512, mesh_opacity=DEFAULT_OPACITY)
    return FittedField(AnalyticField(**kw), OccupancyGrid(16), AABB, cfg)


def test_sphere_mesh_in_world_coordinates():
    verts, faces, colors = extract_mesh(analytic_model(), mesh_resolution=64)
    assert verts.dtype == np.float32 and faces.dtype == np.int32 and colors.dtype == np.float32
    voxel = 6.0 / 63
    dist = np.linalg.norm(verts - SPHERE_CENTER, axis=1)
    assert np.abs(dist - SPHERE_RADIUS).max() < 0.25 * voxel
    # counter-clockwise seen from outside: positive signed volume close to the sphere's
    a, b, c = (verts[faces[:, i]].astype(np.float64) - SPHERE_CENTER for i in range(3))
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    assert volume == pytest.approx(4 / 3 * np.pi * SPHERE_RADIUS ** 3, rel=0.02)
    # colours follow the world side of the sphere (away from the seam at x = 10.5)
    right, left = verts[:, 0] > 10.5 + voxel, verts[:, 0] < 10.5 - voxel
    assert np.allclose(colors[right], [1, 0, 0], atol=0.05) and np.allclose(colors[left], [0, 0, 1], atol=0.05)


def test_floaters_dropped_and_cavities_filled():
    verts, _, _ = extract_mesh(analytic_model(floater=True, cavity=True), mesh_resolution=64)
    dist = np.linalg.norm(verts - SPHERE_CENTER, axis=1)
    assert np.abs(dist - SPHERE_RADIUS).max() < 0.25 * 6.0 / 63      # only the outer surface is left


def test_empty_field_gives_empty_mesh():
    model = analytic_model()
    model.field.density = lambda x: torch.zeros(x.shape[0])
    verts, faces, colors = extract_mesh(model, mesh_resolution=16)
    assert verts.shape == (0, 3) and faces.shape == (0, 3) and colors.shape == (0, 3)


# ---- files ----------------------------------------------------------------------------------
TETRA_V = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) + np.array([5, -3, 2], np.float32)
TETRA_F = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
TETRA_C = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 0.75]], np.float32)


def test_ply_roundtrip(tmp_path):
    v, f, c = read_ply(write_mesh(tmp_path / "m.ply", TETRA_V, TETRA_F, TETRA_C))
    assert np.array_equal(v, TETRA_V) and np.array_equal(f, TETRA_F)
    assert np.array_equal(c, (TETRA_C * 255 + 0.5).astype(np.uint8))


def test_obj_roundtrip(tmp_path):
    v, f, c = read_obj(write_mesh(tmp_path / "m.obj", TETRA_V, TETRA_F, TETRA_C))
    assert np.allclose(v, TETRA_V, atol=1e-5) and np.array_equal(f, TETRA_F) and np.allclose(c, TETRA_C, atol=1e-4)


def test_glb_roundtrip(tmp_path):
    v, f, c = read_glb(write_mesh(tmp_path / "m.glb", TETRA_V, TETRA_F, TETRA_C))
    assert np.allclose(v, TETRA_V) and np.array_equal(f, TETRA_F)
    assert np.allclose(c, srgb_to_linear(TETRA_C))                   # glTF colours are linear
    assert srgb_to_linear(np.array([0.5]))[0] == pytest.approx(0.21404, abs=1e-4)


def test_write_mesh_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown mesh format"):
        write_mesh(tmp_path / "m.stl", TETRA_V, TETRA_F, TETRA_C)
    with pytest.raises(ValueError, match="face indices"):
        write_mesh(tmp_path / "m.ply", TETRA_V, TETRA_F + 1, TETRA_C)
    with pytest.raises(ValueError, match="empty"):
        write_mesh(tmp_path / "m.glb", TETRA_V[:0], TETRA_F[:0], TETRA_C[:0])


# ---- surface fields through inside_field / surface_attributes ------------------------------
# Analytic stand-ins for backend.fitting.model.FittedField (methods "sdf" and "occupancy"): they offer
# exactly what the mesher uses (method, aabb, device, inside_field, surface_attributes), with
# known geometry, so the tests measure the mesher's error and not a fit's.
FAR_CENTER = np.array([1000.5, -250.25, 42.0])       # a non-trivial world offset and scale
FAR_RADIUS = 37.5
FAR_BOX = np.array([FAR_CENTER - [45.0, 55.0, 50.0], FAR_CENTER + [60.0, 50.0, 52.0]])


class StandIn:
    """Union of spheres ``[(centre, radius), ...]`` (world units), or a torus around z."""

    def __init__(self, method="sdf", spheres=((FAR_CENTER, FAR_RADIUS),), aabb=FAR_BOX, torus=None, device="cpu"):
        self.method, self.aabb, self.device = method, np.asarray(aabb, np.float64), torch.device(device)
        self.spheres = [(torch.tensor(c, dtype=torch.float64), r) for c, r in spheres]
        self.torus, self.evaluated = torus, 0

    def inside_field(self, x):
        assert x.dtype == torch.float32 and x.ndim == 2 and x.shape[1] == 3
        self.evaluated += len(x)
        x = x.double()
        if self.torus is not None:
            c, big, small = self.torus
            q = x - torch.tensor(c, dtype=torch.float64, device=x.device)
            d = small - torch.sqrt((q[:, :2].norm(dim=1) - big) ** 2 + q[:, 2] ** 2)
        else:
            d = torch.stack([r - (x - c.to(x.device)).norm(dim=1) for c, r in self.spheres]).amax(0)
        # "sdf": minus the signed distance; "occupancy": a logit (here 4 per world unit)
        return (d if self.method == "sdf" else 4.0 * d).float()

    def surface_attributes(self, points, normals=None):
        red = (points[:, 0] > FAR_CENTER[0]).astype(np.float32)
        return {"albedo": np.stack([red, np.full_like(red, 0.5), 1.0 - red], 1),
                "normal": normals}


def voxel_of(aabb, resolution):
    return float((aabb[1] - aabb[0]).max()) / (resolution - 1)


@pytest.mark.parametrize("method", ["sdf", "occupancy"])
def test_surface_field_mesh_in_scene_units(method):
    """A sphere of known centre/radius far from the origin lands where it is, closed and outward."""
    verts, faces, colors = extract_mesh(StandIn(method), mesh_resolution=64)
    voxel = voxel_of(FAR_BOX, 64)
    dist = np.linalg.norm(verts.astype(np.float64) - FAR_CENTER, axis=1)
    assert np.abs(dist - FAR_RADIUS).max() < 0.05 * voxel
    assert np.abs(verts.mean(0) - FAR_CENTER).max() < 0.05 * voxel
    assert is_watertight(faces) and euler_characteristic(verts, faces) == 2
    assert signed_volume(verts, faces) == pytest.approx(4 / 3 * np.pi * FAR_RADIUS ** 3, rel=0.005)
    right, left = verts[:, 0] > FAR_CENTER[0] + voxel, verts[:, 0] < FAR_CENTER[0] - voxel
    assert np.allclose(colors[right], [1, 0.5, 0]) and np.allclose(colors[left], [0, 0.5, 1])


def test_torus_keeps_its_genus():
    aabb = np.array([[-2.0, -2.0, -1.0], [2.0, 2.0, 1.0]])
    verts, faces, _ = extract_mesh(StandIn(torus=((0.0, 0.0, 0.0), 1.2, 0.4), aabb=aabb), mesh_resolution=64)
    assert is_watertight(faces) and euler_characteristic(verts, faces) == 0


def test_surface_cut_by_the_box_is_closed_on_the_box():
    aabb = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 0.5]])     # the sphere pokes out of the top
    verts, faces, _ = extract_mesh(StandIn(spheres=(((0.0, 0.0, 0.2), 0.8),), aabb=aabb), mesh_resolution=48)
    assert is_watertight(faces)
    assert (verts >= aabb[0]).all() and (verts <= aabb[1]).all()
    cap = np.isclose(verts[:, 2], 0.5)
    cap_r = np.sqrt(0.8 ** 2 - 0.3 ** 2)
    assert cap.sum() > 50 and np.linalg.norm(verts[cap, :2], axis=1).max() < cap_r + 1e-3


def test_floater_removed_from_a_surface_field():
    floater = (FAR_CENTER + [-40.0, 45.0, 45.0], 2.0)          # 0.3% of the sphere's area
    verts, faces, _ = extract_mesh(StandIn(spheres=((FAR_CENTER, FAR_RADIUS), floater)), mesh_resolution=64)
    assert np.abs(np.linalg.norm(verts - FAR_CENTER, axis=1) - FAR_RADIUS).max() < 0.1
    assert is_watertight(faces) and euler_characteristic(verts, faces) == 2
    verts, faces, _ = extract_mesh(StandIn(spheres=((FAR_CENTER, FAR_RADIUS), floater)), mesh_resolution=64,
                                   min_component=0.0)
    assert euler_characteristic(verts, faces) == 4                  # kept when asked


@pytest.mark.parametrize("method", ["sdf", "occupancy"])     # with and without the distance band
def test_coarse_to_fine_gives_the_dense_mesh_for_less(method):
    dense_model, sparse_model = StandIn(method), StandIn(method)
    v0, f0, _ = extract_mesh(dense_model, mesh_resolution=96, block=0)
    v1, f1, _ = extract_mesh(sparse_model, mesh_resolution=96, block=4)
    assert np.array_equal(f0, f1) and np.allclose(v0, v1, atol=1e-5)
    assert sparse_model.evaluated < 0.4 * dense_model.evaluated, sparse_model.evaluated / dense_model.evaluated


def test_coarse_to_fine_keeps_small_parts_of_a_distance_field():
    """A part smaller than a block, far from the rest, which no coarse point falls in: the
    distance band still finds it."""
    tiny = (FAR_CENTER + [-40.3, 44.1, 45.7], 1.0)              # 0.9 voxels across
    spheres = ((FAR_CENTER, FAR_RADIUS), tiny)
    v0, f0, _ = extract_mesh(StandIn(spheres=spheres), mesh_resolution=96, min_component=0.0)
    v1, f1, _ = extract_mesh(StandIn(spheres=spheres), mesh_resolution=96, min_component=0.0, block=4)
    assert np.array_equal(f0, f1) and np.allclose(v0, v1, atol=1e-5)
    assert (np.linalg.norm(v1 - tiny[0], axis=1) < 1.5).sum() >= 4


def test_decimate_to_a_face_count():
    verts, faces, colors = extract_mesh(StandIn(), mesh_resolution=64, decimate_to=1000, device="cpu")
    assert 900 <= len(faces) <= 1000 and is_watertight(faces) and len(colors) == len(verts)
    assert np.abs(np.linalg.norm(verts - FAR_CENTER, axis=1) - FAR_RADIUS).max() < 0.02 * FAR_RADIUS


def test_bad_mesh_options_are_refused():
    with pytest.raises(ValueError, match="resolution"):
        extract_mesh(StandIn(), mesh_resolution=1)
    with pytest.raises(ValueError, match="resolution"):
        extract_mesh(StandIn(), mesh_resolution=100_000)
    with pytest.raises(ValueError, match="decimate_to"):
        extract_mesh(StandIn(), mesh_resolution=16, decimate_to=2)
    with pytest.raises(ValueError, match="min_component"):
        extract_mesh(StandIn(), mesh_resolution=16, min_component=2.0)
    no_field = types.SimpleNamespace(method="sdf", aabb=FAR_BOX, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="inside_field"):
        extract_mesh(no_field, mesh_resolution=16)


# CI has no GPU; the same code runs on the CPU in the tests above. On a CUDA machine run
# `pytest -m gpu` (this comparison has not run on a GPU yet; GPU extraction timings: docs/benchmarks.md).
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block", [0, 4])
def test_gpu_extraction_matches_the_cpu(block):
    v0, f0, _ = extract_mesh(StandIn(), mesh_resolution=96, block=block)
    v1, f1, _ = extract_mesh(StandIn(device="cuda"), mesh_resolution=96, block=block)
    assert np.array_equal(f0, f1) and np.allclose(v0, v1, atol=1e-3)


@pytest.mark.parametrize("method", ["sdf", "occupancy"])
def test_real_surface_model_meshes_through_the_contract(method):
    """The real FittedField, untrained: its geometric initialisation is a sphere of
    ``init_radius`` (normalised units) around the box centre, so the mesh must be a closed
    sphere-like surface there, in world units (a flipped sign would mesh the box instead)."""

    cfg = make_config(method=method, preset="draft", device="cpu")
    aabb = np.array([[97.0, -53.0, 8.0], [103.0, -47.0, 12.0]])
    model = FittedField.build(cfg, aabb)
    verts, faces, colors = extract_mesh(model, mesh_resolution=32)
    assert is_watertight(faces) and euler_characteristic(verts, faces) == 2
    radius = np.linalg.norm(verts - model.center, axis=1)
    assert radius.mean() == pytest.approx(cfg.field.init_radius * model.scale, rel=0.2)
    assert np.abs(verts.mean(0) - model.center).max() < 0.5
    assert colors.shape == verts.shape and (colors >= 0).all() and (colors <= 1).all()
