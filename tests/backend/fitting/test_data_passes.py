"""Passes in backend/fitting/data.py and on the wire: files of a transforms.json dataset,
sample_passes on a plane whose geometry is known, and Submits with malformed passes."""
import json
import re

import numpy as np
import pytest
import torch

from fit_implicit.backend.fitting import data
from fit_implicit.shared import cameras, protocol

H, W = 12, 16
K = np.array([20.0, 20.0, W / 2, H / 2])


def _plane_view(c2w, plane_z=0.0):
    """Exact passes of the plane z = plane_z seen by a camera: z-depth (H, W), normals (H, W, 3)."""
    o, d = cameras.pixel_rays(K, c2w, W, H)                   # (H, W, 3) unit directions
    t = (plane_z - o[..., 2]) / d[..., 2]
    forward = -c2w[:3, 2]
    depth = (t * (d @ forward)).astype(np.float32)            # along the camera's axis
    normal = np.zeros((H, W, 3), np.float32)
    normal[..., 2] = 1.0
    return depth, normal


def _posed(n=2):
    poses = [cameras.look_at(np.array([0.3 * i, -1.0, 3.0]), np.array([0.1, 0.0, 0.0])) for i in range(n)]
    depth, normal = zip(*(_plane_view(p) for p in poses))
    rng = np.random.default_rng(0)
    albedo = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    roughness = rng.uniform(0.0, 1.0, (n, H, W)).astype(np.float32)
    roughness[:, :, :2] = data.NO_ROUGHNESS                   # a material without a roughness
    images = np.full((n, H, W, 4), 255, np.uint8)
    passes = {"albedo": albedo, "normal": np.stack(normal), "depth": np.stack(depth), "roughness": roughness}
    return data.PosedImages(images, np.tile(K, (n, 1)), np.stack(poses), [[-2, -2, -1], [2, 2, 1]],
                            [f"v{i}" for i in range(n)], passes)


