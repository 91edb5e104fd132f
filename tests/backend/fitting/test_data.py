"""Datasets: transforms.json variants, box estimation, hold-out splits, wire submits, ray batches."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fit_implicit.backend.fitting.data import (PosedImages, RaySampler, camera_rays, estimate_aabb, from_submit,
                                               holdout_indices, load_transforms, split_holdout)
from fit_implicit.shared import cameras, protocol


def _rig(n=6, size=(20, 16), fov=0.8, center=(1.0, 2.0, 3.0), radius=5.0):
    pos = cameras.ring_positions(center, radius, n)
    poses = np.stack([cameras.look_at(p, center) for p in pos])
    return poses, cameras.intrinsics_from_fov(fov, *size)


def _write_images(folder, n, size, mode="RGBA", ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        channels = 4 if mode == "RGBA" else 3
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode).save(
            folder / f"img_{i}{ext}")


def test_camera_rays_match_shared_pixel_rays():
    poses, k = _rig()
    o_ref, d_ref = cameras.pixel_rays(k, poses[2], 20, 16)
    v, u = np.meshgrid(np.arange(16) + 0.5, np.arange(20) + 0.5, indexing="ij")
    n = u.size
    o, d = camera_rays(torch.tensor(k, dtype=torch.float32).expand(n, 4),
                       torch.tensor(poses[2], dtype=torch.float32).expand(n, 4, 4),
                       torch.tensor(u.ravel(), dtype=torch.float32), torch.tensor(v.ravel(), dtype=torch.float32))
    assert np.allclose(o.numpy(), o_ref.reshape(-1, 3), atol=1e-5)
    assert np.allclose(d.numpy(), d_ref.reshape(-1, 3), atol=1e-5)


def test_load_nerf_synthetic_layout(tmp_path):
    poses, _ = _rig()
    _write_images(tmp_path / "train", 6, (20, 16))
    doc = {"camera_angle_x": 0.8,
           "frames": [{"file_path": f"./train/img_{i}", "transform_matrix": p.tolist()} for i, p in enumerate(poses)]}
    (tmp_path / "transforms_train.json").write_text(json.dumps(doc))
    data = load_transforms(tmp_path)
    assert data.images.shape == (6, 16, 20, 4) and data.images.dtype == np.uint8
    assert data.names == [f"img_{i}" for i in range(6)]
    fx = 0.5 * 20 / math.tan(0.4)
    assert np.allclose(data.intrinsics, [fx, fx, 10.0, 8.0])
    assert np.allclose(data.poses, poses)
    # the box is estimated: centred on what the cameras look at
    assert np.allclose(data.aabb.mean(0), [1.0, 2.0, 3.0], atol=1e-6)


def test_load_per_frame_intrinsics_extensions_rgb_and_aabb(tmp_path):
    poses, _ = _rig(n=3, size=(12, 10))
    _write_images(tmp_path / "imgs", 3, (12, 10), mode="RGB", ext=".jpg")
    frames = []
    for i, p in enumerate(poses):
        frames.append({"file_path": f"imgs/img_{i}.jpg", "transform_matrix": p.tolist(),
                       "fl_x": 30.0 + i, "fl_y": 31.0, "cx": 5.5, "cy": 4.5, "w": 24, "h": 20})
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": frames, "aabb": [[-1, -2, -3], [1, 2, 3]]}))
    data = load_transforms(tmp_path / "transforms.json")
    assert (data.images[..., 3] == 255).all()                     # RGB gets an opaque alpha
    # written for 24x20, the images are 12x10: intrinsics follow the real size
    assert np.allclose(data.intrinsics[1], [15.5, 15.5, 2.75, 2.25])
    assert np.allclose(data.aabb, [[-1, -2, -3], [1, 2, 3]])
    assert data.names == ["img_0", "img_1", "img_2"]


def test_downscale(tmp_path):
    poses, _ = _rig(n=2, size=(20, 16))
    _write_images(tmp_path, 2, (20, 16))
    doc = {"camera_angle_x": 0.8, "frames": [{"file_path": f"img_{i}", "transform_matrix": p.tolist()}
                                             for i, p in enumerate(poses)]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    full, half = load_transforms(tmp_path), load_transforms(tmp_path, downscale=2)
    assert half.images.shape == (2, 8, 10, 4)
    assert np.allclose(half.intrinsics, full.intrinsics / 2)


def test_exr_photos_load_as_their_png_twins(tmp_path):
    """Renders saved as .exr (linear light, premultiplied alpha, as Blender writes them) load as
    the same sRGB straight-alpha pixels their 8-bit PNG twins give."""
    from fit_implicit.backend.render.image import exr_size, read_exr, write_exr

    poses, _ = _rig(n=2, size=(20, 16))
    _write_images(tmp_path / "png", 2, (20, 16))
    (tmp_path / "exr").mkdir()
    for i in range(2):
        px = np.asarray(Image.open(tmp_path / "png" / f"img_{i}.png"), np.float32) / 255.0
        px[..., :3] *= px[..., 3:]                              # what FittedField.render gives: premultiplied
        write_exr(tmp_path / "exr" / f"img_{i}.exr", px)
    assert exr_size(tmp_path / "exr" / "img_0.exr") == (20, 16) and read_exr(tmp_path / "exr" / "img_0.exr").dtype == np.float32
    for folder in ("png", "exr"):
        doc = {"camera_angle_x": 0.8, "frames": [{"file_path": f"{folder}/img_{i}", "transform_matrix": p.tolist()}
                                                 for i, p in enumerate(poses)]}
        (tmp_path / f"{folder}.json").write_text(json.dumps(doc))
    for d in (1, 2):
        png, exr = (load_transforms(tmp_path / f"{f}.json", downscale=d) for f in ("png", "exr"))
        assert exr.images.shape == png.images.shape and np.allclose(exr.intrinsics, png.intrinsics)
        seen = png.images[..., 3] > 8            # colour is meaningless where (nearly) nothing is there
        diff = np.abs(exr.images.astype(int) - png.images.astype(int))
        assert diff[..., 3].max() <= 1                          # alpha averages the same way
        if d == 1:     # (downscaled, the .exr averages in linear light and the PNG in sRGB: they differ)
            assert diff[..., :3][seen].max() <= 1


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no transforms"):
        load_transforms(tmp_path)
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": [{"file_path": "missing",
                                                                       "transform_matrix": np.eye(4).tolist()}]}))
    with pytest.raises(ValueError, match="not found"):
        load_transforms(tmp_path)


def test_estimate_aabb_on_a_ring():
    center = np.array([0.5, -1.0, 2.0])
    poses, k = _rig(n=8, size=(64, 48), fov=0.7, center=center, radius=4.0)
    box = estimate_aabb(np.repeat(k[None], 8, 0), poses, 64, 48)
    half = 4.0 * 0.5 * min(64 / k[0], 48 / k[1])                   # distance * tan(narrower half fov)
    assert np.allclose(box, [center - half, center + half], atol=1e-6)
    with pytest.raises(ValueError):
        estimate_aabb(k[None], poses[:1], 64, 48)


def test_holdout_every_kth():
    train, held = holdout_indices(10, 4)
    assert held.tolist() == [0, 4, 8] and train.tolist() == [1, 2, 3, 5, 6, 7, 9]
    assert holdout_indices(5, 0)[1].size == 0
    data = PosedImages(np.zeros((5, 2, 2, 4), np.uint8), np.tile([2.0, 2, 1, 1], (5, 1)),
                       np.tile(np.eye(4), (5, 1, 1)), [[0, 0, 0], [1, 1, 1]], list("abcde"))
    tr, te = split_holdout(data, 2)
    assert tr.names == ["b", "d"] and te.names == ["a", "c", "e"]


def test_posed_images_validation():
    good = dict(images=np.zeros((2, 4, 4, 3), np.uint8), intrinsics=np.tile([2.0, 2, 2, 2], (2, 1)),
                poses=np.tile(np.eye(4), (2, 1, 1)), aabb=[[0, 0, 0], [1, 1, 1]], names=["a", "b"])
    assert PosedImages(**good).images.shape == (2, 4, 4, 4)
    for key, bad in [("images", np.zeros((2, 4, 4), np.uint8)), ("intrinsics", np.zeros((2, 3))),
                     ("aabb", [[0, 0, 0], [1, -1, 1]]), ("names", ["a"])]:
        with pytest.raises(ValueError):
            PosedImages(**{**good, key: bad})


def test_from_submit():
    poses, k = _rig(n=3)
    msg = protocol.Submit(images=np.zeros((3, 16, 20, 3), np.uint8), intrinsics=np.repeat(k[None], 3, 0),
                          poses=poses, aabb=np.array([[-1.0, -1, -1], [1, 1, 1]]), name="chair").validate()
    data = from_submit(msg)
    assert data.images.shape == (3, 16, 20, 4) and data.names == ["chair_0000", "chair_0001", "chair_0002"]


def test_ray_sampler_colours_match_projected_pixels():
    poses, k = _rig(n=4, size=(20, 16))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 16, 20, 4), dtype=np.uint8)
    data = PosedImages(images, np.repeat(k[None], 4, 0), poses, [[0, 1, 2], [2, 3, 4]], list("abcd"))
    torch.manual_seed(0)
    o, d, rgba = RaySampler(data, "cpu").sample(64)
    assert o.shape == d.shape == (64, 3) and rgba.shape == (64, 4)
    assert torch.allclose(d.norm(dim=-1), torch.ones(64))
    # each ray must come from one of the cameras and go through the centre of a pixel of the
    # same colour in that camera's image
    for oi, di, ci in zip(o.numpy().astype(np.float64), d.numpy().astype(np.float64), rgba.numpy()):
        cam = int(np.argmin(np.linalg.norm(poses[:, :3, 3] - oi, axis=1)))
        uv, _ = cameras.project((oi + 2.0 * di)[None], k, poses[cam])
        col, row = np.floor(uv[0]).astype(int)
        assert np.allclose(uv[0] - np.floor(uv[0]), 0.5, atol=1e-3)
        assert np.allclose(ci * 255, images[cam, row, col], atol=1e-3)


def test_jittered_rays_pass_anywhere_through_the_pixel_whose_colour_they_carry():
    """RaySampler(jitter=True) (setting pixel_jitter): each ray crosses the image inside the
    pixel whose colour it carries, at a random point of it, not its centre."""
    poses, k = _rig(n=4, size=(20, 16))
    images = np.random.default_rng(2).integers(0, 256, (4, 16, 20, 4), dtype=np.uint8)
    data = PosedImages(images, np.repeat(k[None], 4, 0), poses, [[0, 1, 2], [2, 3, 4]], list("abcd"))
    o, d, rgba, photo = RaySampler(data, "cpu", jitter=True).sample(256, torch.Generator().manual_seed(0),
                                                                    with_photo=True)
    offsets = []
    for oi, di, ci, cam in zip(o.numpy().astype(np.float64), d.numpy().astype(np.float64), rgba.numpy(), photo.numpy()):
        uv, _ = cameras.project((oi + 2.0 * di)[None], k, poses[cam])
        col, row = np.floor(uv[0]).astype(int)
        assert np.allclose(ci * 255, images[cam, row, col], atol=1e-3)
        offsets.append(uv[0] - np.floor(uv[0]))
    offsets = np.array(offsets)
    assert offsets.min() < 0.1 and offsets.max() > 0.9 and abs(offsets.mean() - 0.5) < 0.05   # all over the pixel


def test_a_sampler_over_a_share_of_the_photos_holds_and_draws_only_those(tmp_path):
    """A data-parallel fit's rank (fitting/distributed.py): RaySampler(views=...) puts only its
    photos (and their passes) on the device; every ray comes from one of them, through a pixel of
    the colour it carries, and is reported under the photo's index in the whole capture."""
    poses, k = _rig(n=5, size=(20, 16))
    images = np.random.default_rng(3).integers(0, 256, (5, 16, 20, 4), dtype=np.uint8)
    albedo = np.random.default_rng(4).integers(0, 256, (5, 16, 20, 3), dtype=np.uint8)
    data = PosedImages(images, np.repeat(k[None], 5, 0), poses, [[0, 1, 2], [2, 3, 4]], list("abcde"),
                       passes={"albedo": albedo})
    sampler = RaySampler(data, "cpu", views=[1, 3])
    assert sampler.images.shape[0] == 2 and sampler.passes["albedo"].shape[0] == 2
    o, d, rgba, extra, photo = sampler.sample_passes(256, torch.Generator().manual_seed(0), with_photo=True)
    assert set(photo.tolist()) == {1, 3}
    for oi, di, ci, ai, cam in zip(o.numpy().astype(np.float64), d.numpy().astype(np.float64), rgba.numpy(),
                                   extra["albedo"].numpy(), photo.numpy()):
        assert np.allclose(oi, poses[cam, :3, 3], atol=1e-5)             # from the photo's own camera
        uv, _ = cameras.project((oi + 2.0 * di)[None], k, poses[cam])
        col, row = np.floor(uv[0]).astype(int)
        assert np.allclose(ci * 255, images[cam, row, col], atol=1e-3)
        assert np.allclose(ai * 255, albedo[cam, row, col], atol=1e-3)
    for bad in ([], [1, 1], [5], [-1]):
        with pytest.raises(ValueError, match="distinct photo indices below 5"):
            RaySampler(data, "cpu", views=bad)


