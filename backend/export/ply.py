"""Stanford .ply, binary little endian: the one PLY writer, for vertex-coloured meshes
(:func:`write_colored`: float xyz + uchar red/green/blue, sRGB) and textured ones
(:func:`write_textured`: float xyz, normal and texture coordinates s, t (t up), + PNGs).
Positions in world units, Z up; faces as ``list uchar int vertex_indices``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fit_implicit.backend.export.textured import check_textured, write_pngs

_TYPES = {"float": "<f4", "uchar": "u1"}       # PLY property type -> numpy dtype


def _write(path: Path, comments: list[str], columns: list[tuple[str, tuple[str, ...], np.ndarray]],
           faces: np.ndarray) -> None:
    """The file: header, one record per vertex, one per triangle.  ``columns``: (PLY type,
    property names, (V, len(names)) values) in file order."""
    count = len(columns[0][2])
    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments),
              f"element vertex {count}",
              *(f"property {kind} {name}" for kind, names, _ in columns for name in names),
              f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header", ""]
    v = np.empty(count, dtype=[(f"c{i}", _TYPES[kind], len(names)) for i, (kind, names, _) in enumerate(columns)])
    for i, (_, _, values) in enumerate(columns):
        v[f"c{i}"] = values
    f = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", 3)])
    f["n"], f["i"] = 3, faces
    with open(path, "wb") as fh:
        fh.write("\n".join(header).encode("ascii"))
        fh.write(v.tobytes())
        fh.write(f.tobytes())


def write_colored(path: Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> None:
    """A vertex-coloured mesh; the colours stored as 8-bit sRGB.

    Args:
        verts: (V, 3) float32 world.  faces: (F, 3) int64, 0-based.  colors: (V, 3) float32 sRGB
        in [0, 1].  (As export/files.py write_mesh checks and converts them.)
    """
    rgb8 = (colors * 255.0 + 0.5).astype(np.uint8)
    _write(path, ["Fit Implicit"], [("float", ("x", "y", "z"), verts), ("uchar", ("red", "green", "blue"), rgb8)],
           faces)


def write_textured(path: str | Path, mesh, baked) -> Path:
    """``mesh`` (a UVMesh) with per-vertex normals and texture coordinates + ``baked``
    (BakedTextures) as PNGs named in a ``comment TextureFile`` line (MeshLab's convention: the
    albedo); returns the path."""
    check_textured(mesh)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pngs = write_pngs(path, baked)
    _write(path, ["Fit Implicit: world units, Z up", f"TextureFile {pngs['albedo'].name}"],
           [("float", ("x", "y", "z"), mesh.vertices), ("float", ("nx", "ny", "nz"), mesh.normals),
            ("float", ("s", "t"), mesh.uvs)], mesh.faces)
    return path