def test_sample_passes_depth_is_the_distance_along_the_returned_ray():
    d = _posed()
    sampler = data.RaySampler(d, "cpu")
    g = torch.Generator().manual_seed(0)
    o, dirs, rgba, p = sampler.sample_passes(4096, generator=g)
    assert set(p) == {"albedo", "normal", "depth", "roughness"}
    assert p["depth"].shape == (4096, 1) and p["normal"].shape == (4096, 3) and p["albedo"].shape == (4096, 3)
    assert p["roughness"].shape == (4096, 1)
    assert all(v.dtype == torch.float32 for v in p.values())
    hit = o + p["depth"] * dirs
    assert hit[:, 2].abs().max() < 1e-4                       # on the plane z = 0
    assert torch.allclose(p["normal"], torch.tensor([0.0, 0.0, 1.0]).expand(4096, 3), atol=1e-3)
    assert 0.0 <= float(p["albedo"].min()) and float(p["albedo"].max()) <= 1.0
    # roughness: the pixel's own value (float16 on the device), -1 kept exact where it has none.
    # Here the red channel carries the same number, so each sample can be checked against its pixel.
    images = d.images.copy()
    images[..., 0] = np.random.default_rng(1).integers(0, 256, images.shape[:3])
    rough = np.where(d.passes["roughness"] < 0, data.NO_ROUGHNESS, images[..., 0] / 255.0).astype(np.float32)
    marked = data.PosedImages(images, d.intrinsics, d.poses, d.aabb, d.names, {"roughness": rough})
    _, _, mrgba, mp = data.RaySampler(marked, "cpu").sample_passes(4096, generator=torch.Generator().manual_seed(1))
    r, has = mp["roughness"][:, 0], mp["roughness"][:, 0] >= 0
    assert 0 < int(has.sum()) < 4096 and bool((r[~has] == data.NO_ROUGHNESS).all())
    assert float((r[has] - mrgba[has, 0]).abs().max()) < 1e-3
    # the same pixels as sample(): same generator state, same rays and colours
    o2, d2, rgba2 = sampler.sample(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(o, o2) and torch.equal(dirs, d2) and torch.equal(rgba, rgba2)


def test_sample_passes_without_passes_is_an_empty_dict():
    d = _posed()
    plain = data.PosedImages(d.images, d.intrinsics, d.poses, d.aabb, d.names)
    assert plain.passes == {}
    assert data.RaySampler(plain, "cpu").sample_passes(8)[3] == {}


def test_subset_keeps_passes_and_bad_passes_are_refused():
    d = _posed(3)
    sub = d.subset([2, 0])
    assert np.array_equal(sub.passes["albedo"], d.passes["albedo"][[2, 0]])
    assert np.array_equal(sub.passes["depth"], d.passes["depth"][[2, 0]])
    with pytest.raises(ValueError, match="pass 'depth' must have shape"):
        data.PosedImages(d.images, d.intrinsics, d.poses, d.aabb, d.names, {"depth": d.passes["depth"][:, :4]})
    with pytest.raises(ValueError, match="unknown pass 'shadow'"):
        data.PosedImages(d.images, d.intrinsics, d.poses, d.aabb, d.names, {"shadow": d.passes["depth"]})
    with pytest.raises(ValueError, match="must be >= 0"):
        data.PosedImages(d.images, d.intrinsics, d.poses, d.aabb, d.names, {"depth": -d.passes["depth"]})
    with pytest.raises(ValueError, match="'roughness' must be in"):
        data.PosedImages(d.images, d.intrinsics, d.poses, d.aabb, d.names, {"roughness": d.passes["roughness"] + 0.5})


def _write_dataset(tmp_path, d, depth_scale=1e-4):
    from PIL import Image

    frames = []
    for i, name in enumerate(d.names):
        Image.fromarray(d.images[i]).save(tmp_path / f"{name}.png")
        keys = data.write_pass_files(tmp_path, name, {k: v[i] for k, v in d.passes.items()}, depth_scale)
        frames.append({"file_path": name, "transform_matrix": d.poses[i].tolist(), **keys})
    doc = {"fl_x": K[0], "fl_y": K[1], "cx": K[2], "cy": K[3], "w": W, "h": H, "depth_scale": depth_scale,
           "aabb": d.aabb.tolist(), "frames": frames}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    return doc


def test_transforms_dataset_with_pass_files_round_trips(tmp_path):
    d = _posed()
    d.passes["normal"][0, :3] = 0.0                             # "no surface" on a few rows
    d.passes["depth"][0, :3] = 0.0
    _write_dataset(tmp_path, d)
    got = data.load_transforms(tmp_path)
    assert np.array_equal(got.passes["albedo"], d.passes["albedo"])
    assert np.abs(got.passes["depth"] - d.passes["depth"]).max() <= 0.5e-4 + 1e-6
    assert np.all(got.passes["normal"][0, :3] == 0) and np.all(got.passes["depth"][0, :3] == 0)
    assert np.array_equal(got.passes["roughness"], d.passes["roughness"])          # float32 .npz: exact
    surface = d.passes["normal"].any(-1)
    cos = (got.passes["normal"][surface] * d.passes["normal"][surface]).sum(-1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 1.0          # 8-bit normals
    half = data.load_transforms(tmp_path, downscale=2)
    assert half.passes["albedo"].shape == (2, H // 2, W // 2, 3)
    assert np.array_equal(half.passes["depth"], got.passes["depth"][:, 1::2, 1::2])
    assert np.array_equal(half.passes["roughness"], got.passes["roughness"][:, 1::2, 1::2])


def test_transforms_pass_errors_are_clear(tmp_path):
    d = _posed()
    doc = _write_dataset(tmp_path, d)
    del doc["frames"][1]["depth_path"]
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'depth_path' is given for 1 of 2 frames"):
        data.load_transforms(tmp_path)
    doc["frames"][1]["depth_path"] = "missing_depth.png"
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="depth pass file 'missing_depth.png' of frame 'v1' not found"):
        data.load_transforms(tmp_path)
    doc["frames"][1]["depth_path"] = "v1_depth.png"
    del doc["depth_scale"]
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="needs a 'depth_scale'"):
        data.load_transforms(tmp_path)
    doc["depth_scale"] = 1e-4
    doc["frames"][1]["roughness_path"] = "v1_albedo.png"
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="a roughness pass must be a .npz"):
        data.load_transforms(tmp_path)


