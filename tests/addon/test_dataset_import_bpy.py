"""Photo datasets into real Blender (bpy wheel, headless): COLMAP text models and transforms.json
with lens models, per-frame intrinsics and masks; then the photos back out as fit inputs."""
import json

import numpy as np
import pytest

import colmap_model
from bpy_helpers import fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]


def _imported():
    import bpy
    from fit_implicit.blender_addon import dataset_io
    return sorted((ob for ob in bpy.data.collections[dataset_io.IMPORT_COLLECTION].objects if ob.type == "CAMERA"),
                  key=lambda o: o.name)


def test_colmap_import_matches_the_hand_made_model(tmp_path, addon):
    import bpy
    from fit_implicit.blender_addon import capture, dataset_io
    colmap_model.write_model(tmp_path)
    scene = fresh_scene(width=7, height=5)
    assert bpy.ops.implicit.import_colmap(directory=str(tmp_path)) == {"FINISHED"}
    cams = _imported()
    assert [ob.name for ob in cams] == list("abcdef")
    assert (scene.render.resolution_x, scene.render.resolution_y) == (64, 48)
    k, poses = capture.camera_arrays(cams, scene)
    for ob, ki, pose in zip(cams, k, poses):
        want_k, code, dist = colmap_model.EXPECTED_CAMERA[ob.name]
        # Blender keeps camera settings and matrices in float32: 1e-6 relative / absolute.
        assert np.allclose(ki, want_k, rtol=1e-6, atol=0), (ob.name, ki)
        assert np.allclose(pose, colmap_model.expected_c2w(ob.name), rtol=0, atol=1e-6), ob.name
        assert dataset_io.camera_lens(ob)[0] == code
        assert np.allclose(dataset_io.camera_lens(ob)[1], dist, atol=1e-12)
        assert ob.data.show_background_images
        assert bpy.path.abspath(ob.data.background_images[0].image.filepath).endswith(f"images/{ob.name}.png")
    # The photos come back as fit inputs, distortion included.
    views = dataset_io.photo_views(cams, scene)
    assert views["images"].shape == (6, 48, 64, 4) and views["images"].dtype == np.uint8
    assert views["images"][2, 10, 5].tolist() == [80, 20, 0, 255]        # image c: red 40*2, green 4*x
    assert np.allclose(views["intrinsics"], k) and views["lens_models"].tolist() == [0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_sparse_points_come_in_as_a_point_cloud_in_the_cameras_frame(tmp_path, addon, binary):
    import bpy
    from fit_implicit.blender_addon import dataset_io
    model = colmap_model.write_binary_model(tmp_path) if binary else colmap_model.write_model(tmp_path)
    colmap_model.write_points(model, binary=binary)
    fresh_scene()
    assert bpy.ops.implicit.import_colmap(directory=str(tmp_path)) == {"FINISHED"}
    ob = bpy.data.objects["COLMAP Points"]
    assert ob.users_collection[0].name == dataset_io.IMPORT_COLLECTION and len(_imported()) == 6
    co = np.empty(3 * len(ob.data.vertices), np.float32)
    ob.data.vertices.foreach_get("co", co)
    assert np.allclose(co.reshape(-1, 3), [p[1] for p in colmap_model.POINTS]) and ob.matrix_world == ob.matrix_world.Identity(4)
    rgba = np.empty(4 * 3, np.float32)
    ob.data.color_attributes["Col"].data.foreach_get("color_srgb", rgba)
    assert np.allclose(rgba.reshape(-1, 4)[:, :3] * 255, [p[2] for p in colmap_model.POINTS], atol=0.5)
    err = np.empty(3, np.float32)
    ob.data.attributes[dataset_io.POINTS_ERROR].data.foreach_get("value", err)
    assert np.allclose(err, [p[3] for p in colmap_model.POINTS])
    # ... and not when asked not to
    fresh_scene()
    assert bpy.ops.implicit.import_colmap(directory=str(tmp_path), points=False) == {"FINISHED"}
    assert "COLMAP Points" not in bpy.data.objects


def test_colmap_errors_reach_the_user(tmp_path, addon):
    import bpy
    fresh_scene()
    with pytest.raises(RuntimeError, match="no COLMAP model here"):
        bpy.ops.implicit.import_colmap(directory=str(tmp_path))
    model = colmap_model.write_model(tmp_path, images=False)
    (model / "cameras.txt").write_text("1 FULL_OPENCV 64 48 50 50 32 24 0 0 0 0 0 0 0 0\n")
    with pytest.raises(RuntimeError, match="FULL_OPENCV' is not supported"):
        bpy.ops.implicit.import_colmap(directory=str(tmp_path))


def _write_photo(path, rgb, alpha=None):
    from PIL import Image
    img = np.dstack([rgb, alpha]) if alpha is not None else rgb
    Image.fromarray(img.astype(np.uint8)).save(path)


def test_transforms_lens_models_masks_and_per_frame_intrinsics(tmp_path, addon):
    import bpy
    from fit_implicit.blender_addon import capture, dataset_io
    scene = fresh_scene()
    rng = np.random.default_rng(1)
    masks = []
    for i in range(3):
        _write_photo(tmp_path / f"p{i}.jpg", rng.integers(0, 255, (20, 30, 3)))
        masks.append((rng.random((20, 30)) > 0.5).astype(np.uint8) * 255)
        _write_photo(tmp_path / f"p{i}_mask.png", masks[-1])
    c2w = [np.eye(4) for _ in range(3)]
    for i, m in enumerate(c2w):
        m[:3, 3] = (i, 0.5, 3.0)
    doc = {"camera_model": "OPENCV", "k1": -0.1, "k2": 0.02, "p1": 0.001, "p2": -0.001,
           "fl_x": 40.0, "fl_y": 40.0, "cx": 15.0, "cy": 10.0, "w": 30, "h": 20,
           "frames": [
               {"file_path": "p0.jpg", "mask_path": "p0_mask.png", "transform_matrix": c2w[0].tolist()},
               {"file_path": "p1", "mask_path": "p1_mask.png", "transform_matrix": c2w[1].tolist(),
                "camera_model": "OPENCV_FISHEYE", "k1": 0.02, "k2": 0.0, "k3": 0.001, "k4": 0.0,
                "fl_x": 36.0, "fl_y": 36.0, "cx": 14.5, "cy": 10.5},
               {"file_path": "p2.jpg", "mask_path": "p2_mask.png", "transform_matrix": c2w[2].tolist(),
                "camera_model": "PINHOLE"}]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    assert bpy.ops.implicit.import_transforms(filepath=str(tmp_path / "transforms.json")) == {"FINISHED"}
    cams = _imported()
    k, poses = capture.camera_arrays(cams, scene)
    assert np.allclose(k, [[40, 40, 15, 10], [36, 36, 14.5, 10.5], [40, 40, 15, 10]], rtol=1e-6)
    assert np.allclose(poses, c2w, atol=1e-6)
    lenses = [dataset_io.camera_lens(ob) for ob in cams]
    assert [code for code, _ in lenses] == [1, 2, 0]
    assert np.allclose(lenses[0][1], [-0.1, 0.02, 0, 0, 0.001, -0.001])
    assert np.allclose(lenses[1][1], [0.02, 0.0, 0.001, 0.0, 0, 0]) and not lenses[2][1].any()
    views = dataset_io.photo_views(cams, scene)
    assert np.array_equal(views["images"][..., 3], np.stack(masks))          # masks became alpha
    assert views["distortion"].shape == (3, 6) and views["lens_models"].tolist() == [1, 2, 0]


def test_photos_of_different_sizes_and_shapes_are_fitted_with_their_own_cameras(tmp_path, addon):
    """A landscape and a portrait photo (issue 13): Blender has one resolution a scene, so the
    cameras are drawn approximately, but the fit gets each photo at its size with its own
    fx, fy, cx, cy, and a Submit that says the sizes."""
    import bpy
    from fit_implicit.blender_addon import capture, dataset_io
    scene = fresh_scene()
    _write_photo(tmp_path / "wide.png", np.full((20, 30, 3), 90))
    _write_photo(tmp_path / "tall.png", np.full((30, 20, 3), 160))
    frames = [{"file_path": "wide.png", "transform_matrix": np.eye(4).tolist(),
               "fl_x": 40.0, "fl_y": 40.0, "cx": 15.0, "cy": 10.0, "w": 30, "h": 20},
              {"file_path": "tall.png", "transform_matrix": np.eye(4).tolist(),
               "fl_x": 42.0, "fl_y": 42.0, "cx": 10.5, "cy": 14.0, "w": 20, "h": 30}]
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": frames}))
    assert bpy.ops.implicit.import_transforms(filepath=str(tmp_path / "transforms.json")) == {"FINISHED"}
    cams = [bpy.data.objects["wide"], bpy.data.objects["tall"]]
    views = dataset_io.photo_views(cams, scene)
    assert views["images"].shape == (2, 30, 30, 4) and views["image_sizes"].tolist() == [[30, 20], [20, 30]]
    assert np.allclose(views["intrinsics"], [[40, 40, 15, 10], [42, 42, 10.5, 14]], rtol=1e-6)
    assert (views["images"][0, :20, :30, 0] == 90).all() and (views["images"][0, 20:] == 0).all()
    submit = capture.build_submit(views["images"], views["intrinsics"], np.stack([np.eye(4)] * 2),
                                  [[-1, -1, -1], [1, 1, 1]], image_sizes=views["image_sizes"])
    assert submit.image_sizes.tolist() == [[30, 20], [20, 30]]
    cams[1].data.lens *= 1.5                       # the artist changed a lens: Blender's camera wins
    k = dataset_io.photo_views(cams, scene)["intrinsics"][1]
    assert abs(k[0] - 42.0) > 5.0, k


def test_instant_ngp_fisheye_flag_and_unsupported_model(tmp_path, addon):
    import bpy
    from fit_implicit.blender_addon import dataset_io
    fresh_scene()
    _write_photo(tmp_path / "a.png", np.zeros((8, 8, 3)))
    frame = {"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}
    doc = {"camera_angle_x": 1.2, "is_fisheye": True, "k1": 0.01, "frames": [frame]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    created, _ = dataset_io.import_transforms(bpy.context.scene, str(tmp_path / "transforms.json"))
    assert dataset_io.camera_lens(created[0])[0] == 2
    doc = {"camera_angle_x": 1.2, "camera_model": "EQUIRECTANGULAR", "frames": [frame]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(RuntimeError, match="EQUIRECTANGULAR' is not supported"):
        bpy.ops.implicit.import_transforms(filepath=str(tmp_path / "transforms.json"))


def test_photo_views_name_the_camera_without_a_photo(tmp_path, addon):
    import bpy
    from fit_implicit.blender_addon import dataset_io
    scene = fresh_scene()
    _write_photo(tmp_path / "a.png", np.zeros((8, 8, 3)))
    doc = {"camera_angle_x": 1.0, "frames": [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    created, _ = dataset_io.import_transforms(scene, str(tmp_path / "transforms.json"))
    (tmp_path / "a.png").unlink()
    with pytest.raises(dataset_io.DatasetError, match="Camera 'a' has no photo"):
        dataset_io.photo_views(created, scene)


@pytest.mark.parametrize("kind", ["llff", "idr"])
def test_llff_and_neus_captures_come_in_as_cameras_whose_photos_fit_exactly(tmp_path, addon, kind):
    """Issue 15 (any layout): the add-on's import of the two layouts, photos and masks back as fit inputs
    with the capture's own cameras."""
    import bpy
    from capture_files import write_idr, write_llff
    from fit_implicit.blender_addon import capture, dataset_io
    ks, poses = (write_llff if kind == "llff" else write_idr)(tmp_path / "cap")
    scene = fresh_scene()
    assert bpy.ops.implicit.import_capture(directory=str(tmp_path / "cap")) == {"FINISHED"}
    cams = _imported()
    assert len(cams) == 6 and (scene.render.resolution_x, scene.render.resolution_y) == (40, 30)
    k, c2w = capture.camera_arrays(cams, scene)
    assert np.allclose(k, ks, rtol=1e-5) and np.allclose(c2w, poses, atol=1e-5)
    views = dataset_io.photo_views(cams, scene)
    assert views["images"].shape == (6, 30, 40, 4) and np.allclose(views["intrinsics"], ks, rtol=1e-5)
    if kind == "idr":                     # masks became alpha
        assert (views["images"][..., 3] < 255).any() and (views["images"][..., 3] > 0).any()
    with pytest.raises(RuntimeError, match="neither an LLFF capture"):
        bpy.ops.implicit.import_capture(directory=str(tmp_path))
