"""Small independent readers of the mesh files the backend writes (.ply, .obj, .glb), so that
tests check the files without the writers' own code."""
from __future__ import annotations

import json
import struct

import numpy as np


def read_ply(path):
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    nv = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    nf = int(next(h for h in header if h.startswith("element face")).split()[-1])
    v = np.frombuffer(data, dtype=[("p", "<f4", 3), ("c", "u1", 3)], count=nv, offset=end)
    f = np.frombuffer(data, dtype=[("n", "u1"), ("i", "<i4", 3)], count=nf, offset=end + v.nbytes)
    assert (f["n"] == 3).all() and end + v.nbytes + f.nbytes == len(data)
    return v["p"], f["i"], v["c"]


def read_obj(path):
    v, f = [], []
    for line in path.read_text().splitlines():
        if line.startswith("v "):
            v.append([float(t) for t in line.split()[1:]])
        elif line.startswith("f "):
            f.append([int(t) - 1 for t in line.split()[1:]])
    v = np.array(v)
    xyz = np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)    # Y up on disk -> Z up (as Blender's OBJ import)
    return xyz, np.array(f), v[:, 3:]


def read_glb(path):
    """Parse a GLB, checking the container and the glTF structure; returns world-frame arrays."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    jlen, jtype = struct.unpack_from("<II", data, 12)
    assert jtype == 0x4E4F534A and jlen % 4 == 0
    doc = json.loads(data[20:20 + jlen])
    blen, btype = struct.unpack_from("<II", data, 20 + jlen)
    assert btype == 0x004E4942 and blen % 4 == 0 and 28 + jlen + blen == len(data)
    binary = data[28 + jlen:28 + jlen + blen]
    assert doc["asset"]["version"] == "2.0" and doc["buffers"][0]["byteLength"] <= blen
    prim = doc["meshes"][doc["nodes"][doc["scenes"][doc["scene"]]["nodes"][0]]["mesh"]]["primitives"][0]
    assert prim.get("mode", 4) == 4 and "pbrMetallicRoughness" in doc["materials"][prim["material"]]

    def accessor(i):
        acc = doc["accessors"][i]
        view = doc["bufferViews"][acc["bufferView"]]
        assert view["byteOffset"] % 4 == 0
        assert view["byteOffset"] + view["byteLength"] <= doc["buffers"][0]["byteLength"]
        dtype = {5126: "<f4", 5125: "<u4"}[acc["componentType"]]
        width = {"VEC3": 3, "SCALAR": 1}[acc["type"]]
        arr = np.frombuffer(binary, dtype, acc["count"] * width, view["byteOffset"]).reshape(acc["count"], width)
        if "min" in acc:
            assert np.allclose(arr.min(0), acc["min"]) and np.allclose(arr.max(0), acc["max"])
        return arr

    pos = accessor(prim["attributes"]["POSITION"])
    col = accessor(prim["attributes"]["COLOR_0"])
    idx = accessor(prim["indices"]).reshape(-1, 3)
    world = np.stack([pos[:, 0], -pos[:, 2], pos[:, 1]], axis=1)      # glTF +Y up -> Z up
    return world, idx, col
