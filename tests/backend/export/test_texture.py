"""UV unwrapping (xatlas), rasterising and baking textures from a field (backend/export/texture.py).

The fields here are small analytic stand-ins (tests/stand_ins.py) with ``surface_attributes`` (as FittedField):
their true colours and normals are known exactly, so the tests can say where every texel must
land.  The real FittedField has the same methods (backend/fitting/model.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fit_implicit.backend.export import texture as tx
from stand_ins import HalvesBall, sphere_mesh


class ConstantNormal:
    """Stand-in field whose normal is one world vector everywhere and albedo mid grey."""

    method = "sdf"
    device = torch.device("cpu")
    meta = {"lighting_baked": True}

    def __init__(self, normal):
        self.normal = np.asarray(normal, np.float32) / np.linalg.norm(normal)

    def surface_attributes(self, points, normals=None):
        m = len(points)
        return {"albedo": np.full((m, 3), 0.5, np.float32), "normal": np.tile(self.normal, (m, 1))}


@pytest.fixture(scope="module")
def ball_uv():
    verts, faces = sphere_mesh()
    return verts, faces, tx.unwrap(verts, faces, size=256, padding=4, piece_faces=400)


def world_normals_from_map(mesh, normal_map):
    """Decode the baked map at each face centre in that point's tangent frame -> (F, 3) world
    normals, and the (F, 3) tangent-space normals read from the map."""
    w = np.full((len(mesh.faces), 3, 1), 1.0 / 3.0)
    n = (mesh.normals[mesh.faces] * w).sum(1)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    t = (mesh.tangents[mesh.faces, :3] * w).sum(1)
    t -= n * (n * t).sum(1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    b = np.sign(mesh.tangents[mesh.faces, 3].sum(1))[:, None] * np.cross(n, t)
    local = tx.decode_normal_map(tx.sample_texture(normal_map, mesh.uvs[mesh.faces].mean(1)))
    return local[:, :1] * t + local[:, 1:2] * b + local[:, 2:] * n, local


# ---- unwrapping -------------------------------------------------------------------------------
def test_unwrap_keeps_the_surface_and_gives_a_valid_atlas(ball_uv):
    verts, faces, m = ball_uv
    assert len(m.faces) == len(faces)
    np.testing.assert_array_equal(m.vertices, verts[m.source])          # split copies, exact positions
    welded = np.sort(m.source[m.faces], axis=1)
    assert {tuple(f) for f in welded} == {tuple(f) for f in np.sort(faces, axis=1)}   # same triangles
    assert m.uvs.min() >= 0.0 and m.uvs.max() <= 1.0
    t = m.uvs[m.faces].astype(np.float64)
    area = 0.5 * np.abs((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1])
                        - (t[:, 1, 1] - t[:, 0, 1]) * (t[:, 2, 0] - t[:, 0, 0]))
    assert area.min() > 0, "every triangle gets UV area"
    # No two charts overlap: the texels covered add up to the summed triangle areas (within 5%).
    face_map, _ = tx.rasterize(m.uvs, m.faces, 512)
    covered = float((face_map >= 0).float().mean())
    assert covered == pytest.approx(area.sum(), rel=0.05)
    np.testing.assert_allclose(np.linalg.norm(m.normals, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.abs((m.normals * m.tangents[:, :3]).sum(1)), 0.0, atol=1e-5)


def test_unwrap_rejects_bad_meshes_clearly():
    verts, faces = sphere_mesh(n=8)
    with pytest.raises(ValueError, match=r"face indices must be in \[0, "):
        tx.unwrap(verts, faces + 1000)
    with pytest.raises(ValueError, match="texture size must be in"):
        tx.unwrap(verts, faces, size=8)
    with pytest.raises(ValueError, match="vertices must be finite"):
        tx.unwrap(np.full_like(verts, np.nan), faces)


# ---- rasterising -------------------------------------------------------------------------------
def test_rasterize_matches_a_texel_by_texel_reference():
    rng = np.random.default_rng(1)
    uvs = rng.uniform(0.05, 0.95, (30, 2)).astype(np.float32)
    faces = np.arange(30).reshape(10, 3)
    size = 24
    face_map, bary = tx.rasterize(uvs, faces, size)
    for f in (0, 4, 9):
        a, b, c = (np.array([u * size, (1 - v) * size]) for u, v in uvs[faces[f]])
        rows, cols = np.nonzero(face_map.numpy() == f)
        for r, col in zip(rows, cols):
            w = bary[r, col].numpy()
            p = w[0] * a + w[1] * b + w[2] * c
            np.testing.assert_allclose(p, [col + 0.5, r + 0.5], atol=1e-3)   # weights give the centre
    # Every texel centre inside some triangle is claimed by one.
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    any_inside = np.zeros((size, size), bool)
    for f in range(10):
        a, b, c = (np.array([u * size, (1 - v) * size]) for u, v in uvs[faces[f]])
        def edge(p, q):
            return (q[0] - p[0]) * (yy - p[1]) - (q[1] - p[1]) * (xx - p[0])
        e = np.stack([edge(a, b), edge(b, c), edge(c, a)])
        any_inside |= (e > 1e-3).all(0) | (e < -1e-3).all(0)
    assert (face_map.numpy()[any_inside] >= 0).all()


# ---- baking ---------------------------------------------------------------------------------------
def test_baked_colours_land_on_the_right_faces(ball_uv):
    _, _, m = ball_uv
    baked = tx.bake(HalvesBall(), m, 256, padding=4)
    assert baked.albedo.shape == (256, 256, 3) and baked.albedo.dtype == np.uint8
    centre_uv, centre = m.uvs[m.faces].mean(1), m.vertices[m.faces].mean(1)
    seen = tx.sample_texture(baked.albedo, centre_uv).astype(int)
    want = np.where(centre[:, :1] > 0, [[255, 0, 0]], [[0, 0, 255]])
    wrong = np.abs(seen - want).max(1) > 8
    assert wrong.mean() < 0.01, f"{wrong.sum()} of {len(wrong)} faces show the other half's colour"
    assert np.abs(centre[wrong, 0]).max(initial=0) < 0.1     # only faces on the red/blue border
    assert baked.roughness is None


def test_padding_keeps_background_out_of_the_texture(ball_uv):
    _, _, m = ball_uv
    baked = tx.bake(HalvesBall(), m, 256, padding=4)
    cov = torch.as_tensor(baked.coverage)[None, None].float()
    ring = (torch.nn.functional.max_pool2d(cov, 5, stride=1, padding=2)[0, 0].numpy() > 0) & ~baked.coverage
    colours = baked.albedo[ring].astype(int)
    # Texels around the charts hold chart colours (pure red or blue, or a blend of both at the
    # border), never black background.
    assert ring.sum() > 100
    assert (colours[:, 1] < 10).all() and ((colours[:, 0] + colours[:, 2]) > 200).all()
    assert (baked.albedo.sum(-1) > 0).all()          # the rest holds the mean colour, not black


def test_tangent_space_normal_map_follows_blender_conventions():
    """A flat square facing +Z with u along +X and v along +Y: a field normal tilted towards +X
    reads red > 128, towards +Y green > 128 (OpenGL +Y); with the u axis mirrored, +X reads red < 128."""
    verts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], np.int32)

    def plane(uvs):
        normals = tx.smooth_normals(verts, faces)
        return tx.UVMesh(verts, faces, uvs, np.arange(4), normals, tx.uv_tangents(verts, faces, uvs, normals))

    uv = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]], np.float32)
    s = np.sqrt(0.5)
    centre = np.array([[0.5, 0.5]], np.float32)
    read = lambda mesh, n: tx.sample_texture(tx.bake(ConstantNormal(n), mesh, 32, padding=2).normal, centre)[0]  # noqa: E731
    np.testing.assert_allclose(read(plane(uv), [1, 0, 1]), [round(255 * (s / 2 + 0.5)), 128, round(255 * (s / 2 + 0.5))], atol=2)
    np.testing.assert_allclose(read(plane(uv), [0, 1, 1]), [128, round(255 * (s / 2 + 0.5)), round(255 * (s / 2 + 0.5))], atol=2)
    np.testing.assert_allclose(read(plane(uv), [0, 0, 1]), [128, 128, 255], atol=2)
    mirrored = uv.copy()
    mirrored[:, 0] = 1.0 - mirrored[:, 0]
    m = plane(mirrored)
    assert (m.tangents[:, 3] == -1).all()
    np.testing.assert_allclose(read(m, [1, 0, 1]), [round(255 * (0.5 - s / 2)), 128, round(255 * (s / 2 + 0.5))], atol=2)
    np.testing.assert_allclose(read(m, [0, 1, 1]), [128, round(255 * (s / 2 + 0.5)), round(255 * (s / 2 + 0.5))], atol=2)


def test_normal_map_gives_back_the_fields_normals(ball_uv):
    """Decoding the baked map in each texel's tangent frame gives the field's (bumpy) normal
    back within 4 degrees at every face centre."""
    _, _, m = ball_uv
    ball = HalvesBall(tilt=0.3)
    baked = tx.bake(ball, m, 256, padding=4)
    centre = m.vertices[m.faces].mean(1)
    world, local = world_normals_from_map(m, baked.normal)
    cos = (world * ball.true_normal(centre)).sum(1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 4.0
    # ... and the map is not trivially flat: the tilt shows in it.
    assert np.degrees(np.arccos(np.clip(local[:, 2], -1, 1))).max() > 10.0


def test_roughness_is_baked_where_the_model_estimates_it(ball_uv):
    _, _, m = ball_uv
    baked = tx.bake(HalvesBall(roughness=True), m, 128, padding=2)
    assert baked.roughness.shape == (128, 128, 1)
    centre_uv, centre = m.uvs[m.faces].mean(1), m.vertices[m.faces].mean(1)
    seen = tx.sample_texture(baked.roughness, centre_uv)[:, 0].astype(int)
    want = np.where(centre[:, 0] > 0, 51, 204)
    assert (np.abs(seen - want) <= 2).mean() > 0.98
    assert [k for k, _ in baked.items()] == ["albedo", "normal", "roughness"]


def test_field_is_queried_in_chunks(ball_uv):
    _, _, m = ball_uv
    ball = HalvesBall()
    baked = tx.bake(ball, m, 128, padding=1, chunk=1000)
    assert ball.calls == -(-int(baked.coverage.sum()) // 1000)


# ---- the real model and the job's asset step ------------------------------------------------------
def real_sphere_model():
    """A real FittedField (SDF method), untrained: its geometric initialisation is a sphere of
    radius 0.5 (normalised), which is radius 1.0 in this box of half-side 2."""
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.model import FittedField

    cfg = make_config(method="sdf", preset="draft", device="cpu")
    torch.manual_seed(0)
    return FittedField.build(cfg, np.array([[-2.0, -2, -2], [2, 2, 2]]))


def test_real_sdf_model_normals_survive_the_bake():
    """With the real model (backend/fitting/model.py), the normal map
    decoded in the mesh's tangent frames gives the field's own normals back (median within 3
    degrees, 95% within 8; the untrained hash grid makes the field bumpy at texel scale)."""
    model = real_sphere_model()
    verts, faces = sphere_mesh(radius=1.0, n=24)
    mesh, baked = tx.texture_mesh(model, verts, faces, 128, padding=2)
    centre = mesh.vertices[mesh.faces].mean(1)
    want = model.surface_attributes(centre.astype(np.float32))["normal"]
    got, _ = world_normals_from_map(mesh, baked.normal)
    angle = np.degrees(np.arccos(np.clip((got * want).sum(1), -1, 1)))
    assert np.median(angle) < 3.0 and np.percentile(angle, 95) < 8.0
    assert baked.albedo.shape == (128, 128, 3) and set(baked.timings) >= {"unwrap", "raster", "query"}


class RecordingContext:
    """Stands in for jobs.JobContext (which needs a running server loop): records what is sent,
    validating every message as JobContext.send does."""

    job_id = "job1"

    def __init__(self):
        self.sent, self.stages = [], []

    def progress(self, stage, **kw):
        self.stages.append(stage)

    def check_cancelled(self):
        pass

    def send(self, message):
        self.sent.append(message.validate())


def test_job_sends_textures_then_a_textured_mesh():
    from fit_implicit.backend.service.fit_job import send_mesh_assets
    from fit_implicit.shared import protocol

    verts, faces = sphere_mesh(radius=0.7, n=16)
    ctx = RecordingContext()
    summary = send_mesh_assets(HalvesBall(roughness=True), verts, faces, np.zeros_like(verts), 64, ctx)
    kinds = [(type(m).__name__, getattr(m, "kind", "")) for m in ctx.sent]
    assert kinds == [("TextureResult", "albedo"), ("TextureResult", "normal"), ("TextureResult", "roughness"),
                     ("MeshResult", "")]
    mesh = ctx.sent[-1]
    assert len(mesh.uvs) == len(mesh.vertices) == len(mesh.normals) == summary["vertices"]
    assert ctx.sent[0].lighting_baked is False and summary["textures"] == 64 and "texture" in ctx.stages
    # vertex colours follow the texture: red half red
    red = mesh.vertices[:, 0] > 0.1
    assert (mesh.colors[red, 0] > 0.9).all() and (mesh.colors[red, 2] < 0.1).all()
    # Round trip through the wire.
    for m in ctx.sent:
        protocol.decode_message([bytes(f) for f in m.to_frames()])


def test_job_without_textures_sends_the_plain_mesh():
    from fit_implicit.backend.service.fit_job import send_mesh_assets

    verts, faces = sphere_mesh(radius=0.7, n=8)
    ctx = RecordingContext()
    colors = np.full_like(verts, 0.25)
    summary = send_mesh_assets(HalvesBall(), verts, faces, colors, 0, ctx)
    assert [type(m).__name__ for m in ctx.sent] == ["MeshResult"]
    assert ctx.sent[0].uvs.shape == (0, 2) and np.array_equal(ctx.sent[0].colors, colors)
    assert summary == {"vertices": len(verts), "faces": len(faces)}


def _views_at(distance: float, focal: float = 800.0):
    from fit_implicit.backend.export.unseen import Views
    from fit_implicit.shared.cameras import look_at
    poses = np.stack([look_at(np.array([distance, 0.0, 0.0]), np.zeros(3)),
                      look_at(np.array([0.0, -3 * distance, 0.0]), np.zeros(3))])     # a farther one
    return Views(np.tile([focal, focal, 400.0, 400.0], (2, 1)), poses, 800, 800)


def test_auto_texture_size_gives_a_texel_per_pixel_of_the_closest_camera():
    verts, faces = sphere_mesh(radius=1.0, n=48)
    from fit_implicit.backend.export.cleanup import face_areas
    area = float(face_areas(verts, faces).sum())
    # A camera 4 units away with f = 800 px: one pixel spans ~4/800 at the sphere; the texture
    # needs sqrt(area / 0.7) / (4 / 800) ~ 847 texels a side -> 1024 (multiples of 256).
    assert tx.footprint_side(verts, faces, _views_at(4.0)) == 256 * int(np.ceil(np.sqrt(area / tx.UV_FILL) / (4 / 800) / 256))
    assert tx.footprint_side(verts, faces, _views_at(4.0)) == 1024
    assert tx.footprint_side(verts, faces, _views_at(8.0)) == 512           # half the detail
    assert tx.footprint_side(verts, faces, _views_at(4.0, focal=8000.0)) == tx.AUTO_MAX     # a long lens: clamped
    # Cameras that look away see nothing in front: the smallest side.
    away = _views_at(4.0)
    away.poses[:, :3, 2] *= -1
    assert tx.footprint_side(verts, faces, away) == tx.AUTO_MIN


def test_job_with_auto_texture_size_reports_the_side_it_chose():
    from fit_implicit.backend.service.fit_job import send_mesh_assets
    from fit_implicit.shared.protocol import TEXTURE_AUTO

    verts, faces = sphere_mesh(radius=0.7, n=16)
    ctx = RecordingContext()
    summary = send_mesh_assets(HalvesBall(), verts, faces, np.zeros_like(verts), TEXTURE_AUTO, ctx,
                               views=_views_at(30.0))
    assert summary["textures"] == tx.AUTO_MIN == ctx.sent[0].image.shape[0]
    assert summary["material"] == "passes"          # the stand-in says its colours are free of light (meta)
    with pytest.raises(ValueError, match="needs the training cameras"):
        send_mesh_assets(HalvesBall(), verts, faces, np.zeros_like(verts), TEXTURE_AUTO, RecordingContext())


def test_job_decimates_to_the_face_count_asked():
    from fit_implicit.backend.service.fit_job import send_mesh_assets

    verts, faces = sphere_mesh(radius=0.7, n=32)
    ctx = RecordingContext()
    summary = send_mesh_assets(HalvesBall(), verts, faces, np.zeros_like(verts), 64, ctx, max_faces=400)
    assert summary["faces"] <= 400 < len(faces) and len(ctx.sent[-1].faces) == summary["faces"]
