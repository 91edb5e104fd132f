"""What the cameras saw of a mesh, and closing what they never saw with the least surface.

A field is only constrained where some camera looked.  Behind an object's visible rim (under a
pedestal photographed from above, inside a cavity) the fit is free, and its surface there
balloons into whatever shape the regularisers and the initial sphere leave.  An artist expects
the least surface there: flat against the visible rim.  :func:`close_unseen` does that on the
extracted mesh:

1. :func:`seen_faces`: a face is seen when, in some training view, a pixel centre sees it
   (z-buffer, backend/render/raster.py) or all three of its vertices lie in front of the
   view's z-buffer (within two pixel footprints: faces smaller than a pixel count too).
2. Connected unseen regions larger than ``min_share`` of the surface area are cut out (smaller
   ones, such as the bottoms of creases, stay as they are).
3. Each hole left is filled with a fan of triangles to the centroid of its rim: the flat cap a
   string stretched over the rim would give for a planar rim.
4. The guard: a cap that any view would see (it would cover surface a camera saw, or show past
   the visible silhouette) is dropped and its region kept as fitted.  So the mesh drawn from
   every training view is unchanged, pixel for pixel, except at the caps' rims.

Views are anything with ``intrinsics`` (N, 4) fx fy cx cy, ``poses`` (N, 4, 4) camera-to-world
(Blender convention), ``width`` and ``height``: backend.fitting.data.PosedImages, or
:class:`Views`.  Meshes are ``verts`` (V, 3), ``faces`` (F, 3), counter-clockwise seen from
outside (backend/export/cleanup.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from fit_implicit.backend.export.cleanup import compact, face_areas, face_components
from fit_implicit.backend.render.raster import project, rasterize

log = logging.getLogger(__name__)

DEPTH_PIXELS = 2.0          # pixel footprints a point may lie behind the z-buffer and count as seen
MIN_SHARE = 0.002           # unseen regions below this share of the surface area are left as they are
CAP_PIXELS = 1e-3           # a cap seen on more than this share of the object's pixels (all views) is dropped
MAX_SIDE = 512              # views are drawn at most this many pixels a side (faces below a pixel: vertex test)
GUARD_SIDE = 160            # ... and at most this many for the guard: the caps' fan triangles are large, and
                            # the raster tests each against its whole box (CAP_PIXELS is a share: size-free)


@dataclass
class Views:
    """Pinhole cameras (the attributes PosedImages has): images of ``width`` x ``height``, or
    each its own size (``sizes``)."""

    intrinsics: np.ndarray      # (N, 4) fx, fy, cx, cy in pixels
    poses: np.ndarray           # (N, 4, 4) camera-to-world, Blender convention
    width: int                  # the largest
    height: int
    sizes: np.ndarray | None = None     # (N, 2) int width, height of each (None: all width x height)

    @classmethod
    def of(cls, data) -> "Views":
        """The cameras of ``data`` (PosedImages or Views) without its images."""
        sizes = getattr(data, "sizes", None)
        return cls(np.asarray(data.intrinsics, np.float64), np.asarray(data.poses, np.float64),
                   int(data.width), int(data.height), None if sizes is None else np.asarray(sizes, np.int64))

    def size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of view ``i``."""
        if self.sizes is None:
            return self.width, self.height
        return int(self.sizes[i, 0]), int(self.sizes[i, 1])

    @classmethod
    def of_run(cls, meta: dict) -> "Views | None":
        """The training cameras a fitted run's meta keeps (backend/fitting/trainer.py), or None."""
        cams = meta.get("cameras")
        if not cams or not meta.get("width") or not meta.get("height"):
            return None
        k, poses = np.asarray(cams["intrinsics"], np.float64), np.asarray(cams["poses"], np.float64)
        if k.ndim != 2 or k.shape[1:] != (4,) or poses.shape != (len(k), 4, 4):
            return None
        sizes = np.asarray(cams.get("sizes") or [], np.int64)
        return cls(k, poses, int(meta["width"]), int(meta["height"]), sizes if sizes.shape == (len(k), 2) else None)

    def __len__(self) -> int:
        return len(self.intrinsics)

    def at_most(self, side: int) -> "Views":
        """The same cameras drawing images no larger than ``side`` pixels along the longer side."""
        scale = min(1.0, side / max(self.width, self.height))
        if scale == 1.0:
            return self
        width, height = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        k = self.intrinsics * np.array([width / self.width, height / self.height] * 2)
        sizes = None if self.sizes is None else np.maximum(1, np.floor(self.sizes * [width / self.width, height / self.height]))
        return Views(k, self.poses, width, height, None if sizes is None else sizes.astype(np.int64))


