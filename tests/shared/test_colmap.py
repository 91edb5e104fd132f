"""COLMAP text and binary models (shared.colmap, numpy only) against a hand-made model (tests/colmap_model.py)."""
import numpy as np
import pytest

import colmap_model
from fit_implicit.shared import cameras, colmap


def test_hand_made_model_reads_exactly(tmp_path):
    colmap_model.write_model(tmp_path, images=False)
    folder, cams, images = colmap.read_model(tmp_path)          # finds sparse/0
    assert folder == tmp_path / "sparse" / "0"
    assert [im.name for im in images] == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    for im in images:
        stem = im.name[0]
        k, code, dist = colmap_model.EXPECTED_CAMERA[stem]
        cam = cams[im.camera_id]
        assert np.allclose(cam.intrinsics, k, rtol=0, atol=1e-12)
        assert cam.lens_model == code and np.allclose(cam.distortion, dist, rtol=0, atol=1e-12)
        assert (cam.width, cam.height) == (64, 48)
        assert np.allclose(im.c2w, colmap_model.expected_c2w(stem), rtol=0, atol=1e-6), stem


def test_poses_project_like_colmap(tmp_path):
    """A world point projects to the same pixel by COLMAP's formula (x = R X + t, u = f x/z + c)
    and through our camera-to-world matrix."""
    colmap_model.write_model(tmp_path, images=False)
    _, cams, images = colmap.read_model(tmp_path)
    rng = np.random.default_rng(0)
    for im in images:
        q = [float(v) for v in colmap_model.IMAGES_TXT.split(f" {im.camera_id} {im.name}")[0].split("\n")[-1].split()[1:8]]
        r, t = cameras.quaternion_to_matrix(*q[:4]), np.array(q[4:7])
        cam_pts = rng.uniform([-1, -1, 2], [1, 1, 4], size=(20, 3))         # in front, OpenCV frame
        world = (cam_pts - t) @ r                                            # R^T (x - t)
        fx, fy, cx, cy = cams[im.camera_id].intrinsics
        want = np.stack([fx * cam_pts[:, 0] / cam_pts[:, 2] + cx, fy * cam_pts[:, 1] / cam_pts[:, 2] + cy], -1)
        got, depth = cameras.project(world, cams[im.camera_id].intrinsics, im.c2w)
        assert np.allclose(got, want, atol=1e-9) and np.allclose(depth, cam_pts[:, 2])


@pytest.mark.parametrize("cameras_txt,images_txt,text", [
    ("1 FOV 64 48 50 32 24 0.1\n", None, "FOV' is not supported"),
    ("1 PINHOLE 64 48 50 32 24\n", None, "PINHOLE needs 4 parameters, got 3"),
    ("1 PINHOLE 64 48 50 nan 32 24\n", None, "NaN"),
    ("1 PINHOLE 64 48 -50 50 32 24\n", None, "focal lengths must be positive"),
    ("1 PINHOLE 0 48 50 50 32 24\n", None, "image size 0 x 48"),
    ("1 PINHOLE sixty 48 50 50 32 24\n", None, "expected numbers"),
    ("# nothing\n", None, "no cameras"),
    (None, "1 1 0 0 0 0 0 5 9 x.png\n\n", "uses camera 9, which cameras.txt does not list"),
    (None, "1 0 0 0 0 0 0 5 1 x.png\n\n", "no direction"),
    (None, "1 1 0 0 0 0 0 5\n", "expected IMAGE_ID"),
])
def test_bad_models_get_clear_errors(tmp_path, cameras_txt, images_txt, text):
    colmap_model.write_model(tmp_path, images=False)
    model = tmp_path / "sparse" / "0"
    if cameras_txt is not None:
        (model / "cameras.txt").write_text(cameras_txt)
    if images_txt is not None:
        (model / "images.txt").write_text(images_txt)
    with pytest.raises(ValueError, match=text):
        colmap.read_model(tmp_path)


