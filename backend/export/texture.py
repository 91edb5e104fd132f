"""UV textures baked from a fitted field: unwrap (xatlas), rasterise, bake, dilate.

Conventions.
* UVs: (u, v) in [0, 1], u to the right, v UP (Blender's and OBJ's convention; glTF flips v).
  Images are (S, S, C) uint8 with the TOP row first, so texel (row r, column c) has its centre at
  ``u = (c + 0.5) / S``, ``v = 1 - (r + 0.5) / S``.
* The unwrapped mesh is split at UV seams: each vertex of :class:`UVMesh` has one UV and knows
  the vertex of the input mesh it came from (``source``); positions are copied exactly, so
  welding vertices with equal positions gives the input mesh back.
* Normals are angle-weighted averages of the face normals around a vertex of the INPUT (welded)
  mesh, as Blender computes them for smooth shading, so a seam does not show in the shading.
* Tangent space (the normal map): per vertex, the angle-weighted average of the faces' UV
  tangents (direction of +u on the surface), made orthogonal to the vertex normal; the sign says
  whether the surface's +v direction is ``cross(n, t)`` (+1) or its opposite (-1).  At a texel,
  the interpolated tangent is re-orthogonalised against the interpolated normal and
  ``b = sign * cross(n, t)``: the MikkTSpace conventions Blender's Normal Map node (tangent
  space) and glTF's normalTexture use, with +Y (green) pointing along +v (OpenGL style).
  Blender computes its own MikkTSpace tangents from the UVs on import; on a smooth ball they
  agree with these to 0.03 degrees, same handedness everywhere
  (tests/addon/test_importer_material_bpy.py), so the normal map shows no seams in Blender.

The field is queried through ``model.surface_attributes(points_world,
normals_world)`` returning "albedo" (sRGB), "normal" (world, unit) and optionally "roughness".
Rasterising and dilation run in PyTorch on ``device`` (the model's device: CUDA when it is there).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fit_implicit.backend.render.raster import rasterize_2d
from fit_implicit.shared.protocol import TEXTURE_AUTO

DEFAULT_SIZE = 2048
MAX_SIZE = 8192
DEFAULT_PADDING = 8           # texels charts are grown by (mip-mapping must not see background)
PIECE_FACES = 1500            # faces per piece handed to xatlas (see unwrap)
MAX_FACES = 200_000           # larger meshes are decimated before unwrapping (see texture_mesh)
UV_FILL = 0.7                 # share of the UV square the packed charts cover (footprint_side)
AUTO_MIN, AUTO_MAX = 512, 4096  # range of the sides footprint_side picks
ATTRIBUTE_CHUNK = 1 << 18     # texels per surface_attributes call


@dataclass
class UVMesh:
    """A triangle mesh split at UV seams.

    vertices (V, 3) float32 world; faces (F, 3) int32; uvs (V, 2) float32 in [0, 1] (v up);
    source (V,) int64 index of each vertex in the input mesh; normals (V, 3) float32 unit
    (smooth normals of the input mesh); tangents (V, 4) float32 (unit xyz, handedness sign w).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    source: np.ndarray
    normals: np.ndarray
    tangents: np.ndarray


@dataclass
class BakedTextures:
    """(S, S, C) uint8 images, top row first: albedo (C=3, sRGB), normal (C=3, tangent space,
    Non-Color), roughness (C=1, Non-Color) or None; coverage (S, S) bool, texels on the mesh;
    metallic (C=1, Non-Color) or None (estimated from photos: export/materials.py)."""

    albedo: np.ndarray
    normal: np.ndarray
    roughness: np.ndarray | None
    coverage: np.ndarray
    timings: dict = field(default_factory=dict)
    metallic: np.ndarray | None = None

    def items(self) -> list[tuple[str, np.ndarray]]:
        """(kind, image) pairs for the kinds that exist: albedo, normal, roughness, metallic."""
        out = [("albedo", self.albedo), ("normal", self.normal)]
        if self.roughness is not None:
            out.append(("roughness", self.roughness))
        if self.metallic is not None:
            out.append(("metallic", self.metallic))
        return out


