"""Wavefront .obj: the one OBJ writer, for vertex-coloured meshes (:func:`write_colored`:
``v x y z r g b`` with sRGB in [0, 1]) and textured ones (:func:`write_textured`: v, vt with v
up, vn and ``f v/vt/vn``, + .mtl + PNGs).  Positions in world units, 1-based indices, written
Y up and -Z forward (export/textured.py z_up_to_y_up): the axes Blender's OBJ importer expects by
default, so the mesh lands upright in the world frame it was fitted in.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fit_implicit.backend.export.textured import DEFAULT_ROUGHNESS, check_textured, write_pngs, z_up_to_y_up


def write_colored(path: Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> None:
    """A vertex-coloured mesh.

    Args:
        verts: (V, 3) float32 world.  faces: (F, 3) int64, 0-based.  colors: (V, 3) float32 sRGB
        in [0, 1].  (As export/files.py write_mesh checks and converts them.)
    """
    with open(path, "w") as fh:
        fh.write("# Fit Implicit: world units, Y up, -Z forward; vertex colours are sRGB in [0, 1]\n")
        np.savetxt(fh, np.hstack([z_up_to_y_up(verts), colors]), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(fh, faces + 1, fmt="f %d %d %d")


def write_textured(path: str | Path, mesh, baked, name: str = "Implicit") -> Path:
    """``mesh`` (a UVMesh) + ``.mtl`` + ``baked`` (BakedTextures) as PNGs; returns the path.
    The .mtl names the albedo (map_Kd), the tangent-space normal map (map_Bump, read as a normal
    map by Blender's OBJ importer; also ``norm``), the roughness (map_Pr, PBR extension) and, where
    estimated, the metallic (map_Pm)."""
    check_textured(mesh)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pngs = write_pngs(path, baked)
    mtl = path.with_suffix(".mtl")
    lines = [f"newmtl {name}", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "illum 1", f"map_Kd {pngs['albedo'].name}",
             f"map_Bump {pngs['normal'].name}", f"norm {pngs['normal'].name}"]
    if "roughness" in pngs:
        lines.append(f"map_Pr {pngs['roughness'].name}")
    else:
        lines.append(f"Pr {DEFAULT_ROUGHNESS}")
    if "metallic" in pngs:
        lines.append(f"map_Pm {pngs['metallic'].name}")
    mtl.write_text("# Fit Implicit: the normal map and the roughness are data (Non-Color); Blender's OBJ importer\n"
                   "# reads them as sRGB: switch them to Non-Color after importing, or use the .glb\n"
                   + "\n".join(lines) + "\n")
    f = mesh.faces.astype(np.int64) + 1
    with open(path, "w") as fh:
        fh.write(f"# Fit Implicit: world units, Y up, -Z forward\nmtllib {mtl.name}\no {name}\n")
        np.savetxt(fh, z_up_to_y_up(mesh.vertices), fmt="v %.6f %.6f %.6f")
        np.savetxt(fh, mesh.uvs, fmt="vt %.6f %.6f")
        np.savetxt(fh, z_up_to_y_up(mesh.normals), fmt="vn %.5f %.5f %.5f")
        fh.write(f"usemtl {name}\ns 1\n")
        np.savetxt(fh, np.repeat(f, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    return path
