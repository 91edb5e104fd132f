"""Textured mesh files: glTF 2.0 binary (.glb) with PBR textures, Wavefront .obj (+ .mtl + PNGs)
and .ply (+ PNGs).

Input is a :class:`backend.export.texture.UVMesh` (world units, Z up, split at UV seams) and its
:class:`~backend.export.texture.BakedTextures`.  Positions stay in world units in every format.

glTF specifics: +Y up, so a Z-up point (x, y, z) is stored as (x, z, -y) (normals and tangents
too), which Blender's glTF importer turns back; texture coordinates have v pointing DOWN from
the image's top-left corner, so v is stored as 1 - v.  The material is metallic-roughness PBR:
baseColorTexture (sRGB), normalTexture (tangent space, with TANGENT given per vertex), and
metallicRoughnessTexture holding roughness in G and metallic 0 in B (when roughness was baked;
otherwise a constant roughnessFactor).  Images are embedded as PNG.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np

GLB_MAGIC, GLB_JSON, GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UNSIGNED_INT = 5126, 5125
DEFAULT_ROUGHNESS = 0.8
LINEAR, LINEAR_MIPMAP_LINEAR, REPEAT = 9729, 9987, 10497


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, C) uint8, C in {1, 3, 4}, top row first -> PNG file bytes."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 1|3|4) uint8 image, got {arr.dtype} {arr.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def metallic_roughness_image(roughness: np.ndarray) -> np.ndarray:
    """(H, W, 1) roughness -> (H, W, 3) glTF metallicRoughness texture: R 255 (unused), G
    roughness, B metallic = 0."""
    r = np.asarray(roughness)[..., 0]
    return np.ascontiguousarray(np.stack([np.full_like(r, 255), r, np.zeros_like(r)], -1))


def z_up_to_y_up(v: np.ndarray) -> np.ndarray:
    """(N, 3) Blender (Z up) -> glTF (Y up): (x, y, z) -> (x, z, -y)."""
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def _check(mesh, baked) -> None:
    if not len(mesh.faces):
        raise ValueError("cannot write an empty mesh")
    for name in ("uvs", "normals", "tangents", "source"):
        if len(getattr(mesh, name)) != len(mesh.vertices):
            raise ValueError(f"mesh.{name} must have one row per vertex")


def write_glb(path: str | Path, mesh, baked, name: str = "Implicit") -> Path:
    """Write ``mesh`` with ``baked`` textures as a .glb file; returns the path."""
    _check(mesh, baked)
    path = Path(path)
    pos = np.ascontiguousarray(z_up_to_y_up(mesh.vertices), dtype="<f4")
    nrm = np.ascontiguousarray(z_up_to_y_up(mesh.normals), dtype="<f4")
    tan = np.ascontiguousarray(np.concatenate([z_up_to_y_up(mesh.tangents[:, :3]), mesh.tangents[:, 3:]], 1),
                               dtype="<f4")
    uv = np.ascontiguousarray(np.stack([mesh.uvs[:, 0], 1.0 - mesh.uvs[:, 1]], 1), dtype="<f4")
    idx = np.ascontiguousarray(mesh.faces.reshape(-1), dtype="<u4")
    images = [("albedo", png_bytes(baked.albedo)), ("normal", png_bytes(baked.normal))]
    if baked.roughness is not None:
        images.append(("metallicRoughness", png_bytes(metallic_roughness_image(baked.roughness))))

    blobs, views = [], []

    def add(data: bytes, target: int | None = None) -> int:
        offset = sum(len(b) for b in blobs)
        view = {"buffer": 0, "byteOffset": offset, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        blobs.append(data + b"\0" * (-len(data) % 4))
        views.append(view)
        return len(views) - 1

    accessors = [
        {"bufferView": add(pos.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(pos),
         "type": "VEC3", "min": pos.min(0).tolist(), "max": pos.max(0).tolist()},
        {"bufferView": add(nrm.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(nrm), "type": "VEC3"},
        {"bufferView": add(tan.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(tan), "type": "VEC4"},
        {"bufferView": add(uv.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(uv), "type": "VEC2"},
        {"bufferView": add(idx.tobytes(), ELEMENT_ARRAY_BUFFER), "componentType": UNSIGNED_INT,
         "count": len(idx), "type": "SCALAR", "min": [int(idx.min())], "max": [int(idx.max())]},
    ]
    image_docs = [{"bufferView": add(data), "mimeType": "image/png", "name": f"{name}_{kind}"}
                  for kind, data in images]
    pbr = {"baseColorTexture": {"index": 0}, "metallicFactor": 0.0}
    if baked.roughness is not None:
        pbr["metallicRoughnessTexture"] = {"index": 2}
        pbr["roughnessFactor"] = 1.0
    else:
        pbr["roughnessFactor"] = DEFAULT_ROUGHNESS
    doc = {
        "asset": {"version": "2.0", "generator": "Fit Implicit"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [{"name": name, "primitives": [{
            "attributes": {"POSITION": 0, "NORMAL": 1, "TANGENT": 2, "TEXCOORD_0": 3},
            "indices": 4, "material": 0, "mode": 4}]}],
        "materials": [{"name": f"{name} Material", "pbrMetallicRoughness": pbr,
                       "normalTexture": {"index": 1, "scale": 1.0}}],
        "samplers": [{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR, "wrapS": REPEAT, "wrapT": REPEAT}],
        "images": image_docs,
        "textures": [{"sampler": 0, "source": i} for i in range(len(image_docs))],
        "buffers": [{"byteLength": sum(len(b) for b in blobs)}],
        "bufferViews": views,
        "accessors": accessors,
    }
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    binary = b"".join(blobs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<III", GLB_MAGIC, 2, 12 + 8 + len(js) + 8 + len(binary)))
        fh.write(struct.pack("<II", len(js), GLB_JSON) + js)
        fh.write(struct.pack("<II", len(binary), GLB_BIN) + binary)
    return path


def read_glb(path: str | Path) -> tuple[dict, bytes]:
    """(JSON document, BIN chunk) of a .glb file; checks the container's framing."""
    data = Path(path).read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short for a glb file")
    magic, version, total = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC or version != 2 or total != len(data):
        raise ValueError(f"{path}: not a glTF 2.0 binary (magic, version or length wrong)")
    js_len, js_type = struct.unpack_from("<II", data, 12)
    if js_type != GLB_JSON:
        raise ValueError(f"{path}: the first chunk is not JSON")
    doc = json.loads(data[20:20 + js_len])
    rest = 20 + js_len
    binary = b""
    if rest < len(data):
        bin_len, bin_type = struct.unpack_from("<II", data, rest)
        if bin_type != GLB_BIN:
            raise ValueError(f"{path}: the second chunk is not BIN")
        binary = data[rest + 8:rest + 8 + bin_len]
    return doc, binary


