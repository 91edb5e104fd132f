"""Mesh files by suffix: :func:`write_mesh` (vertex colours) and :func:`write_textured` (UV
textures) pick the writer of the format (export/glb.py, export/obj.py, export/ply.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fit_implicit.backend.export import glb, obj, ply

COLORED = {".ply": ply.write_colored, ".obj": obj.write_colored, ".glb": glb.write_colored}
TEXTURED = {".glb": glb.write_textured, ".obj": obj.write_textured, ".ply": ply.write_textured}


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
    writer = COLORED.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"{path.name}: unknown mesh format (use {', '.join(COLORED)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path, verts, faces, colors)
    return path


def write_textured(path: str | Path, mesh, baked) -> Path:
    """Write a textured mesh (a UVMesh and its BakedTextures, export/texture.py); the suffix
    (.glb, .obj, .ply) picks the format."""
    path = Path(path)
    writer = TEXTURED.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"{path.name}: unknown textured mesh format (use {', '.join(TEXTURED)})")
    return writer(path, mesh, baked)
