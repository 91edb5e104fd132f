"""PyTorch marching cubes against scikit-image's, and the topology it promises: closed,
edge-manifold, outward-wound meshes for every cube configuration and for random volumes."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes as skimage_mc

from fit_implicit.backend.export.cleanup import euler_characteristic, is_watertight, signed_volume
from fit_implicit.backend.export.marching_cubes import TRI_COUNT, TRI_TABLE, marching_cubes

N = 48
AXIS = np.linspace(-1.0, 1.0, N)
X, Y, Z = np.meshgrid(AXIS, AXIS, AXIS, indexing="ij")
VOXEL = AXIS[1] - AXIS[0]
SPHERE = (0.7 - np.sqrt(X ** 2 + Y ** 2 + Z ** 2)).astype(np.float32)                 # radius 0.7
TORUS = (0.25 - np.sqrt((np.sqrt(X ** 2 + Y ** 2) - 0.55) ** 2 + Z ** 2)).astype(np.float32)


def torch_mesh(vol, **kw):
    v, f = marching_cubes(torch.from_numpy(np.ascontiguousarray(vol)), **kw)
    assert v.dtype == torch.float32 and f.dtype == torch.int64
    return v.numpy(), f.numpy()


@pytest.mark.parametrize("name, vol, chi", [("sphere", SPHERE, 2), ("torus", TORUS, 0)])
def test_same_surface_as_skimage(name, vol, chi):
    v, f = torch_mesh(vol, origin=(-1.0, -1.0, -1.0), spacing=(VOXEL,) * 3)
    sv, sf, _, _ = skimage_mc(vol, level=0.0, spacing=(VOXEL,) * 3)
    sv = sv - 1.0
    # both place vertices on the same grid edges by linear interpolation
    assert cKDTree(sv).query(v)[0].max() < 1e-3 * VOXEL
    assert cKDTree(v).query(sv)[0].max() < 1e-3 * VOXEL
    assert euler_characteristic(v, f) == euler_characteristic(sv, sf) == chi
    assert is_watertight(f)
    assert len(f) == len(sf)


def test_sphere_faces_wind_outwards():
    v, f = torch_mesh(SPHERE, origin=(-1.0, -1.0, -1.0), spacing=(VOXEL,) * 3)
    a, b, c = (v[f[:, i]] for i in range(3))
    normal = np.cross(b - a, c - a)
    assert (np.einsum("ij,ij->i", normal, (a + b + c) / 3) > 0).all()
    assert signed_volume(v, f) == pytest.approx(4 / 3 * np.pi * 0.7 ** 3, rel=0.01)
    assert np.abs(np.linalg.norm(v, axis=1) - 0.7).max() < 0.1 * VOXEL


def test_table_covers_every_case():
    assert TRI_TABLE.shape[0] == 256 and TRI_COUNT[0] == 0 and TRI_COUNT[255] == 0
    assert TRI_COUNT[1:255].min() >= 1 and TRI_COUNT.max() <= TRI_TABLE.shape[1] // 3


def test_every_cube_case_closes():
    """One cube of each configuration, surrounded by outside: a closed, outward mesh."""
    bad = []
    for case in range(1, 255):
        vol = -np.ones((4, 4, 4), np.float32)
        for c in range(8):
            vol[1 + (c & 1), 1 + (c >> 1 & 1), 1 + (c >> 2 & 1)] = 1.0 if case >> c & 1 else -1.0
        v, f = torch_mesh(vol)
        if not is_watertight(f) or signed_volume(v, f) <= 0:
            bad.append(case)
    assert not bad, f"cases not closed or wound inwards: {bad}"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), shape=st.tuples(*[st.integers(2, 9)] * 3))
def test_random_volumes_give_closed_outward_meshes(seed, shape):
    """Noise has every ambiguous face there is; padded with outside, the mesh must close."""
    vol = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    vol = np.pad(vol, 1, constant_values=-1.0)
    v, f = torch_mesh(vol)
    if (vol > 0).any():
        assert is_watertight(f)
        assert signed_volume(v, f) > 0
    else:
        assert len(f) == 0


def test_origin_and_spacing_place_vertices():
    v, _ = torch_mesh(SPHERE)
    w, _ = torch_mesh(SPHERE, origin=(100.0, -20.0, 3.0), spacing=(2.0, 0.5, 1.0))
    assert np.allclose(w, v * [2.0, 0.5, 1.0] + [100.0, -20.0, 3.0], atol=1e-4)


def test_nan_counts_as_outside_and_empty_volume():
    vol = SPHERE.copy()
    vol[vol < -0.2] = np.nan
    v, f = torch_mesh(vol)
    assert is_watertight(f) and np.isfinite(v).all()
    v, f = torch_mesh(-np.ones((5, 5, 5), np.float32))
    assert v.shape == (0, 3) and f.shape == (0, 3)


def test_bad_volume_is_refused():
    with pytest.raises(ValueError, match="every side >= 2"):
        marching_cubes(torch.zeros(1, 5, 5))
    with pytest.raises(ValueError, match="nx, ny, nz"):
        marching_cubes(torch.zeros(5, 5))


# CI has no GPU; the same code runs on the CPU in the tests above. On a CUDA machine run
# `pytest -m gpu` (this comparison has not run on a GPU yet; GPU extraction timings: docs/benchmarks.md).
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu():
    vol = torch.from_numpy(TORUS)
    v_cpu, f_cpu = marching_cubes(vol)
    v_gpu, f_gpu = marching_cubes(vol.cuda())
    assert torch.equal(f_gpu.cpu(), f_cpu) and torch.allclose(v_gpu.cpu(), v_cpu, atol=1e-5)
