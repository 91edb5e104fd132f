"""NeRF datasets in and out: ``transforms.json`` (instant-ngp / nerfstudio fields) with the
BlenderNeRF / NeRF-synthetic layout.

Export writes, in a folder::

    transforms_train.json   frames of the training cameras   (file_path "train/r_000", no extension)
    transforms_test.json    frames of the held-out cameras   (file_path "test/r_000")
    transforms.json         all frames, file_path with ".png", plus nerfstudio's
                            train_filenames / test_filenames split
    train/r_000.png ...     RGBA renders (transparent film), test/r_000.png ...

Every frame carries its own fl_x, fl_y, cx, cy, w, h, camera_angle_x, camera_angle_y (from
shared.cameras.blender_intrinsics: exact for every sensor fit, lens shift and pixel aspect);
the file's top level repeats the first camera's, for readers that only look there.
``transform_matrix`` is the rigid camera-to-world in Blender's / OpenGL's convention.

Import reads transforms.json (global or per-frame intrinsics, lens model and distortion, masks)
or a COLMAP text model (shared.colmap) and makes cameras whose Blender intrinsics give them back
(shared.cameras.blender_camera_from_intrinsics), with the images as camera backgrounds;
:func:`photo_views` turns those cameras' photos (masks as alpha) into fit inputs.
Main thread only; no torch here.  shared/transforms.py parses transforms.json (frames,
intrinsics, lens) for this import and for the backend's reader (backend/fitting/data.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

from . import capture
from ._shared import cameras, colmap, layouts, protocol, transforms
from .importer import ensure_collection

IMPORT_COLLECTION = "Implicit Dataset"
INTRINSIC_KEYS = transforms.INTRINSIC_KEYS
EXTRA_KEYS = (*transforms.LENS_KEYS, "mask_path")


class DatasetError(Exception):
    """The dataset cannot be read or written; the text tells the user why."""


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def frame_fields(intrinsics, width: int, height: int) -> dict:
    """The per-frame intrinsics keys of a transforms file."""
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    ax, ay = cameras.fov_angles(intrinsics, width, height)
    return {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": int(width), "h": int(height),
            "camera_angle_x": ax, "camera_angle_y": ay}


def _doc(frames: list, aabb) -> dict:
    doc = {}
    if frames:
        doc.update({k: frames[0][k] for k in INTRINSIC_KEYS})
        doc.update({"camera_model": "OPENCV", "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0})
    if aabb is not None:
        doc["aabb"] = np.asarray(aabb, dtype=np.float64).tolist()
    doc["frames"] = frames
    return doc


def export_dataset(scene, view_layer, folder: str, *, camera_objects=None, render: bool = True,
                   aabb=None, progress=None, passes: bool = False, over_time: str = "STILL",
                   frame_range=None, test_frame_range=None) -> dict:
    """Write the scene's cameras (+ renders) as a transforms.json dataset in ``folder``.

    Args:
        camera_objects: cameras to export (default: every renderable camera of the view layer,
            held-out ones included: they go to the test split).
        render: render every camera (capture's settings: RGBA PNG, transparent film); False
            writes the json files only.
        aabb: (2, 3) world box written as "aabb"; None: the padded box of the visible geometry
            (left out if there is none).
        progress: ``progress(i, n)`` after each render.
        passes: also render albedo / normal / depth / roughness passes (Cycles) and name their
            files in each frame (albedo_path, normal_path, depth_path, roughness_path: see
            backend/fitting/data.py).
        over_time: capture.OVER_TIME: all but STILL export the frame range (``frame_range``, None:
            the scene's) as a dataset over time, D-NeRF's layout: each frame with its ``time`` in
            [0, 1]; the training cameras as ``over_time`` says, the held-out ones one a frame in turn
            over ``test_frame_range`` (None: the same frames; other frames: instants no training
            view shows, as D-NeRF's test splits).  Instants are measured over ``frame_range``.
    Returns:
        {"train": n_train, "test": n_test, "files": [written json paths]}.
    Raises:
        DatasetError / capture.CaptureError with a message for the user.
    """
    cams = list(camera_objects) if camera_objects is not None else capture.scene_cameras(
        view_layer, include_holdout=True)
    if not cams:
        raise DatasetError("The scene has no cameras to export: add cameras or a camera rig.")
    capture.check_perspective(cams)
    w, h = capture.render_size(scene)
    if w < 1 or h < 1:
        raise DatasetError(f"The render size {w} x {h} is empty: check the output resolution.")
    if aabb is None:
        try:
            aabb = capture.padded_aabb(capture.world_bbox(
                capture.target_objects(view_layer, selected_only=False), view_layer.depsgraph))
        except capture.CaptureError:
            aabb = None
    root = Path(folder)
    splits = {"train": [ob for ob in cams if not capture.is_holdout(ob)],
              "test": [ob for ob in cams if capture.is_holdout(ob)]}
    at = {split: [None] * len(obs) for split, obs in splits.items()}      # the scene frame of each view
    if over_time != "STILL":
        for split, mode, frames_of in (("train", over_time, frame_range), ("test", "IN_TURN", test_frame_range)):
            if splits[split]:
                splits[split], at[split] = capture.views_over_time(splits[split], at[split], mode, scene,
                                                                   frames_of or frame_range)
    # each view's instant, measured over the training frames' range (raises for a single frame)
    instants = {split: capture.frame_times(frames, scene, frame_range)[0] if over_time != "STILL" else frames
                for split, frames in at.items()}
    total, done = sum(len(obs) for obs in splits.values()), 0
    all_frames, names = [], {"train": [], "test": []}
    files = []
    current = scene.frame_current
    for split, obs in splits.items():
        frames = []
        if render and obs:
            (root / split).mkdir(parents=True, exist_ok=True)
        for i, ob in enumerate(obs):
            stem = f"{split}/r_{i:03d}"
            if at[split][i] is not None and at[split][i] != scene.frame_current:
                scene.frame_set(at[split][i])
            pass_keys = {}
            if render and passes:
                pass_keys = capture.export_view_with_passes(scene, view_layer, ob, str(root), stem)
                done += 1
            elif render:
                capture.render_view(scene, ob, str(root / f"{stem}.png"))
                done += 1
                if progress is not None:
                    progress(done, total)
            k = capture.camera_intrinsics(ob, scene)
            frame = {"file_path": stem, "camera": ob.name, **frame_fields(k, w, h),
                     "transform_matrix": capture.camera_pose(ob).tolist(), **pass_keys}
            if at[split][i] is not None:     # D-NeRF's instant in [0, 1] (shared/transforms.py TIME_KEY)
                frame["time"] = instants[split][i]
                frame["frame"] = at[split][i]
            frames.append(frame)
            all_frames.append({**frame, "file_path": f"{stem}.png"})
            names[split].append(f"{stem}.png")
        if obs or split == "train":
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"transforms_{split}.json"
            path.write_text(json.dumps(_doc(frames, aabb), indent=2))
            files.append(str(path))
    if scene.frame_current != current:
        scene.frame_set(current)
    combined = _doc(all_frames, aabb)
    combined["train_filenames"] = names["train"]
    combined["val_filenames"] = names["test"]
    combined["test_filenames"] = names["test"]
    path = root / "transforms.json"
    path.write_text(json.dumps(combined, indent=2))
    files.append(str(path))
    return {"train": len(splits["train"]), "test": len(splits["test"]), "files": files}


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def _image_size(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    img = bpy.data.images.load(str(path), check_existing=True)
    w, h = img.size
    return (int(w), int(h)) if w and h else None


def read_transforms(path: str) -> tuple[Path, list[dict], dict]:
    """(file, frames with merged keys + "name" + "c2w" + "image", top-level dict).  ``path``: the
    file or a folder holding transforms.json / transforms_train.json."""
    try:
        file, raw, doc = transforms.read(path, ("transforms.json", "transforms_train.json"),
                                         INTRINSIC_KEYS + EXTRA_KEYS)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    out = []
    for f in raw:
        meta = dict(f.meta, name=f.name, c2w=f.c2w, image=f.image)
        if "mask_path" in meta:
            mask = transforms.resolve_image(file.parent, str(meta["mask_path"]))
            meta["mask_path"] = str(mask) if mask is not None else str(meta["mask_path"])
        out.append(meta)
    return file, out, doc


@dataclass
class View:
    """One photo's camera, from any dataset format, before it becomes a Blender camera.

    ``intrinsics`` (4,) fx, fy, cx, cy in pixels of a ``width`` x ``height`` image; ``c2w`` (4, 4)
    rigid camera-to-world (Blender convention); ``lens_model`` a shared.cameras code with
    ``distortion`` (6,) k1 k2 k3 k4 p1 p2; ``props`` extra custom properties for the camera data.
    """

    name: str
    c2w: np.ndarray
    intrinsics: np.ndarray
    width: int
    height: int
    image: Path | None = None
    mask: Path | None = None
    lens_model: int = 0
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(6))
    props: dict = field(default_factory=dict)


def import_transforms(scene, path: str, *, collection_name: str = IMPORT_COLLECTION,
                      backgrounds: bool = True, set_resolution: bool = True) -> tuple[list, list[str]]:
    """Cameras (and background images) from a transforms.json (see :func:`create_cameras`).

    Intrinsics: global or per-frame fl_x/fl_y/cx/cy/w/h or camera_angle_x/y.  Lens: camera_model
    (PINHOLE, OPENCV, OPENCV_FISHEYE; instant-ngp's is_fisheye) with k1..k4, p1, p2.  mask_path:
    the mask that becomes the image's alpha when the photos are fitted (:func:`photo_views`).
    The file's own keys are also kept as custom properties on the camera data.
    Returns:
        (camera objects in file order, warnings for the user).
    """
    file, frames, _doc_ = read_transforms(path)
    views = []
    for f in frames:
        size = transforms.declared_size(f) or _image_size(f["image"])
        if size is None:
            raise DatasetError(f"{file}: frame {f['name']!r} gives no w/h and its image is missing")
        try:
            model, coeffs = transforms.frame_lens(f)
        except ValueError as exc:
            raise DatasetError(f"{file}: frame {f['name']!r}: {exc}") from None
        k = transforms.frame_intrinsics(f, *size)
        if k is None:
            raise DatasetError("a frame has no intrinsics (need fl_x or camera_angle_x)")
        mask = f.get("mask_path")
        views.append(View(name=f["name"], c2w=f["c2w"], intrinsics=k, width=size[0],
                          height=size[1], image=f["image"], mask=Path(mask) if mask else None,
                          lens_model=model, distortion=coeffs,
                          props={key: f[key] for key in EXTRA_KEYS if key in f}))
    return create_cameras(scene, views, collection_name=collection_name, backgrounds=backgrounds,
                          set_resolution=set_resolution)


def import_colmap(scene, path: str, *, image_dir: str | None = None, collection_name: str = IMPORT_COLLECTION,
                  backgrounds: bool = True, set_resolution: bool = True, points: bool = True) -> tuple[list, list[str]]:
    """Cameras (and background images) from a COLMAP model (cameras + images, .txt or .bin, in
    ``path``, or in its sparse/0); images from ``image_dir`` or the model's images/ folder.
    Cameras are named after the image files, in name order.  See :func:`create_cameras`.
    ``points``: the model's sparse points3D too, as a point cloud object (:func:`import_points`)."""
    try:
        folder, cams, images = colmap.read_model(path)
        cloud = colmap.read_points(folder) if points else None
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    views = []
    for im in images:
        cam = cams[im.camera_id]
        views.append(View(name=Path(im.name).stem or f"image_{im.image_id}", c2w=im.c2w,
                          intrinsics=cam.intrinsics, width=cam.width, height=cam.height,
                          image=colmap.find_image(folder, im.name, image_dir), lens_model=cam.lens_model,
                          distortion=cam.distortion,
                          props={"colmap_model": cam.model, "colmap_image_id": im.image_id,
                                 "colmap_camera_id": im.camera_id}))
    created, warnings = create_cameras(scene, views, collection_name=collection_name, backgrounds=backgrounds,
                                       set_resolution=set_resolution)
    if cloud is not None and len(cloud[0]):
        import_points(scene, *cloud, collection_name=collection_name)
    return created, warnings


def import_capture(scene, path: str, *, collection_name: str = IMPORT_COLLECTION, backgrounds: bool = True,
                   set_resolution: bool = True) -> tuple[list, list[str]]:
    """Cameras (and background images) of an LLFF capture (poses_bounds.npy with images_N/) or
    an IDR/NeuS one (cameras_sphere.npz with image(s)_N/ and masks), read by shared/layouts.py:
    ``path`` is the capture's folder or one of its photo folders.  See :func:`create_cameras`."""
    try:
        layout = layouts.read(path)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    if layout is None:
        raise DatasetError(f"{path}: neither an LLFF capture ({layouts.LLFF_FILE}) nor an IDR/NeuS one "
                           f"({layouts.IDR_FILE})")
    views = []
    for v in layout.views:
        size = _image_size(v.image)
        if size is None:
            raise DatasetError(f"Could not read the image {v.image}")
        k = v.intrinsics if v.size is None else v.intrinsics * np.array([size[0] / v.size[0], size[1] / v.size[1]] * 2)
        views.append(View(name=v.name, c2w=v.c2w, intrinsics=k, width=size[0], height=size[1], image=v.image,
                          mask=v.mask))
    created, warnings = create_cameras(scene, views, collection_name=collection_name, backgrounds=backgrounds,
                                       set_resolution=set_resolution)
    return created, list(layout.notes) + warnings


POINTS_ERROR = "implicit_reprojection_error"     # the per-point attribute of an imported point cloud


def import_points(scene, xyz: np.ndarray, rgb: np.ndarray, error: np.ndarray | None = None, *,
                  name: str = "COLMAP Points", collection_name: str = IMPORT_COLLECTION):
    """A point cloud object (a mesh of vertices only) in the cameras' world frame: colour
    attribute "Col" (sRGB bytes, the photos' colours) and, when given, the reprojection error in
    pixels as a float attribute; shown as points in the viewport.  Returns the object."""
    from .importer import ensure_collection

    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(xyz))
    mesh.vertices.foreach_set("co", np.ascontiguousarray(xyz, np.float32).reshape(-1))
    col = mesh.color_attributes.new("Col", "BYTE_COLOR", "POINT")
    rgba = np.concatenate([np.asarray(rgb, np.float32) / 255.0, np.ones((len(xyz), 1), np.float32)], axis=1)
    col.data.foreach_set("color_srgb", rgba.reshape(-1))
    if error is not None:
        att = mesh.attributes.new(POINTS_ERROR, "FLOAT", "POINT")
        att.data.foreach_set("value", np.asarray(error, np.float32))
    mesh.update()
    ob = bpy.data.objects.new(name, mesh)
    ensure_collection(scene, collection_name).objects.link(ob)
    return ob


def create_cameras(scene, views: list[View], *, collection_name: str = IMPORT_COLLECTION,
                   backgrounds: bool = True, set_resolution: bool = True) -> tuple[list, list[str]]:
    """Blender cameras whose intrinsics and poses are the views', with their photos as camera
    background images.

    The scene's resolution and pixel aspect are set from the first view (they are per scene in
    Blender); every camera gets the sensor fit, lens and shift that reproduce its fx, fy, cx, cy.
    Each camera's data keeps ``implicit_image``, ``implicit_mask``, ``implicit_lens_model``
    (a LENS_MODELS name) and ``implicit_distortion`` (k1 k2 k3 k4 p1 p2): Blender cameras have no
    lens distortion, so it is honoured when the photos are fitted, not in Blender's views.
    Returns:
        (camera objects in view order, warnings for the user).
    """
    if not views:
        raise DatasetError("The dataset has no cameras.")
    warnings: list[str] = []
    sizes = [(v.width, v.height) for v in views]
    w0, h0 = sizes[0]
    k = np.array([v.intrinsics * np.array([w0 / s[0], h0 / s[1], w0 / s[0], h0 / s[1]])
                  for v, s in zip(views, sizes)])
    if any(s != sizes[0] for s in sizes):
        warnings.append(f"Images of several sizes: all cameras use {w0} x {h0} (intrinsics rescaled).")
    par = k[:, 0] / k[:, 1]
    if np.ptp(par) > 1e-6 * par[0]:
        warnings.append("Frames differ in pixel aspect (fl_x / fl_y): the first frame's is used.")
    first = cameras.blender_camera_from_intrinsics(k[0], w0, h0)
    if set_resolution:
        r = scene.render
        r.resolution_x, r.resolution_y, r.resolution_percentage = w0, h0, 100
        r.pixel_aspect_x, r.pixel_aspect_y = first.pixel_aspect_x, first.pixel_aspect_y
    positions = np.array([v.c2w[:3, 3] for v in views])
    extent = float(np.ptp(positions, axis=0).max()) if len(views) > 1 else 1.0
    coll = ensure_collection(scene, collection_name)
    created = []
    for v, ki in zip(views, k):
        kk = np.array([ki[0], ki[0] / par[0], ki[2], ki[3]]) if abs(ki[0] / ki[1] - par[0]) > 1e-9 else ki
        bc = cameras.blender_camera_from_intrinsics(kk, w0, h0)
        data = bpy.data.cameras.new(v.name)
        data.type = "PERSP"
        data.sensor_width, data.sensor_height, data.sensor_fit = bc.sensor_width, bc.sensor_height, bc.sensor_fit
        data.lens, data.shift_x, data.shift_y = bc.lens, bc.shift_x, bc.shift_y
        data.clip_start = max(1e-3 * extent, 1e-4)
        data.clip_end = max(100.0, 20.0 * extent)
        for key, value in v.props.items():
            data[key] = value if isinstance(value, (int, float, str)) else str(value)
        for key, value in zip(("fl_x", "fl_y", "cx", "cy"), ki):
            data[f"implicit_{key}"] = float(value)
        # The photo's own camera, exactly (Blender has one resolution a scene, so a photo of another
        # size or shape is drawn approximately); photo_views uses it while the lens is as built.
        data["implicit_photo_k"] = [float(x) for x in v.intrinsics]
        data["implicit_photo_size"] = [int(v.width), int(v.height)]
        data["implicit_built_k"] = [float(x) for x in kk]
        data["implicit_built_size"] = [int(w0), int(h0)]
        data["implicit_lens_model"] = cameras.LENS_MODELS[v.lens_model]
        data["implicit_distortion"] = [float(c) for c in v.distortion]
        if v.mask is not None:
            data["implicit_mask"] = str(v.mask)
        if v.image is not None:
            data["implicit_image"] = str(v.image)
            if backgrounds:
                img = bpy.data.images.load(str(v.image), check_existing=True)
                bg = data.background_images.new()
                bg.image = img
                bg.frame_method = "STRETCH"
                bg.alpha = 1.0
                data.show_background_images = True
        else:
            warnings.append(f"No image found for {v.name!r}.")
        ob = bpy.data.objects.new(v.name, data)
        ob.matrix_world = Matrix(v.c2w.tolist())
        coll.objects.link(ob)
        created.append(ob)
    if created and scene.camera is None:
        scene.camera = created[0]
    return created, warnings


# --------------------------------------------------------------------------------------------
# Photos of imported cameras -> arrays for a fit
# --------------------------------------------------------------------------------------------
def camera_lens(camera_object) -> tuple[int, np.ndarray]:
    """(lens model code, (6,) float64 k1 k2 k3 k4 p1 p2) kept on an imported camera (PINHOLE,
    zeros for any other camera)."""
    data = camera_object.data
    name = str(data.get("implicit_lens_model", "PINHOLE"))
    coeffs = np.zeros(6)
    if "implicit_distortion" in data:
        coeffs = np.array([float(c) for c in data["implicit_distortion"]], dtype=np.float64)[:6]
    code = cameras.lens_model_code(name) if name in cameras.LENS_MODELS else cameras.PINHOLE
    return code, coeffs if code else np.zeros(6)


def has_photo(camera_object) -> bool:
    """True for cameras imported from a photo dataset (they carry their photo's path)."""
    return camera_object.type == "CAMERA" and bool(camera_object.data.get("implicit_image"))


def _read_rgba(path: str) -> np.ndarray:
    """(H, W, 4) uint8 of an image file (the stored bytes; top row first), through Blender."""
    img = bpy.data.images.load(path, check_existing=False)
    try:
        w, h = img.size
        if not (w and h):
            raise DatasetError(f"Could not read the image {path}")
        px = np.empty(w * h * img.channels, dtype=np.float32)
        img.pixels.foreach_get(px)   # rows bottom to top, floats of the stored bytes / 255
        px = px.reshape(h, w, img.channels)[::-1]
        if img.channels == 3:
            px = np.concatenate([px, np.ones((h, w, 1), np.float32)], axis=-1)
        elif img.channels != 4:
            px = np.repeat(px[..., :1], 4, axis=-1)
        return (np.clip(px, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    finally:
        bpy.data.images.remove(img)


def _photo_intrinsics(ob, scene, w: int, h: int, render_w: int, render_h: int) -> np.ndarray:
    """fx, fy, cx, cy of a camera's photo of w x h: the dataset's own where the camera was imported
    with it and its lens not changed since, else the Blender camera's rescaled to the photo."""
    from . import capture

    k = capture.camera_intrinsics(ob, scene)
    own, size, built = (ob.data.get(key) for key in ("implicit_photo_k", "implicit_photo_size", "implicit_built_k"))
    if own is not None and size is not None and built is not None and list(size) == [w, h] \
            and (render_w, render_h) == tuple(ob.data.get("implicit_built_size", (render_w, render_h))) \
            and np.allclose(k, list(built), rtol=1e-5, atol=1e-4):
        return np.array(list(own), np.float64)
    return k * np.array([w / render_w, h / render_h, w / render_w, h / render_h])


def photo_views(camera_objects, scene) -> dict:
    """The photos of imported cameras as fit inputs.

    Masks (``implicit_mask``) become the images' alpha (their alpha channel, else their red =
    grey value).  Intrinsics are the cameras' Blender intrinsics rescaled to the photo size.
    Returns:
        {"images": (N, H, W, 4) uint8 sRGB RGBA, "intrinsics": (N, 4), "poses": (N, 4, 4),
        "lens_models": (N,) int32, "distortion": (N, 6) float64, "image_sizes": (N, 2) int64 or
        empty when all photos share one size (shared/protocol.py Submit.image_sizes)}
    Raises:
        DatasetError naming the camera whose photo or mask is missing, or whose mask has another size.
    """
    from . import capture

    images, ks, poses, models, dists = [], [], [], [], []
    render_w, render_h = capture.render_size(scene)
    for ob in camera_objects:
        path = ob.data.get("implicit_image") if ob.type == "CAMERA" else None
        if not path or not os.path.isfile(str(path)):
            raise DatasetError(f"Camera '{ob.name}' has no photo" + (f" (missing: {path})" if path else "")
                               + ": re-import the dataset or remove the camera.")
        rgba = _read_rgba(str(path))
        h, w = rgba.shape[:2]
        mask = ob.data.get("implicit_mask")
        if mask:
            if not os.path.isfile(str(mask)):
                raise DatasetError(f"The mask of camera '{ob.name}' is missing: {mask}")
            m = _read_rgba(str(mask))
            if m.shape[:2] != (h, w):
                raise DatasetError(f"The mask of camera '{ob.name}' is {m.shape[1]} x {m.shape[0]}, "
                                   f"its photo {w} x {h}.")
            rgba[..., 3] = m[..., 3] if (m[..., 3] < 255).any() else m[..., 0]
        images.append(rgba)
        ks.append(_photo_intrinsics(ob, scene, w, h, render_w, render_h))
        poses.append(capture.camera_pose(ob))
        code, coeffs = camera_lens(ob)
        models.append(code)
        dists.append(coeffs)
    if not images:
        raise DatasetError("No cameras with photos to fit.")
    stacked, sizes = protocol.pad_images(images)     # photos of different sizes: each top-left, padded
    return {"images": stacked, "intrinsics": np.stack(ks), "poses": np.stack(poses),
            "lens_models": np.array(models, np.int32), "distortion": np.stack(dists),
            "image_sizes": sizes if (sizes != sizes[0]).any() else np.zeros((0, 2), np.int64)}
