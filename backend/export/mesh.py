"""Meshes from fitted fields (marching cubes on the density) and mesh files (.ply, .obj, .glb).

Iso-level.  The surface is where the density makes a slab of ``REFERENCE_LENGTH`` = 1/100 of
the normalised cube's side (0.02 normalised units) ``opacity`` opaque, i.e.
``sigma_iso = -ln(1 - opacity) / 0.02`` per normalised unit: 2.56 at the default opacity 0.05,
close to instant-ngp's customary level.  A low level suits radiance fields, whose densities
inside objects only need to be high enough to be opaque over the object's thickness (short fits
often stay in the single digits).  Being defined in the trainer's normalised frame, the level,
and so the mesh, does not change when the world is scaled or moved.

Vertex colours are what the field shows a camera looking at the vertex along its inward normal:
a short volume rendering from just outside the surface.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

REFERENCE_LENGTH = 0.02   # normalised units: 1/100 of the normalised cube's side
DEFAULT_OPACITY = 0.05


def iso_level(opacity: float = DEFAULT_OPACITY) -> float:
    """Density (per normalised unit) at which a slab of REFERENCE_LENGTH is ``opacity`` opaque."""
    if not 0.0 < opacity < 1.0:
        raise ValueError(f"opacity must be in (0, 1), got {opacity}")
    return -math.log1p(-opacity) / REFERENCE_LENGTH


def grid_shape(aabb: np.ndarray, resolution: int) -> tuple[int, int, int]:
    """Grid points per axis: ``resolution`` along the box's longest side, cubic cells."""
    ext = aabb[1] - aabb[0]
    return tuple(max(2, int(round(resolution * e / ext.max()))) for e in ext)


@torch.no_grad()
def density_grid(model, resolution: int, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Density at the points of a grid over the model's world box.

    Points in cells the occupancy grid marks empty are not queried and read 0 (their density
    is below the occupancy threshold, itself below any iso-level used here).

    Returns:
        density (nx, ny, nz) float32 (per normalised unit), spacing (3,) float64 world units.
    """
    shape = grid_shape(model.aabb, resolution)
    axes = [np.linspace(lo, hi, n) for lo, hi, n in zip(model.aabb[0], model.aabb[1], shape)]
    spacing = (model.aabb[1] - model.aabb[0]) / (np.array(shape) - 1)
    out = np.zeros(shape, dtype=np.float32)
    ys, zs = np.meshgrid(axes[1], axes[2], indexing="ij")
    slab = torch.from_numpy(np.stack([ys.ravel(), zs.ravel()], -1)).float().to(model.device)  # (ny*nz, 2)
    for i, x in enumerate(axes[0]):
        pts = model.to_normalised(torch.cat([torch.full_like(slab[:, :1], float(x)), slab], dim=1))
        keep = model.occupancy.occupied(pts)
        sig = torch.zeros(pts.shape[0], device=model.device)
        if keep.any():
            sig[keep] = torch.cat([model.field.density(p) for p in pts[keep].split(chunk)])
        out[i] = sig.reshape(shape[1], shape[2]).cpu().numpy()
    return out, spacing


def keep_large_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """(nx, ny, nz) bool -> the same without 26-connected parts smaller than ``min_fraction`` of
    the largest part."""
    from skimage.measure import label

    labels, count = label(mask, connectivity=3, return_num=True)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= min_fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def solid_interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """(nx, ny, nz) bool -> the mask with the space it encloses filled.

    A radiance field only needs enough density near an object's surface to be opaque, so its
    inside is often a shell around low-density pockets, and the shell may have pinholes.  The
    mask is closed with a ball of ``radius`` voxels (sealing pinholes, filling concave details
    narrower than about two radii) and then every cavity is filled.
    """
    from scipy import ndimage

    ball = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), radius)
    pad = radius + 1
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=ball)[pad:-pad, pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(closed | mask)


@torch.no_grad()
def extract_mesh(model, resolution: int, opacity: float = DEFAULT_OPACITY, min_component: float = 0.01,
                 chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangle mesh of a fitted field's surface, in WORLD coordinates.

    Args:
        model: a :class:`backend.model.FittedField`.
        resolution: grid points along the longest side of the box.
        opacity: sets the iso-level, see :func:`iso_level`.
        min_component: connected parts with fewer voxels than this fraction of the largest part
            are dropped (floaters); the space the rest encloses is filled (:func:`solid_interior`).
    Returns:
        vertices (V, 3) float32 world, faces (F, 3) int32 (counter-clockwise seen from outside),
        colours (V, 3) float32 sRGB in [0, 1].  Empty arrays if nothing is above the level.
    """
    from skimage.measure import marching_cubes

    if resolution < 2:
        raise ValueError(f"mesh resolution must be at least 2, got {resolution}")
    level = iso_level(opacity)
    density, spacing = density_grid(model, resolution, chunk)
    above = keep_large_components(density > level, min_component)
    if not above.any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32)
    solid = solid_interior(above)
    # Voxels above the level keep their density (sub-voxel surface placement), voxels filled in
    # go above it, everything else (dropped parts included) below it; the zero padding closes
    # surfaces cut by the box.
    vol = np.where(solid, np.where(above, density, 2.0 * level), np.where(density > level, 0.0, density))
    vol = np.pad(vol.astype(np.float32), 1)
    verts, faces, normals, _ = marching_cubes(vol, level=level, spacing=tuple(spacing))
    verts = np.clip(verts - spacing + model.aabb[0], model.aabb[0], model.aabb[1])
    faces = faces[:, ::-1]          # skimage winds clockwise seen from outside
    colors = vertex_colors(model, verts, normals, offset=2.0 * float(spacing.max()))
    return verts.astype(np.float32), np.ascontiguousarray(faces, dtype=np.int32), colors


