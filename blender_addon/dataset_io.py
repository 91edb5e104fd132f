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

Import reads global or per-frame intrinsics and makes cameras whose Blender intrinsics give them
back (shared.cameras.blender_camera_from_intrinsics), with the images as camera backgrounds.
Main thread only; no torch here (the backend's reader is backend/data.py).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

from . import capture
from ._shared import cameras, transforms
from .importer import ensure_collection

IMPORT_COLLECTION = "Implicit Dataset"
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")
EXTRA_KEYS = ("camera_model", "k1", "k2", "k3", "k4", "p1", "p2", "mask_path")


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
                   aabb=None, progress=None) -> dict:
    """Write the scene's cameras (+ renders) as a transforms.json dataset in ``folder``.

    Args:
        camera_objects: cameras to export (default: every renderable camera of the view layer,
            held-out ones included: they go to the test split).
        render: render every camera (capture's settings: RGBA PNG, transparent film); False
            writes the json files only.
        aabb: (2, 3) world box written as "aabb"; None: the padded box of the visible geometry
            (left out if there is none).
        progress: ``progress(i, n)`` after each render.
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
    total, done = len(cams), 0
    all_frames, names = [], {"train": [], "test": []}
    files = []
    for split, obs in splits.items():
        frames = []
        if render and obs:
            (root / split).mkdir(parents=True, exist_ok=True)
        for i, ob in enumerate(obs):
            stem = f"{split}/r_{i:03d}"
            if render:
                capture.render_view(scene, ob, str(root / f"{stem}.png"))
                done += 1
                if progress is not None:
                    progress(done, total)
            k = capture.camera_intrinsics(ob, scene)
            frame = {"file_path": stem, "camera": ob.name, **frame_fields(k, w, h),
                     "transform_matrix": capture.camera_pose(ob).tolist()}
            frames.append(frame)
            all_frames.append({**frame, "file_path": f"{stem}.png"})
            names[split].append(f"{stem}.png")
        if obs or split == "train":
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"transforms_{split}.json"
            path.write_text(json.dumps(_doc(frames, aabb), indent=2))
            files.append(str(path))
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


def frame_intrinsics(meta: dict, width: int, height: int) -> np.ndarray:
    """fx, fy, cx, cy for an image of ``width`` x ``height`` from a frame's keys (global keys
    overridden by per-frame ones); values written for another w/h are rescaled."""
    dw, dh = (float(meta["w"]), float(meta["h"])) if "w" in meta and "h" in meta else (width, height)
    sx, sy = width / dw, height / dh
    if "fl_x" in meta or "fl_y" in meta:
        fx = float(meta.get("fl_x", meta.get("fl_y"))) * sx
        fy = float(meta.get("fl_y", meta.get("fl_x"))) * sy
    elif "camera_angle_x" in meta:
        fx = 0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"]))
        fy = 0.5 * height / math.tan(0.5 * float(meta["camera_angle_y"])) if "camera_angle_y" in meta else fx
    else:
        raise DatasetError("a frame has no intrinsics (need fl_x or camera_angle_x)")
    cx = float(meta["cx"]) * sx if "cx" in meta else width / 2.0
    cy = float(meta["cy"]) * sy if "cy" in meta else height / 2.0
    return np.array([fx, fy, cx, cy], dtype=np.float64)


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


def import_transforms(scene, path: str, *, collection_name: str = IMPORT_COLLECTION,
                      backgrounds: bool = True, set_resolution: bool = True) -> tuple[list, list[str]]:
    """Cameras (and background images) from a transforms.json.

    The scene's resolution and pixel aspect are set from the first frame (they are per scene in
    Blender); every camera gets the sensor fit, lens and shift that reproduce its fx, fy, cx, cy.
    Distortion (k1..k4, p1, p2), camera_model and mask_path are kept as custom properties on the
    camera data (not applied yet).
    Returns:
        (camera objects in file order, warnings for the user).
    """
    file, frames, _doc_ = read_transforms(path)
    warnings: list[str] = []
    sizes = []
    for f in frames:
        if "w" in f and "h" in f:
            sizes.append((int(f["w"]), int(f["h"])))
        else:
            size = _image_size(f["image"])
            if size is None:
                raise DatasetError(f"{file}: frame {f['name']!r} gives no w/h and its image is missing")
            sizes.append(size)
    w0, h0 = sizes[0]
    k = [frame_intrinsics(f, *size) for f, size in zip(frames, sizes)]
    k = np.array([ki * np.array([w0 / s[0], h0 / s[1], w0 / s[0], h0 / s[1]]) for ki, s in zip(k, sizes)])
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
    positions = np.array([f["c2w"][:3, 3] for f in frames])
    extent = float(np.ptp(positions, axis=0).max()) if len(frames) > 1 else 1.0
    coll = ensure_collection(scene, collection_name)
    created = []
    for f, ki in zip(frames, k):
        kk = np.array([ki[0], ki[0] / par[0], ki[2], ki[3]]) if abs(ki[0] / ki[1] - par[0]) > 1e-9 else ki
        bc = cameras.blender_camera_from_intrinsics(kk, w0, h0)
        data = bpy.data.cameras.new(f["name"])
        data.type = "PERSP"
        data.sensor_width, data.sensor_height, data.sensor_fit = bc.sensor_width, bc.sensor_height, bc.sensor_fit
        data.lens, data.shift_x, data.shift_y = bc.lens, bc.shift_x, bc.shift_y
        data.clip_start = max(1e-3 * extent, 1e-4)
        data.clip_end = max(100.0, 20.0 * extent)
        for key in EXTRA_KEYS:
            if key in f:
                value = f[key]
                data[key] = value if isinstance(value, (int, float, str)) else str(value)
        for key in ("fl_x", "fl_y", "cx", "cy"):
            data[f"implicit_{key}"] = float(dict(zip(("fl_x", "fl_y", "cx", "cy"), ki))[key])
        if f["image"] is not None:
            data["implicit_image"] = str(f["image"])
            if backgrounds:
                img = bpy.data.images.load(str(f["image"]), check_existing=True)
                bg = data.background_images.new()
                bg.image = img
                bg.frame_method = "STRETCH"
                bg.alpha = 1.0
                data.show_background_images = True
        else:
            warnings.append(f"No image found for frame {f['name']!r}.")
        ob = bpy.data.objects.new(f["name"], data)
        ob.matrix_world = Matrix(f["c2w"].tolist())
        coll.objects.link(ob)
        created.append(ob)
    if created and scene.camera is None:
        scene.camera = created[0]
    return created, warnings
