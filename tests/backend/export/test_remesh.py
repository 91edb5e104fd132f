"""Remeshing a UV-mapped mesh (backend/export/remesh.py), as the mesh refinement uses it between
its steps: cutting edges leaves the surface and the texture lookup exactly as they were; collapsing
short edges keeps a closed surface closed and facing out, and never touches a UV seam or the border."""
import numpy as np
import torch

from fit_implicit.backend.export import remesh
from fit_implicit.backend.export import texture as tx
from fit_implicit.backend.export.refine import draw
from stand_ins import sphere_mesh


def _uv_sphere(n=12):
    v, f = sphere_mesh(radius=1.0, n=n)
    m = tx.unwrap(v.astype(np.float32), f, size=128, padding=2, piece_faces=60)
    _, weld = np.unique(np.asarray(m.source), return_inverse=True)
    weld = weld.reshape(-1)
    points = np.zeros((weld.max() + 1, 3))
    points[weld] = m.vertices
    return m, np.asarray(m.faces, np.int64), weld, points


def _edges(faces, weld):
    wf = weld[faces]
    e = np.sort(np.concatenate([wf[:, [0, 1]], wf[:, [1, 2]], wf[:, [2, 0]]]), 1)
    return np.unique(e, axis=0, return_counts=True)


def _check_closed_and_outward(points, faces, weld):
    """A closed surface: every edge in two faces, Euler characteristic 2, each face facing out
    (the sphere's centre is the origin), no vertex left over."""
    edges, counts = _edges(faces, weld)
    assert (counts == 2).all()
    assert len(points) - len(edges) + len(faces) == 2
    p = points[weld[faces]]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    assert ((n * p.mean(1)).sum(1) > 0).all()
    assert len(np.unique(weld[faces])) == len(points) and len(np.unique(faces)) == len(weld)


def test_cutting_edges_keeps_the_surface_and_the_texture_exactly():
    m, faces, weld, points = _uv_sphere()
    lengths = remesh.edge_lengths(points, faces, weld)
    priority = np.where(lengths == lengths.max(1, keepdims=True), lengths, 0.0)    # each face's longest edge
    r = remesh.split_edges(faces, weld, priority, limit=40)
    assert r.changed == 40 and len(r.faces) == len(faces) + 80        # each cut edge: two faces more
    new_points = remesh.carry(points, r.parents)
    verts = remesh.carry(np.asarray(m.vertices, np.float64), r.uv_parents)
    uvs = remesh.carry(np.asarray(m.uvs, np.float64), r.uv_parents)
    assert np.allclose(verts, new_points[r.weld])                     # UV copies stay on their welded vertex
    _check_closed_and_outward(new_points, r.faces, r.weld)
    assert (r.face_parents[:len(faces)] == np.arange(len(faces))).all()

    def area(p, f):
        return 0.5 * np.linalg.norm(np.cross(p[f[:, 1]] - p[f[:, 0]], p[f[:, 2]] - p[f[:, 0]]), axis=1).sum()

    def uv_area(u, f):
        return 0.5 * np.abs(np.cross(u[f[:, 1]] - u[f[:, 0]], u[f[:, 2]] - u[f[:, 0]])).sum()

    assert abs(area(verts, r.faces) - area(np.asarray(m.vertices, np.float64), faces)) < 1e-9
    assert abs(uv_area(uvs, r.faces) - uv_area(np.asarray(m.uvs, np.float64), faces)) < 1e-6
    # drawn from a camera, the cut mesh shows the same texture at every pixel
    texture = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
    k = np.array([60.0, 60.0, 32.0, 32.0])               # fx, fy, cx, cy
    c2w = np.eye(4)
    c2w[:3, 3] = [0.0, 0.0, 3.0]           # looking down -z at the sphere
    before = draw(torch.as_tensor(m.vertices), torch.as_tensor(faces), torch.as_tensor(m.uvs), texture, k, c2w, 64, 64)
    after = draw(torch.as_tensor(verts, dtype=torch.float32), torch.as_tensor(r.faces),
                 torch.as_tensor(uvs, dtype=torch.float32), texture, k, c2w, 64, 64)
    assert (before < 0.999).any(dim=-1).float().mean() > 0.2          # the sphere fills the view
    assert (before - after).abs().max() < 1e-4


def test_a_cut_on_a_uv_seam_gives_each_side_its_own_uv_vertex():
    m, faces, weld, points = _uv_sphere()
    copies = np.bincount(weld)
    pairs, _ = remesh.face_edges(faces, weld)
    seam = (copies[pairs[..., 0]] > 1) & (copies[pairs[..., 1]] > 1)
    # an edge between two seam vertices whose two faces name different UV vertices for it
    f, k = np.argwhere(seam)[0]
    priority = np.zeros(faces.shape)
    priority[f, k] = 1.0
    r = remesh.split_edges(faces, weld, priority, limit=1)
    new_uv = np.arange(len(weld), len(r.weld))
    assert r.changed == 1 and len(r.parents) == len(points) + 1
    assert (r.weld[new_uv] == len(points)).all()                     # one new point of the surface
    a, b = faces[f, k], faces[f, (k + 1) % 3]
    assert sorted(map(tuple, r.uv_parents[new_uv])).count((min(a, b), max(a, b))) == 1


def test_collapsing_short_edges_keeps_a_closed_surface_facing_out_and_leaves_seams_alone():
    m, faces, weld, points = _uv_sphere(n=16)
    copies = np.bincount(weld)
    total = 0
    for _ in range(4):          # rounds, as the refinement would run them
        lengths = remesh.edge_lengths(points, faces, weld)
        r = remesh.collapse_edges(points, faces, weld, 1.0 / lengths, limit=1000)
        total += r.changed
        # only vertices with one UV vertex (inside a chart) ever merge
        merged = r.parents[r.parents[:, 0] != r.parents[:, 1]]
        assert (copies[merged] == 1).all()
        points, weld, faces = remesh.carry(points, r.parents), r.weld, r.faces
        copies = np.bincount(weld)
        _check_closed_and_outward(points, faces, weld)
    assert total >= 10, total


def test_the_border_of_an_open_surface_does_not_move():
    # a flat 6 x 6 grid of squares, each two triangles, one UV chart
    n = 7
    xy = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2).astype(float)
    points = np.c_[xy, np.zeros(len(xy))]
    idx = np.arange(n * n).reshape(n, n)
    quads = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 4)
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    weld = np.arange(len(points))
    r = remesh.collapse_edges(points, faces, weld, np.ones(faces.shape), limit=100)
    assert r.changed > 0
    border = (xy == 0).any(1) | (xy == n - 1).any(1)
    merged = r.parents[r.parents[:, 0] != r.parents[:, 1]].ravel()
    assert not border[merged].any()
    new = remesh.carry(points, r.parents)
    # every border point is still there, where it was
    assert all(np.isclose(new, p).all(1).any() for p in points[border])