def glb_accessor(doc: dict, binary: bytes, index: int) -> np.ndarray:
    """The array of accessor ``index`` (float32 or uint32 data, tightly packed)."""
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc["type"]]
    dtype = {FLOAT: "<f4", UNSIGNED_INT: "<u4"}[acc["componentType"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    arr = np.frombuffer(binary, dtype=dtype, count=acc["count"] * width, offset=start)
    return arr.reshape(acc["count"], width) if width > 1 else arr


def glb_image(doc: dict, binary: bytes, index: int) -> np.ndarray:
    """Image ``index`` of the document decoded to (H, W, C) uint8."""
    from PIL import Image

    view = doc["bufferViews"][doc["images"][index]["bufferView"]]
    start = view.get("byteOffset", 0)
    img = np.asarray(Image.open(io.BytesIO(binary[start:start + view["byteLength"]])))
    return img[..., None] if img.ndim == 2 else img


def texture_paths(path: Path, baked) -> dict[str, Path]:
    """PNG paths next to an .obj/.ply: ``<stem>_albedo.png`` etc., one per baked kind."""
    return {kind: path.with_name(f"{path.stem}_{kind}.png") for kind, _ in baked.items()}


def _write_pngs(path: Path, baked) -> dict[str, Path]:
    paths = texture_paths(path, baked)
    for kind, image in baked.items():
        paths[kind].write_bytes(png_bytes(image))
    return paths


def write_obj(path: str | Path, mesh, baked, name: str = "Implicit") -> Path:
    """``.obj`` (v, vt with v up, vn, f v/vt/vn) + ``.mtl`` + PNGs.  The .mtl names the albedo
    (map_Kd), the tangent-space normal map (map_Bump, read as a normal map by Blender's OBJ
    importer; also ``norm``) and the roughness (map_Pr, PBR extension)."""
    _check(mesh, baked)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pngs = _write_pngs(path, baked)
    mtl = path.with_suffix(".mtl")
    lines = [f"newmtl {name}", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "illum 1", f"map_Kd {pngs['albedo'].name}",
             f"map_Bump {pngs['normal'].name}", f"norm {pngs['normal'].name}"]
    if "roughness" in pngs:
        lines.append(f"map_Pr {pngs['roughness'].name}")
    else:
        lines.append(f"Pr {DEFAULT_ROUGHNESS}")
    mtl.write_text("# Fit Implicit\n" + "\n".join(lines) + "\n")
    f = mesh.faces.astype(np.int64) + 1
    with open(path, "w") as fh:
        fh.write(f"# Fit Implicit: world units, Z up\nmtllib {mtl.name}\no {name}\n")
        np.savetxt(fh, mesh.vertices, fmt="v %.6f %.6f %.6f")
        np.savetxt(fh, mesh.uvs, fmt="vt %.6f %.6f")
        np.savetxt(fh, mesh.normals, fmt="vn %.5f %.5f %.5f")
        fh.write(f"usemtl {name}\ns 1\n")
        np.savetxt(fh, np.repeat(f, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    return path


def write_ply(path: str | Path, mesh, baked) -> Path:
    """Binary .ply with per-vertex xyz, normal, texture coordinates (s, t; t up) + PNGs named
    in a ``comment TextureFile`` line (MeshLab's convention: the albedo)."""
    _check(mesh, baked)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pngs = _write_pngs(path, baked)
    header = (f"ply\nformat binary_little_endian 1.0\ncomment Fit Implicit: world units, Z up\n"
              f"comment TextureFile {pngs['albedo'].name}\n"
              f"element vertex {len(mesh.vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
              f"property float nx\nproperty float ny\nproperty float nz\nproperty float s\nproperty float t\n"
              f"element face {len(mesh.faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    v = np.empty(len(mesh.vertices), dtype=[("p", "<f4", 3), ("n", "<f4", 3), ("uv", "<f4", 2)])
    v["p"], v["n"], v["uv"] = mesh.vertices, mesh.normals, mesh.uvs
    fc = np.empty(len(mesh.faces), dtype=[("n", "u1"), ("i", "<i4", 3)])
    fc["n"], fc["i"] = 3, mesh.faces
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(v.tobytes())
        fh.write(fc.tobytes())
    return path


WRITERS = {".glb": write_glb, ".obj": write_obj, ".ply": write_ply}


def write_textured(path: str | Path, mesh, baked) -> Path:
    """Write a textured mesh; the suffix (.glb, .obj, .ply) picks the format."""
    path = Path(path)
    writer = WRITERS.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"{path.name}: unknown textured mesh format (use {', '.join(WRITERS)})")
    return writer(path, mesh, baked)