def test_photos_of_different_sizes_load_and_only_their_own_pixels_are_drawn(tmp_path):
    """Landscape, portrait and small photos in one capture (issue 13): each keeps its size; rays
    come through its own pixel centres, every pixel equally likely, never from the padding."""
    import synthetic

    sizes = [(32, 24), (24, 32), (16, 12)]
    data = load_transforms(synthetic.write_transforms(tmp_path / "mixed", count=6, sizes=sizes))
    assert data.sizes.tolist() == [list(s) for s in sizes * 2] and data.images.shape == (6, 32, 32, 4) and not data.uniform
    assert data.image(1).shape == (32, 24, 4) and data.image(2).shape == (12, 16, 4)
    assert np.allclose(data.intrinsics[1], cameras.intrinsics_from_fov(0.7, 24, 32))
    assert (data.images[2, 12:] == 0).all() and (data.images[2, :, 16:] == 0).all()     # padding
    sampler = RaySampler(data, "cpu")
    gen = torch.Generator().manual_seed(0)
    img, y, x, o, d, rgba = sampler._draw(60_000, gen)
    w, h = torch.as_tensor(data.sizes[:, 0])[img], torch.as_tensor(data.sizes[:, 1])[img]
    assert bool(((x < w) & (y < h)).all())
    share = np.bincount(img.numpy(), minlength=6) / 60_000
    pixels = data.sizes.prod(1) / data.sizes.prod(1).sum()
    assert np.allclose(share, pixels, atol=0.01), (share, pixels)
    for i in range(0, 60_000, 6007):              # through the centre of the drawn pixel of that camera
        cam = int(img[i])
        uv, _ = cameras.project((o[i].double().numpy() + 2.0 * d[i].double().numpy())[None],
                                data.intrinsics[cam], data.poses[cam])
        assert np.allclose(uv[0], [float(x[i]) + 0.5, float(y[i]) + 0.5], atol=1e-3)
        assert np.allclose(rgba[i].numpy() * 255, data.images[cam, int(y[i]), int(x[i])], atol=1e-3)


