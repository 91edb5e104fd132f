"""glTF 2.0 binary (.glb): the one GLB container writer (:func:`write_container`) and its
readers, for vertex-coloured meshes (:func:`write_colored`) and textured ones
(:func:`write_textured`).

Both: +Y up, so a Z-up point (x, y, z) is stored as (x, z, -y) (normals and tangents too),
which Blender's glTF importer turns back; positions stay in world units; one mesh, one node,
one metallic-roughness material.

* Vertex colours: POSITION, COLOR_0 (linear, as glTF requires; the input is sRGB), indices.
* Textures (a :class:`backend.export.texture.UVMesh` and its
  :class:`~backend.export.texture.BakedTextures`): POSITION, NORMAL, TANGENT, TEXCOORD_0 with v
  pointing DOWN from the image's top-left corner (stored as 1 - v), indices; the material has
  baseColorTexture (sRGB), normalTexture (tangent space, with TANGENT given per vertex) and
  metallicRoughnessTexture holding roughness in G and metallic 0 in B (when roughness was baked;
  otherwise a constant roughnessFactor).  Images are embedded as PNG.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np

from fit_implicit.backend.export.textured import DEFAULT_ROUGHNESS, check_textured, png_bytes, z_up_to_y_up
from fit_implicit.shared.color import srgb_to_linear

GLB_MAGIC, GLB_JSON, GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UNSIGNED_INT = 5126, 5125
LINEAR, LINEAR_MIPMAP_LINEAR, REPEAT = 9729, 9987, 10497


def metallic_roughness_image(roughness: np.ndarray, metallic: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 1) roughness (and metallic, None: 0) -> (H, W, 3) glTF metallicRoughness texture:
    R 255 (unused), G roughness, B metallic."""
    r = np.asarray(roughness)[..., 0]
    m = np.zeros_like(r) if metallic is None else np.asarray(metallic)[..., 0]
    return np.ascontiguousarray(np.stack([np.full_like(r, 255), r, m], -1))


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------
class BinaryChunk:
    """The BIN chunk being laid out: each piece one bufferView, padded to 4 bytes."""

    def __init__(self):
        self.blobs: list[bytes] = []
        self.views: list[dict] = []

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.blobs)

    def add(self, data: bytes, target: int | None = None) -> int:
        """Append ``data`` as a new bufferView (``target``: ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER or
        None); returns its index."""
        view = {"buffer": 0, "byteOffset": self.size, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.blobs.append(data + b"\0" * (-len(data) % 4))
        self.views.append(view)
        return len(self.views) - 1

    def data(self) -> bytes:
        return b"".join(self.blobs)


def write_container(path: Path, doc: dict, binary: bytes) -> None:
    """Write a .glb: the 12-byte header, ``doc`` as the JSON chunk (padded with spaces) and
    ``binary`` as the BIN chunk (padded with zeros), both 4-byte aligned as glTF 2.0 requires."""
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    binary += b"\0" * (-len(binary) % 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<III", GLB_MAGIC, 2, 12 + 8 + len(js) + 8 + len(binary)))
        fh.write(struct.pack("<II", len(js), GLB_JSON) + js)
        fh.write(struct.pack("<II", len(binary), GLB_BIN) + binary)


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


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------
def _floats(chunk: BinaryChunk, values: np.ndarray, bounds: bool = False) -> dict:
    """The accessor of (N, 2|3|4) vertex data, stored as float32 in ``chunk`` now; ``bounds``:
    with its min and max (glTF requires them for POSITION)."""
    a = np.ascontiguousarray(values, dtype="<f4")
    acc = {"bufferView": chunk.add(a.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(a),
           "type": f"VEC{a.shape[1]}"}
    if bounds:
        acc["min"], acc["max"] = a.min(0).tolist(), a.max(0).tolist()
    return acc


def _indices(chunk: BinaryChunk, faces: np.ndarray) -> dict:
    """The accessor of the (F, 3) triangles' vertex indices, stored as uint32 in ``chunk`` now."""
    idx = np.ascontiguousarray(faces.reshape(-1), dtype="<u4")
    return {"bufferView": chunk.add(idx.tobytes(), ELEMENT_ARRAY_BUFFER), "componentType": UNSIGNED_INT,
            "count": len(idx), "type": "SCALAR", "min": [int(idx.min())], "max": [int(idx.max())]}


def _write_mesh(path: Path, name: str, chunk: BinaryChunk, attributes: dict[str, dict], indices: dict,
                material: dict, **textures) -> None:
    """One mesh of one triangle primitive with one material, as a .glb.  ``attributes``: glTF
    attribute name -> accessor, and ``indices``, with their data in ``chunk``; ``textures``: the
    samplers, images and textures lists a textured material refers to."""
    doc = {
        "asset": {"version": "2.0", "generator": "Fit Implicit"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [{"name": name, "primitives": [{
            "attributes": {key: i for i, key in enumerate(attributes)}, "indices": len(attributes),
            "material": 0, "mode": 4}]}],
        "materials": [material],
        **textures,
        "buffers": [{"byteLength": chunk.size}],
        "bufferViews": chunk.views,
        "accessors": [*attributes.values(), indices],
    }
    write_container(path, doc, chunk.data())


def write_colored(path: Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> None:
    """A vertex-coloured mesh as a .glb named after the file; COLOR_0 holds the colours linear.

    Args:
        verts: (V, 3) float32 world.  faces: (F, 3) int64, 0-based.  colors: (V, 3) float32 sRGB
        in [0, 1].  (As export/files.py write_mesh checks and converts them.)
    """
    if not len(verts) or not len(faces):
        raise ValueError("cannot write an empty mesh as glTF (accessors need at least one element)")
    chunk = BinaryChunk()
    attributes = {"POSITION": _floats(chunk, z_up_to_y_up(verts), bounds=True),
                  "COLOR_0": _floats(chunk, srgb_to_linear(colors))}
    material = {"name": "vertex_colour", "pbrMetallicRoughness": {
        "baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}}
    _write_mesh(path, path.stem, chunk, attributes, _indices(chunk, faces), material)


def write_textured(path: str | Path, mesh, baked, name: str = "Implicit") -> Path:
    """Write ``mesh`` (a UVMesh) with ``baked`` textures (BakedTextures) as a .glb file; returns
    the path."""
    check_textured(mesh)
    path = Path(path)
    images = [("albedo", png_bytes(baked.albedo)), ("normal", png_bytes(baked.normal))]
    if baked.roughness is not None:
        images.append(("metallicRoughness", png_bytes(metallic_roughness_image(baked.roughness,
                                                                               getattr(baked, "metallic", None)))))
    chunk = BinaryChunk()
    tangents = np.concatenate([z_up_to_y_up(mesh.tangents[:, :3]), mesh.tangents[:, 3:]], 1)
    attributes = {"POSITION": _floats(chunk, z_up_to_y_up(mesh.vertices), bounds=True),
                  "NORMAL": _floats(chunk, z_up_to_y_up(mesh.normals)),
                  "TANGENT": _floats(chunk, tangents),
                  "TEXCOORD_0": _floats(chunk, np.stack([mesh.uvs[:, 0], 1.0 - mesh.uvs[:, 1]], 1))}
    indices = _indices(chunk, mesh.faces)
    image_docs = [{"bufferView": chunk.add(data), "mimeType": "image/png", "name": f"{name}_{kind}"}
                  for kind, data in images]
    pbr = {"baseColorTexture": {"index": 0}, "metallicFactor": 0.0}
    if baked.roughness is not None:
        pbr["metallicRoughnessTexture"] = {"index": 2}
        pbr["roughnessFactor"] = 1.0
        if getattr(baked, "metallic", None) is not None:     # the texture's B channel, as is
            pbr["metallicFactor"] = 1.0
    else:
        pbr["roughnessFactor"] = DEFAULT_ROUGHNESS
    material = {"name": f"{name} Material", "pbrMetallicRoughness": pbr, "normalTexture": {"index": 1, "scale": 1.0}}
    _write_mesh(path, name, chunk, attributes, indices, material,
                samplers=[{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR, "wrapS": REPEAT, "wrapT": REPEAT}],
                images=image_docs, textures=[{"sampler": 0, "source": i} for i in range(len(image_docs))])
    return path
