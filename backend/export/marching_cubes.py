"""Marching cubes in plain PyTorch (the same code on the GPU and the CPU).

Convention: a grid value ``> 0`` is INSIDE the solid, ``<= 0`` outside; the surface is the
zero level.  Triangles wind counter-clockwise seen from outside (their normal, (b - a) x (c - a),
points out of the solid).

The case table is generated here, not copied.  Cube corner ``c`` (0..7) sits at offset
``(c & 1, c >> 1 & 1, c >> 2 & 1)`` in (x, y, z); edge ``4 * axis + k`` joins the two corners
that differ only in bit ``axis``.  For every face of the cube, walked counter-clockwise seen
from outside the cube, each maximal run of inside corners is cut off by one segment, oriented
from the crossing where the walk enters the run to the crossing where it leaves it (the outside
then lies to the left of the segment, which makes the polygons it forms wind counter-clockwise
around the outward normal).  The segments chain into closed polygons, fanned into triangles.
Because an ambiguous face (two inside corners on a diagonal) is always resolved the same way
(the inside corners are separated), two cubes sharing a face agree on it; with vertices shared
by grid-edge id, a closed surface therefore gives a closed, edge-manifold, consistently wound
mesh.
"""
from __future__ import annotations

import numpy as np
import torch

CORNERS = np.array([[c & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.int64)   # (8, 3)


def _edges() -> tuple[np.ndarray, np.ndarray]:
    """(12, 2) corner pairs and (12,) axis of each cube edge; the first corner has the 0 bit."""
    pairs, axes = [], []
    for axis in range(3):
        others = [b for b in range(3) if b != axis]
        for k in range(4):
            c0 = ((k & 1) << others[0]) | (((k >> 1) & 1) << others[1])
            pairs.append((c0, c0 | (1 << axis)))
            axes.append(axis)
    return np.array(pairs), np.array(axes)


EDGE_CORNERS, EDGE_AXIS = _edges()


def _face_cycles() -> list[list[int]]:
    """The 4 corners of each of the 6 faces, counter-clockwise seen from outside the cube."""
    cycles = []
    for axis in range(3):
        for side in (0, 1):
            normal = np.zeros(3)
            normal[axis] = 2 * side - 1
            u = np.zeros(3)
            u[(axis + 1) % 3] = 1.0
            v = np.cross(normal, u)                                  # (u, v, normal) right-handed
            corners = [c for c in range(8) if CORNERS[c, axis] == side]
            rel = CORNERS[corners] - 0.5
            angle = np.arctan2(rel @ v, rel @ u)
            cycles.append([corners[i] for i in np.argsort(angle)])
    return cycles


def _edge_between(a: int, b: int) -> int:
    for e, (c0, c1) in enumerate(EDGE_CORNERS):
        if {c0, c1} == {a, b}:
            return e
    raise AssertionError((a, b))


def _case_polygons(case: int, cycles: list[list[int]]) -> list[list[int]]:
    """Closed polygons (lists of cube edges) of one case, wound around the outward normal."""
    inside = [(case >> c) & 1 == 1 for c in range(8)]
    nxt: dict[int, int] = {}
    for cyc in cycles:
        n = len(cyc)
        for i in range(n):
            # a run of inside corners starts at cyc[i] (its predecessor is outside)
            if not inside[cyc[i]] or inside[cyc[i - 1]]:
                continue
            j = i
            while inside[cyc[(j + 1) % n]]:
                j += 1
            enter = _edge_between(cyc[i - 1], cyc[i])
            leave = _edge_between(cyc[j % n], cyc[(j + 1) % n])
            if enter in nxt:
                raise AssertionError(f"case {case}: edge {enter} starts two segments")
            nxt[enter] = leave
    polygons = []
    while nxt:
        start = min(nxt)
        poly = [start]
        e = nxt.pop(start)
        while e != start:
            poly.append(e)
            e = nxt.pop(e)
        polygons.append(poly)
    return polygons


EDGE_FACES = [{(a, CORNERS[c0, a]) for a in range(3) if a != EDGE_AXIS[e]} for e, (c0, _) in enumerate(EDGE_CORNERS)]


def _triangulate(poly: list[int], case: int) -> list[tuple[int, int, int]]:
    """Triangles (in the polygon's winding) with no chord joining two crossings of one cube face.

    Such a chord could be chosen by the neighbour sharing that face too, and the edge would then
    have four triangles; chords through the cube's interior belong to this cube alone.
    """
    n = len(poly)
    for shift in range(n):                            # the closing side may be any polygon edge
        p = poly[shift:] + poly[:shift]

        def ok(i: int, j: int) -> bool:
            return j - i == 1 or (i, j) == (0, n - 1) or not EDGE_FACES[p[i]] & EDGE_FACES[p[j]]

        def solve(i: int, j: int) -> list | None:     # triangles of p[i..j], side (i, j) given
            if j - i < 2:
                return []
            for k in sorted(range(i + 1, j), key=lambda k: abs(2 * k - i - j)):
                if ok(i, k) and ok(k, j):
                    left, right = solve(i, k), solve(k, j)
                    if left is not None and right is not None:
                        return left + [(p[i], p[k], p[j])] + right
            return None

        tris = solve(0, n - 1)
        if tris is not None:
            return tris
    raise AssertionError(f"case {case}: polygon {poly} has no valid triangulation")


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    """(256, 3 * T) int64 triangle table (cube edges, -1 padded) and (256,) triangle counts."""
    cycles = _face_cycles()
    tris = []
    for case in range(256):
        t = []
        for poly in _case_polygons(case, cycles):
            t += _triangulate(poly, case)
        tris.append(t)
    width = max(len(t) for t in tris)
    table = -np.ones((256, 3 * width), dtype=np.int64)
    for case, t in enumerate(tris):
        if t:
            table[case, :3 * len(t)] = np.array(t).ravel()
    return table, np.array([len(t) for t in tris], dtype=np.int64)


TRI_TABLE, TRI_COUNT = _build_tables()


@torch.no_grad()
def marching_cubes(volume: torch.Tensor, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle mesh of the zero level of ``volume`` (positive inside).

    Args:
        volume: (nx, ny, nz) float tensor, any device; NaN counts as outside.
        origin: (3,) position of grid point (0, 0, 0).  spacing: (3,) distance between points.
    Returns:
        vertices (V, 3) float32 and faces (F, 3) int64 on ``volume``'s device.  Each vertex lies
        on one grid edge, placed by linear interpolation; vertices are shared between faces.
    """
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise ValueError(f"volume must be (nx, ny, nz) with every side >= 2, got {tuple(volume.shape)}")
    dev = volume.device
    vol = volume.float()
    nx, ny, nz = vol.shape
    strides = torch.tensor([ny * nz, nz, 1], device=dev)
    inside = (vol > 0).to(torch.uint8)
    case = torch.zeros((nx - 1, ny - 1, nz - 1), dtype=torch.uint8, device=dev)
    for c, (ox, oy, oz) in enumerate(CORNERS.tolist()):
        case |= inside[ox:nx - 1 + ox, oy:ny - 1 + oy, oz:nz - 1 + oz] << c
    del inside
    cells = ((case != 0) & (case != 255)).nonzero()                       # (K, 3) int64
    empty = (torch.zeros((0, 3), dtype=torch.float32, device=dev), torch.zeros((0, 3), dtype=torch.int64, device=dev))
    if not len(cells):
        return empty
    cases = case[cells[:, 0], cells[:, 1], cells[:, 2]].long()             # (K,)
    del case
    table = torch.from_numpy(TRI_TABLE).to(dev)
    counts = torch.from_numpy(TRI_COUNT).to(dev)[cases]                    # (K,)
    owner = torch.repeat_interleave(torch.arange(len(cells), device=dev), counts)       # (F,)
    first = torch.cumsum(counts, 0) - counts
    which = torch.arange(len(owner), device=dev) - first[owner]            # triangle within its cell
    cols = 3 * which[:, None] + torch.arange(3, device=dev)                # (F, 3)
    local = table[cases[owner][:, None], cols]                             # (F, 3) cube edges
    # global id of a grid edge: axis * points + linear index of its first grid point
    points = nx * ny * nz
    edge_start = (torch.from_numpy(CORNERS[EDGE_CORNERS[:, 0]]).to(dev) * strides).sum(1)  # (12,)
    edge_key = torch.from_numpy(EDGE_AXIS).to(dev) * points + edge_start                # (12,)
    base = (cells[owner] * strides).sum(1)                                 # (F,) (no integer matmul on CUDA)
    keys = base[:, None] + edge_key[local]                                 # (F, 3)
    uniq, faces = torch.unique(keys.reshape(-1), return_inverse=True)
    faces = faces.reshape(-1, 3)
    axis, p0 = uniq // points, uniq % points
    flat = vol.reshape(-1)
    v0, v1 = flat[p0], flat[p0 + strides[axis]]
    t = (v0 / (v0 - v1)).clamp(0.0, 1.0)
    t = torch.where(torch.isfinite(t), t, torch.full_like(t, 0.5))      # NaN / inf corner values
    ijk = torch.stack([p0 // strides[0], (p0 // nz) % ny, p0 % nz], dim=1).float()
    ijk[torch.arange(len(uniq), device=dev), axis] += t
    origin_t = torch.as_tensor(np.asarray(origin, np.float64), dtype=torch.float32, device=dev)
    spacing_t = torch.as_tensor(np.asarray(spacing, np.float64), dtype=torch.float32, device=dev)
    return origin_t + ijk * spacing_t, faces