# --------------------------------------------------------------------------------------------
# The wire
# --------------------------------------------------------------------------------------------
def _roundtrip(msg):
    return protocol.decode_message([bytes(f) for f in msg.to_frames()])


def test_submit_with_passes_round_trips_to_posed_images():
    d = _posed()
    msg = protocol.Submit(images=d.images, intrinsics=d.intrinsics, poses=d.poses, aabb=d.aabb,
                          albedo=d.passes["albedo"], normal=d.passes["normal"].astype(np.float16),
                          depth=d.passes["depth"], roughness=d.passes["roughness"].astype(np.float16))
    got = data.from_submit(_roundtrip(msg))
    assert got.passes["roughness"].dtype == np.float32
    assert np.abs(got.passes["roughness"] - d.passes["roughness"]).max() < 1e-3
    assert np.array_equal(got.passes["roughness"] == -1, d.passes["roughness"] == -1)
    assert np.array_equal(got.passes["albedo"], d.passes["albedo"])
    assert np.array_equal(got.passes["depth"], d.passes["depth"])
    assert got.passes["normal"].dtype == np.float32
    assert np.abs(got.passes["normal"] - d.passes["normal"]).max() < 1e-3
    plain = data.from_submit(_roundtrip(protocol.Submit(images=d.images, intrinsics=d.intrinsics,
                                                        poses=d.poses, aabb=d.aabb)))
    assert plain.passes == {}


@pytest.mark.parametrize("field, make, words", [
    ("albedo", lambda d: d.passes["albedo"][:, :, :5], "submit.albedo: shape"),
    ("albedo", lambda d: d.passes["albedo"][:1], "does not match the images' 2 x 12 x 16"),
    ("albedo", lambda d: d.passes["albedo"].astype(np.float32), "albedo: dtype float32 is not allowed"),
    ("normal", lambda d: 2.0 * d.passes["normal"], "normals that are neither unit length"),
    ("normal", lambda d: d.passes["normal"].astype(np.float64), "normal: dtype float64 is not allowed"),
    ("normal", lambda d: d.passes["normal"][..., :2].copy(), "normal: axis 3 must be 3"),
    ("depth", lambda d: -d.passes["depth"], "depths must be >= 0"),
    ("depth", lambda d: np.where(d.passes["depth"] > 3.2, np.nan, d.passes["depth"]).astype(np.float32),
     "depth: contains NaN or infinite values"),
    ("depth", lambda d: d.passes["depth"][..., None].copy(), "depth: expected 3 dimensions"),
    ("roughness", lambda d: d.passes["roughness"] * 2.0, "values outside [0, 1] that are not -1.0"),
    ("roughness", lambda d: np.where(d.passes["roughness"] < 0, -0.5, d.passes["roughness"]).astype(np.float32),
     "roughness: image 0 has 24 values outside"),
    ("roughness", lambda d: d.passes["roughness"][:, :5].copy(), "submit.roughness: shape"),
    ("roughness", lambda d: d.passes["roughness"].astype(np.float64), "roughness: dtype float64 is not allowed"),
])
def test_malformed_passes_get_a_clear_protocol_error(field, make, words):
    d = _posed()
    msg = protocol.Submit(images=d.images, intrinsics=d.intrinsics, poses=d.poses, aabb=d.aabb)
    setattr(msg, field, make(d))
    with pytest.raises(protocol.ProtocolError, match=re.escape(words)):
        _roundtrip(msg)