def footprint_side(vertices: np.ndarray, faces: np.ndarray, views, fill: float = UV_FILL,
                   lo: int = AUTO_MIN, hi: int = AUTO_MAX) -> int:
    """The texture side that gives the mesh about one texel per pixel of the view that sees it
    most closely (Submit.texture_size TEXTURE_AUTO): a pixel of view i spans ``depth / f_i`` world
    units at the median depth of the mesh's vertices in front of it; the finest such span over
    the views is the texel's edge, and the charts cover ``fill`` of the UV square.  Rounded up to
    a multiple of 256, clamped to [lo, hi].  ``views``: PosedImages or export.unseen.Views."""
    from fit_implicit.backend.export.cleanup import face_areas

    area = float(face_areas(vertices, faces).sum())
    pts = np.asarray(vertices, np.float64)
    if len(pts) > 20000:
        pts = pts[np.random.default_rng(0).choice(len(pts), 20000, replace=False)]
    spans = []
    for k, pose in zip(np.asarray(views.intrinsics, np.float64), np.asarray(views.poses, np.float64)):
        depth = -(pts - pose[:3, 3]) @ pose[:3, 2]          # along the viewing axis (-Z)
        front = depth[depth > 1e-9]
        if len(front):
            spans.append(float(np.median(front)) / float(min(k[0], k[1])))
    if not spans or area <= 0:
        return lo
    side = np.sqrt(area / fill) / min(spans)
    return int(np.clip(256 * np.ceil(side / 256), lo, hi))


def check_size(texture_size: int) -> int:
    texture_size = int(texture_size)
    if not 16 <= texture_size <= MAX_SIZE:
        raise ValueError(f"texture size must be in [16, {MAX_SIZE}] texels, got {texture_size}")
    return texture_size


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
def _corner_angles(p: np.ndarray) -> np.ndarray:
    """p (F, 3, 3) triangle corners -> (F, 3) float64 interior angles (radians)."""
    out = np.empty(p.shape[:2])
    for i in range(3):
        a = p[:, (i + 1) % 3] - p[:, i]
        b = p[:, (i + 2) % 3] - p[:, i]
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos = np.einsum("ij,ij->i", a, b) / np.maximum(na * nb, 1e-30)
        out[:, i] = np.arccos(np.clip(cos, -1.0, 1.0))
    return out