def _tensors(verts, faces, device):
    v = torch.as_tensor(np.asarray(verts, np.float32), device=device)
    f = torch.as_tensor(np.asarray(faces, np.int64), device=device)
    return v, f


def visible_points(points: np.ndarray, verts: np.ndarray, faces: np.ndarray, views, device="cpu",
                   depth_pixels: float = DEPTH_PIXELS) -> np.ndarray:
    """(P,) bool: which ``points`` (on or near the mesh's surface) some view sees, that is they
    project inside its image in front of the camera, onto a pixel where the mesh is drawn, no
    more than ``depth_pixels`` pixel footprints behind the mesh's z-buffer there."""
    dev = torch.device(device)
    v, f = _tensors(verts, faces, dev)
    p = torch.as_tensor(np.asarray(points, np.float32), device=dev)
    seen = torch.zeros(len(p), dtype=torch.bool, device=dev)
    for i in range(len(views)):
        frags = rasterize(v, f, views.intrinsics[i], views.poses[i], *views.size(i))
        seen |= _in_front(p, frags.depth, views.intrinsics[i], views.poses[i], depth_pixels)
    return seen.cpu().numpy()


def _in_front(p: torch.Tensor, zbuf: torch.Tensor, intrinsics, pose, depth_pixels: float) -> torch.Tensor:
    height, width = zbuf.shape
    pix, depth = project(p, intrinsics, pose)
    col, row = torch.floor(pix[:, 0]).long(), torch.floor(pix[:, 1]).long()
    inside = (depth > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    z = torch.full_like(depth, -torch.inf)
    z[inside] = zbuf[row[inside], col[inside]]
    footprint = depth / float(min(intrinsics[0], intrinsics[1]))
    return inside & torch.isfinite(z) & (depth <= z + depth_pixels * footprint)


def seen_faces(verts: np.ndarray, faces: np.ndarray, views, device="cpu",
               depth_pixels: float = DEPTH_PIXELS) -> np.ndarray:
    """(F,) bool: faces some view sees (a pixel centre on them, or all three vertices in front
    of the z-buffer; see the module doc)."""
    dev = torch.device(device)
    v, f = _tensors(verts, faces, dev)
    seen = torch.zeros(len(f), dtype=torch.bool, device=dev)
    for i in range(len(views)):
        frags = rasterize(v, f, views.intrinsics[i], views.poses[i], *views.size(i))
        seen[frags.face[frags.mask]] = True
        seen |= _in_front(v, frags.depth, views.intrinsics[i], views.poses[i], depth_pixels)[f].all(-1)
    return seen.cpu().numpy()


def open_edges(faces: np.ndarray) -> np.ndarray:
    """(K, 2) the directed edges (a, b) of ``faces`` that no face walks back (b, a): the rims of
    its holes, as the faces beside them traverse them."""
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).astype(np.int64)
    n = int(faces.max()) + 1 if len(faces) else 0
    key = directed[:, 0] * n + directed[:, 1]
    return directed[~np.isin(directed[:, 1] * n + directed[:, 0], key)]


def rim_loops(faces: np.ndarray) -> list[np.ndarray] | None:
    """The holes of an edge-manifold mesh as loops of vertex indices, each in the order the
    kept faces traverse its edges (:func:`chain_loops`: None at a pinch)."""
    return chain_loops(open_edges(faces))


