"""Textured mesh files (.glb, .obj + .mtl, .ply + PNGs) written by backend/export/glb.py, obj.py
and ply.py (export/files.py picks one by suffix), read back with their own parsers: vertices stay
in world units, UVs and textures round-trip."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fit_implicit.backend.export import glb
from fit_implicit.backend.export.files import write_textured
from fit_implicit.backend.export.textured import DEFAULT_ROUGHNESS, png_bytes, z_up_to_y_up
from fit_implicit.backend.export import texture as tx
from stand_ins import HalvesBall, sphere_mesh


@pytest.fixture(scope="module")
def textured():
    verts, faces = sphere_mesh(radius=2.5, n=16)
    verts = verts + np.float32([10.0, -4.0, 3.0])        # world units, off the origin

    class Ball(HalvesBall):
        def surface_attributes(self, points, normals=None):
            return super().surface_attributes(np.asarray(points) - [10.0, -4.0, 3.0], normals)

    mesh = tx.unwrap(verts, faces, size=64, padding=2)
    return mesh, tx.bake(Ball(roughness=True), mesh, 64, padding=2)


def test_glb_round_trips_geometry_uvs_and_pbr_textures(tmp_path, textured):
    mesh, baked = textured
    path = glb.write_textured(tmp_path / "x.glb", mesh, baked)
    doc, binary = glb.read_glb(path)
    prim = doc["meshes"][0]["primitives"][0]
    pos = glb.glb_accessor(doc, binary, prim["attributes"]["POSITION"])
    # glTF is Y up: (x, y, z) was stored as (x, z, -y); undo it and compare in world units.
    np.testing.assert_allclose(np.stack([pos[:, 0], -pos[:, 2], pos[:, 1]], 1), mesh.vertices, atol=1e-6)
    uv = glb.glb_accessor(doc, binary, prim["attributes"]["TEXCOORD_0"])
    np.testing.assert_allclose(np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1), mesh.uvs, atol=1e-6)
    idx = glb.glb_accessor(doc, binary, prim["indices"]).reshape(-1, 3)
    np.testing.assert_array_equal(idx, mesh.faces)
    tangents = glb.glb_accessor(doc, binary, prim["attributes"]["TANGENT"])
    assert set(np.unique(tangents[:, 3])) <= {-1.0, 1.0}
    np.testing.assert_allclose(np.linalg.norm(glb.glb_accessor(doc, binary, prim["attributes"]["NORMAL"]), axis=1),
                               1.0, atol=1e-5)
    mat = doc["materials"][prim["material"]]
    pbr = mat["pbrMetallicRoughness"]

    def image_of(texture_ref):
        return glb.glb_image(doc, binary, doc["textures"][texture_ref["index"]]["source"])

    np.testing.assert_array_equal(image_of(pbr["baseColorTexture"]), baked.albedo)
    np.testing.assert_array_equal(image_of(mat["normalTexture"]), baked.normal)
    mr = image_of(pbr["metallicRoughnessTexture"])
    np.testing.assert_array_equal(mr[..., 1:2], baked.roughness)     # roughness in G
    assert (mr[..., 2] == 0).all() and pbr["metallicFactor"] == 0.0  # metallic 0 in B
    assert all(img["mimeType"] == "image/png" for img in doc["images"])
    # The red half of the ball (world x > 10) reads red in the base colour at its faces' UVs.
    centre_uv = mesh.uvs[mesh.faces].mean(1)
    red = mesh.vertices[mesh.faces].mean(1)[:, 0] > 10.3
    seen = tx.sample_texture(image_of(pbr["baseColorTexture"]), centre_uv)
    assert (seen[red, 0] > 200).all() and (seen[red, 2] < 50).all()


def test_glb_framing_is_valid_for_strict_readers(tmp_path, textured):
    mesh, baked = textured
    data = glb.write_textured(tmp_path / "x.glb", mesh, baked).read_bytes()
    assert len(data) % 4 == 0
    doc = json.loads(data[20:20 + int.from_bytes(data[12:16], "little")])
    for view in doc["bufferViews"]:
        assert view["byteOffset"] % 4 == 0
        assert view["byteOffset"] + view["byteLength"] <= doc["buffers"][0]["byteLength"]


def test_glb_without_roughness_uses_a_constant(tmp_path, textured):
    mesh, baked = textured
    plain = tx.BakedTextures(baked.albedo, baked.normal, None, baked.coverage)
    doc, _ = glb.read_glb(glb.write_textured(tmp_path / "y.glb", mesh, plain))
    pbr = doc["materials"][0]["pbrMetallicRoughness"]
    assert "metallicRoughnessTexture" not in pbr and pbr["roughnessFactor"] == DEFAULT_ROUGHNESS
    assert len(doc["images"]) == 2


def test_obj_with_mtl_and_pngs(tmp_path, textured):
    mesh, baked = textured
    path = write_textured(tmp_path / "x.obj", mesh, baked)
    lines = path.read_text().splitlines()
    v = np.array([[float(t) for t in ln.split()[1:]] for ln in lines if ln.startswith("v ")])
    vt = np.array([[float(t) for t in ln.split()[1:]] for ln in lines if ln.startswith("vt ")])
    f = [ln.split()[1:] for ln in lines if ln.startswith("f ")]
    np.testing.assert_allclose(v, z_up_to_y_up(mesh.vertices), atol=1e-5)     # Y up, -Z forward on disk
    np.testing.assert_allclose(vt, mesh.uvs, atol=1e-5)
    assert len(f) == len(mesh.faces) and f[0][0] == "/".join([str(mesh.faces[0, 0] + 1)] * 3)
    mtl = (tmp_path / "x.mtl").read_text()
    assert "mtllib x.mtl" in lines and "map_Kd x_albedo.png" in mtl and "map_Bump x_normal.png" in mtl
    assert "map_Pr x_roughness.png" in mtl
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x_albedo.png")), baked.albedo)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x_roughness.png")), baked.roughness[..., 0])


def test_ply_with_uvs(tmp_path, textured):
    mesh, baked = textured
    data = write_textured(tmp_path / "x.ply", mesh, baked).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode()
    assert "comment TextureFile x_albedo.png" in header and "property float s" in header
    v = np.frombuffer(data, dtype=[("p", "<f4", 3), ("n", "<f4", 3), ("uv", "<f4", 2)],
                      count=len(mesh.vertices), offset=end)
    np.testing.assert_array_equal(v["p"], mesh.vertices)
    np.testing.assert_array_equal(v["uv"], mesh.uvs)
    assert (tmp_path / "x_normal.png").is_file()


def test_bad_inputs_are_refused(tmp_path, textured):
    mesh, baked = textured
    with pytest.raises(ValueError, match="unknown textured mesh format"):
        write_textured(tmp_path / "x.stl", mesh, baked)
    with pytest.raises(ValueError, match="not a glTF 2.0 binary"):
        (tmp_path / "bad.glb").write_bytes(b"\0" * 64)
        glb.read_glb(tmp_path / "bad.glb")
    with pytest.raises(ValueError, match="uint8 image"):
        png_bytes(np.zeros((4, 4, 3), np.float32))
    assert io.BytesIO(png_bytes(baked.roughness)).getvalue()[:4] == b"\x89PNG"


@pytest.mark.slow   # a subprocess that imports torch and meshes (about 20 s on 2 cores)
def test_cli_mesh_writes_a_textured_glb_in_world_units(tmp_path):
    """``fit-implicit mesh RUN --out x.glb`` on a saved real model (an SDF at its
    geometric initialisation: about a sphere of radius 1.0 world unit centred at (5, 0, 1))."""
    import subprocess
    import sys

    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.model import FittedField
    from fit_implicit.backend.fitting.runs import save_run
    from helpers import REPO as REPO_ROOT

    cfg = make_config(method="sdf", preset="draft", device="cpu")
    aabb = np.array([[3.0, -2, -1], [7, 2, 3]])
    save_run(FittedField.build(cfg, aabb), tmp_path / "run")
    out = tmp_path / "x.glb"
    args = ["mesh", tmp_path / "run", "--out", out, "--mesh-resolution", 32, "--texture-size", 128, "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "fit_implicit.backend", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "textures: 128x128 (albedo, normal)" in proc.stdout
    doc, binary = glb.read_glb(out)
    prim = doc["meshes"][0]["primitives"][0]
    pos = glb.glb_accessor(doc, binary, prim["attributes"]["POSITION"])
    world = np.stack([pos[:, 0], -pos[:, 2], pos[:, 1]], 1)
    # World frame, not the trainer's normalised one (centre 0, radius 0.5): the blob sits at
    # (5, 0, 1) with about the world radius (the untrained hash grid bumps it), inside the box.
    assert np.allclose(world.mean(0), [5.0, 0.0, 1.0], atol=0.25)
    assert 0.8 < np.median(np.linalg.norm(world - [5.0, 0.0, 1.0], axis=1)) < 1.8
    assert (world >= aabb[0] - 1e-4).all() and (world <= aabb[1] + 1e-4).all()
    assert glb.glb_image(doc, binary, 0).shape == (128, 128, 3)
    assert "normalTexture" in doc["materials"][0]
