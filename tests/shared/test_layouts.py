"""LLFF (poses_bounds.npy) and IDR/NeuS (cameras_sphere.npz) captures written here from known
cameras (tests/capture_files.py), read back by shared/layouts.py and backend/fitting/data.py (issue 15)."""
import numpy as np
import pytest

import synthetic
from capture_files import write_idr, write_llff
from fit_implicit.backend.fitting.data import load_dataset
from fit_implicit.shared import cameras, layouts


def test_an_llff_capture_reads_with_its_cameras_and_photos(tmp_path):
    ks, poses = write_llff(tmp_path / "flower")
    for path in (tmp_path / "flower", tmp_path / "flower" / "images_2"):
        data = load_dataset(path)
        assert len(data) == 6 and (data.width, data.height) == (40, 30)
        assert np.allclose(data.poses, poses, atol=1e-9) and np.allclose(data.intrinsics, ks, atol=1e-9)
        assert data.names[0] == "IMG_000" and "images_2/" in data.notes[0]
        # the box holds what the cameras see between the near and far bounds: the object too
        assert (data.aabb[0] <= synthetic.aabb()[0]).all() and (data.aabb[1] >= synthetic.aabb()[1]).all()
    with pytest.raises(ValueError, match="5 photos for the 6 cameras"):
        (tmp_path / "flower" / "images_2" / "IMG_005.png").unlink()
        load_dataset(tmp_path / "flower")


def test_an_idr_capture_reads_with_masks_and_the_sphere_box(tmp_path):
    ks, poses = write_idr(tmp_path / "scan")
    data = load_dataset(tmp_path / "scan")
    assert np.allclose(data.poses, poses, atol=1e-6) and np.allclose(data.intrinsics, ks, atol=1e-6)
    assert np.allclose(data.aabb, [[-1.5] * 3, [1.5] * 3])
    want = np.stack([synthetic.render(k, p, 40, 30, ss=1)[..., 3] for k, p in zip(ks, poses)])
    assert np.array_equal(data.images[..., 3], want) and "masks from mask_2/" in data.notes[0]


def test_projections_decompose_into_the_cameras_they_came_from():
    rng = np.random.default_rng(3)
    for _ in range(20):
        c2w = cameras.look_at(rng.normal(size=3) * 4, rng.normal(size=3) * 0.2)
        k = np.array([rng.uniform(100, 900), rng.uniform(100, 900), rng.uniform(50, 400), rng.uniform(50, 300)])
        w2c = np.linalg.inv(c2w @ cameras.BLENDER_TO_OPENCV)
        p = rng.choice([-1, 1]) * rng.uniform(0.1, 10) * np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1]]) @ w2c[:3]
        got_k, got_c2w = layouts.projection_to_camera(p)
        assert np.allclose(got_k, k, rtol=1e-9) and np.allclose(got_c2w, c2w, atol=1e-9)
    with pytest.raises(ValueError, match="skewed pixels"):
        layouts.projection_to_camera(np.array([[500, 80, 100, 0], [0, 500, 100, 0], [0, 0, 1, 0]], float))


def test_bad_layouts_get_clear_errors(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "poses_bounds.npy", np.zeros((3, 12)))
    with pytest.raises(ValueError, match="expected N x 17 numbers"):
        load_dataset(tmp_path / "a")
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "cameras_sphere.npz", nothing=np.zeros(3))
    with pytest.raises(ValueError, match="no world_mat_i entries"):
        load_dataset(tmp_path / "b")
    with pytest.raises(ValueError, match="nor a COLMAP model, LLFF's poses_bounds.npy or IDR's"):
        load_dataset(tmp_path)
