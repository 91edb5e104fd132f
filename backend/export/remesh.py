"""Remeshing a UV-mapped triangle mesh between the steps of the mesh refinement (export/refine.py).

The refinement moves vertices, so it cannot add detail where the mesh has too few triangles
(a thin part that marching cubes and decimation left as a few long faces), nor clean up the
slivers it squeezes.  Two operations, each keeping the texture mapping:

* :func:`split_edges` cuts chosen edges at their midpoints.  Each face on a cut edge becomes two;
  the new vertex takes the midpoint of the edge's UVs on each side of it (both sides share one
  new UV vertex unless the edge is a UV seam), so the drawn mesh and the texture read exactly as
  before the cut: the surface and its texture lookup are unchanged, only now free to move.
* :func:`collapse_edges` merges the two ends of chosen short edges into their midpoint, where it
  is safe: both ends inside one UV chart (neither on a seam nor on the mesh's border), the two
  ends share exactly the two neighbours across the edge (the surface stays a manifold), and no
  face around them turns over.

Vertices are of two kinds, as in refine.py: UV vertices (the rows of the UV mesh; a seam vertex
has one per chart) and welded vertices (one per point of the surface; ``weld`` maps the first to
the second).  Each result says where every new vertex comes from as a pair of old ones (the same
one twice for a kept vertex); :func:`carry` averages any per-vertex quantity over that pair
(positions, offsets, an optimiser's moments), so the caller carries its state across.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLLAPSE_MIN_COS = 0.2     # a collapse is refused where a face around it would turn by more than ~78 degrees


@dataclass(frozen=True)
class Remeshed:
    """A remeshed topology: faces over the new UV vertices, and where the new vertices come from."""

    faces: np.ndarray        # (F, 3) int64, UV-vertex indices, the old winding
    uv_parents: np.ndarray   # (V, 2) int64: each new UV vertex is the mean of these two old ones
    weld: np.ndarray         # (V,) int64: each new UV vertex's welded vertex
    parents: np.ndarray      # (N, 2) int64: each new welded vertex is the mean of these two old ones
    face_parents: np.ndarray  # (F,) int64: the old face each new face lies in (or replaces)
    changed: int             # edges split or collapsed


def carry(values, parents):
    """Per-vertex ``values`` (old vertices first, any trailing shape; numpy or torch) carried to
    the new vertices: the mean over each one's two ``parents`` (M, 2)."""
    return 0.5 * (values[parents[:, 0]] + values[parents[:, 1]])


