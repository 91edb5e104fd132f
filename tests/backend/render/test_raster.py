"""The triangle rasteriser (backend/render/raster.py) against values worked out by hand, its
gradients against finite differences, and bad input."""
import numpy as np
import pytest
import torch

from fit_implicit.backend.render.raster import Fragments, interpolate, project, rasterize, sample_texture
from fit_implicit.shared import cameras

K = np.array([10.0, 10.0, 8.0, 8.0])        # 16 x 16 pixels; at depth 2: u = 5 x + 8, v = 8 - 5 y
EYE = np.eye(4)                             # at the origin, looking down -Z


def tri(*pts, dtype=torch.float32):
    return torch.tensor(pts, dtype=dtype), torch.tensor([[0, 1, 2]])


def test_coverage_and_depth_of_a_triangle():
    # Corners at pixels (3, 13), (13, 13), (3, 3): the pixel centres with x >= 3, y <= 13 and
    # y >= x, i.e. columns 3..12 and rows c..12: 10 + 9 + ... + 1 = 55 of them.
    v, f = tri((-1.0, -1.0, -2.0), (1.0, -1.0, -2.0), (-1.0, 1.0, -2.0))
    frags = rasterize(v, f, K, EYE, 16, 16)
    rows, cols = torch.nonzero(frags.mask, as_tuple=True)
    assert len(rows) == 55 and bool((rows >= cols).all()) and int(cols.min()) == 3 and int(rows.max()) == 12
    assert torch.all(frags.depth[frags.mask] == 2.0) and torch.isinf(frags.depth[~frags.mask]).all()
    assert torch.all(frags.face[frags.mask] == 0) and torch.all(frags.face[~frags.mask] == -1)


def test_interpolated_positions_are_where_the_pixel_rays_meet_a_slanted_triangle():
    """Perspective-correct weights: the interpolated world position of each pixel is the point
    where that pixel's ray meets the triangle's plane (depth 1.5 to 4.5 across the image)."""
    v, f = tri((-2.0, -2.0, -1.5), (3.0, -2.0, -4.5), (-2.0, 3.0, -3.0), dtype=torch.float64)
    frags = rasterize(v, f, K, EYE, 16, 16)
    assert int(frags.mask.sum()) > 40
    got = interpolate(v, v, f, frags, K, EYE).numpy()
    o, d = cameras.pixel_rays(K, EYE, 16, 16)
    o, d = o[frags.mask.numpy()], d[frags.mask.numpy()]
    normal = np.cross(v[1].numpy() - v[0].numpy(), v[2].numpy() - v[0].numpy())
    t = ((v[0].numpy() - o) @ normal) / (d @ normal)
    np.testing.assert_allclose(got, o + t[:, None] * d, atol=1e-9)
    np.testing.assert_allclose(frags.depth[frags.mask].numpy(), -got[:, 2], rtol=1e-5)


def test_the_nearer_triangle_wins_whatever_the_order():
    near = [(-1.0, -1.0, -2.0), (1.0, -1.0, -2.0), (-1.0, 1.0, -2.0)]
    far = [(-2.0, -2.0, -4.0), (2.0, -2.0, -4.0), (-2.0, 2.0, -4.0)]
    for order in ((near, far), (far, near)):
        v = torch.tensor(order[0] + order[1])
        frags = rasterize(v, torch.tensor([[0, 1, 2], [3, 4, 5]]), K, EYE, 16, 16)
        near_face = 0 if order[0] is near else 1
        covered_by_near = frags.depth == 2.0
        assert int(covered_by_near.sum()) == 55 and torch.all(frags.face[covered_by_near] == near_face)
        assert torch.all(frags.depth[frags.mask & ~covered_by_near] == 4.0)


def test_gradients_match_finite_differences():
    v, f = tri((-2.0, -2.0, -1.5), (3.0, -2.0, -4.5), (-2.0, 3.0, -3.0), dtype=torch.float64)
    frags = rasterize(v, f, K, EYE, 16, 16)          # which pixel sees what: fixed, no gradient
    attr = torch.tensor([[0.1, 0.9], [0.7, 0.2], [0.4, 0.4]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, p: interpolate(a, p, f, frags, K, EYE),
                                    (attr.requires_grad_(), v.clone().requires_grad_()), eps=1e-6, atol=1e-6)
    texture = torch.rand(8, 8, 3, dtype=torch.float64)
    uv = torch.rand(20, 2, dtype=torch.float64) * 0.8 + 0.1
    assert torch.autograd.gradcheck(sample_texture, (texture.requires_grad_(), uv.requires_grad_()),
                                    eps=1e-6, atol=1e-6)


def test_texture_reads_hit_texel_centres_exactly():
    texture = torch.arange(4 * 4 * 1, dtype=torch.float32).reshape(4, 4, 1)
    # texel (row r, column c) has its centre at u = (c + .5) / 4, v = 1 - (r + .5) / 4
    uv = torch.tensor([[0.125, 0.875], [0.375, 0.875], [0.125, 0.625], [0.875, 0.125]])
    assert sample_texture(texture, uv)[:, 0].tolist() == [0.0, 1.0, 4.0, 15.0]


def test_projection_matches_the_shared_one():
    pts = np.random.default_rng(0).normal(size=(50, 3)) + [0.0, 0.0, -5.0]
    c2w = cameras.look_at(np.array([1.0, -3.0, 2.0]), np.array([0.0, 0.0, -5.0]))
    got, depth = project(torch.from_numpy(pts), K, c2w)
    want, want_depth = cameras.project(pts, K, c2w)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)
    np.testing.assert_allclose(depth.numpy(), want_depth, atol=1e-12)


