"""Triangle rasterisation in PyTorch (CPU or GPU), with gradients for what is drawn.

Two steps, as in nvdiffrast:

* :func:`rasterize` decides which triangle each pixel centre sees (a z-buffer over candidate
  (triangle, pixel) pairs: every triangle is tested against the pixels of its bounding box).
  This choice has no gradient.
* :func:`interpolate` then computes, for the triangle each pixel sees, the pixel centre's
  perspective-correct barycentric weights from the projected vertices with differentiable
  operations, and interpolates vertex attributes (UVs, normals, colours) with them: gradients
  reach the vertex positions and the attributes.  :func:`sample_texture` reads a texture at
  interpolated UVs bilinearly: gradients reach the texels.

Silhouettes get their gradient from :func:`antialias` (after nvdiffrast's antialias op): the
colour of the pixels an outline crosses blends by where it crosses, so a vertex moves the outline.

Conventions: the OpenCV pixel frame of shared/cameras.py (x right, y down, pixel (r, c) has its
centre at (c + 0.5, r + 0.5)), intrinsics ``(fx, fy, cx, cy)``, poses camera-to-world in
Blender's camera convention (the camera looks down -Z).  Triangles with a vertex closer than
``near`` in front of the camera (or behind it) are not drawn: no clipping.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fit_implicit.backend.render import raster_triton

RASTER_CHUNK = 1 << 24      # candidate (triangle, pixel) pairs tested at once
NEAR = 1e-4                 # world units: nearest depth a drawn vertex may have
OUTLINE_HOPS = 32           # antialias: triangles walked from a pixel centre to the outline at most
EXIT_TOLERANCE = 1e-3       # antialias: pixels past where the walk came in that a triangle's exit must lie


@dataclass
class Fragments:
    """What each pixel sees: ``face`` (H, W) int64, the triangle (-1: nothing); ``depth`` (H, W)
    float32, its depth along the viewing axis (inf: nothing)."""

    face: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(H, W) bool: pixels that see a triangle."""
        return self.face >= 0


def project(vertices: torch.Tensor, intrinsics, c2w) -> tuple[torch.Tensor, torch.Tensor]:
    """World points (V, 3) -> pixel positions (V, 2) and depths (V,) along the viewing axis
    (positive in front), differentiable in the points.  ``intrinsics`` (4,), ``c2w`` (4, 4)."""
    k = torch.as_tensor(intrinsics, dtype=vertices.dtype, device=vertices.device)
    pose = torch.as_tensor(c2w, dtype=vertices.dtype, device=vertices.device)
    rot, origin = pose[:3, :3], pose[:3, 3]
    pc = (vertices - origin) @ rot                      # camera frame: x right, y up, z backwards
    depth = -pc[:, 2]
    safe = torch.where(depth.abs() > 1e-12, depth, torch.full_like(depth, 1e-12))
    u = k[0] * pc[:, 0] / safe + k[2]
    v = -k[1] * pc[:, 1] / safe + k[3]
    return torch.stack([u, v], -1), depth


