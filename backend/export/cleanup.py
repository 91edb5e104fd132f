"""Triangle-mesh clean-up on the CPU (numpy + scipy): components, floaters, normals, decimation,
and the checks the tests and callers use (watertight, consistently wound).  Also the volume steps
before meshing a radiance field: filling the space its shell encloses (scipy, or PyTorch on the
GPU), and the free space no straight line from outside reaches (PyTorch).

Meshes are ``verts`` (V, 3) float and ``faces`` (F, 3) integer arrays, 0-based, triangles
counter-clockwise seen from outside.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch


def face_areas(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) float64 triangle areas."""
    a, b, c = (verts[faces[:, i]].astype(np.float64) for i in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) float32 unit normals: the area-weighted sum of the adjacent faces' normals
    (pointing out for counter-clockwise faces).  Vertices without area get (0, 0, 1)."""
    a, b, c = (verts[faces[:, i]].astype(np.float64) for i in range(3))
    n = np.cross(b - a, c - a)                       # length = twice the area
    idx = faces.reshape(-1)
    out = np.stack([np.bincount(idx, weights=np.repeat(n[:, k], 3), minlength=len(verts)) for k in range(3)], 1)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.where(norm > 0, out / np.maximum(norm, 1e-300), [0.0, 0.0, 1.0])
    return out.astype(np.float32)


def face_components(faces: np.ndarray, vertex_count: int) -> tuple[np.ndarray, int]:
    """Label of each face's connected part (faces sharing a vertex are connected).

    Returns (F,) int labels in [0, count) and count (vertices no face uses count as parts too)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(faces):
        return np.zeros(0, dtype=np.int64), 0
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(vertex_count, vertex_count))
    count, vertex_labels = connected_components(graph, directed=False)
    return vertex_labels[faces[:, 0]].astype(np.int64), int(count)