def smooth_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) float32 unit vertex normals: face normals weighted by the corner angle (Blender's
    rule for smooth shading).  Vertices without faces get (0, 0, 1)."""
    p = vertices[faces].astype(np.float64)                               # (F, 3, 3)
    fn = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-30)
    w = _corner_angles(p)
    out = np.zeros((len(vertices), 3))
    for i in range(3):
        np.add.at(out, faces[:, i], fn * w[:, i:i + 1])
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.where(norm > 1e-20, out / np.maximum(norm, 1e-30), [0.0, 0.0, 1.0])
    return out.astype(np.float32)


def uv_tangents(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(V, 4) float32 tangents (see the module docstring): xyz unit and orthogonal to ``normals``,
    w = +1 or -1 (the handedness of the UV layout around the vertex)."""
    p = vertices[faces].astype(np.float64)                               # (F, 3, 3)
    t = uvs[faces].astype(np.float64)                                    # (F, 3, 2)
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    r = np.where(np.abs(det) > 1e-20, 1.0 / np.where(det == 0, 1.0, det), 0.0)[:, None]
    tan = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * r                        # dP/du
    bit = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * r                        # dP/dv
    fn = np.cross(e1, e2)
    sign = np.where(np.einsum("ij,ij->i", np.cross(fn, tan), bit) < 0, -1.0, 1.0)
    w = _corner_angles(p)
    acc = np.zeros((len(vertices), 3))
    sgn = np.zeros(len(vertices))
    n64 = normals.astype(np.float64)
    for i in range(3):
        n = n64[faces[:, i]]
        ti = tan - n * np.einsum("ij,ij->i", n, tan)[:, None]
        ti /= np.maximum(np.linalg.norm(ti, axis=1, keepdims=True), 1e-30)
        np.add.at(acc, faces[:, i], ti * w[:, i:i + 1])
        np.add.at(sgn, faces[:, i], sign * w[:, i])
    acc -= n64 * np.einsum("ij,ij->i", n64, acc)[:, None]
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    # A vertex whose faces give no tangent: any unit vector orthogonal to its normal.
    fallback = np.cross(n64, np.where(np.abs(n64[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]]))
    fallback /= np.maximum(np.linalg.norm(fallback, axis=1, keepdims=True), 1e-30)
    acc = np.where(norm > 1e-12, acc / np.maximum(norm, 1e-30), fallback)
    return np.concatenate([acc, np.where(sgn < 0, -1.0, 1.0)[:, None]], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Unwrapping
# --------------------------------------------------------------------------------------------
def _pieces(centroids: np.ndarray, piece_faces: int) -> list[np.ndarray]:
    """Face indices split into spatially compact pieces of at most ``piece_faces`` faces
    (recursive median cuts along the longest side)."""
    out, todo = [], [np.arange(len(centroids))]
    while todo:
        ids = todo.pop()
        if len(ids) <= piece_faces:
            out.append(ids)
            continue
        c = centroids[ids]
        axis = int(np.argmax(c.max(0) - c.min(0)))
        order = np.argsort(c[:, axis], kind="stable")
        half = len(ids) // 2
        todo += [ids[order[:half]], ids[order[half:]]]
    return out


def unwrap(vertices: np.ndarray, faces: np.ndarray, *, size: int = DEFAULT_SIZE, padding: int = DEFAULT_PADDING,
           piece_faces: int = PIECE_FACES) -> UVMesh:
    """UV-unwrap a triangle mesh with xatlas into one atlas meant for a ``size`` x ``size`` texture.

    xatlas's chart search grows faster than linearly with the face count and runs one task per
    mesh, so the mesh is cut into spatially compact pieces of about ``piece_faces`` faces that
    xatlas charts in parallel and packs together (0: one piece).  Cuts only add seams.

    Args:
        vertices: (V, 3) float world.  faces: (F, 3) int, counter-clockwise from outside.
        size: the texture side the charts are packed for.  padding: texels kept between charts.
    """
    import xatlas

    size = check_size(size)
    verts = np.ascontiguousarray(vertices, dtype=np.float32)
    tris = np.ascontiguousarray(faces, dtype=np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3 or tris.ndim != 2 or tris.shape[1] != 3 or not len(tris):
        raise ValueError(f"unwrap needs (V, 3) vertices and (F, 3) faces, got {verts.shape} and {tris.shape}")
    if tris.min() < 0 or tris.max() >= len(verts):
        raise ValueError(f"face indices must be in [0, {len(verts)})")
    if not np.isfinite(verts).all():
        raise ValueError("vertices must be finite")
    normals = smooth_normals(verts, tris)
    groups = _pieces(verts[tris].mean(1), piece_faces) if piece_faces > 0 else [np.arange(len(tris))]
    atlas = xatlas.Atlas()
    locals_ = []
    for ids in groups:
        used, local = np.unique(tris[ids], return_inverse=True)
        locals_.append(used)
        atlas.add_mesh(verts[used], local.reshape(-1, 3).astype(np.uint32), normals[used])
    pack = xatlas.PackOptions()
    pack.resolution = size
    pack.padding = max(1, int(padding) // 2)   # each chart keeps half the gap around itself
    pack.bilinear = True
    pack.blockAlign = True
    atlas.generate(xatlas.ChartOptions(), pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas made {atlas.atlas_count} atlases; one was expected")
    out_f, out_uv, out_src = [], [], []
    base = 0
    for i, used in enumerate(locals_):
        vmap, idx, uv = atlas[i]
        src = used[vmap.astype(np.int64)]
        out_src.append(src)
        out_uv.append(uv)
        out_f.append(idx.astype(np.int64) + base)
        base += len(vmap)
    source = np.concatenate(out_src)
    uvs = np.clip(np.concatenate(out_uv).astype(np.float32), 0.0, 1.0)
    new_faces = np.concatenate(out_f).astype(np.int32)
    new_verts = verts[source]
    new_normals = normals[source]
    tangents = uv_tangents(new_verts, new_faces, uvs, new_normals)
    return UVMesh(new_verts, new_faces, uvs, source.astype(np.int64), new_normals, tangents)


# --------------------------------------------------------------------------------------------
# Rasterising
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def rasterize(uvs: np.ndarray, faces: np.ndarray, size: int, device: str | torch.device = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which triangle covers each texel centre, and where (backend/render/raster.py, in UV space).

    Args:
        uvs: (V, 2) float in [0, 1] (v up).  faces: (F, 3) int.  size: texture side S.
    Returns:
        face (S, S) int64 on ``device``: the covering triangle, -1 where none (top row first);
        bary (S, S, 3) float32: barycentric weights of the texel centre in that triangle.
    """
    size = check_size(size)
    dev = torch.device(device)
    uv = torch.as_tensor(np.asarray(uvs, np.float32), device=dev)
    tri = torch.as_tensor(np.asarray(faces, np.int64), device=dev)
    # texel coordinates: x = column, y = row (down); texel (r, c) has its centre at (c + .5, r + .5)
    pix = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], dim=-1)
    return rasterize_2d(pix, tri, size, size)


@torch.no_grad()
def dilate(image: torch.Tensor, mask: torch.Tensor, texels: int, fill_rest: bool = True) -> torch.Tensor:
    """Grow the covered texels of ``image`` outwards by ``texels`` rings (each new texel is the
    mean of its covered 8-neighbours), then give every texel still empty the mean of the covered
    ones, so filtering and mip-mapping never mix in a background colour.

    image (S, S, C) float32; mask (S, S) bool (covered texels).  Returns a new (S, S, C) tensor.
    """
    img = image.permute(2, 0, 1)[None].float()
    m = mask[None, None].float()
    img = img * m
    for _ in range(int(texels)):
        total = torch.nn.functional.avg_pool2d(img * m, 3, stride=1, padding=1) * 9.0
        count = torch.nn.functional.avg_pool2d(m, 3, stride=1, padding=1) * 9.0
        grow = (count > 0.5) & (m < 0.5)
        img = torch.where(grow, total / count.clamp_min(1.0), img)
        m = torch.where(grow, torch.ones_like(m), m)
    out = img[0].permute(1, 2, 0)
    if fill_rest:
        filled = m[0, 0] > 0.5
        if filled.any():
            mean = out[filled].mean(0)
            out = torch.where(filled[..., None], out, mean)
    return out


# --------------------------------------------------------------------------------------------
# Baking
# --------------------------------------------------------------------------------------------
def _to_u8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def bake(model, mesh: UVMesh, size: int = DEFAULT_SIZE, *, padding: int = DEFAULT_PADDING,
         device: str | torch.device | None = None, chunk: int = ATTRIBUTE_CHUNK) -> BakedTextures:
    """Bake ``model``'s albedo, tangent-space normals and (if it has them) roughness into textures.

    Args:
        model: has ``surface_attributes`` and ``device`` (as FittedField, backend/fitting/model.py).
        mesh: from :func:`unwrap`.  size: texture side S.  padding: dilation in texels.
        device: where rasterising runs (default: the model's device).
    """
    size = check_size(size)
    dev = torch.device(device if device is not None else getattr(model, "device", "cpu"))
    t0 = time.perf_counter()
    face_map, bary = rasterize(mesh.uvs, mesh.faces, size, dev)
    covered = face_map >= 0
    fid = face_map[covered]                                                          # (M,)
    w = bary[covered][..., None]                                                     # (M, 3, 1)
    tri = torch.as_tensor(mesh.faces, dtype=torch.long, device=dev)[fid]             # (M, 3)

    def interp(arr: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(arr, dtype=torch.float32, device=dev)[tri] * w).sum(1)

    pts = interp(mesh.vertices)
    n = torch.nn.functional.normalize(interp(mesh.normals), dim=-1, eps=1e-12)
    t = interp(mesh.tangents[:, :3])
    t = torch.nn.functional.normalize(t - n * (n * t).sum(-1, keepdim=True), dim=-1, eps=1e-12)
    sign = torch.as_tensor(mesh.tangents[:, 3], device=dev)[tri].sum(1).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    bt = sign[:, None] * torch.cross(n, t, dim=-1)
    t1 = time.perf_counter()

    pts_np, n_np = pts.cpu().numpy(), n.cpu().numpy()
    albedo, normal, rough = [], [], []
    for i in range(0, len(pts_np), chunk):
        attrs = model.surface_attributes(pts_np[i:i + chunk], n_np[i:i + chunk])
        albedo.append(np.asarray(attrs["albedo"], np.float32))
        normal.append(np.asarray(attrs["normal"], np.float32))
        if "roughness" in attrs:
            rough.append(np.asarray(attrs["roughness"], np.float32).reshape(-1))
    t2 = time.perf_counter()

    def cat(parts, width):
        if not parts:
            return torch.zeros((0, width), device=dev)
        return torch.as_tensor(np.concatenate(parts), device=dev).reshape(-1, width)

    a = cat(albedo, 3)
    nf = torch.nn.functional.normalize(cat(normal, 3), dim=-1, eps=1e-12)
    local = torch.stack([(nf * t).sum(-1), (nf * bt).sum(-1), (nf * n).sum(-1)], -1)   # tangent space
    local = torch.where(torch.linalg.vector_norm(nf, dim=-1, keepdim=True) > 0.5, local,
                        torch.tensor([0.0, 0.0, 1.0], device=dev))

    def image(values: torch.Tensor, channels: int, default) -> torch.Tensor:
        img = torch.zeros((size, size, channels), device=dev)
        img[covered] = values
        return dilate(img, covered, padding) if covered.any() else img + torch.tensor(default, device=dev)

    albedo_img = _to_u8(image(a, 3, [0.5, 0.5, 0.5]))
    nrm = image(local, 3, [0.0, 0.0, 1.0])
    nrm = torch.nn.functional.normalize(nrm, dim=-1, eps=1e-12)
    normal_img = _to_u8(nrm * 0.5 + 0.5)
    rough_img = None
    if rough and sum(len(r) for r in rough) == len(pts_np):
        rough_img = _to_u8(image(cat(rough, 1), 1, [0.5]))
    t3 = time.perf_counter()
    timings = {"raster": t1 - t0, "query": t2 - t1, "images": t3 - t2}
    return BakedTextures(albedo_img, normal_img, rough_img, covered.cpu().numpy(), timings)


def texture_mesh(model, vertices: np.ndarray, faces: np.ndarray, texture_size: int = DEFAULT_SIZE, *,
                 padding: int = DEFAULT_PADDING, piece_faces: int = PIECE_FACES,
                 max_faces: int | None = MAX_FACES, device: str | torch.device | None = None, views=None
                 ) -> tuple[UVMesh, BakedTextures]:
    """Unwrap then bake: the whole post-fit texture step, into textures of ``texture_size``
    texels a side (the setting of that name: panel, Submit, --texture-size); TEXTURE_AUTO
    (shared/protocol.py) picks the side from ``views``, the training cameras (:func:`footprint_side`).

    A mesh of more than ``max_faces`` triangles is first decimated to that many (the normal map
    keeps the detail; unwrapping time grows with the face count).  ``timings`` gains
    "decimate" and "unwrap" (seconds).
    """
    t0 = time.perf_counter()
    if max_faces is not None and len(faces) > max_faces:
        from fit_implicit.backend.export.cleanup import decimate

        vertices, faces = decimate(np.asarray(vertices, np.float32), np.asarray(faces, np.int64), int(max_faces),
                                   at_most=True)
    if texture_size == TEXTURE_AUTO:
        if views is None or not len(views.intrinsics):
            raise ValueError("texture size 'auto' needs the training cameras")
        texture_size = footprint_side(vertices, faces, views)
    t1 = time.perf_counter()
    mesh = unwrap(vertices, faces, size=texture_size, padding=padding, piece_faces=piece_faces)
    t2 = time.perf_counter()
    baked = bake(model, mesh, texture_size, padding=padding, device=device)
    baked.timings.update(decimate=t1 - t0, unwrap=t2 - t1)
    return mesh, baked


def vertex_colors_from(mesh: UVMesh, baked: BakedTextures) -> np.ndarray:
    """(V, 3) float32 sRGB in [0, 1]: the albedo texel under each vertex's UV (vertex-colour
    fallback that matches the texture)."""
    return sample_texture(baked.albedo, mesh.uvs)[:, :3].astype(np.float32) / 255.0


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest texel of an (S, S, C) image (top row first) at (N, 2) UVs (v up) -> (N, C)."""
    s_h, s_w = image.shape[:2]
    col = np.clip(np.floor(uv[:, 0] * s_w), 0, s_w - 1).astype(np.int64)
    row = np.clip(np.floor((1.0 - uv[:, 1]) * s_h), 0, s_h - 1).astype(np.int64)
    return image[row, col]


def decode_normal_map(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 tangent-space normal map texels -> (..., 3) float32 unit vectors."""
    v = rgb.astype(np.float32) / 255.0 * 2.0 - 1.0
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