def test_bad_input_draws_nothing_or_says_why():
    v, f = tri((-1.0, -1.0, -2.0), (1.0, -1.0, -2.0), (-1.0, 1.0, -2.0))
    assert not rasterize(v, torch.zeros((0, 3), dtype=torch.long), K, EYE, 16, 16).mask.any()   # no faces
    line, _ = tri((-1.0, -1.0, -2.0), (0.0, 0.0, -2.0), (1.0, 1.0, -2.0))                       # degenerate
    frags = rasterize(line, f, K, EYE, 16, 16)
    assert not frags.mask.any() and interpolate(line, line, f, frags, K, EYE).shape == (0, 3)
    behind = v * torch.tensor([1.0, 1.0, -1.0])                                                  # looking away
    assert not rasterize(behind, f, K, EYE, 16, 16).mask.any()
    straddling = torch.tensor([[-1.0, -1.0, -2.0], [1.0, -1.0, 2.0], [-1.0, 1.0, -2.0]])         # through the camera
    assert not rasterize(straddling, f, K, EYE, 16, 16).mask.any()
    with pytest.raises(ValueError, match="face indices"):
        rasterize(v, torch.tensor([[0, 1, 3]]), K, EYE, 16, 16)
    with pytest.raises(ValueError, match="image size"):
        rasterize(v, f, K, EYE, 0, 16)
    assert isinstance(rasterize(v, f, K, EYE, 3, 2), Fragments)


def test_antialias_gives_the_outline_a_gradient_that_matches_finite_differences():
    """A white triangle on black: the anti-aliased image's sum is the triangle's area (within a
    pixel row), and moving a vertex changes it as the gradient says."""
    from fit_implicit.backend.render.raster import Fragments, antialias, rasterize_2d

    def covered(points):
        faces = torch.tensor([[0, 1, 2]])
        face, _ = rasterize_2d(points.detach(), faces, 16, 16, torch.ones(3))
        depth = torch.where(face >= 0, 1.0, torch.inf)
        image = (face >= 0).float()[..., None].expand(16, 16, 3).contiguous()
        return antialias(image, Fragments(face, depth), points, faces)[..., 0].sum()

    points = torch.tensor([[2.3, 2.6], [13.4, 3.1], [6.2, 12.7]], dtype=torch.float32, requires_grad=True)
    total = covered(points)
    p = points.detach()
    area = 0.5 * abs(float((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1])
                           - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0])))
    assert abs(float(total.detach()) - area) < 4.0, (float(total.detach()), area)
    total.backward()
    grad = points.grad.clone()
    assert grad.abs().sum() > 0
    eps = 0.05                                   # small enough that no pixel centre changes side
    for v, axis in ((2, 1), (1, 0)):
        plus, minus = points.detach().clone(), points.detach().clone()
        plus[v, axis] += eps
        minus[v, axis] -= eps
        numeric = (float(covered(plus)) - float(covered(minus))) / (2 * eps)
        assert abs(numeric - float(grad[v, axis])) < 0.25 * max(1.0, abs(numeric)), (v, axis, numeric, float(grad[v, axis]))


@pytest.mark.parametrize("segments", [40, 160, 320])
def test_antialiased_outline_of_a_fine_mesh_covers_its_true_area(segments):
    """A sphere seen from 4 radii away, 26 pixels across, as a mesh of triangles about one pixel
    (40 segments), a quarter (160) or an eighth of a pixel (320) wide: the anti-aliased coverage
    sums to the disc's area within a twentieth of a pixel along the outline.  (Taking the near
    pixel's triangle edge for the outline lost 34 and 46 of about 522 pixels: a refinement grew
    meshes 3 % to make up; walking at most 8 triangles to the outline and keeping the pairs
    that ran out hard lost 0.09 pixel along it at 160 segments.)"""
    from stand_ins import sphere_mesh
    from fit_implicit.backend.render.raster import antialias, face_adjacency

    size, f, radius, dist = 48, 50.0, 1.0, 4.0
    k = np.array([f, f, size / 2, size / 2])
    verts, faces = sphere_mesh(radius, segments)
    v = torch.as_tensor(verts + np.float32([0.3, -0.2, -dist]), dtype=torch.float32)
    fc = torch.as_tensor(np.asarray(faces, np.int64))
    frags = rasterize(v, fc, k, EYE, size, size)
    pix, _ = project(v, k, EYE)
    image = frags.mask.float()[..., None].expand(size, size, 3).contiguous()
    covered = float(antialias(image, frags, pix, fc)[..., 0].sum())
    # the silhouette of a sphere is an ellipse off the axis; its area by many random points
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, size, (400_000, 2))
    d = np.stack([(pts[:, 0] - k[2]) / f, -(pts[:, 1] - k[3]) / f, -np.ones(len(pts))], 1)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    c = np.array([0.3, -0.2, -dist])
    hits = np.linalg.norm(np.cross(d, c), axis=1) < radius * np.cos(np.pi / segments)   # the mesh's sag
    area = hits.mean() * size * size
    outline = 2 * np.pi * np.sqrt(area / np.pi)
    assert abs(covered - area) < 0.05 * outline, (covered, area, float(frags.mask.sum()))
    adj = face_adjacency(fc)                   # closed: every edge has a face across it, which points back
    assert bool((adj >= 0).all()) and bool((adj[adj] == torch.arange(len(fc))[:, None, None]).any(-1).all())
