"""Point clouds and meshes from files, for surface fits to points (issue 16): :func:`read_points`.

* ``.ply``: ASCII or binary (either byte order) Stanford files, read here (the vertex count is
  checked against the cap before anything is allocated): x, y, z; normals nx, ny, nz; colours
  red, green, blue (or diffuse_*); with a face element the file is a mesh (below).
* ``.xyz``, ``.txt``, ``.pts``, ``.csv``: one point a line, 3 to 9 numbers, spaces or commas:
  x y z; x y z nx ny nz (unit vectors) or x y z r g b (0-255); x y z nx ny nz r g b or
  x y z r g b nx ny nz; ``.pts``'s x y z intensity r g b.  Lines starting with ``#`` and a first
  line holding only a count are skipped.
* ``.las``, ``.laz``: through laspy (``.laz`` needs its LAZ backend, lazrs).
* ``.e57``: through pye57 where it is installed (not a dependency: say so if it is missing).
* meshes (``.obj``, ``.stl``, ``.off``, ``.glb``, ``.gltf`` through trimesh, and ``.ply`` with
  faces): their surface, sampled uniformly by area (``mesh_samples`` points), with the faces'
  normals when the mesh's winding is consistent (flipped as a whole if it encloses a negative
  volume), else none (the fit is then sign-agnostic).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fit_implicit.backend.fitting.point_cloud import MAX_POINTS, PointCloud, make_cloud, mesh_surface_points

MAX_HEADER_BYTES = 1 << 16          # a PLY header longer than this is not one
MAX_TEXT_BYTES = 4 << 30            # text clouds beyond this: convert to binary PLY first
MESH_SUFFIXES = (".obj", ".stl", ".off", ".glb", ".gltf")
TEXT_SUFFIXES = (".xyz", ".txt", ".pts", ".csv")
SUFFIXES = (".ply", *TEXT_SUFFIXES, ".las", ".laz", ".e57", *MESH_SUFFIXES)

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_COLOUR_NAMES = (("red", "green", "blue"), ("diffuse_red", "diffuse_green", "diffuse_blue"), ("r", "g", "b"))


def read_points(path: str | Path, mesh_samples: int = 250_000, seed: int = 0) -> PointCloud:
    """The points of ``path`` as a checked PointCloud (module doc); ValueError on anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    facts = {"source": path.name}
    if suffix == ".ply":
        return _read_ply(path, mesh_samples, seed, facts)
    if suffix in TEXT_SUFFIXES:
        return _read_text(path, facts)
    if suffix in (".las", ".laz"):
        return _read_las(path, facts)
    if suffix == ".e57":
        return _read_e57(path, facts)
    if suffix in MESH_SUFFIXES:
        return _read_mesh(path, mesh_samples, seed, facts)
    raise ValueError(f"{path}: unknown point-cloud format {suffix!r} (one of {', '.join(SUFFIXES)})")


# ---- meshes -------------------------------------------------------------------------------------
def mesh_cloud(vertices, faces, samples: int, seed: int = 0, facts: dict | None = None) -> PointCloud:
    """A mesh's surface as a PointCloud (module doc): oriented where its winding is consistent."""
    import trimesh

    facts = dict(facts or {})
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if not np.isfinite(v).all():
        raise ValueError("the mesh has vertices with NaN or infinite coordinates")
    pts, normals, _ = mesh_surface_points(v, f, samples, seed)
    mesh = trimesh.Trimesh(v, f, process=False)
    mesh.merge_vertices()               # split seams (UVs, normals) would read as open borders
    facts.update(mesh_faces=int(len(f)), watertight=bool(mesh.is_watertight))
    if mesh.is_winding_consistent:
        if mesh.is_watertight and mesh.volume < 0:      # consistent but inside out
            normals = -normals
            facts["flipped"] = True
        facts["normals"] = "faces"
    else:
        normals = None
        facts["normals"] = "none: the faces' winding is inconsistent (sign-agnostic fit)"
    return make_cloud(pts, normals, None, facts)


def _read_mesh(path: Path, samples: int, seed: int, facts: dict) -> PointCloud:
    import trimesh

    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:            # trimesh raises many kinds for damaged files
        raise ValueError(f"{path}: not a readable mesh ({type(exc).__name__}: {exc})") from exc
    if not hasattr(mesh, "faces") or not len(mesh.faces):
        raise ValueError(f"{path}: the mesh has no faces")
    return mesh_cloud(mesh.vertices, mesh.faces, samples, seed, facts)


