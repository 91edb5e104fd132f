"""LLFF (poses_bounds.npy with images_N/) and IDR/NeuS (cameras_sphere.npz with images and
masks) captures written from known cameras (tests/synthetic.py's scene), for the readers' tests
(tests/shared/test_layouts.py) and the add-on's import (tests/addon/test_dataset_import_bpy.py)."""
import numpy as np
from PIL import Image

import synthetic
from fit_implicit.shared import cameras


def _rig(n=6, w=40, h=30):
    ks, poses = synthetic.camera_rig(n, w)
    k = cameras.intrinsics_from_fov(0.7, w, h)
    return np.repeat(k[None], n, 0), poses


def write_llff(folder, n=6, w=40, h=30, shrink=2):
    """poses_bounds.npy for full-size photos of 2w x 2h and images_2/ of w x h."""
    ks, poses = _rig(n, w, h)
    rows = []
    for k, c2w in zip(ks, poses):
        m = np.zeros((3, 5))
        m[:, 0], m[:, 1], m[:, 2], m[:, 3] = -c2w[:3, 1], c2w[:3, 0], c2w[:3, 2], c2w[:3, 3]   # down, right, back
        m[:, 4] = (h * shrink, w * shrink, k[0] * shrink)
        rows.append(np.concatenate([m.reshape(-1), [1.0, 8.0]]))
    folder.mkdir(parents=True)
    np.save(folder / "poses_bounds.npy", np.array(rows))
    (folder / f"images_{shrink}").mkdir()
    for i, (k, c2w) in enumerate(zip(ks, poses)):
        Image.fromarray(synthetic.render(k, c2w, w, h, ss=1)).save(folder / f"images_{shrink}" / f"IMG_{i:03d}.png")
    return ks, poses


def write_idr(folder, n=6, w=40, h=30, shrink=2):
    """cameras_sphere.npz at 2w x 2h, image/ folder of images_2/ and masks in mask_2/."""
    ks, poses = _rig(n, w, h)
    mats = {}
    for i, (k, c2w) in enumerate(zip(ks, poses)):
        w2c = np.linalg.inv(c2w @ cameras.BLENDER_TO_OPENCV)        # OpenCV world-to-camera
        big = np.array([[k[0] * shrink, 0, k[2] * shrink], [0, k[1] * shrink, k[3] * shrink], [0, 0, 1]])
        world = np.eye(4)
        world[:3, :4] = -3.0 * big @ w2c[:3, :4]                     # any scale, even a negative one
        mats[f"world_mat_{i}"] = world
        mats[f"scale_mat_{i}"] = np.diag([1.5, 1.5, 1.5, 1.0])
    folder.mkdir(parents=True)
    np.savez(folder / "cameras_sphere.npz", **mats)
    for sub in (f"images_{shrink}", f"mask_{shrink}"):
        (folder / sub).mkdir()
    for i, (k, c2w) in enumerate(zip(ks, poses)):
        rgba = synthetic.render(k, c2w, w, h, ss=1)
        Image.fromarray(rgba[..., :3]).save(folder / f"images_{shrink}" / f"{i:06d}.png")
        Image.fromarray(rgba[..., 3]).save(folder / f"mask_{shrink}" / f"{i:03d}.png")
    return ks, poses
