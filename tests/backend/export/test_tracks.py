"""One mesh through time (backend/export/tracks.py): the solver finds where each vertex goes under a
known motion, says where it cannot, and the point cache it writes is read by Blender's Mesh Cache
modifier as the same positions frame by frame.  The fits over time that use it:
tests/backend/fitting/test_dynamic_fit.py, tests/backend/service/test_fit_job_time.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fit_implicit.backend.export.tracks import TOLERANCE, follow_vertices, read_pc2, write_pc2
from fit_implicit.backend.fitting.config import make_config
from fit_implicit.backend.fitting.model import FittedField

AABB = np.array([[-2.0, -2.0, -2.0], [2.0, 2.0, 2.0]])


class Shear(nn.Module):
    """A stand-in for a fitted deformation (fields/motion.py) whose motion is known: at time t the
    scene's point x shows the canonical point warp(x, t) = x + (0.4 t (1 + 0.5 y), 0.2 t sin(2 x), 0),
    one-to-one and nonlinear; its inverse has no closed form, so the test checks the equation."""

    time = 0.0

    def forward(self, x, t=None):
        t = self.time if t is None else t
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        d = torch.stack([0.4 * (1 + 0.5 * x[:, 1]), 0.2 * torch.sin(2 * x[:, 0]), torch.zeros_like(x[:, 0])], 1)
        return x + t * d


def sheared_model():
    model = FittedField.build(make_config("sdf", "draft", device="cpu"), AABB)
    model.field.deformation = Shear()
    return model


def test_each_vertex_goes_where_the_motion_takes_its_canonical_point():
    model = sheared_model()
    rng = np.random.default_rng(0)
    verts = rng.uniform(-1.2, 1.2, (500, 3)).astype(np.float32)       # world units; the box's half side is 2
    times = [0.0, 0.3, 0.6, 1.0]
    model.time = 0.6
    tracks, facts = follow_vertices(model, verts, times)
    assert tracks.shape == (4, 500, 3)
    np.testing.assert_allclose(tracks[2], verts, atol=1e-5)           # the instant the mesh was taken at
    warp = model.field.deformation
    canonical = warp(model.to_normalised(torch.tensor(verts)), 0.6)
    for i, t in enumerate(times):
        mapped = warp(model.to_normalised(torch.tensor(tracks[i])), t)
        assert float((mapped - canonical).norm(dim=1).max()) < TOLERANCE, t     # normalised units
    # the points really moved: at t = 0 a vertex is where its canonical point is, about 0.4 * 0.6
    # of the box's half side (2 units) further along x
    assert 0.3 < float(np.mean(tracks[0][:, 0] - verts[:, 0])) < 0.7
    assert facts["track_residual"] < 1e-4 and facts["track_lost"] == 0.0


def test_what_cannot_be_followed_is_counted_and_bad_requests_are_refused():
    model = sheared_model()

    class Fold(Shear):          # every x > 0 maps onto x = 0 at t = 1: those points have no preimage
        def forward(self, x, t=None):
            t = self.time if t is None else t
            t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
            x = x.clone()
            return torch.cat([x[:, :1] - t * torch.relu(x[:, :1]) - t * 0.3, x[:, 1:]], 1)

    model.field.deformation = Fold()
    verts = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.5, 0.5, 0.0]], np.float32)
    _, facts = follow_vertices(model, verts, [1.0], reference_time=0.0)
    assert facts["track_lost"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"instants in \[0, 1\]"):
        follow_vertices(model, verts, [0.5, 1.5])
    still = FittedField.build(make_config("sdf", "draft", device="cpu"), AABB)
    with pytest.raises(ValueError, match="one instant"):
        follow_vertices(still, verts, [0.5])


def test_point_cache_files_round_trip_and_bad_ones_are_refused(tmp_path):
    positions = np.random.default_rng(1).normal(size=(3, 5, 3)).astype(np.float32)
    write_pc2(tmp_path / "clip.pc2", positions)
    back, start, rate = read_pc2(tmp_path / "clip.pc2")
    np.testing.assert_array_equal(back, positions)
    assert (start, rate) == (0.0, 1.0)
    data = (tmp_path / "clip.pc2").read_bytes()
    (tmp_path / "short.pc2").write_bytes(data[:-12])           # one position missing
    with pytest.raises(ValueError, match="does not match its size"):
        read_pc2(tmp_path / "short.pc2")
    (tmp_path / "other.pc2").write_bytes(b"PLY" + data[3:])
    with pytest.raises(ValueError, match="not a Point Cache 2 file"):
        read_pc2(tmp_path / "other.pc2")


@pytest.mark.blender
@pytest.mark.parametrize("suffix", [".ply", ".obj", ".glb"])
def test_blenders_mesh_cache_modifier_plays_the_point_cache_on_the_imported_file(tmp_path, suffix):
    """``mesh --frames N --follow`` writes a mesh file and its .pc2 (export/tracks.py
    write_cache_for); imported into Blender with its own importer and given a Mesh Cache modifier,
    the mesh shows each sample's world positions at its frame."""
    pytest.importorskip("bpy")
    import bpy

    from fit_implicit.backend.export.files import write_mesh
    from fit_implicit.backend.export.tracks import write_cache_for
    from stand_ins import sphere_mesh
    verts, faces = sphere_mesh(radius=1.0, n=6)
    verts = (verts + np.float32([2.0, -1.0, 0.5])).astype(np.float32)
    positions = np.stack([verts * (1 + 0.2 * k) + [0.5 * k, -0.25 * k, 0.1 * k * k] for k in range(3)]).astype(np.float32)
    mesh_path = write_mesh(tmp_path / f"clip{suffix}", verts, faces, np.full(verts.shape, 0.5, np.float32))
    cache = write_cache_for(mesh_path, positions)

    bpy.ops.wm.read_factory_settings(use_empty=True)
    importer = {".ply": bpy.ops.wm.ply_import, ".obj": bpy.ops.wm.obj_import,
                ".glb": bpy.ops.import_scene.gltf}[suffix]
    importer(filepath=str(mesh_path))
    ob = next(o for o in bpy.context.scene.objects if o.type == "MESH")
    assert len(ob.data.vertices) == len(verts)
    mod = ob.modifiers.new("cache", "MESH_CACHE")
    mod.cache_format, mod.filepath, mod.frame_start = "PC2", str(cache), 1.0
    world = np.array(ob.matrix_world)
    for k in range(3):
        bpy.context.scene.frame_set(1 + k)
        shown = ob.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
        got = np.array([v.co[:] for v in shown.vertices], np.float64)
        got = got @ world[:3, :3].T + world[:3, 3]
        np.testing.assert_allclose(got, positions[k], atol=1e-4, err_msg=f"{suffix}, frame {1 + k}")