# ---- PLY ----------------------------------------------------------------------------------------
def _ply_header(fh, path: Path) -> tuple[str, list[dict]]:
    """(format, elements): each element {name, count, props: [(name, dtype) or (name, (count dtype,
    item dtype))]}."""
    if fh.readline().strip() != b"ply":
        raise ValueError(f"{path}: not a PLY file (no 'ply' line first)")
    fmt, elements, size = None, [], 0
    while True:
        line = fh.readline()
        size += len(line)
        if not line or size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: the PLY header has no end_header line")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append({"name": words[1], "count": int(words[2]), "props": []})
        elif words[0] == "property" and elements:
            try:
                if words[1] == "list":
                    elements[-1]["props"].append((words[4], (_PLY_TYPES[words[2]], _PLY_TYPES[words[3]])))
                else:
                    elements[-1]["props"].append((words[2], _PLY_TYPES[words[1]]))
            except (KeyError, IndexError):
                raise ValueError(f"{path}: bad PLY property line {line.strip()!r}") from None
        else:
            raise ValueError(f"{path}: unexpected PLY header line {line.strip()!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"{path}: unknown PLY format {fmt!r}")
    return fmt, elements


def _read_ply(path: Path, samples: int, seed: int, facts: dict) -> PointCloud:
    with open(path, "rb") as fh:
        fmt, elements = _ply_header(fh, path)
        names = [e["name"] for e in elements]
        if "vertex" not in names:
            raise ValueError(f"{path}: the PLY file has no vertex element")
        vertex = elements[names.index("vertex")]
        if vertex["count"] > MAX_POINTS:
            raise ValueError(f"{path}: {vertex['count']:,} points is over the cap of {MAX_POINTS:,}: thin the cloud "
                             f"first (e.g. a voxel-grid downsample)")
        props = dict(vertex["props"])
        if not {"x", "y", "z"} <= set(props):
            raise ValueError(f"{path}: the vertices have no x, y, z properties")
        data, faces = {}, None
        needed = {"vertex"} | ({"face"} if "face" in names else set())
        for element in elements:                        # in file order, up to the last one needed
            if not needed:
                break
            values = (_ply_ascii(fh, element, path) if fmt == "ascii"
                      else _ply_binary(fh, element, "<" if fmt == "binary_little_endian" else ">", path))
            if element["name"] == "vertex":
                data = values
            elif element["name"] == "face":
                faces = values
            needed.discard(element["name"])
    pts = np.stack([data["x"], data["y"], data["z"]], axis=1)
    if faces is not None and len(faces):
        return mesh_cloud(pts, faces, samples, seed, facts)
    normals = np.stack([data[k] for k in ("nx", "ny", "nz")], axis=1) if {"nx", "ny", "nz"} <= set(data) else None
    colours = None
    for trio in _COLOUR_NAMES:
        if set(trio) <= set(data):
            c = np.stack([data[k] for k in trio], axis=1).astype(np.float64)
            kind = props[trio[0]]
            colours = c / 257.0 if kind == "u2" else (c * 255.0 if kind.startswith("f") else c)
            break
    return make_cloud(pts, normals, colours, facts)


def _ply_binary(fh, element: dict, order: str, path: Path):
    """A binary element: a dict of arrays (scalar properties) or, for faces, (F, 3) triangles."""
    count, props = element["count"], element["props"]
    if not any(isinstance(kind, tuple) for _, kind in props):
        dtype = np.dtype([(name, order + kind) for name, kind in props])
        raw = fh.read(count * dtype.itemsize)
        if len(raw) < count * dtype.itemsize:
            raise ValueError(f"{path}: the file ends inside its {element['name']} data (truncated?)")
        rec = np.frombuffer(raw, dtype=dtype, count=count)
        return {name: rec[name] for name, _ in props}
    if element["name"] != "face" or len(props) != 1:
        raise ValueError(f"{path}: list properties are read only in a face element of one property")
    count_type, item_type = props[0][1]
    if count == 0:
        return np.zeros((0, 3), np.int64)
    # Fixed-size polygons (triangles, or quads split in two): one structured read.
    first = fh.read(np.dtype(count_type).itemsize)
    n = int(np.frombuffer(first, dtype=order + count_type)[0]) if first else 0
    if n not in (3, 4):
        raise ValueError(f"{path}: faces of {n} corners: triangles or quads only (triangulate first)")
    dtype = np.dtype([("n", order + count_type), ("i", order + item_type, n)])
    raw = first + fh.read(count * dtype.itemsize - len(first))
    if len(raw) < count * dtype.itemsize:
        raise ValueError(f"{path}: the file ends inside its faces, or the faces mix polygon sizes "
                         f"(triangulate first)")
    rec = np.frombuffer(raw, dtype=dtype, count=count)
    if (rec["n"] != n).any():
        raise ValueError(f"{path}: the faces mix polygon sizes: triangulate first")
    return _triangles(rec["i"].astype(np.int64))


def _ply_ascii(fh, element: dict, path: Path):
    count, props = element["count"], element["props"]
    lines = [fh.readline() for _ in range(count)]
    if count and not lines[-1]:
        raise ValueError(f"{path}: the file ends inside its {element['name']} data (truncated?)")
    if element["name"] == "face" and len(props) == 1 and isinstance(props[0][1], tuple):
        rows = [line.split() for line in lines]
        sizes = {int(r[0]) for r in rows} if rows else {3}
        if len(sizes) != 1 or sizes.pop() not in (3, 4) or any(len(r) != int(r[0]) + 1 for r in rows):
            raise ValueError(f"{path}: faces must all be triangles or all quads (triangulate first)")
        return _triangles(np.array([r[1:] for r in rows], dtype=np.int64).reshape(count, -1))
    try:
        table = np.loadtxt(lines, dtype=np.float64, ndmin=2) if count else np.zeros((0, len(props)))
    except ValueError as exc:
        raise ValueError(f"{path}: bad number in the {element['name']} data ({exc})") from None
    if table.shape[1] != len(props):
        raise ValueError(f"{path}: {element['name']} rows have {table.shape[1]} numbers, the header names {len(props)}")
    return {name: table[:, i] for i, (name, _) in enumerate(props)}


def _triangles(polys: np.ndarray) -> np.ndarray:
    """(F, 3) triangles, or (F, 4) quads split into two triangles each."""
    if polys.shape[1] == 3:
        return polys
    return np.concatenate([polys[:, [0, 1, 2]], polys[:, [0, 2, 3]]])


# ---- text ---------------------------------------------------------------------------------------
def _read_text(path: Path, facts: dict) -> PointCloud:
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ValueError(f"{path}: over {MAX_TEXT_BYTES >> 30} GiB of text: convert it to binary PLY first")
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        lines = [line for line in fh if line.strip() and not line.lstrip().startswith(("#", "//"))]
    if lines and re.fullmatch(r"\s*\d+\s*", lines[0]):
        lines = lines[1:]                           # .pts files start with the count
    if len(lines) > MAX_POINTS:
        raise ValueError(f"{path}: {len(lines):,} points is over the cap of {MAX_POINTS:,}: thin the cloud first")
    if not lines:
        raise ValueError(f"{path}: no points in the file")
    try:
        table = np.loadtxt([line.replace(",", " ") for line in lines], dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: every line must hold 3 to 9 numbers ({exc})") from None
    cols = table.shape[1]
    if not 3 <= cols <= 9:
        raise ValueError(f"{path}: lines of {cols} numbers: expected x y z and up to 6 more (normals, colours)")
    pts, normals, colours = table[:, :3], None, None
    rest = table[:, 3:]
    if cols == 7:                                   # .pts: x y z intensity r g b
        colours = rest[:, 1:4]
    elif cols in (6, 9):
        a, b = rest[:, :3], rest[:, 3:6] if cols == 9 else None
        if _looks_like_normals(a):
            normals, colours = a, b
        elif b is not None and _looks_like_normals(b):
            colours, normals = a, b
        else:
            colours = a
        if colours is not None and np.nanmax(colours) <= 1.0:
            colours = colours * 255.0
    facts["columns"] = cols
    return make_cloud(pts, normals, colours, facts)


def _looks_like_normals(a: np.ndarray) -> bool:
    """Whether three columns hold unit vectors (most rows of length 1 within 1 %)."""
    length = np.linalg.norm(a, axis=1)
    return bool(np.nanmean(np.abs(length - 1.0) < 0.01) > 0.9)


# ---- LAS / E57 ----------------------------------------------------------------------------------
def _read_las(path: Path, facts: dict) -> PointCloud:
    import laspy

    try:
        with laspy.open(path) as reader:
            if reader.header.point_count > MAX_POINTS:
                raise ValueError(f"{path}: {reader.header.point_count:,} points is over the cap of {MAX_POINTS:,}: "
                                 f"thin the cloud first")
            las = reader.read()
    except laspy.errors.LaspyException as exc:
        raise ValueError(f"{path}: not a readable LAS/LAZ file ({exc})") from exc
    pts = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1)
    colours = None
    names = set(las.point_format.dimension_names)
    if {"red", "green", "blue"} <= names:
        c = np.stack([np.asarray(las.red), np.asarray(las.green), np.asarray(las.blue)], axis=1).astype(np.float64)
        colours = c / 257.0 if c.max() > 255 else c
    return make_cloud(pts, None, colours, facts)


def _read_e57(path: Path, facts: dict) -> PointCloud:
    try:
        import pye57
    except ImportError:
        raise ValueError(f"{path}: reading .e57 needs the pye57 package (pip install pye57), or convert the "
                         f"scan to PLY or LAS") from None
    e57 = pye57.E57(str(path))
    parts = [e57.read_scan(i, ignore_missing_fields=True, intensity=False, colors=True, transform=True)
             for i in range(e57.scan_count)]
    pts = np.concatenate([np.stack([p["cartesianX"], p["cartesianY"], p["cartesianZ"]], axis=1) for p in parts])
    colours = None
    if all("colorRed" in p for p in parts):
        colours = np.concatenate([np.stack([p["colorRed"], p["colorGreen"], p["colorBlue"]], axis=1) for p in parts])
    return make_cloud(pts, None, colours, facts)
