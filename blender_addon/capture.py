"""Blender scene -> posed RGBA images: cameras, intrinsics, renders, bounding box, Submit.

All camera maths comes from ``shared.cameras``; this module only reads Blender's numbers.
Everything here runs on the main thread.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import bpy
import numpy as np
from mathutils import Matrix

from ._shared import cameras, protocol
from .importer import ensure_collection

CAMERA_COLLECTION = "Implicit Cameras"
GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "META", "FONT", "CURVES", "POINTCLOUD", "VOLUME"}
RING_DISTANCE = 3.0       # ring radius, in radii of the object's bounding sphere
RING_FILL = 0.9           # fraction of the half-frame the selection's box spans in the ring's views
AABB_PADDING = 0.1        # of the box's longest side, on every side


class CaptureError(Exception):
    """The scene cannot be captured; the text tells the user what to change."""


class CaptureCancelled(CaptureError):
    """Rendering was cancelled (views rendered so far stay in the cache)."""


# --------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------
HOLDOUT_PROP = "implicit_holdout"   # custom property of held-out cameras (never trained on)


def is_holdout(camera_object) -> bool:
    return bool(camera_object.get(HOLDOUT_PROP, False))


def scene_cameras(view_layer, include_holdout: bool = False) -> list:
    """Camera objects of the view layer that are enabled for rendering, sorted by name; held-out
    cameras (custom property ``implicit_holdout``) only with ``include_holdout``."""
    cams = [ob for ob in view_layer.objects if ob.type == "CAMERA" and not ob.hide_render
            and (include_holdout or not is_holdout(ob))]
    return sorted(cams, key=lambda ob: ob.name)


def check_perspective(camera_objects) -> None:
    for ob in camera_objects:
        if ob.data.type != "PERSP":
            kind = {"ORTHO": "orthographic", "PANO": "panoramic"}.get(ob.data.type, ob.data.type.lower())
            raise CaptureError(
                f"Camera '{ob.name}' is {kind}: only perspective cameras can be used. "
                "Set its type to Perspective, or disable it for rendering."
            )


def blender_camera(camera_object, scene) -> "cameras.BlenderCamera":
    """The numbers Blender projects with, from ``camera.data`` and ``scene.render``."""
    cam, r = camera_object.data, scene.render
    return cameras.BlenderCamera(
        lens=cam.lens, sensor_width=cam.sensor_width, sensor_height=cam.sensor_height,
        sensor_fit=cam.sensor_fit, shift_x=cam.shift_x, shift_y=cam.shift_y,
        resolution_x=r.resolution_x, resolution_y=r.resolution_y,
        resolution_percentage=r.resolution_percentage,
        pixel_aspect_x=r.pixel_aspect_x, pixel_aspect_y=r.pixel_aspect_y,
    )


def camera_intrinsics(camera_object, scene) -> np.ndarray:
    """(4,) float64 fx, fy, cx, cy in pixels of the rendered image (OpenCV pixel frame)."""
    return cameras.blender_intrinsics(blender_camera(camera_object, scene))


def camera_pose(camera_object) -> np.ndarray:
    """(4, 4) float64 camera-to-world, Blender camera convention, scale removed."""
    return cameras.rigid(np.array(camera_object.matrix_world, dtype=np.float64))


def camera_arrays(camera_objects, scene) -> tuple[np.ndarray, np.ndarray]:
    """intrinsics (N, 4) float64 and poses (N, 4, 4) float64 of perspective cameras."""
    check_perspective(camera_objects)
    k = np.array([camera_intrinsics(ob, scene) for ob in camera_objects], dtype=np.float64).reshape(-1, 4)
    p = np.array([camera_pose(ob) for ob in camera_objects], dtype=np.float64).reshape(-1, 4, 4)
    return k, p


# --------------------------------------------------------------------------------------------
# Camera sources: the scene's cameras (default), the selected cameras, the cameras of a
# collection, or one animated camera over a frame range (one view per frame)
# --------------------------------------------------------------------------------------------
SOURCES = ("SCENE", "SELECTED", "COLLECTION", "ANIMATION")


def selected_cameras(view_layer) -> list:
    """Selected camera objects enabled for rendering, sorted by name."""
    cams = [ob for ob in view_layer.objects if ob.type == "CAMERA" and not ob.hide_render
            and ob.select_get(view_layer=view_layer)]
    return sorted(cams, key=lambda ob: ob.name)


def collection_cameras(collection) -> list:
    """Camera objects (enabled for rendering) of a collection and its children, sorted by name.
    ``collection``: a Collection or its name."""
    coll = bpy.data.collections.get(collection) if isinstance(collection, str) else collection
    if coll is None:
        raise CaptureError(f"There is no collection named '{collection}': pick the collection holding the cameras.")
    cams = [ob for ob in coll.all_objects if ob.type == "CAMERA" and not ob.hide_render]
    if not cams:
        raise CaptureError(f"The collection '{coll.name}' holds no cameras enabled for rendering.")
    return sorted(cams, key=lambda ob: ob.name)


def frame_numbers(scene, frame_range=None) -> list[int]:
    """Frames of ``frame_range`` = (start, end, step), end included; None: the scene's range."""
    start, end, step = frame_range or (scene.frame_start, scene.frame_end, scene.frame_step)
    start, end, step = int(start), int(end), int(step)
    if step < 1 or end < start:
        raise CaptureError(f"The frame range {start}..{end} (step {step}) is empty: the end must not be "
                           "before the start, and the step must be at least 1.")
    return list(range(start, end + 1, step))


