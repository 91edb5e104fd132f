"""The training cameras as the fit refined them (protocol.CamerasResult; issue 15, item 2).

A fit with *Refine Cameras* on corrects each photo's pose while it trains
(backend/fitting/camera_refine.py), in the capture's own frame and scale, so the refined cameras
line up with the imported mesh in the artist's scene.  They come back as new cameras beside the
originals (the originals stay as they were): one copy of each training camera (its lens, sensor
and photo) at the refined pose, named "<camera> refined", in the collection "<fit> Refined
Cameras".  Each keeps how far it moved (``implicit_moved_deg``, ``implicit_moved`` in world
units) and the camera it came from (``implicit_refined_from``).  They are disabled for rendering,
so the next fit does not train on both; enable them (and disable the originals) to fit again from
the refined poses.
"""
from __future__ import annotations

import bpy
import numpy as np
from mathutils import Matrix

SUFFIX = "Refined Cameras"


def add_refined_cameras(scene, names: list[str], poses: np.ndarray, moved_deg: np.ndarray, moved: np.ndarray,
                        title: str, intrinsics: np.ndarray | None = None, size: tuple[int, int] | None = None,
                        focal_scale: float = 1.0):
    """New cameras at ``poses`` (N, 4, 4) camera-to-world (Blender's camera convention), copies of
    the camera objects ``names`` (N) where they still exist (else cameras built from the sent
    ``intrinsics`` (N, 4) of images ``size`` (width, height)), in a new collection "<title>
    Refined Cameras" linked to ``scene``; returns that collection.  ``focal_scale``: the refined
    focal length's factor (CamerasResult.focal_scale), applied to each copy's lens."""
    from ._shared import cameras

    if len(names) != len(poses):
        raise ValueError(f"{len(poses)} refined cameras came back for {len(names)} training cameras")
    coll = bpy.data.collections.new(f"{title} {SUFFIX}")
    scene.collection.children.link(coll)
    for i, (name, pose, deg, dist) in enumerate(zip(names, np.asarray(poses, np.float64), moved_deg, moved)):
        source = bpy.data.objects.get(name)
        if source is not None and source.type == "CAMERA":
            data = source.data.copy()
        else:       # the camera is gone: one from the intrinsics the fit was sent
            data = bpy.data.cameras.new(f"{name} refined")
            if intrinsics is not None and size is not None:
                bc = cameras.blender_camera_from_intrinsics(np.asarray(intrinsics[i], np.float64), *size)
                data.sensor_width, data.sensor_height, data.sensor_fit = bc.sensor_width, bc.sensor_height, bc.sensor_fit
                data.lens, data.shift_x, data.shift_y = bc.lens, bc.shift_x, bc.shift_y
        data.lens *= float(focal_scale)
        ob = bpy.data.objects.new(f"{name} refined", data)
        ob.matrix_world = Matrix(pose.tolist())
        ob.hide_render = True
        ob["implicit_refined_from"] = name
        ob["implicit_moved_deg"] = round(float(deg), 4)
        ob["implicit_moved"] = round(float(dist), 6)
        coll.objects.link(ob)
    return coll


def moved_text(moved_deg: np.ndarray, moved: np.ndarray, collection) -> str:
    """One sentence for the fit's report: how far the cameras moved and where the refined ones are."""
    deg = np.asarray(moved_deg, np.float64)
    return (f"Cameras refined: turned {deg.mean():.2f} degrees on average (most {deg.max():.2f}), moved "
            f"{np.mean(moved):.3g} on average; the refined ones are in '{collection.name}' (disabled for rendering).")