def _edge_weights(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentric weights (..., 3) of points ``p`` (..., 2) in triangles
    (a, b, c) (..., 2); the weights of a degenerate triangle are not finite."""
    area = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
    wa = (b[..., 0] - p[..., 0]) * (c[..., 1] - p[..., 1]) - (b[..., 1] - p[..., 1]) * (c[..., 0] - p[..., 0])
    wb = (c[..., 0] - p[..., 0]) * (a[..., 1] - p[..., 1]) - (c[..., 1] - p[..., 1]) * (a[..., 0] - p[..., 0])
    w = torch.stack([wa, wb], -1) / area[..., None]
    return torch.cat([w, 1.0 - w.sum(-1, keepdim=True)], -1)


def _boxes(points: torch.Tensor, faces: torch.Tensor, width: int, height: int, inv_depth: torch.Tensor | None):
    """Each triangle's corners (F, 3, 2), pixel box (first / last column and row, inclusive,
    clipped), box side, whether it is drawn at all (finite, not degenerate, in front where
    ``inv_depth`` is given) and its corners' 1 / depth (F, 3) (None without depths)."""
    pix = points.float()[faces]                                                 # (F, 3, 2)
    size = torch.tensor([width - 1, height - 1], device=points.device)
    lo = torch.ceil(pix.amin(1) - 0.5).clamp_min(0).long()
    hi = torch.minimum(torch.floor(pix.amax(1) - 0.5).long(), size)
    extent = (hi - lo + 1).clamp_min(0).amax(1)                                  # (F,) bbox side
    a, b, c = pix[:, 0], pix[:, 1], pix[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    good = (extent > 0) & (area.abs() > 1e-12) & torch.isfinite(pix).all(-1).all(-1)
    inv = None if inv_depth is None else inv_depth.float()[faces]               # (F, 3)
    if inv is not None:
        good &= (inv > 0).all(-1)
    return pix, lo, hi, extent, good, inv


@torch.no_grad()
def rasterize_2d(points: torch.Tensor, faces: torch.Tensor, width: int, height: int,
                 inv_depth: torch.Tensor | None = None, kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which triangle covers each pixel centre of a ``width`` x ``height`` image.

    Args:
        points: (V, 2) float32 pixel positions.  faces: (F, 3) int64.
        inv_depth: (V,) 1 / depth of the vertices: where triangles overlap the nearest one wins
            (1 / depth is linear in screen space; equally near: the higher index); None: any
            covering triangle (UV charts, which do not overlap; where they do, the higher index).
        kernel: the z-buffer in Triton (render/raster_triton.py) or in PyTorch
            (:func:`zbuffer_reference`); None: Triton where it runs (CUDA).
    Returns:
        face (H, W) int64 (-1: none); bary (H, W, 3) float32 screen-space barycentric weights.
    """
    face_map = torch.full((width * height,), -1, dtype=torch.long, device=points.device)
    bary_map = torch.zeros((width * height, 3), dtype=torch.float32, device=points.device)
    if faces.numel():
        pix, lo, hi, extent, good, inv = _boxes(points, faces, width, height, inv_depth)
        if raster_triton.usable(points) if kernel is None else kernel:
            ids = torch.nonzero(good).squeeze(1)
            face_map = raster_triton.zbuffer(pix, inv, ids, lo, hi, width, height)
        else:
            face_map = zbuffer_reference(pix, lo, hi, extent, good, inv, width, height)
        seen = torch.nonzero(face_map >= 0).squeeze(1)
        if len(seen):       # the weights of the triangle each pixel sees, clamped as the inside test allows
            f = face_map[seen]
            centres = torch.stack([seen % width, seen // width], -1).float() + 0.5
            w = _edge_weights(centres, pix[f, 0], pix[f, 1], pix[f, 2]).clamp_min(0.0)
            bary_map[seen] = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return face_map.reshape(height, width), bary_map.reshape(height, width, 3)


def zbuffer_reference(pix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, extent: torch.Tensor, good: torch.Tensor,
                      inv: torch.Tensor | None, width: int, height: int) -> torch.Tensor:
    """The z-buffer in plain PyTorch (the Triton kernel's reference): (H * W,) int64, the triangle
    each pixel centre sees (-1: none), from :func:`_boxes`' output.  Every drawn triangle is
    tested against the pixel centres of its box, as (triangle, pixel) pairs, in buckets of
    similar box size; each covered pixel keeps the largest key, 1 / depth's float bits above the
    triangle's index (the index alone without depths), as the kernel does."""
    dev = pix.device
    key = torch.full((width * height,), -1, dtype=torch.long, device=dev)
    a, b, c = pix[:, 0], pix[:, 1], pix[:, 2]
    bucket = torch.ceil(torch.log2(extent.clamp_min(1).float())).long()
    for k in torch.unique(bucket[good]).tolist():
        side = 1 << k
        ids = torch.nonzero(good & (bucket == k)).squeeze(1)
        offs = torch.stack(torch.meshgrid(torch.arange(side, device=dev), torch.arange(side, device=dev),
                                          indexing="xy"), -1).reshape(-1, 2)        # (side^2, 2) (dx, dy)
        for chunk in ids.split(max(1, RASTER_CHUNK // (side * side))):
            cols_rows = lo[chunk][:, None, :] + offs[None]                           # (n, side^2, 2)
            inside_box = (cols_rows <= hi[chunk][:, None, :]).all(-1)
            w = _edge_weights(cols_rows.float() + 0.5, a[chunk][:, None], b[chunk][:, None], c[chunk][:, None])
            hit = inside_box & (w >= -raster_triton.INSIDE_EPS).all(-1)
            n_idx, t_idx = torch.nonzero(hit, as_tuple=True)
            cr = cols_rows[n_idx, t_idx]
            tri = chunk[n_idx]
            candidate = tri
            if inv is not None:     # nearest first: 1 / depth (positive) orders as its float bits do
                z = (w[n_idx, t_idx].clamp_min(0.0) * inv[tri]).sum(-1)
                candidate = (z.view(torch.int32).long() << 32) | tri
            key.scatter_reduce_(0, cr[:, 1] * width + cr[:, 0], candidate, reduce="amax")
    return torch.where(key >= 0, key & 0xFFFFFFFF, key)


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, intrinsics, c2w, width: int, height: int,
              near: float = NEAR) -> Fragments:
    """The triangle each pixel of a camera's image sees, nearest first.

    Args:
        vertices: (V, 3) float world positions.  faces: (F, 3) int64.
        intrinsics: (4,) fx, fy, cx, cy.  c2w: (4, 4) camera-to-world (Blender convention).
    """
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    faces = torch.as_tensor(faces, dtype=torch.long, device=vertices.device)
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= len(vertices)):
        raise ValueError(f"face indices must be in [0, {len(vertices)})")
    with torch.no_grad():
        pix, depth = project(vertices.detach().float(), intrinsics, c2w)
        inv = torch.where(depth > near, 1.0 / depth.clamp_min(near), torch.zeros_like(depth))
        face, _ = rasterize_2d(pix, faces, width, height, inv)
        depth_map = torch.full((height, width), torch.inf, device=vertices.device)
        seen = face >= 0
        if seen.any():
            w = perspective_weights(pix, depth, faces, face[seen], _pixel_centres(seen))
            depth_map[seen] = (w * depth[faces[face[seen]]]).sum(-1)
    return Fragments(face, depth_map)


def _pixel_centres(mask: torch.Tensor) -> torch.Tensor:
    """(K, 2) float pixel centres (x, y) of the True pixels of ``mask`` (H, W), in row order."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.stack([cols, rows], -1).to(torch.float32) + 0.5


def perspective_weights(pix: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, face: torch.Tensor,
                        centres: torch.Tensor) -> torch.Tensor:
    """Perspective-correct barycentric weights (K, 3) of pixel ``centres`` (K, 2) in triangles
    ``face`` (K,) of the projected vertices ``pix`` (V, 2) with depths ``depth`` (V,);
    differentiable in ``pix`` and ``depth``."""
    tri = faces[face]                                                            # (K, 3)
    p = pix[tri]                                                                 # (K, 3, 2)
    w = _edge_weights(centres.to(pix.dtype), p[:, 0], p[:, 1], p[:, 2])          # screen space
    w = w / depth[tri]
    return w / w.sum(-1, keepdim=True)


def interpolate(attributes: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, fragments: Fragments,
                intrinsics, c2w) -> torch.Tensor:
    """Vertex ``attributes`` (V, C) at every pixel that sees a triangle -> (K, C), K the number of
    such pixels in row order (``fragments.mask``); differentiable in the attributes and in the
    vertex positions (V, 3)."""
    faces = torch.as_tensor(faces, dtype=torch.long, device=vertices.device)
    seen = fragments.mask
    pix, depth = project(vertices, intrinsics, c2w)
    w = perspective_weights(pix, depth, faces, fragments.face[seen], _pixel_centres(seen))
    return (w[..., None] * attributes[faces[fragments.face[seen]]]).sum(1)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear reads of ``texture`` (S, S, C) (top row first) at ``uv`` (K, 2) in [0, 1] (v up)
    -> (K, C); differentiable in the texels and in the UVs.  Reads clamp at the border."""
    grid = torch.stack([uv[:, 0] * 2.0 - 1.0, 1.0 - uv[:, 1] * 2.0], -1)       # x right, y down
    img = texture.permute(2, 0, 1)[None]
    out = torch.nn.functional.grid_sample(img, grid[None, None].to(img.dtype), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out[0, :, 0].T


@torch.no_grad()
def render_unlit(vertices: torch.Tensor, faces: torch.Tensor, attributes: torch.Tensor, intrinsics, c2w,
                 width: int, height: int, texture: torch.Tensor | None = None, supersample: int = 1) -> torch.Tensor:
    """The mesh unlit, as a camera sees it: (H, W, 4) float RGBA in [0, 1], straight alpha.  The
    colour is ``texture`` (S, S, 3) read at the interpolated ``attributes`` (V, 2) UVs, or without
    a texture the interpolated ``attributes`` (V, 3) themselves (vertex colours).  With
    ``supersample`` s > 1 the image is drawn s x s times larger and box-filtered down, so edges are
    anti-aliased as a path tracer's pixel filter makes them (benchmarks/lego_mesh.py compares it
    with Cycles)."""
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    k = torch.as_tensor(intrinsics, dtype=torch.float32) * s
    big_w, big_h = int(width) * s, int(height) * s
    frags = rasterize(vertices, faces, k, c2w, big_w, big_h)
    rgba = torch.zeros((big_h, big_w, 4), dtype=torch.float32, device=vertices.device)
    if frags.mask.any():
        values = interpolate(attributes.float(), vertices.float(), faces, frags, k, c2w)
        colour = values if texture is None else sample_texture(texture.float(), values)
        rgba[frags.mask] = torch.cat([colour[:, :3], torch.ones_like(colour[:, :1])], -1)
    if s > 1:
        premul = torch.cat([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1).permute(2, 0, 1)[None]
        premul = torch.nn.functional.avg_pool2d(premul, s)[0].permute(1, 2, 0)
        alpha = premul[..., 3:]
        rgba = torch.cat([premul[..., :3] / alpha.clamp_min(1e-8), alpha], -1)
    return rgba


def _exit(pix: torch.Tensor, tri: torch.Tensor, centre: torch.Tensor, step: torch.Tensor, along: int, across: int,
          entry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the line from each pixel centre (K, 2) in direction ``step`` (K,) (+1 / -1) along axis
    ``along`` leaves triangle ``tri`` (K, 3) of the projected vertices ``pix``: the distance t
    (K,) in pixels (differentiable; inf if it does not leave it past ``entry``) and which edge
    (K,), edge k running from corner k to corner k + 1.  A line crosses a triangle's outline
    twice at most, and it leaves at the farther crossing: that one, however the nearer one
    (where it came in, or a centre a hair outside) rounds."""
    a, b = pix[tri], pix[tri[:, [1, 2, 0]]]                                      # (K, 3, 2) edges a -> b
    da = b[..., across] - a[..., across]
    s = (centre[:, None, across] - a[..., across]) / torch.where(da.abs() > 1e-12, da, torch.ones_like(da))
    crossing = a[..., along] + s * (b[..., along] - a[..., along])
    t = (crossing - centre[:, None, along]) * step[:, None]
    valid = (da.abs() > 1e-12) & (s >= 0) & (s <= 1)
    t, edge = torch.where(valid, t, torch.full_like(t, -torch.inf)).max(1)
    ahead = t > entry + EXIT_TOLERANCE
    return torch.where(ahead, t, torch.full_like(t, torch.inf)), edge


def face_adjacency(faces: torch.Tensor) -> torch.Tensor:
    """(F, 3) int64: the face across each face's edge k (from corner k to corner k + 1), -1 where
    no other face shares it (an open border).  Faces are matched by vertex index, so a mesh split
    at UV seams needs its welded faces."""
    faces = torch.as_tensor(faces, dtype=torch.long)
    n = len(faces)
    adj = torch.full((3 * n,), -1, dtype=torch.long, device=faces.device)
    if not n:
        return adj.reshape(0, 3)
    e = torch.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1).reshape(-1, 2)   # half-edge 3 f + k
    key = e.amin(1) * (int(faces.max()) + 1) + e.amax(1)
    order = torch.argsort(key, stable=True)
    proper = (e[:, 0] != e[:, 1])[order]                 # an edge of one vertex joins nothing
    pair = (key[order][1:] == key[order][:-1]) & proper[1:] & proper[:-1] & (order[1:] // 3 != order[:-1] // 3)
    a, b = order[:-1][pair], order[1:][pair]
    adj[a] = b // 3
    adj[b] = a // 3
    return adj.reshape(n, 3)


def antialias(image: torch.Tensor, fragments: Fragments, pix: torch.Tensor, faces: torch.Tensor,
              depth_gap: float = 0.02, adjacency: torch.Tensor | None = None) -> torch.Tensor:
    """Silhouette anti-aliasing with gradients for the outline (the idea of nvdiffrast's
    antialias op, in plain PyTorch).

    For every pair of neighbouring pixels (left-right, top-bottom) where the nearer one sees a
    triangle and the other sees nothing or a surface more than ``depth_gap`` (relative) farther
    away, the nearer triangle's edge crosses the segment between the two pixel centres at some
    fraction t.  Past the midpoint (t > 0.5) the triangle covers that much of the far pixel,
    whose colour moves (t - 0.5) of the way to the near one; before it (t < 0.5) the near pixel
    moves (0.5 - t) of the way to the far one.  t is computed from the projected vertices
    ``pix`` (V, 2) with differentiable operations, so the loss reaches where the outline is.

    The crossing is the outline's: an open border, or an edge whose neighbour across it
    (``adjacency``: :func:`face_adjacency` of the welded faces; when not given, of ``faces`` with
    vertices at the same screen position welded, as at UV seams) faces the other
    way on screen.  Where the near pixel's triangle leaves the segment through an inner edge
    (triangles smaller than a pixel), the walk goes on through the neighbours, up to
    ``OUTLINE_HOPS`` triangles.  Taking the near triangle's own exit edge instead made outlines
    lose about half a pixel of coverage on fine meshes (a sphere 25 pixels across: 452 of 500
    pixels), which a refinement against photos paid for by growing the mesh.  Triangles seen
    edge-on near the outline are thin, so the walk there is long: with at most 8 hops, and the
    pairs that ran out kept hard, a sphere of quarter-pixel triangles lost 0.11 pixel of
    coverage along its outline (the still life's refined asset came out 0.1 pixel fat on its
    outlines in Cycles, docs/benchmarks.md); 32 hops, and the walks still going then taken
    as far as they got (from the midpoint on): within 0.05 pixel.

    image (H, W, C): the shaded image (background where nothing is seen); returns a new one.
    """
    face, depth = fragments.face, fragments.depth
    height, width = face.shape
    faces = torch.as_tensor(faces, dtype=torch.long, device=face.device)
    if adjacency is None:       # weld by screen position: a mesh split at UV seams is one surface there
        _, welded = torch.unique(pix.detach(), dim=0, return_inverse=True)
        adjacency = face_adjacency(welded[faces])
    with torch.no_grad():       # which way each triangle faces on screen (sign of its projected area)
        p = pix.detach()[faces]
        facing = torch.sign((p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1])
                            - (p[:, 1, 1] - p[:, 0, 1]) * (p[:, 2, 0] - p[:, 0, 0]))
    flat = image.reshape(height * width, -1)
    delta = torch.zeros_like(flat)
    for axis in (1, 0):                                      # x neighbours, then y neighbours
        if face.shape[axis] < 2:
            continue
        lo = (slice(None), slice(0, -1)) if axis == 1 else (slice(0, -1), slice(None))
        hi = (slice(None), slice(1, None)) if axis == 1 else (slice(1, None), slice(None))
        d0, d1 = depth[lo], depth[hi]
        near_first = d0 < d1
        dn, df = torch.where(near_first, d0, d1), torch.where(near_first, d1, d0)
        edge = (face[lo] != face[hi]) & torch.isfinite(dn) & (df > dn * (1.0 + depth_gap))
        rows, cols = torch.nonzero(edge, as_tuple=True)
        if not len(rows):
            continue
        first = rows * width + cols                          # the pixel with the lower index
        second = first + (1 if axis == 1 else width)
        nf = near_first[rows, cols]
        near = torch.where(nf, first, second)
        far = torch.where(nf, second, first)
        centre = torch.stack([near % width, near // width], -1).to(pix.dtype) + 0.5  # (K, 2) x, y
        step = torch.where(near < far, 1.0, -1.0).to(pix.dtype)                 # direction to far
        along, across = (0, 1) if axis == 1 else (1, 0)
        # Walk from the near pixel's triangle along the segment, across inner edges, to the
        # outline (at most OUTLINE_HOPS triangles; a walk still inside the segment then takes
        # the outline to be where it got, or the midpoint if it got less far: the walks that
        # run out are the long ones, whose outline lies past the midpoint, and keeping them
        # hard lost coverage, see the docstring).
        current = face.reshape(-1)[near]
        entry = torch.full_like(step, -EXIT_TOLERANCE)     # the first triangle holds the centre: t >= 0
        t = torch.full_like(step, torch.inf)          # stays inf where no outline was found
        todo = torch.arange(len(near), device=near.device)
        for _ in range(OUTLINE_HOPS):
            t_exit, edge = _exit(pix, faces[current], centre[todo], step[todo], along, across, entry)
            nxt = adjacency[current, edge]
            outline = (nxt < 0) | (facing[nxt.clamp_min(0)] * facing[current] <= 0)
            inside = torch.isfinite(t_exit) & (t_exit <= 1.0)
            found = inside & outline
            t = t.index_put((todo[found],), t_exit[found])
            go = inside & ~outline
            todo, current, last = todo[go], nxt[go], t_exit[go]
            entry = last.detach()
            if not len(todo):
                break
        else:       # walks still on their way: the outline lies at least as far as they got (and
            t = t.index_put((todo,), last.clamp_min(0.5))     # from the midpoint on, the hard edge)
        keep = torch.isfinite(t)
        t, near, far = t[keep], near[keep], far[keep]
        spill = t > 0.5                                                         # covers part of far
        target = torch.where(spill, far, near)
        source = torch.where(spill, near, far)
        amount = torch.where(spill, t - 0.5, 0.5 - t)[:, None]
        delta = delta.index_add(0, target, amount * (flat[source] - flat[target]))
    return (flat + delta).reshape(image.shape)