def view_arrays(scene, camera_objects, frames=None) -> tuple[np.ndarray, np.ndarray]:
    """intrinsics (N, 4) and poses (N, 4, 4) float64 of views; ``frames[i]`` (or None) is the
    scene frame at which view i is seen (animated cameras: pose and lens per frame).  The
    current frame is restored."""
    if frames is None or all(f is None for f in frames):
        return camera_arrays(camera_objects, scene)
    check_perspective(camera_objects)
    current = scene.frame_current
    ks, ps = [], []
    try:
        for ob, frame in zip(camera_objects, frames):
            if frame is not None and frame != scene.frame_current:
                scene.frame_set(frame)
            ks.append(camera_intrinsics(ob, scene))
            ps.append(camera_pose(ob))
    finally:
        if scene.frame_current != current:
            scene.frame_set(current)
    return np.array(ks, dtype=np.float64).reshape(-1, 4), np.array(ps, dtype=np.float64).reshape(-1, 4, 4)


#: How a capture follows the scene's time (the panel's "Over Time"): STILL renders one instant (the
#: current frame, or the animated camera's frames as views of a still scene); the others make a fit
#: over time (backend/fields/motion.py) from the frame range: EVERY_CAMERA renders every camera at
#: every frame (multi-view), IN_TURN one camera a frame, the cameras taken in turn, RANDOM one camera
#: a frame picked at random (seeded: the same views every time; monocular, as D-NeRF's datasets).
OVER_TIME = ("STILL", "EVERY_CAMERA", "IN_TURN", "RANDOM")


def views_over_time(cameras_: list, frames: list, over_time: str, scene, frame_range=None) -> tuple[list, list]:
    """(camera objects, frames) of a capture over time from its cameras (``frames``: the animated
    camera's, else None each); the frames are ``frame_range``'s (None: the scene's)."""
    if over_time not in OVER_TIME:
        raise CaptureError(f"Unknown Over Time mode {over_time!r} (one of {', '.join(OVER_TIME)}).")
    if over_time == "STILL" or any(f is not None for f in frames):
        return cameras_, frames       # an animated camera already gives one view a frame
    numbers = frame_numbers(scene, frame_range)
    if over_time == "EVERY_CAMERA":
        pairs = [(ob, f) for f in numbers for ob in cameras_]
    elif over_time == "IN_TURN":
        pairs = [(cameras_[i % len(cameras_)], f) for i, f in enumerate(numbers)]
    else:
        pick = np.random.default_rng(0).integers(0, len(cameras_), len(numbers))
        pairs = [(cameras_[int(j)], f) for j, f in zip(pick, numbers)]
    if len(pairs) > protocol.MAX_IMAGES:
        raise CaptureError(f"{len(pairs)} views ({len(cameras_)} cameras x {len(numbers)} frames) are more than the "
                           f"{protocol.MAX_IMAGES} a fit takes: raise the frame step, or use one camera a frame.")
    return [ob for ob, _ in pairs], [f for _, f in pairs]


def frame_times(frames: list, scene, frame_range=None) -> tuple[list[float], tuple[int, int]]:
    """(the instant in [0, 1] of each frame, (first, last) frame of the range) of a capture over
    time: the range's first frame is 0, its last 1."""
    numbers = frame_numbers(scene, frame_range)
    first, last = numbers[0], numbers[-1]
    if last <= first:
        raise CaptureError(f"A capture over time needs at least two frames; the range {first}..{last} has one. "
                           "Widen the frame range, or set Over Time to Still.")
    return [min(max((f - first) / (last - first), 0.0), 1.0) for f in frames], (first, last)


def current_instant(scene, time_range: tuple) -> float:
    """The scene's current frame as an instant of a capture over time (clamped into [0, 1])."""
    first, last = time_range
    return min(max((scene.frame_current - first) / (last - first), 0.0), 1.0)


def source_views(scene, view_layer, source: str, *, collection=None, camera=None, frame_range=None
                 ) -> tuple[list, list]:
    """(camera objects, frames) of a non-default source; frames are None except for ANIMATION."""
    if source == "SELECTED":
        cams = selected_cameras(view_layer)
        if not cams:
            raise CaptureError("No cameras are selected: select the cameras to render, or pick another camera source.")
        return cams, [None] * len(cams)
    if source == "COLLECTION":
        if not collection:
            raise CaptureError("Pick the collection whose cameras should be rendered.")
        cams = collection_cameras(collection)
        return cams, [None] * len(cams)
    if source == "ANIMATION":
        ob = scene.objects.get(camera) if isinstance(camera, str) and camera else (camera or scene.camera)
        if ob is None or ob.type != "CAMERA":
            raise CaptureError(f"'{camera or 'The scene camera'}' is not a camera: pick the animated camera.")
        frames = frame_numbers(scene, frame_range)
        return [ob] * len(frames), frames
    raise CaptureError(f"Unknown camera source {source!r} (one of {', '.join(SOURCES)}).")


def fit_settings_from_props(props) -> dict:
    """FitSettings keyword arguments of the capture options in ``scene.implicit``."""
    coll = getattr(props, "capture_collection", None)
    cam = getattr(props, "capture_camera", None)
    return {"source": getattr(props, "capture_source", "SCENE"),
            "source_collection": coll.name if coll is not None else "",
            "source_camera": cam.name if cam is not None else "",
            "passes": {"ON": True, "OFF": False}.get(getattr(props, "render_passes", "AUTO")),
            "cache_dir": "" if getattr(props, "resume_renders", True) else None,
            "background": getattr(props, "background", "auto"), "camera_refine": getattr(props, "camera_refine", "off"),
            "appearance": bool(getattr(props, "appearance", False)), "encoding": getattr(props, "encoding", "hashgrid"),
            "over_time": getattr(props, "over_time", "STILL"), "material_steps": int(getattr(props, "material_steps", 0))}