def compact(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop vertices no face uses.  Returns verts, faces renumbered and (V',) indices of the
    kept vertices in the input (to carry per-vertex attributes along)."""
    mask = np.zeros(len(verts), dtype=bool)
    mask[faces.reshape(-1)] = True
    used = np.flatnonzero(mask)
    if len(used) == len(verts):
        return verts, faces, used
    remap = np.cumsum(mask) - 1
    return verts[used], remap[faces].astype(faces.dtype), used


def keep_large_components(verts: np.ndarray, faces: np.ndarray, min_share: float
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove connected parts whose surface AREA is below ``min_share`` of the largest part's.

    Returns verts, faces and (V',) indices of the kept vertices in the input."""
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_component must be in [0, 1] (a share of the largest part's area), got {min_share}")
    if min_share == 0.0:
        return compact(verts, faces)
    labels, count = face_components(faces, len(verts))
    if count > 1:
        area = np.bincount(labels, weights=face_areas(verts, faces), minlength=count)
        faces = faces[(area >= min_share * area.max())[labels]]
    return compact(verts, faces)


def edge_face_counts(faces: np.ndarray) -> np.ndarray:
    """(E,) how many faces share each distinct undirected edge."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(edges, axis=0, return_counts=True)[1]


def is_watertight(faces: np.ndarray) -> bool:
    """Every edge is shared by exactly two faces that traverse it in opposite directions
    (closed, edge-manifold and consistently wound)."""
    if not len(faces):
        return False
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).astype(np.int64)
    if np.any(directed[:, 0] == directed[:, 1]):
        return False
    key = directed[:, 0] * (int(faces.max()) + 1) + directed[:, 1]
    rev = directed[:, 1] * (int(faces.max()) + 1) + directed[:, 0]
    key_sorted = np.sort(key)
    if np.any(key_sorted[1:] == key_sorted[:-1]):
        return False                                 # an edge walked twice the same way
    pos = np.searchsorted(key_sorted, rev)
    pos = np.minimum(pos, len(key_sorted) - 1)
    return bool(np.all(key_sorted[pos] == rev))      # and each once the other way


def euler_characteristic(verts: np.ndarray, faces: np.ndarray) -> int:
    """V - E + F (2 for a sphere, 0 for a torus), counting only vertices that faces use."""
    return int(len(np.unique(faces)) - len(edge_face_counts(faces)) + len(faces))


def signed_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed mesh; positive when the faces wind outwards."""
    a, b, c = (verts[faces[:, i]].astype(np.float64) for i in range(3))
    origin = verts.mean(0) if len(verts) else np.zeros(3)
    return float(np.einsum("ij,ij->i", a - origin, np.cross(b - origin, c - origin)).sum() / 6.0)


def decimate(verts: np.ndarray, faces: np.ndarray, target_faces: int, at_most: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """Quadric-error decimation (fast-simplification) down to about ``target_faces`` triangles;
    with ``at_most``, never more than that (a face budget: the asks of max_faces and MAX_FACES).

    A watertight input stays watertight where it can: when the collapse order would break that (it
    can pinch thin parts), the target is relaxed up to twice over (with ``at_most``: down to half
    of it, in the same steps).  Past that the face budget wins
    (a detailed mesh of many thin parts, e.g. a radiance field's, may not survive any decimation
    watertight, and an unusably heavy asset is worse than a few open seams): the mesh decimated to
    the target is returned, open.  Positions are not snapped: the surface moves by the collapses'
    error.
    """
    import fast_simplification

    target_faces = int(target_faces)
    if target_faces < 4:
        raise ValueError(f"decimate_to must be at least 4 faces, got {target_faces}")
    if len(faces) <= target_faces:
        return verts, faces
    closed = is_watertight(faces)
    v32 = np.ascontiguousarray(verts, dtype=np.float32)
    f32 = np.ascontiguousarray(faces, dtype=np.int32)

    def simplify(target: int) -> tuple[np.ndarray, np.ndarray]:
        out_v, out_f = fast_simplification.simplify(v32, f32, target_reduction=1.0 - target / len(faces))
        out_v, out_f, _ = compact(out_v, out_f.astype(np.int64))
        return out_v.astype(np.float32), out_f

    first = simplify(target_faces)
    ask = target_faces
    for _ in range(8 if at_most else 0):      # the simplifier lands near its target, sometimes above
        if len(first[1]) <= target_faces or ask <= 4:
            break
        ask = max(4, min(int(ask * target_faces / len(first[1]) * 0.98), ask - 1))
        first = simplify(ask)
    if not closed or is_watertight(first[1]):
        return first
    step = 0.8 if at_most else 1.25
    target = int(target_faces * step) + (0 if at_most else 1)
    while (target >= target_faces // 2 if at_most else target <= 2 * target_faces) and 4 <= target < len(faces):
        out_v, out_f = simplify(target)
        if len(out_f) and is_watertight(out_f) and (not at_most or len(out_f) <= target_faces):
            return out_v, out_f
        target = int(target * step) + (0 if at_most else 1)
    return first if len(first[1]) else (verts, faces)


# --------------------------------------------------------------------------------------------
# Volumes: the inside of a radiance field's shell
# --------------------------------------------------------------------------------------------
def solid_interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """(nx, ny, nz) bool -> the mask with the space it encloses filled (CPU, scipy).

    A radiance field only needs enough density near an object's surface to be opaque, so its
    inside is often a shell around low-density pockets, and the shell may have pinholes.  The
    mask is closed with a ball of ``radius`` voxels (the L1 ball: sealing pinholes, filling
    concave details narrower than about two radii) and then every cavity is filled (the
    background is 6-connected).  :func:`solid_interior_torch` is the same on any torch device.
    """
    from scipy import ndimage

    ball = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), radius)
    pad = radius + 1
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=ball)[pad:-pad, pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(closed | mask)


def _grow(x: torch.Tensor) -> torch.Tensor:
    """(1, 1, nx, ny, nz) float 0/1 -> dilated by the 6-neighbourhood (outside the array: 0)."""
    pool = torch.nn.functional.max_pool3d
    return torch.maximum(torch.maximum(pool(x, (3, 1, 1), 1, (1, 0, 0)), pool(x, (1, 3, 1), 1, (0, 1, 0))),
                         pool(x, (1, 1, 3), 1, (0, 0, 1)))


@torch.no_grad()
def solid_interior_torch(mask: torch.Tensor, radius: int = 2, check_every: int = 16) -> torch.Tensor:
    """:func:`solid_interior` in PyTorch (for the GPU): (nx, ny, nz) bool -> bool, same device.

    The cavity fill floods the background from the array's border, one 6-neighbour step per
    iteration, so it takes as many steps as the longest path through the empty space."""
    pad = radius + 1
    x = torch.nn.functional.pad(mask.float(), (pad,) * 6)[None, None]
    closed = x
    for _ in range(radius):
        closed = _grow(closed)
    for _ in range(radius):
        closed = 1.0 - _grow(1.0 - closed)
    closed = closed[..., pad:-pad, pad:-pad, pad:-pad]
    free = 1.0 - torch.maximum(closed, mask.float()[None, None])          # background
    border = torch.zeros_like(free, dtype=torch.bool)
    for d in range(2, 5):
        border.index_fill_(d, torch.tensor([0, free.shape[d] - 1], device=free.device), True)
    reach = free * border
    while True:
        before = reach
        for _ in range(check_every):
            reach = _grow(reach) * free
        if torch.equal(reach, before):
            break
    return (reach[0, 0] == 0)


#: The 26 grid directions (every step of -1, 0 or 1 along each axis, but not none).
GRID_DIRECTIONS = tuple(d for d in itertools.product((-1, 0, 1), repeat=3) if any(d))


def _shifted(clear: torch.Tensor, d: tuple[int, int, int], k: int) -> torch.Tensor:
    """out[v] = clear[v - k d], and True where v - k d falls outside the array."""
    out = torch.ones_like(clear)
    dst, src = [], []
    for di, n in zip(d, clear.shape):
        if di and k >= n:
            return out
        dst.append(slice(k, None) if di > 0 else slice(None, n - k) if di < 0 else slice(None))
        src.append(slice(None, n - k) if di > 0 else slice(k, None) if di < 0 else slice(None))
    out[tuple(dst)] = clear[tuple(src)]
    return out


@torch.no_grad()
def seen_from_outside(clear: torch.Tensor) -> torch.Tensor:
    """(nx, ny, nz) bool free space -> bool: the free cells that a straight line of free cells
    joins to the outside of the array, along one of the 26 :data:`GRID_DIRECTIONS`.

    Any torch device.  Per direction, "the last k cells back along d are free" doubles k each
    step (log2 of the longest side steps), so the cost is 26 x log2(n) passes over the grid.
    """
    seen = torch.zeros_like(clear)
    for d in GRID_DIRECTIONS:
        run, k = clear.clone(), 1
        while k < max(clear.shape):
            run &= _shifted(run, d, k)
            k *= 2
        seen |= run
    return seen