def face_edges(faces: np.ndarray, weld: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each face's three edges (corner k to corner k+1) as welded pairs (F, 3, 2) and as keys
    (F, 3) int64 that are equal for the same edge seen from either face."""
    wf = weld[faces]
    pairs = np.stack([wf, np.roll(wf, -1, axis=1)], axis=-1)
    lo, hi = pairs.min(-1), pairs.max(-1)
    return pairs, lo * (int(weld.max()) + 1 if len(weld) else 1) + hi


def edge_lengths(points: np.ndarray, faces: np.ndarray, weld: np.ndarray) -> np.ndarray:
    """(F, 3) length of each face's edge from corner k to corner k+1, ``points`` (N, 3) welded."""
    pairs, _ = face_edges(faces, weld)
    return np.linalg.norm(points[pairs[..., 1]] - points[pairs[..., 0]], axis=-1)


def split_edges(faces: np.ndarray, weld: np.ndarray, priority: np.ndarray, limit: int) -> Remeshed:
    """Cut at most ``limit`` edges at their midpoints, those with the highest ``priority`` (F, 3)
    first (a face's edge k runs from its corner k to k+1; an edge takes the highest priority any
    of its faces gives it; priority <= 0: never cut), at most one edge of any face per call (call
    again to cut more).  The new positions are the caller's, by :func:`carry`."""
    faces = np.asarray(faces, np.int64)
    weld = np.asarray(weld, np.int64)
    n_uv, n_welded = len(weld), int(weld.max()) + 1 if len(weld) else 0
    _, keys = face_edges(faces, weld)
    flat_keys, flat_prio = keys.reshape(-1), np.asarray(priority, np.float64).reshape(-1)
    order = np.argsort(flat_keys, kind="stable")
    sorted_keys = flat_keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(sorted_keys)]
    best = np.maximum.reduceat(flat_prio[order], starts) if len(starts) else np.zeros(0)
    candidates = np.flatnonzero(best > 0)
    candidates = candidates[np.argsort(-best[candidates], kind="stable")]
    taken = np.zeros(len(faces), bool)
    cuts: list[tuple[int, int, int]] = []     # (face, corner k of its cut edge k -> k+1, the new welded vertex)
    welded_pairs: list[tuple[int, int]] = []
    for c in candidates:
        if len(welded_pairs) >= limit:
            break
        slots = order[starts[c]:ends[c]]
        fs = slots // 3
        if taken[fs].any() or len(np.unique(fs)) != len(fs):
            continue
        taken[fs] = True
        w = n_welded + len(welded_pairs)
        cuts.extend((int(s // 3), int(s % 3), w) for s in slots)
        f, k = divmod(int(slots[0]), 3)
        welded_pairs.append((int(weld[faces[f, k]]), int(weld[faces[f, (k + 1) % 3]])))
    new_faces = faces.copy()
    extra_faces, mids, mid_welds = [], {}, []
    for f, k, w in cuts:
        a, b, c = faces[f, k], faces[f, (k + 1) % 3], faces[f, (k + 2) % 3]
        key = (int(min(a, b)), int(max(a, b)))
        m = mids.get(key)
        if m is None:           # one UV vertex per side of a seam, shared where the edge is no seam
            m = mids[key] = n_uv + len(mids)
            mid_welds.append(w)
        # (a, b, c) -> (a, m, c) and (m, b, c): the same winding, the same UV triangle
        new_faces[f] = (a, m, c)
        extra_faces.append((m, b, c))
    keep = np.repeat(np.arange(n_welded), 2).reshape(-1, 2)
    keep_uv = np.repeat(np.arange(n_uv), 2).reshape(-1, 2)
    return Remeshed(np.concatenate([new_faces, np.asarray(extra_faces, np.int64).reshape(-1, 3)]),
                    np.concatenate([keep_uv, np.asarray(list(mids), np.int64).reshape(-1, 2)]),
                    np.concatenate([weld, np.asarray(mid_welds, np.int64)]),
                    np.concatenate([keep, np.asarray(welded_pairs, np.int64).reshape(-1, 2)]),
                    np.concatenate([np.arange(len(faces)), np.asarray([f for f, _, _ in cuts], np.int64)]),
                    len(welded_pairs))


def collapse_edges(points: np.ndarray, faces: np.ndarray, weld: np.ndarray, priority: np.ndarray,
                   limit: int) -> Remeshed:
    """Merge the two ends of at most ``limit`` edges into their midpoint, those with the highest
    ``priority`` (F, 3) first (as :func:`split_edges`; <= 0: never), where it is safe (module
    doc), at most one collapse in any vertex's neighbourhood per call.  ``points`` (N, 3): the
    welded vertices' current positions (for the fold check)."""
    faces = np.asarray(faces, np.int64)
    weld = np.asarray(weld, np.int64)
    points = np.asarray(points, np.float64)
    n_uv, n_welded = len(weld), len(points)
    wf = weld[faces]
    copies = np.bincount(weld, minlength=n_welded)
    # each welded vertex's faces and neighbours (CSR)
    corner_faces = np.repeat(np.arange(len(faces)), 3)
    order = np.argsort(wf.reshape(-1), kind="stable")
    vf_start = np.searchsorted(wf.reshape(-1)[order], np.arange(n_welded + 1))
    vf = corner_faces[order]
    pairs, keys = face_edges(faces, weld)
    flat_keys = keys.reshape(-1)
    uniq, first, counts = np.unique(flat_keys, return_index=True, return_counts=True)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, np.searchsorted(uniq, flat_keys), np.asarray(priority, np.float64).reshape(-1))
    edge_pairs = pairs.reshape(-1, 2)[first]
    interior = counts == 2
    # a vertex inside the surface (not on its border, not non-manifold) has as many faces as neighbours
    nb_pairs = np.unique(np.concatenate([edge_pairs, edge_pairs[:, ::-1]]), axis=0)
    neighbours = np.bincount(nb_pairs[:, 0], minlength=n_welded)
    nb_start = np.searchsorted(nb_pairs[:, 0], np.arange(n_welded + 1))
    ring_faces = np.diff(vf_start)
    inside = (ring_faces == neighbours) & (ring_faces >= 3) & (copies == 1)
    ok = (best > 0) & interior & inside[edge_pairs[:, 0]] & inside[edge_pairs[:, 1]]
    candidates = np.flatnonzero(ok)
    candidates = candidates[np.argsort(-best[candidates], kind="stable")]
    locked = np.zeros(n_welded, bool)
    merge = np.arange(n_welded)          # welded vertex -> the one it merges into
    removed_faces = np.zeros(len(faces), bool)
    done = 0
    for e in candidates:
        if done >= limit:
            break
        u, v = (int(x) for x in edge_pairs[e])
        if u == v or locked[u] or locked[v]:
            continue
        nu = nb_pairs[nb_start[u]:nb_start[u + 1], 1]
        nv = nb_pairs[nb_start[v]:nb_start[v + 1], 1]
        if len(np.intersect1d(nu, nv)) != 2 or locked[nu].any() or locked[nv].any():
            continue
        ring = np.union1d(vf[vf_start[u]:vf_start[u + 1]], vf[vf_start[v]:vf_start[v + 1]])
        both = (wf[ring] == u).any(1) & (wf[ring] == v).any(1)
        if both.sum() != 2:
            continue
        rest = ring[~both]
        mid = 0.5 * (points[u] + points[v])
        tri = points[wf[rest]]
        moved = np.where(((wf[rest] == u) | (wf[rest] == v))[..., None], mid, tri)
        n0 = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n1 = np.cross(moved[:, 1] - moved[:, 0], moved[:, 2] - moved[:, 0])
        cos = (n0 * n1).sum(-1) / np.maximum(np.linalg.norm(n0, axis=-1) * np.linalg.norm(n1, axis=-1), 1e-30)
        if (cos < COLLAPSE_MIN_COS).any():
            continue
        merge[v] = u
        removed_faces[ring[both]] = True
        locked[u] = locked[v] = True
        locked[nu] = locked[nv] = True
        done += 1
    # the survivor of a merged pair sits at their midpoint; its one UV vertex at their UVs' midpoint
    keep_w = merge == np.arange(n_welded)
    partner = np.arange(n_welded)
    partner[merge[~keep_w]] = np.flatnonzero(~keep_w)
    new_w = np.cumsum(keep_w) - 1
    parents = np.stack([np.flatnonzero(keep_w), partner[keep_w]], 1)
    uv_of = np.zeros(n_welded, np.int64)
    uv_of[weld] = np.arange(n_uv)                       # merged vertices have one UV vertex each
    keep_uv = keep_w[weld]
    uv_merge = np.arange(n_uv)
    uv_merge[~keep_uv] = uv_of[merge[weld[~keep_uv]]]
    uv_partner = np.arange(n_uv)
    uv_partner[uv_merge[~keep_uv]] = np.flatnonzero(~keep_uv)
    new_uv = np.cumsum(keep_uv) - 1
    out_faces = new_uv[uv_merge[faces[~removed_faces]]]
    uv_parents = np.stack([np.flatnonzero(keep_uv), uv_partner[keep_uv]], 1)
    return Remeshed(out_faces, uv_parents, new_w[weld[keep_uv]], parents, np.flatnonzero(~removed_faces), done)