@pytest.mark.parametrize("method", ["nerf", "sdf"])
def test_a_fit_trains_on_photos_of_different_sizes_and_keeps_each_cameras_size(tmp_path, method):
    import synthetic
    from fit_implicit.backend.export.unseen import Views
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.loop import fit

    data = load_transforms(synthetic.write_transforms(tmp_path / "mixed", count=6, sizes=[(24, 16), (12, 20)]))
    for i in range(len(data)):
        data.image(i)[..., 3] = 255                   # opaque photos: only the padding is transparent
    model = fit(data, make_config(method, "draft", device="cpu", steps=8, preview_size=16, seed=0))
    views = Views.of_run(model.meta)
    assert views.size(0) == (24, 16) and views.size(1) == (12, 20) and views.at_most(12).size(1) == (6, 10)
    if method == "sdf":
        assert model.meta["masks"] is False          # the padding is not a mask


def test_colmap_projects_load_for_the_command_line(tmp_path):
    """``fit`` and ``eval`` read a COLMAP project (binary model, COLMAP's default, or text) with
    its photos: cameras, distortion and pixels as the model and the files say."""
    import colmap_model
    from fit_implicit.backend.fitting.data import load_dataset

    colmap_model.write_model(tmp_path)                       # text model + photos in images/
    text = load_dataset(tmp_path)
    (tmp_path / "sparse" / "0" / "cameras.txt").unlink()
    (tmp_path / "sparse" / "0" / "images.txt").unlink()
    colmap_model.write_binary_model(tmp_path)
    binary = load_dataset(tmp_path / "sparse" / "0" / "cameras.bin")
    for data in (text, binary):
        assert data.images.shape == (6, 48, 64, 4) and data.names == list("abcdef")
        for i, name in enumerate("abcdef"):
            k, code, dist = colmap_model.EXPECTED_CAMERA[name]
            assert np.allclose(data.intrinsics[i], k) and data.lens_models[i] == code
            assert np.allclose(data.distortion[i], dist) and np.allclose(data.poses[i], colmap_model.expected_c2w(name))
        assert data.images[2, 10, 5].tolist() == [80, 20, 0, 255]
    half = load_dataset(tmp_path, downscale=2)
    assert half.images.shape == (6, 24, 32, 4) and np.allclose(half.intrinsics, binary.intrinsics / 2)
    (tmp_path / "images" / "c.png").unlink()
    with pytest.raises(ValueError, match="photo 'c.png' not found"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="no transforms_train.json or transforms.json in this folder"):
        load_dataset(tmp_path / "images")


