"""Camera rig generator: N cameras evenly spread (Fibonacci) on a hemisphere or sphere around
the selection, all looking at its bounding-box centre, one lens that makes it fill the views,
and a share of them held out for evaluation.

Held-out cameras carry the custom property ``implicit_holdout = True`` and live in the
sub-collection ``Implicit Held-out``; capture.scene_cameras / plan_capture never train on them.
Main thread only.
"""
from __future__ import annotations

import bpy
import numpy as np
from mathutils import Matrix

from . import capture
from ._shared import cameras
from .importer import ensure_collection

RIG_COLLECTION = "Implicit Rig"
HOLDOUT_COLLECTION = "Implicit Held-out"
HOLDOUT_PROP = capture.HOLDOUT_PROP
RIG_PROP = "implicit_rig"
is_holdout = capture.is_holdout


def rig_poses(bbox, count: int, hemisphere: bool = True, distance_factor: float = capture.RING_DISTANCE
              ) -> tuple[np.ndarray, float, float]:
    """Camera-to-world poses around a (2, 3) box: (count, 4, 4), distance, bounding-sphere radius."""
    bbox = np.asarray(bbox, dtype=np.float64)
    center = 0.5 * (bbox[0] + bbox[1])
    radius = max(0.5 * float(np.linalg.norm(bbox[1] - bbox[0])), 1e-3)
    distance = distance_factor * radius
    dirs = cameras.fibonacci_directions(count, hemisphere=hemisphere)
    poses = np.array([cameras.look_at(center + distance * d, center) for d in dirs]).reshape(-1, 4, 4)
    return poses, distance, radius


def remove_rig(scene=None) -> int:
    """Delete the cameras made by earlier rigs (custom property ``implicit_rig``); returns how many."""
    obs = [ob for ob in bpy.data.objects if ob.type == "CAMERA" and ob.get(RIG_PROP)]
    for ob in obs:
        data = ob.data
        bpy.data.objects.remove(ob, do_unlink=True)
        if data is not None and data.users == 0:
            bpy.data.cameras.remove(data)
    for name in (HOLDOUT_COLLECTION, RIG_COLLECTION):
        coll = bpy.data.collections.get(name)
        if coll is not None and not coll.all_objects and not coll.children:
            bpy.data.collections.remove(coll)
    return len(obs)


def add_camera_rig(scene, view_layer, *, count: int = 24, hemisphere: bool = True,
                   holdout_share: float = 0.0, objects=None, replace: bool = True) -> list:
    """Add ``count`` cameras around ``objects`` (default: the selected geometry).

    Args:
        count: number of views (>= 1).
        hemisphere: upper (+Z) hemisphere only, else the full sphere.
        holdout_share: fraction of the views (0 <= share < 1) held out, spread evenly over the rig.
        replace: delete the cameras of earlier rigs first.
    Returns:
        the new camera objects, in rig order (held-out ones included).
    Raises:
        capture.CaptureError with a message for the user.
    """
    count = int(count)
    if count < 1:
        raise capture.CaptureError("The rig needs at least one camera.")
    if not 0.0 <= holdout_share < 1.0:
        raise capture.CaptureError("The held-out share must be at least 0 and less than 1.")
    if objects is None:
        objects = capture.target_objects(view_layer, selected_only=True)
    objects = list(objects)
    if not objects:
        raise capture.CaptureError("Select the object(s) to put the camera rig around.")
    depsgraph = view_layer.depsgraph
    bbox = capture.world_bbox(objects, depsgraph)
    points = capture.world_points(objects, depsgraph)
    if replace:
        remove_rig(scene)
    poses, distance, radius = rig_poses(bbox, count, hemisphere)
    held = set(cameras.spread_indices(count, round(holdout_share * count)).tolist())
    if len(held) >= count:       # keep at least one training view
        held.discard(max(held))
    rig = ensure_collection(scene, RIG_COLLECTION)
    holdout_coll = None
    if held:
        holdout_coll = bpy.data.collections.get(HOLDOUT_COLLECTION) or bpy.data.collections.new(HOLDOUT_COLLECTION)
        if holdout_coll.name not in rig.children:
            for parent in [c for c in bpy.data.collections if holdout_coll.name in c.children]:
                parent.children.unlink(holdout_coll)
            if holdout_coll.name in scene.collection.children:
                scene.collection.children.unlink(holdout_coll)
            rig.children.link(holdout_coll)
    sensor_w, sensor_h = 36.0, 24.0
    lens = capture.ring_lens(scene, sensor_w, sensor_h, distance, radius, list(poses), points)
    created = []
    for i, c2w in enumerate(poses):
        name = f"Implicit Rig {i:03d}"
        data = bpy.data.cameras.new(name)
        data.type = "PERSP"
        data.sensor_fit = "AUTO"
        data.sensor_width, data.sensor_height = sensor_w, sensor_h
        data.lens = lens
        data.clip_start = max(distance - 2.0 * radius, distance * 1e-3) * 0.5
        data.clip_end = (distance + 2.0 * radius) * 2.0
        ob = bpy.data.objects.new(name, data)
        ob.matrix_world = Matrix(c2w.tolist())
        ob[RIG_PROP] = True
        if i in held:
            ob[HOLDOUT_PROP] = True
            holdout_coll.objects.link(ob)
        else:
            rig.objects.link(ob)
        created.append(ob)
    if scene.camera is None and created:
        scene.camera = created[0]
    view_layer.update()
    return created
