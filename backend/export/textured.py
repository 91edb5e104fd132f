"""What the mesh writers (export/glb.py, export/obj.py, export/ply.py) share: the check of their
input, the turn from Blender's Z up to the Y up of glTF and OBJ files (:func:`z_up_to_y_up`),
the roughness used when none was baked, and the texture images as PNG
(:func:`png_bytes`, the one PNG encoder of the exports; :func:`write_pngs`, the image files next
to an .obj or .ply).

Input is a :class:`backend.export.texture.UVMesh` (world units, Z up, split at UV seams) and its
:class:`~backend.export.texture.BakedTextures`.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

DEFAULT_ROUGHNESS = 0.8       # the material's roughness when no roughness texture was baked


def z_up_to_y_up(v: np.ndarray) -> np.ndarray:
    """(N, 3) Blender (Z up) -> glTF and OBJ (Y up, -Z forward: what Blender's importers of both
    expect by default, so an import lands in the world frame again): (x, y, z) -> (x, z, -y)."""
    v = np.asarray(v)
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def check_textured(mesh) -> None:
    """Refuse an empty mesh and per-vertex arrays that do not have one row per vertex."""
    if not len(mesh.faces):
        raise ValueError("cannot write an empty mesh")
    for name in ("uvs", "normals", "tangents", "source"):
        if len(getattr(mesh, name)) != len(mesh.vertices):
            raise ValueError(f"mesh.{name} must have one row per vertex")


def png_bytes(image: np.ndarray, compress_level: int = 1, optimize: bool = False) -> bytes:
    """(H, W, C) uint8, C in {1, 3, 4}, top row first -> PNG file bytes.  The default is fast
    (zlib level 1); ``compress_level=9, optimize=True`` gives the smallest file."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 1|3|4) uint8 image, got {arr.dtype} {arr.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    buf = io.BytesIO()
    img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    img.save(buf, format="PNG", compress_level=compress_level, optimize=optimize)
    return buf.getvalue()


def texture_paths(path: Path, baked) -> dict[str, Path]:
    """PNG paths next to an .obj/.ply: ``<stem>_albedo.png`` etc., one per baked kind."""
    return {kind: path.with_name(f"{path.stem}_{kind}.png") for kind, _ in baked.items()}


def write_pngs(path: Path, baked) -> dict[str, Path]:
    """Write the baked images next to the mesh file ``path`` (see :func:`texture_paths`);
    returns kind -> PNG path."""
    paths = texture_paths(path, baked)
    for kind, image in baked.items():
        paths[kind].write_bytes(png_bytes(image))
    return paths