def passes_by_default(scene, method: str) -> bool:
    """Passes are on by default for surface fits (sdf, occupancy) when the scene renders with Cycles."""
    return method in ("sdf", "occupancy") and scene.render.engine == "CYCLES"


def lighting_note(scene, props) -> str:
    """A sentence for the panel when the fit's colours will keep the scene's lighting, else ''."""
    photos = any(ob.type == "CAMERA" and ob.data is not None and "implicit_image" in ob.data
                 for ob in scene.objects)
    if photos:
        if int(getattr(props, "material_steps", 0)) > 0:
            return "Materials and light are estimated from the photos: the asset can be relit"
        return "Photos have no albedo pass: lighting stays baked into the colours (Estimate Materials separates it)"
    mode = getattr(props, "render_passes", "AUTO")
    on = mode == "ON" or (mode == "AUTO" and passes_by_default(scene, getattr(props, "method", "nerf")))
    return "" if on else "No render passes: lighting stays baked into the colours"


def render_size(scene) -> tuple[int, int]:
    """(width, height) of a render, after the resolution percentage."""
    r = scene.render
    return cameras.image_size(cameras.BlenderCamera(
        lens=50.0, sensor_width=36.0, sensor_height=24.0, sensor_fit="AUTO",
        resolution_x=r.resolution_x, resolution_y=r.resolution_y,
        resolution_percentage=r.resolution_percentage))


# --------------------------------------------------------------------------------------------
# Bounding boxes
# --------------------------------------------------------------------------------------------
def target_objects(view_layer, selected_only: bool) -> list:
    """Geometry objects to fit: the selected ones, or every visible, renderable one."""
    obs = [ob for ob in view_layer.objects if ob.type in GEOMETRY_TYPES and not ob.hide_render]
    if selected_only:
        return [ob for ob in obs if ob.select_get(view_layer=view_layer)]
    return [ob for ob in obs if ob.visible_get(view_layer=view_layer)]


def box_empty(view_layer):
    """The selected Empty drawn as a cube (Add > Empty > Cube), or None: the box an artist sets
    for a photo fit (what is meshed; the background model takes what lies outside it)."""
    for ob in view_layer.objects:
        if ob.type == "EMPTY" and ob.empty_display_type == "CUBE" and ob.select_get(view_layer=view_layer):
            return ob
    return None


def empty_box(ob) -> np.ndarray:
    """(2, 3) float64 world min/max of a cube Empty as drawn (its display size, moved, turned and
    scaled by its world matrix)."""
    s = float(ob.empty_display_size)
    corners = np.array([[x, y, z] for x in (-s, s) for y in (-s, s) for z in (-s, s)], dtype=np.float64)
    m = np.array(ob.matrix_world, dtype=np.float64)
    pts = corners @ m[:3, :3].T + m[:3, 3]
    return np.stack([pts.min(axis=0), pts.max(axis=0)])


def world_bbox(objects, depsgraph) -> np.ndarray:
    """(2, 3) float64 world min/max over the evaluated bounding boxes of ``objects``."""
    corners = []
    for ob in objects:
        ev = ob.evaluated_get(depsgraph)
        local = np.array([tuple(c) for c in ev.bound_box], dtype=np.float64).reshape(-1, 3)
        m = np.array(ev.matrix_world, dtype=np.float64)
        corners.append(local @ m[:3, :3].T + m[:3, 3])
    if not corners:
        raise CaptureError("Nothing to fit: no visible mesh objects in the scene.")
    pts = np.concatenate(corners)
    return np.stack([pts.min(axis=0), pts.max(axis=0)])