@torch.no_grad()
def vertex_colors(model, verts: np.ndarray, normals: np.ndarray, offset: float, chunk: int = 1 << 16
                  ) -> np.ndarray:
    """Colour seen at each vertex by a ray along its inward normal, started ``offset`` (world
    units) outside.  Where that ray stays nearly transparent, the colour network is queried at
    the vertex instead.

    Args:
        verts: (V, 3) world.  normals: (V, 3) outward unit normals.
    Returns:
        (V, 3) float32 sRGB in [0, 1].
    """
    if not len(verts):
        return np.zeros((0, 3), np.float32)
    v = torch.from_numpy(np.ascontiguousarray(verts, np.float32)).to(model.device)
    n = torch.from_numpy(np.ascontiguousarray(normals, np.float32)).to(model.device)
    n = torch.nn.functional.normalize(n, dim=-1)
    out = []
    for vc, nc in zip(v.split(chunk), n.split(chunk)):
        ray = model.trace(vc + offset * nc, -nc, differentiable=False)
        seen = ray.rgb / ray.opacity.clamp_min(1e-6)[:, None]
        _, direct = model.field(model.to_normalised(vc), -nc)
        out.append(torch.where(ray.opacity[:, None] > 0.1, seen, direct))
    return torch.cat(out).clamp(0.0, 1.0).cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_mesh(path: str | Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> Path:
    """Write a coloured triangle mesh; the format follows the suffix.

    * ``.ply``: binary little endian, float xyz + uchar red/green/blue (sRGB) per vertex.
    * ``.obj``: ``v x y z r g b`` (sRGB in [0, 1]) and 1-based ``f`` lines.
    * ``.glb``: glTF 2.0 binary with POSITION, COLOR_0, indices and one default material.
      glTF is +Y up, so Z-up world points (x, y, z) are stored as (x, z, -y), exactly what
      Blender's glTF importer undoes; COLOR_0 holds linear colours, as glTF requires.

    Args:
        verts: (V, 3) float world.  faces: (F, 3) int, 0-based.  colors: (V, 3) float sRGB [0, 1].
    """
    path = Path(path)
    verts = np.asarray(verts, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    colors = np.clip(np.asarray(colors, dtype=np.float32), 0.0, 1.0)
    if verts.ndim != 2 or verts.shape[1] != 3 or colors.shape != verts.shape:
        raise ValueError(f"verts and colors must both be (V, 3), got {verts.shape} and {colors.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be (F, 3), got {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError(f"face indices must be in [0, {len(verts)})")
    writers = {".ply": _write_ply, ".obj": _write_obj, ".glb": _write_glb}
    writer = writers.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"{path.name}: unknown mesh format (use {', '.join(writers)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path, verts, faces, colors)
    return path


def _rgb8(colors: np.ndarray) -> np.ndarray:
    return (colors * 255.0 + 0.5).astype(np.uint8)


def _write_ply(path: Path, verts, faces, colors) -> None:
    header = (f"ply\nformat binary_little_endian 1.0\ncomment Fit Implicit\n"
              f"element vertex {len(verts)}\nproperty float x\nproperty float y\nproperty float z\n"
              f"property uchar red\nproperty uchar green\nproperty uchar blue\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    v = np.empty(len(verts), dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    v["p"], v["c"] = verts, _rgb8(colors)
    f = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", 3)])
    f["n"], f["i"] = 3, faces
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(v.tobytes())
        fh.write(f.tobytes())


def _write_obj(path: Path, verts, faces, colors) -> None:
    with open(path, "w") as fh:
        fh.write("# Fit Implicit: vertex colours are sRGB in [0, 1]\n")
        np.savetxt(fh, np.hstack([verts, colors]), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(fh, faces + 1, fmt="f %d %d %d")


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


GLB_MAGIC, GLB_JSON, GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UNSIGNED_INT = 5126, 5125


def _write_glb(path: Path, verts, faces, colors) -> None:
    if not len(verts) or not len(faces):
        raise ValueError("cannot write an empty mesh as glTF (accessors need at least one element)")
    pos = np.ascontiguousarray(np.stack([verts[:, 0], verts[:, 2], -verts[:, 1]], axis=1), dtype="<f4")
    col = np.ascontiguousarray(srgb_to_linear(colors), dtype="<f4")
    idx = np.ascontiguousarray(faces.reshape(-1), dtype="<u4")
    blobs = [pos.tobytes(), col.tobytes(), idx.tobytes()]   # all multiples of 4 bytes
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    targets = [ARRAY_BUFFER, ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER]
    doc = {
        "asset": {"version": "2.0", "generator": "Fit Implicit"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": path.stem}],
        "meshes": [{"name": path.stem, "primitives": [{
            "attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2, "material": 0, "mode": 4}]}],
        "materials": [{"name": "vertex_colour", "pbrMetallicRoughness": {
            "baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
        "buffers": [{"byteLength": int(offsets[-1])}],
        "bufferViews": [{"buffer": 0, "byteOffset": int(o), "byteLength": len(b), "target": t}
                        for o, b, t in zip(offsets, blobs, targets)],
        "accessors": [
            {"bufferView": 0, "componentType": FLOAT, "count": len(pos), "type": "VEC3",
             "min": pos.min(0).tolist(), "max": pos.max(0).tolist()},
            {"bufferView": 1, "componentType": FLOAT, "count": len(col), "type": "VEC3"},
            {"bufferView": 2, "componentType": UNSIGNED_INT, "count": len(idx), "type": "SCALAR",
             "min": [int(idx.min())], "max": [int(idx.max())]},
        ],
    }
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    binary = b"".join(blobs)
    binary += b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(js) + 8 + len(binary)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<III", GLB_MAGIC, 2, total))
        fh.write(struct.pack("<II", len(js), GLB_JSON) + js)
        fh.write(struct.pack("<II", len(binary), GLB_BIN) + binary)