def test_other_tools_keys_are_honoured_or_named(tmp_path):
    """instant-ngp's aabb_scale / scale / offset give the box ngp renders; nerfstudio's keys the fit
    cannot use are named in the notes (the command line prints them), never silently dropped."""
    poses, _ = _rig(n=3, size=(20, 16))
    _write_images(tmp_path, 3, (20, 16))
    frames = [{"file_path": f"img_{i}", "transform_matrix": p.tolist()} for i, p in enumerate(poses)]
    frames[1]["depth_file_path"] = "depth/img_1.png"
    doc = {"camera_angle_x": 0.8, "aabb_scale": 4, "scale": 0.5, "offset": [0.5, 1.0, 0.0], "frames": frames,
           "applied_transform": np.eye(4)[:3].tolist()}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    data = load_transforms(tmp_path)
    # ngp: p * 0.5 + offset inside [0.5 - 2, 0.5 + 2]^3  ->  p in [(-1.5 - o) / 0.5, (2.5 - o) / 0.5]
    assert np.allclose(data.aabb, [[-4.0, -5.0, -3.0], [4.0, 3.0, 5.0]])
    assert len(data.notes) == 2 and "'applied_transform'" in data.notes[0] and "'depth_file_path'" in data.notes[1]
    doc["scale"] = -1
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'aabb_scale' and 'scale' must be positive"):
        load_transforms(tmp_path)