def test_binary_model_reads_as_the_text_one(tmp_path):
    colmap_model.write_model(tmp_path / "text", images=False)
    colmap_model.write_binary_model(tmp_path / "bin")
    _, cams_t, images_t = colmap.read_model(tmp_path / "text")
    folder, cams_b, images_b = colmap.read_model(tmp_path / "bin")
    assert folder == tmp_path / "bin" / "sparse" / "0"
    assert [im.name for im in images_b] == [im.name for im in images_t]
    for a, b in zip(images_t, images_b):
        assert a.camera_id == b.camera_id and np.allclose(a.c2w, b.c2w, rtol=0, atol=1e-12)
        ca, cb = cams_t[a.camera_id], cams_b[b.camera_id]
        assert (ca.model, ca.width, ca.height, ca.lens_model) == (cb.model, cb.width, cb.height, cb.lens_model)
        assert np.array_equal(ca.intrinsics, cb.intrinsics) and np.array_equal(ca.distortion, cb.distortion)


def test_bad_binary_models_get_clear_errors(tmp_path):
    import struct
    model = colmap_model.write_binary_model(tmp_path)
    good_images = (model / "images.bin").read_bytes()
    (model / "images.bin").write_bytes(good_images[:-30])
    with pytest.raises(ValueError, match="images.bin: ends at byte .* inside a record"):
        colmap.read_model(tmp_path)
    (model / "images.bin").write_bytes(struct.pack("<Q", 10 ** 12))
    with pytest.raises(ValueError, match="says 1000000000000 records, more than the file holds"):
        colmap.read_model(tmp_path)
    (model / "images.bin").write_bytes(good_images)
    (model / "cameras.bin").write_bytes(struct.pack("<QiiQQ5d", 1, 1, 7, 64, 48, 50, 32, 24, 0.1, 0))
    with pytest.raises(ValueError, match="camera 1 has model FOV .supported: SIMPLE_PINHOLE"):
        colmap.read_model(tmp_path)


def test_missing_model(tmp_path):
    with pytest.raises(ValueError, match="no COLMAP model here"):
        colmap.read_model(tmp_path)


def test_find_image_stays_inside_the_dataset(tmp_path):
    model = colmap_model.write_model(tmp_path)
    assert colmap.find_image(model, "a.png") == tmp_path / "images" / "a.png"
    (tmp_path / "secret.png").write_bytes(b"x")
    assert colmap.find_image(model, "../secret.png") is None
    assert colmap.find_image(model, str(tmp_path / "secret.png")) is None
    assert colmap.find_image(model, "zzz.png") is None


@pytest.mark.parametrize("binary", [False, True])
def test_sparse_points_read_in_both_encodings(tmp_path, binary):
    colmap_model.write_points(tmp_path, binary=binary)
    xyz, rgb, err = colmap.read_points(tmp_path)
    assert np.array_equal(xyz, [p[1] for p in colmap_model.POINTS]) and xyz.dtype == np.float64
    assert np.array_equal(rgb, [p[2] for p in colmap_model.POINTS]) and rgb.dtype == np.uint8
    assert np.array_equal(err, [p[3] for p in colmap_model.POINTS])
    assert colmap.read_points(tmp_path / "nowhere") is None


def test_bad_sparse_points_get_clear_errors(tmp_path):
    colmap_model.write_points(tmp_path, binary=True)
    data = (tmp_path / "points3D.bin").read_bytes()
    (tmp_path / "points3D.bin").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"points3D.bin: .*(truncated|more than the file holds)"):
        colmap.read_points(tmp_path)
    (tmp_path / "points3D.bin").unlink()
    for line, want in [("1 0 0 nan 1 2 3 0.5", "NaN or infinite"), ("1 0 0 0 1 2 300 0.5", "outside 0-255"),
                       ("1 0 0 0 1 2 3 0.5 7", "pairs"), ("1 a 0 0 1 2 3 0.5", "not numbers")]:
        (tmp_path / "points3D.txt").write_text(line + "\n")
        with pytest.raises(ValueError, match=f"points3D.txt:1: .*{want}"):
            colmap.read_points(tmp_path)