def world_points(objects, depsgraph, limit: int = 20000) -> np.ndarray:
    """(P, 3) float64 world positions of the evaluated vertices of ``objects`` (at most about
    ``limit``, evenly strided), or their bounding-box corners for objects without a mesh."""
    parts = []
    for ob in objects:
        ev = ob.evaluated_get(depsgraph)
        m = np.array(ev.matrix_world, dtype=np.float64)
        try:
            mesh = ev.to_mesh()
        except RuntimeError:
            mesh = None
        if mesh is not None and len(mesh.vertices):
            co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
            mesh.vertices.foreach_get("co", co)
            local = co.reshape(-1, 3).astype(np.float64)
        else:
            local = np.array([tuple(c) for c in ev.bound_box], dtype=np.float64).reshape(-1, 3)
        if mesh is not None:
            ev.to_mesh_clear()
        local = local[:: max(1, len(local) * len(objects) // limit)]
        parts.append(local @ m[:3, :3].T + m[:3, 3])
    return np.concatenate(parts) if parts else np.zeros((0, 3))


def world_triangles(objects, depsgraph) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated meshes of ``objects`` (modifiers applied) in world units, as one triangle mesh:
    vertices (V, 3) float64 and triangles (F, 3) int32."""
    verts, faces, base = [], [], 0
    for ob in objects:
        ev = ob.evaluated_get(depsgraph)
        mesh = ev.to_mesh()
        mesh.calc_loop_triangles()
        co = np.empty(len(mesh.vertices) * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        tri = np.empty(len(mesh.loop_triangles) * 3, np.int32)
        mesh.loop_triangles.foreach_get("vertices", tri)
        m = np.array(ev.matrix_world, dtype=np.float64)
        verts.append(co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3])
        faces.append(tri.reshape(-1, 3) + base)
        base += len(co) // 3
        ev.to_mesh_clear()
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int32)
    return np.concatenate(verts), np.concatenate(faces).astype(np.int32)


def padded_aabb(bbox: np.ndarray, padding: float = AABB_PADDING) -> np.ndarray:
    """Grow a (2, 3) box by ``padding`` times its longest side on every side (never flat)."""
    bbox = np.asarray(bbox, dtype=np.float64)
    pad = max(padding * float(np.max(bbox[1] - bbox[0])), 1e-3)
    return np.stack([bbox[0] - pad, bbox[1] + pad])


# --------------------------------------------------------------------------------------------
# Ring of cameras around the selection
# --------------------------------------------------------------------------------------------
def ring_lens(scene, sensor_width: float, sensor_height: float, distance: float, radius: float,
              poses: list | None = None, points: np.ndarray | None = None) -> float:
    """Focal length (mm) of the ring cameras (scene resolution, centred, AUTO sensor fit).

    With ``poses`` (camera-to-world) and ``points`` (P, 3) world: every point seen from every
    pose lies within RING_FILL of the half-frame, so the object fills the views.
    Otherwise: a sphere of ``radius`` at ``distance`` spans RING_FILL of the narrower view.
    """
    probe = blender_camera_like(scene, lens=1.0, sensor_width=sensor_width, sensor_height=sensor_height)
    fx, fy, cx, cy = cameras.blender_intrinsics(probe)
    w, h = cameras.image_size(probe)
    tan_x, tan_y = 0.5 * w / fx, 0.5 * h / fy               # half-frame tangents at 1 mm
    if poses is None or points is None or not len(points):
        tan_target = math.tan(math.asin(min(radius / distance, 0.999))) / RING_FILL
        return min(tan_x, tan_y) / tan_target
    corners = np.asarray(points, dtype=np.float64)
    need = 0.0                                               # largest tangent / half-frame tangent
    for c2w in poses:
        local = (corners - c2w[:3, 3]) @ c2w[:3, :3]        # camera frame: looks down -Z
        depth = np.maximum(-local[:, 2], 1e-6)
        need = max(need, float(np.max(np.abs(local[:, 0]) / depth)) / tan_x,
                   float(np.max(np.abs(local[:, 1]) / depth)) / tan_y)
    return RING_FILL / max(need, 1e-9)


def blender_camera_like(scene, **overrides) -> "cameras.BlenderCamera":
    r = scene.render
    values = dict(lens=50.0, sensor_width=36.0, sensor_height=24.0, sensor_fit="AUTO",
                  resolution_x=r.resolution_x, resolution_y=r.resolution_y,
                  resolution_percentage=r.resolution_percentage,
                  pixel_aspect_x=r.pixel_aspect_x, pixel_aspect_y=r.pixel_aspect_y)
    values.update(overrides)
    return cameras.BlenderCamera(**values)


def make_ring_cameras(scene, bbox: np.ndarray, count: int, collection_name: str = CAMERA_COLLECTION,
                      points: np.ndarray | None = None) -> list:
    """``count`` perspective cameras on rings around the box centre, all looking at it; one lens
    for all, chosen so that ``points`` (default: the box corners) fill the views."""
    if points is None:
        points = np.array([[bbox[i][0], bbox[j][1], bbox[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    bbox = np.asarray(bbox, dtype=np.float64)
    center = 0.5 * (bbox[0] + bbox[1])
    radius = max(0.5 * float(np.linalg.norm(bbox[1] - bbox[0])), 1e-3)
    distance = RING_DISTANCE * radius
    coll = ensure_collection(scene, collection_name)
    created = []
    poses = [cameras.look_at(eye, center) for eye in cameras.ring_positions(center, distance, count)]
    lens = None
    for i, c2w in enumerate(poses):
        data = bpy.data.cameras.new(f"Implicit Camera {i:03d}")
        data.type = "PERSP"
        data.sensor_fit = "AUTO"
        if lens is None:
            lens = ring_lens(scene, data.sensor_width, data.sensor_height, distance, radius, poses, points)
        data.lens = lens
        data.clip_start = max(distance - 2.0 * radius, distance * 1e-3) * 0.5
        data.clip_end = (distance + 2.0 * radius) * 2.0
        ob = bpy.data.objects.new(data.name, data)
        ob.matrix_world = Matrix(c2w.tolist())
        coll.objects.link(ob)
        created.append(ob)
    return created


def remove_cameras(camera_objects) -> None:
    """Delete camera objects and their data (e.g. a ring that was not used after all)."""
    for ob in list(camera_objects):
        data = ob.data
        bpy.data.objects.remove(ob, do_unlink=True)
        if data is not None and data.users == 0:
            bpy.data.cameras.remove(data)
    coll = bpy.data.collections.get(CAMERA_COLLECTION)
    if coll is not None and not coll.all_objects and not coll.children:
        bpy.data.collections.remove(coll)


# --------------------------------------------------------------------------------------------
# Planning: which cameras, which box
# --------------------------------------------------------------------------------------------
@dataclass
class CapturePlan:
    cameras: list                    # camera objects to render, in order
    intrinsics: np.ndarray           # (N, 4) float64
    poses: np.ndarray                # (N, 4, 4) float64
    aabb: np.ndarray                 # (2, 3) float64, padded
    width: int
    height: int
    eval_cameras: list = field(default_factory=list)
    eval_intrinsics: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    eval_poses: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 4)))
    frames: list = field(default_factory=list)   # per camera: the scene frame to render at, or None
    times: list = field(default_factory=list)    # a capture over time: each view's instant in [0, 1]; else empty
    time_range: tuple = ()                       # ... and the frames that are the instants 0 and 1
    passes: bool = False                         # render albedo / normal / depth / roughness passes too
    ring: list = field(default_factory=list)     # every camera the plan placed (held-out ones included)
    targets: list = field(default_factory=list)  # the objects fitted (their box is the fit's)

    @property
    def created_ring(self) -> bool:
        """The plan placed its own ring of cameras (no cameras were given or found)."""
        return bool(self.ring)


def plan_capture(scene, view_layer, *, ring_count: int = 24, camera_objects=None,
                 eval_cameras=None, source: str = "SCENE", collection=None, camera=None,
                 frame_range=None, passes: bool = False, eval_holdout: bool = False,
                 ring_holdout: int = 0, over_time: str = "STILL") -> CapturePlan:
    """Decide what to render.  Raises CaptureError with a message for the user.

    ``eval_holdout``: the view layer's held-out cameras (``implicit_holdout``) are evaluation
    cameras too.  ``ring_holdout``: a ring placed here gets this many more cameras, held out
    (marked, never trained on) and evaluated.

    ``camera_objects`` (explicit cameras) wins over ``source``; ``source`` is one of SOURCES:
    SCENE (the view layer's cameras, or a ring around the selection if there are none),
    SELECTED, COLLECTION (``collection``: a name or Collection), ANIMATION (``camera``, default
    the scene camera, over ``frame_range`` = (start, end, step), default the scene's range).
    ``over_time``: one of OVER_TIME; all but STILL make a capture over time (:func:`views_over_time`)
    whose views carry their instants (``times``).
    """
    selected = target_objects(view_layer, selected_only=True)
    targets = selected or target_objects(view_layer, selected_only=False)
    if camera_objects is not None or source == "SCENE":
        cams = list(camera_objects) if camera_objects is not None else scene_cameras(view_layer)
        frames = [None] * len(cams)
    else:
        cams, frames = source_views(scene, view_layer, source, collection=collection, camera=camera,
                                    frame_range=frame_range)
    eval_cams = list(eval_cameras or [])
    if eval_holdout:
        eval_cams += [ob for ob in scene_cameras(view_layer, include_holdout=True)
                      if is_holdout(ob) and ob not in eval_cams]
    eval_names = {ob.name for ob in eval_cams}
    # Held-out views are never trained on (an animated camera's frames are all views of it).
    keep = [(ob, f) for ob, f in zip(cams, frames)
            if (f is not None or not is_holdout(ob)) and ob.name not in eval_names]
    cams, frames = [ob for ob, _ in keep], [f for _, f in keep]
    check_perspective(cams + eval_cams)
    if passes and scene.render.engine != "CYCLES":
        raise CaptureError(f"Render passes (albedo, normal, depth, roughness) need the Cycles engine; the "
                           f"scene uses {scene.render.engine}. Switch to Cycles, or turn the passes off.")
    if not cams and source != "SCENE":
        raise CaptureError("The chosen camera source has no views left to train on (held-out and "
                           "evaluation cameras are left out).")
    if not cams and not selected:
        raise CaptureError(
            "The scene has no cameras and nothing is selected: select the object to fit "
            f"(a ring of {ring_count} cameras will be placed around it), or add cameras."
        )
    if not targets:
        raise CaptureError("Nothing to fit: select the object to fit, or make it visible.")
    w, h = render_size(scene)
    if w < 1 or h < 1:
        raise CaptureError(f"The render size {w} x {h} is empty: check the output resolution.")
    depsgraph = view_layer.depsgraph
    bbox = padded_aabb(world_bbox(targets, depsgraph))
    created = not cams
    ring: list = []
    if created:   # the last step: nothing above may fail after the scene was changed
        ring = make_ring_cameras(scene, world_bbox(selected, depsgraph), ring_count + max(int(ring_holdout), 0),
                                 points=world_points(selected, depsgraph))
        held = set(cameras.spread_indices(len(ring), ring_holdout).tolist())
        for i in sorted(held):
            ring[i][HOLDOUT_PROP] = True
        cams = [ob for i, ob in enumerate(ring) if i not in held]
        eval_cams += [ring[i] for i in sorted(held)]
        view_layer.update()
    frames = frames if len(frames) == len(cams) else [None] * len(cams)   # a new ring
    times, time_range = [], ()
    if over_time != "STILL":
        try:
            cams, frames = views_over_time(cams, frames, over_time, scene, frame_range)
            times, time_range = frame_times(frames, scene, frame_range)
        except CaptureError:
            remove_cameras(ring)            # leave the scene as it was
            raise
    k, p = view_arrays(scene, cams, frames)
    ek, ep = camera_arrays(eval_cams, scene)
    return CapturePlan(cameras=cams, intrinsics=k, poses=p, aabb=bbox, width=w, height=h,
                       eval_cameras=eval_cams, eval_intrinsics=ek, eval_poses=ep,
                       frames=frames, passes=bool(passes), ring=ring, targets=list(targets), times=times,
                       time_range=time_range)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
class CaptureRenderSettings:
    """Context manager: render settings for capture (transparent film, 'Standard' view, RGBA
    8-bit PNG, no compositing or stamps), put back exactly as they were on exit, even on error."""

    def __init__(self, scene):
        self.scene = scene
        self._saved: list = []

    def _set(self, owner, attr, value):
        if owner is None or not hasattr(owner, attr):
            return
        self._saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def __enter__(self):
        s, r = self.scene, self.scene.render
        fmt = r.image_settings
        try:
            self._set(s, "camera", s.camera)
            self._set(r, "filepath", r.filepath)
            self._set(r, "film_transparent", True)
            self._set(r, "use_compositing", False)
            self._set(r, "use_sequencer", False)
            self._set(r, "use_border", False)
            self._set(r, "use_multiview", False)
            self._set(r, "use_stamp", False)
            self._set(r, "use_single_layer", True)
            self._set(r, "use_file_extension", True)
            self._set(fmt, "media_type", "IMAGE")            # 5.0+: before file_format
            self._set(fmt, "file_format", "PNG")
            self._set(fmt, "color_mode", "RGBA")
            self._set(fmt, "color_depth", "8")
            self._set(fmt, "color_management", "FOLLOW_SCENE")
            self._set(s.display_settings, "display_device", "sRGB")
            self._set(s.view_settings, "view_transform", "Standard")
            self._set(s.view_settings, "look", "None")
            self._set(s.view_settings, "exposure", 0.0)
            self._set(s.view_settings, "gamma", 1.0)
            self._set(s.view_settings, "use_curve_mapping", False)
        except Exception:
            self.restore()
            raise
        return self

    def restore(self):
        # Forward order: media_type before file_format before colour mode/depth.
        for owner, attr, value in self._saved:
            try:
                setattr(owner, attr, value)
            except Exception as exc:  # keep restoring the rest
                print(f"Fit Implicit: could not restore {attr}: {exc}")
        self._saved.clear()

    def __exit__(self, *exc):
        self.restore()
        return False


def load_png_rgba(path: str) -> np.ndarray:
    """(H, W, 4) uint8 RGBA, top row first, of an 8-bit PNG (values as stored: sRGB-encoded)."""
    img = bpy.data.images.load(path, check_existing=False)
    try:
        w, h = img.size
        if w == 0 or h == 0:
            raise CaptureError(f"Could not read the rendered image {path}")
        px = np.empty(w * h * 4, dtype=np.float32)
        img.pixels.foreach_get(px)   # byte images: the stored byte / 255, rows bottom to top
        if img.channels != 4:
            raise CaptureError(f"The rendered image {path} has {img.channels} channels, expected RGBA")
    finally:
        bpy.data.images.remove(img)
    rgba = px.reshape(h, w, 4)[::-1]
    return np.ascontiguousarray(np.clip(rgba * 255.0 + 0.5, 0, 255).astype(np.uint8))


def render_view(scene, camera_object, path: str) -> np.ndarray:
    """Render ``camera_object`` with the scene's engine and resolution: (H, W, 4) uint8 sRGB RGBA,
    straight alpha (the object mask), top row first."""
    with CaptureRenderSettings(scene):
        _render_still(scene, camera_object, path)
    return load_png_rgba(path)


def _render_still(scene, camera_object, path: str) -> None:
    """Render the current frame from ``camera_object`` into ``path`` (settings as they are)."""
    scene.camera = camera_object
    scene.render.filepath = path
    if os.path.exists(path):
        os.remove(path)
    bpy.ops.render.render(write_still=True, scene=scene.name)
    if not os.path.exists(path):
        raise CaptureError(f"Rendering camera '{camera_object.name}' wrote no image ({path}).")


def render_views(scene, camera_objects, folder: str, progress=None) -> np.ndarray:
    """Render every camera: (N, H, W, 4) uint8.  ``progress(i, n)`` is called after each view."""
    out = []
    for i, ob in enumerate(camera_objects):
        out.append(render_view(scene, ob, os.path.join(folder, f"view_{i:04d}.png")))
        if progress is not None:
            progress(i + 1, len(camera_objects))
    return np.stack(out) if out else np.zeros((0, 1, 1, 4), np.uint8)


# --------------------------------------------------------------------------------------------
# Views with passes, resumable: a cache keyed by the view and the scene's state
# --------------------------------------------------------------------------------------------
CACHE_VERSION = 1


def default_cache_dir() -> str:
    """Next to the saved .blend ("//fit_implicit_cache"), else in the system's temp folder."""
    if bpy.data.filepath:
        return bpy.path.abspath("//fit_implicit_cache")
    return os.path.join(tempfile.gettempdir(), "fit_implicit_cache")


def _values(owner, names) -> list:
    out = []
    for n in names:
        v = getattr(owner, n, None)
        out.append(round(v, 6) if isinstance(v, float) else v if isinstance(v, (int, str, bool)) or v is None
                   else [round(float(x), 6) for x in v])
    return out


def _node_values(tree) -> list:
    """Every node's type, image file and input default values (materials, world)."""
    if tree is None:
        return []
    out = []
    for node in sorted(tree.nodes, key=lambda nd: nd.name):
        image = getattr(node, "image", None)
        out.append([node.bl_idname, node.name, getattr(image, "filepath", None)])
        for sock in node.inputs:
            v = getattr(sock, "default_value", None)
            if v is not None:
                out.append(_values(sock, ["default_value"]))
    out.append(sorted([lk.from_node.name, lk.from_socket.identifier, lk.to_node.name, lk.to_socket.identifier]
                      for lk in tree.links))
    return out


def scene_fingerprint(scene, view_layer) -> str:
    """A hash of what a render shows: render settings, and every renderable object's transform,
    geometry (vertex count and coordinate sums), light, materials' and the world's node values.
    Edits it cannot see (e.g. inside a node group, a texture image's pixels) need a cache clear."""
    r = scene.render
    doc = [CACHE_VERSION, _values(r, ["engine", "resolution_x", "resolution_y", "resolution_percentage",
                                      "pixel_aspect_x", "pixel_aspect_y"])]
    if r.engine == "CYCLES":
        doc.append(_values(scene.cycles, ["samples", "use_denoising", "seed", "use_adaptive_sampling",
                                          "max_bounces", "film_exposure"]))
    depsgraph = view_layer.depsgraph
    for ob in sorted(view_layer.objects, key=lambda o: o.name):
        if ob.hide_render or ob.type == "CAMERA":
            continue
        ev = ob.evaluated_get(depsgraph)
        doc.append([ob.name, ob.type, np.round(np.array(ev.matrix_world), 6).tolist()])
        if ob.type == "LIGHT":
            doc.append(_values(ob.data, ["type", "energy", "color", "shadow_soft_size", "spot_size"]))
        elif ob.type in GEOMETRY_TYPES:
            try:
                mesh = ev.to_mesh()
            except RuntimeError:
                mesh = None
            if mesh is not None:
                co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
                mesh.vertices.foreach_get("co", co)
                doc.append([len(mesh.vertices), len(mesh.polygons),
                            np.round(co.reshape(-1, 3).astype(np.float64).sum(0), 4).tolist()])
                ev.to_mesh_clear()
        for slot in getattr(ob, "material_slots", ()):
            mat = slot.material
            doc.append([getattr(mat, "name", None), _node_values(getattr(mat, "node_tree", None))])
    world = scene.world
    doc.append([getattr(world, "name", None), _node_values(getattr(world, "node_tree", None))])
    doc.append(sorted([c.name, c.hide_render] for c in bpy.data.collections))   # e.g. a light rig switched off
    doc.append(_excluded(view_layer.layer_collection))
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()


def _excluded(layer_collection) -> list:
    """Names of the view layer's excluded collections (depth first)."""
    out = [layer_collection.name] if layer_collection.exclude else []
    for child in layer_collection.children:
        out += _excluded(child)
    return out


@dataclass
class RenderedView:
    rgba: np.ndarray                                   # (H, W, 4) uint8 sRGB RGBA, top row first
    passes: dict = field(default_factory=dict)         # C1 passes: albedo / normal / depth / roughness (H, W, ...)
    cached: bool = False


class ViewRenderer:
    """Renders views (camera, frame) with or without passes, reusing earlier renders.

    A view already rendered with the same pose, intrinsics, frame, passes and scene fingerprint
    is read from ``cache_dir`` (one compressed .npz per view) instead of rendered again, so a
    cancelled or repeated capture resumes where it stopped.  ``cache_dir=None``: no cache.
    ``renders`` counts real renders, ``cache_hits`` the views read back.
    """

    def __init__(self, scene, view_layer, folder: str, *, cache_dir: str | None = None):
        self.scene, self.view_layer, self.folder = scene, view_layer, folder
        self.cache_dir = cache_dir
        self.renders = 0
        self.cache_hits = 0
        self._fingerprint = scene_fingerprint(scene, view_layer) if cache_dir else ""

    def key(self, camera_object, frame=None, passes: bool = False) -> str:
        k, p = view_arrays(self.scene, [camera_object], [frame])
        doc = [self._fingerprint, np.round(k, 6).tolist(), np.round(p, 6).tolist(), frame, bool(passes),
               list(render_size(self.scene))]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:40]

    def render(self, camera_object, frame=None, *, passes: bool = False, index: int = 0) -> RenderedView:
        """One view: from the cache, or rendered (and then cached)."""
        path = None
        if self.cache_dir:
            path = os.path.join(self.cache_dir, self.key(camera_object, frame, passes) + ".npz")
            hit = _read_cached(path, passes)
            if hit is not None:
                self.cache_hits += 1
                return hit
        current = self.scene.frame_current
        try:
            if frame is not None and frame != current:
                self.scene.frame_set(frame)
            view = self._render(camera_object, index, passes)
        finally:
            if self.scene.frame_current != current:
                self.scene.frame_set(current)
        self.renders += 1
        if path is not None:
            _write_cached(path, view)
        return view

    def render_all(self, camera_objects, frames=None, *, passes: bool = False, progress=None,
                   should_cancel=None) -> list[RenderedView]:
        """Every view in order.  ``progress(i, n)`` after each; ``should_cancel()`` is asked
        before each and raises CaptureCancelled when it returns True."""
        frames = list(frames) if frames is not None else [None] * len(camera_objects)
        out = []
        for i, (ob, frame) in enumerate(zip(camera_objects, frames)):
            if should_cancel is not None and should_cancel():
                raise CaptureCancelled(f"Rendering cancelled after {i} of {len(frames)} views.")
            out.append(self.render(ob, frame, passes=passes, index=i))
            if progress is not None:
                progress(i + 1, len(frames))
        return out

    def _render(self, camera_object, index: int, passes: bool) -> RenderedView:
        path = os.path.join(self.folder, f"view_{index:04d}.png")
        if not passes:
            return RenderedView(render_view(self.scene, camera_object, path))
        from .passes import PassError, PassOutput

        prefix = f"view_{index:04d}_"
        try:
            with CaptureRenderSettings(self.scene), PassOutput(self.scene, self.view_layer, self.folder) as out:
                out.prepare(prefix)
                _render_still(self.scene, camera_object, path)
                rgba = load_png_rgba(path)
                return RenderedView(rgba, out.read(prefix, rgba[..., 3].astype(np.float32) / 255.0))
        except PassError as exc:
            raise CaptureError(str(exc)) from None


def export_view_with_passes(scene, view_layer, camera_object, folder: str, stem: str) -> dict:
    """Render one camera with passes for a dataset export: the RGBA image as ``<stem>.png`` and
    the pass files (passes.save_pass_files) under ``folder``.  Returns the frame's pass keys."""
    import shutil

    from .passes import save_pass_files

    work = tempfile.mkdtemp(prefix="fit_implicit_export_")
    try:
        view = ViewRenderer(scene, view_layer, work).render(camera_object, passes=True)
        shutil.copyfile(os.path.join(work, "view_0000.png"), os.path.join(folder, f"{stem}.png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return save_pass_files(folder, stem, view.passes)


# The passes a cached view with passes must hold, each (H, W, ...) of its image and of its dtype
# (shared/protocol.py).  A file written before a pass existed (e.g. roughness) is a miss: re-rendered.
_CACHED_PASSES = protocol.PASS_DTYPES


def _read_cached(path: str, passes: bool) -> RenderedView | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            rgba = np.array(z["rgba"])
            got = {k: np.array(z[k]) for k in _CACHED_PASSES if k in z} if passes else {}
    except (OSError, KeyError, ValueError):
        return None
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[-1] != 4:
        return None
    if passes and (len(got) != len(_CACHED_PASSES)
                   or any(v.dtype != _CACHED_PASSES[k] or v.shape[:2] != rgba.shape[:2] for k, v in got.items())):
        return None
    return RenderedView(rgba, got, cached=True)


def _write_cached(path: str, view: RenderedView) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, rgba=view.rgba, **view.passes)
    os.replace(tmp, path)   # atomic: a cancelled write never leaves half a file under the key


# --------------------------------------------------------------------------------------------
# The job message
# --------------------------------------------------------------------------------------------
def build_submit(images: np.ndarray, intrinsics: np.ndarray, poses: np.ndarray, aabb: np.ndarray, *,
                 name: str = "", method: str = "nerf", preset: str = "standard", steps: int = 0,
                 seconds: float = 0.0, mesh_resolution: int = 0, mesh_opacity: float = 0.0,
                 preview_size: int = 128,
                 preview_interval: float = 1.0, eval_intrinsics=None, eval_poses=None,
                 eval_sizes=None, passes: dict | None = None, texture_size: int = 0, max_faces: int = 0,
                 lens_models=None, distortion=None, image_sizes=None, background: str = "auto",
                 camera_refine: str = "off", appearance: bool = False, encoding: str = "hashgrid",
                 times=None, eval_times=None, mesh_time: float = 0.0, material_steps: int = 0) -> "protocol.Submit":
    """A validated Submit.

    Args:
        images: (N, H, W, 4) uint8 sRGB RGBA, top row first.
        intrinsics: (N, 4) fx, fy, cx, cy; poses: (N, 4, 4) camera-to-world; aabb: (2, 3).
        eval_intrinsics / eval_poses / eval_sizes: (M, 4), (M, 4, 4), (M, 2) int (width, height)
            of cameras the backend renders after fitting; None: none.
        passes: None, or C1 passes of the images (each optional): "albedo" (N, H, W, 3) uint8,
            "normal" (N, H, W, 3) float (sent as float16), "depth" (N, H, W) float32,
            "roughness" (N, H, W) float in [0, 1], protocol.NO_ROUGHNESS (-1) where there is no
            value (sent as float16, which keeps -1, 0 and 1 exact).
        mesh_opacity: radiance fields' surface level in (0, 0.99]; 0: chosen per field.
        texture_size: side of the baked UV textures (albedo, normal, roughness); 0: vertex colours.
        max_faces: most triangles of the mesh; 0: the backend's default.
        lens_models / distortion: None (pinhole), or (N,) int32 shared.cameras lens codes and
            (N, 6) float64 k1 k2 k3 k4 p1 p2 of the images (photos of imported cameras).
        image_sizes: None (all images W x H), or (N, 2) int (width, height) of photos of
            different sizes, each top-left in its slot (protocol.pad_images).
        background / camera_refine / appearance: photo captures' settings (protocol.Submit).
        encoding: the field's encoding of positions (shared/methods.py ENCODINGS).
        times / eval_times: None, or each view's (eval camera's) instant in [0, 1] (a capture over
            time); mesh_time: the instant the mesh shows.
        material_steps: photos without passes: steps estimating materials and light (0: off).
    Raises:
        protocol.ProtocolError if a value is out of range.
    """
    m = 0 if eval_intrinsics is None else len(eval_intrinsics)
    msg = protocol.Submit(
        images=np.ascontiguousarray(images, dtype=np.uint8),
        intrinsics=np.asarray(intrinsics, dtype=np.float64).reshape(-1, 4),
        poses=np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4),
        aabb=np.asarray(aabb, dtype=np.float64).reshape(2, 3),
        name=name[: protocol.MAX_NAME], method=method, preset=preset, steps=int(steps),
        # (rounded: Blender's float32 property holds 0.99 as 0.9900000095, above the wire's cap)
        seconds=float(seconds), mesh_resolution=int(mesh_resolution), mesh_opacity=round(float(mesh_opacity), 4),
        preview_size=int(preview_size),
        preview_interval=float(preview_interval), texture_size=int(texture_size), max_faces=int(max_faces),
        eval_intrinsics=np.asarray(eval_intrinsics if m else np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4),
        eval_poses=np.asarray(eval_poses if m else np.zeros((0, 4, 4)), dtype=np.float64).reshape(-1, 4, 4),
        eval_sizes=np.asarray(eval_sizes if m else np.zeros((0, 2)), dtype=np.int32).reshape(-1, 2),
        background=background, camera_refine=camera_refine, appearance=bool(appearance), encoding=encoding,
        material_steps=int(material_steps),
    )
    passes = passes or {}
    if "albedo" in passes:
        msg.albedo = np.ascontiguousarray(passes["albedo"], dtype=np.uint8)
    if "normal" in passes:
        msg.normal = np.ascontiguousarray(passes["normal"], dtype=np.float16)
    if "depth" in passes:
        msg.depth = np.ascontiguousarray(passes["depth"], dtype=np.float32)
    if "roughness" in passes:
        msg.roughness = np.ascontiguousarray(passes["roughness"], dtype=np.float16)
    if lens_models is not None:
        msg.lens_models = np.ascontiguousarray(lens_models, dtype=np.int32).reshape(-1)
        msg.distortion = np.ascontiguousarray(distortion, dtype=np.float64).reshape(-1, 6)
    if image_sizes is not None and len(image_sizes):
        msg.image_sizes = np.ascontiguousarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    if times is not None and len(times):
        msg.times = np.asarray(times, dtype=np.float64).reshape(-1)
        msg.eval_times = np.asarray(eval_times if eval_times is not None else np.zeros(0), np.float64).reshape(-1)
        msg.mesh_time = float(mesh_time)
    return msg.validate()