def region_rim(faces: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(K, 2) the open edges the rest of a closed mesh has once the faces ``members`` are cut out,
    as the kept faces traverse them: the region's edges (a, b) whose twin (b, a) is not the
    region's, turned round.  Reads only the region's faces (fast on big meshes)."""
    d = faces[members][:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).astype(np.int64)
    if not len(d):
        return np.zeros((0, 2), np.int64)
    n = int(d.max()) + 1
    border = d[~np.isin(d[:, 1] * n + d[:, 0], d[:, 0] * n + d[:, 1])]
    return border[:, ::-1]


def chain_loops(edges: np.ndarray) -> list[np.ndarray] | None:
    """Directed open edges -> loops of vertex indices; None when a vertex starts two of them (a
    pinch) or a chain does not close."""
    if not len(edges):
        return []
    starts, counts = np.unique(edges[:, 0], return_counts=True)
    if (counts > 1).any():
        return None
    nxt = dict(zip(edges[:, 0].tolist(), edges[:, 1].tolist()))
    loops, done = [], set()
    for a in nxt:
        if a in done:
            continue
        loop = [a]
        done.add(a)
        b = nxt[a]
        while b != a:
            if b in done or b not in nxt:
                return None
            loop.append(b)
            done.add(b)
            b = nxt[b]
        loops.append(np.array(loop, np.int64))
    return loops


def cap(verts: np.ndarray, loop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fan closing ``loop`` (open edges a -> b as the kept faces traverse them): one new
    vertex at the loop's length-weighted centre, triangles (b, a, centre) wound like their
    neighbours.  Returns the new vertex (1, 3) and (len(loop), 3) faces, the centre numbered
    ``len(verts)``."""
    p = verts[loop].astype(np.float64)
    q = np.roll(p, -1, axis=0)
    length = np.linalg.norm(q - p, axis=1)
    centre = ((p + q) * 0.5 * length[:, None]).sum(0) / max(length.sum(), 1e-30)
    c = len(verts)
    return centre[None].astype(verts.dtype), np.stack([np.roll(loop, -1), loop, np.full_like(loop, c)], 1)


def close_unseen(verts: np.ndarray, faces: np.ndarray, views, device="cpu", min_share: float = MIN_SHARE,
                 depth_pixels: float = DEPTH_PIXELS, max_side: int = MAX_SIDE) -> tuple[np.ndarray, np.ndarray, dict]:
    """Replace the mesh's large unseen regions with flat caps (see the module doc); the views
    are drawn at most ``max_side`` pixels a side.

    Returns verts, faces and facts: "regions" (closed), "kept_regions" (unseen but left as fitted:
    their cap would show, or their rim pinches), "area_share" (of the surface replaced),
    "seconds".  A mesh without faces or views comes back unchanged."""
    start = time.perf_counter()
    facts = {"regions": 0, "kept_regions": 0, "area_share": 0.0, "seconds": 0.0}
    if not len(faces) or not len(views):
        return verts, faces, facts
    views = Views.of(views).at_most(max_side)
    seen = seen_faces(verts, faces, views, device, depth_pixels)
    unseen = np.flatnonzero(~seen)
    if not len(unseen):
        facts["seconds"] = round(time.perf_counter() - start, 3)
        return verts, faces, facts
    area = face_areas(verts, faces)
    labels, count = face_components(faces[unseen], len(verts))
    region_area = np.bincount(labels, weights=area[unseen], minlength=count)
    big = np.flatnonzero(region_area >= min_share * area.sum())
    new_verts, caps, removed, cap_of = [verts], [], np.zeros(len(faces), bool), []
    n = len(verts)
    for r in big:
        members = _without_pinches(faces, unseen[labels == r], n)
        members = members[~removed[members]]          # regions stay apart (growth may reach another)
        loops = chain_loops(region_rim(faces, members)) if len(members) else None
        if not loops:
            facts["kept_regions"] += 1
            continue
        faces_r = []
        for lp in loops:
            centre, fan = cap(np.concatenate(new_verts), lp)
            new_verts.append(centre)
            faces_r.append(fan)
        removed[members] = True
        caps.append(np.concatenate(faces_r))
        cap_of.append((r, members))
    if not caps:
        facts["seconds"] = round(time.perf_counter() - start, 3)
        return verts, faces, facts
    all_verts = np.concatenate(new_verts)
    # The guard: draw the candidate and drop every cap a view sees; again, until none is dropped
    # (a dropped cap's region comes back and may uncover another cap).
    ok = list(range(len(caps)))
    for _ in range(4):
        base = faces[~removed]
        visible = _cap_pixels(all_verts, base, [caps[k] for k in ok], views.at_most(GUARD_SIDE), device)
        still = [k for k, v in zip(ok, visible[:-1]) if v <= CAP_PIXELS * visible[-1]]
        for k in set(ok) - set(still):
            removed[cap_of[k][1]] = False
        if len(still) == len(ok):
            break
        ok = still
    out_faces = np.concatenate([faces[~removed]] + [caps[k] for k in ok]).astype(faces.dtype)
    out_verts, out_faces, _ = compact(all_verts, out_faces)
    replaced = sum(float(area[cap_of[k][1]].sum()) for k in ok)
    facts.update(regions=len(ok), kept_regions=facts["kept_regions"] + len(caps) - len(ok),
                 area_share=round(replaced / max(float(area.sum()), 1e-30), 4),
                 seconds=round(time.perf_counter() - start, 3))
    log.info("unseen regions: %d closed, %d kept (%.1f%% of the surface replaced) in %.2f s", facts["regions"],
             facts["kept_regions"], 100 * facts["area_share"], facts["seconds"])
    return out_verts.astype(verts.dtype), out_faces, facts


def summary_entries(facts: dict) -> dict:
    """:func:`close_unseen`'s facts as flat entries of a job's summary (Done.summary holds scalars)."""
    return {"unseen_closed": facts["regions"], "unseen_kept": facts["kept_regions"],
            "unseen_area_share": facts["area_share"], "unseen_seconds": facts["seconds"]}


def _without_pinches(faces: np.ndarray, members: np.ndarray, vertex_count: int, rounds: int = 8) -> np.ndarray:
    """Grow a region (face indices) over the faces around the vertices where its rim would
    pinch (two arcs of the rim meeting at one vertex), so that each hole has one simple rim."""
    for _ in range(rounds):
        starts, counts = np.unique(region_rim(faces, members)[:, 0], return_counts=True)
        bad = starts[counts > 1]
        if not len(bad):
            break
        at = np.zeros(vertex_count, bool)
        at[bad] = True
        members = np.union1d(members, np.flatnonzero(at[faces].any(1)))
    return members


def _cap_pixels(verts: np.ndarray, base: np.ndarray, caps: list[np.ndarray], views, device) -> list[int]:
    """Pixels (all views) on which each cap is drawn, then the pixels the whole mesh covers."""
    dev = torch.device(device)
    faces = np.concatenate([base] + caps)
    owner = np.concatenate([np.full(len(base), -1)] + [np.full(len(c), k) for k, c in enumerate(caps)])
    v, f = _tensors(verts, faces, dev)
    owner_t = torch.as_tensor(owner, device=dev)
    counts = torch.zeros(len(caps) + 1, dtype=torch.long, device=dev)
    for i in range(len(views)):
        frags = rasterize(v, f, views.intrinsics[i], views.poses[i], *views.size(i))
        who = owner_t[frags.face[frags.mask]]
        counts[:-1] += torch.bincount(who[who >= 0], minlength=len(caps))[:len(caps)]
        counts[-1] += int(frags.mask.sum())
    return counts.cpu().tolist()


__all__ = ["Views", "cap", "chain_loops", "close_unseen", "open_edges", "region_rim", "rim_loops",
           "seen_faces", "summary_entries", "visible_points"]
