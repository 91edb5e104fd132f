"""Issue 17's evaluation scene: an animated Blender scene rendered as D-NeRF's datasets are (one
camera a frame), with the ground-truth geometry of every frame; and the scores of a fit of it.

    python benchmarks/dynamic_scene.py render --out .data/dynamic [--frames 120] [--size 400] [--samples 16]
    python benchmarks/dynamic_scene.py score --data .data/dynamic --run runs/dynamic [--every 10]

``render`` builds, with the bpy wheel (Cycles on the CPU), benchmarks/surface_scene.py's "shapes"
(a textured sphere, torus and bevelled cube, off the origin, scaled) and animates them over
2 ``--frames`` - 1 scene frames (training views at the odd ones, held-out views at every
``--test-every``-th even one: instants no training view shows, as D-NeRF's test splits): the
cube travels and turns (rigid motion), the sphere squashes and stretches as it bounces, a thin
two-bladed propeller spins two turns (a thin, fast part) and a subdivided sheet ripples (a Wave
modifier: a deforming surface).  Cameras: a sphere of 24, 4 of them held out
(blender_addon.rig); the add-on's dataset export over time (blender_addon/dataset_io.py,
over_time RANDOM: one training camera a frame, picked at random; the held-out cameras one a frame
in turn) writes transforms_train.json / transforms_test.json with each frame's ``time``.  The
evaluated geometry of every training frame goes to ground_truth.npz (v_<frame>, f_<frame>, "frames").

``score`` meshes a fitted run (``fit-implicit fit DATA --out RUN``) at every ``--every``-th frame's
instant and prints the Chamfer distance and F-score against that frame's ground truth, in % of
the box diagonal (backend/fitting/metrics.py, docs/benchmarks.md conventions), and the same for
One Moving Mesh: the middle scored frame's mesh followed through the others (backend/export/
tracks.py; ``followed_*``, with the share of positions lost); held-out PSNR at
held-out instants comes from ``fit-implicit eval RUN --cameras DATA/transforms_test.json`` or
benchmarks/lego.py ``--test DATA/transforms_test.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import surface_scene  # noqa: E402  (benchmarks/surface_scene.py: the shapes, lights, materials)

CAMERAS, HELD_OUT = 24, 4


def animate(scene, frames: int) -> None:
    """Keyframe the shapes and add the propeller and the sheet (see the module doc)."""
    import bpy

    from fit_implicit.blender_addon.results import fcurves

    gt = bpy.data.collections[surface_scene.GT_COLLECTION]
    root = bpy.data.objects["Scene Root"]
    scene.frame_start, scene.frame_end = 1, frames
    last = frames

    def key(ob, path, value, frame):
        setattr(ob, path, value)
        ob.keyframe_insert(path, frame=frame)

    cube, sphere = bpy.data.objects["Cube"], bpy.data.objects["Sphere"]
    key(cube, "location", (0.05, 0.45, -0.2), 1)                        # rigid: travels and turns
    key(cube, "rotation_euler", (0.0, 0.0, math.radians(30.0)), 1)
    key(cube, "location", (0.35, 0.05, 0.25), last)
    key(cube, "rotation_euler", (math.radians(40.0), 0.0, math.radians(120.0)), last)
    for i, (z, squash) in enumerate([(0.1, 1.0), (-0.15, 0.6), (0.25, 1.25), (-0.15, 0.6), (0.1, 1.0)]):
        frame = 1 + round(i * (last - 1) / 4)                            # bounce: squash and stretch
        key(sphere, "location", (0.45, -0.35, z), frame)
        key(sphere, "scale", (1.0 / math.sqrt(squash), 1.0 / math.sqrt(squash), squash), frame)

    hub = bpy.data.objects.new("Propeller", None)                       # thin and fast: two turns
    gt.objects.link(hub)
    hub.parent = root
    hub.location = (-0.45, -0.45, 0.45)
    for i in range(2):
        blade = surface_scene.add(bpy.ops.mesh.primitive_cube_add, f"Blade {i}", surface_scene.plain_material(
            f"Blade {i}", (0.9, 0.75, 0.1), 0.4), False, size=1.0)
        blade.scale = (0.5, 0.04, 0.015)
        blade.rotation_euler = (0.0, 0.0, math.pi / 2 * i)
        blade.parent = hub
    key(hub, "rotation_euler", (0.0, 0.0, 0.0), 1)
    key(hub, "rotation_euler", (0.0, 0.0, 4.0 * math.pi), last)
    sheet = surface_scene.add(bpy.ops.mesh.primitive_plane_add, "Sheet", surface_scene.checker_material(), True,
                              size=0.9, location=(-0.2, 0.2, -0.55))    # deforming: a travelling ripple
    sub = sheet.modifiers.new("Subdivide", "SUBSURF")
    sub.subdivision_type, sub.levels, sub.render_levels = "SIMPLE", 5, 5
    wave = sheet.modifiers.new("Ripple", "WAVE")
    wave.height, wave.width, wave.narrowness, wave.speed = 0.12, 0.5, 1.5, 1.2 / last     # 1.2 units a clip
    solid = sheet.modifiers.new("Thickness", "SOLIDIFY")
    solid.thickness = 0.02
    for ob in (bpy.data.objects["Cube"], sphere, hub):
        for fc in fcurves(ob):
            for kp in fc.keyframe_points:
                kp.interpolation = "LINEAR" if ob is hub else "BEZIER"


def cmd_render(args) -> int:
    import bpy

    from fit_implicit.blender_addon import capture, dataset_io, rig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scene = surface_scene.build_scene(args.size, args.samples, "shapes", out)
    animate(scene, 2 * args.frames - 1)
    layer = bpy.context.view_layer
    scene.frame_set(1)
    rig.add_camera_rig(scene, layer, count=CAMERAS, hemisphere=False, holdout_share=HELD_OUT / CAMERAS,
                       objects=surface_scene.gt_objects(layer))
    # the box holds every frame: the union of the frames' boxes
    boxes = []
    for f in range(1, 2 * args.frames, max(1, args.frames // 12)):
        scene.frame_set(f)
        boxes.append(capture.world_bbox(surface_scene.gt_objects(layer), layer.depsgraph))
    aabb = capture.padded_aabb(np.stack([np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)]))
    scene.frame_set(1)
    t0 = time.perf_counter()
    # training views at the odd frames, held-out ones at every test_every-th even frame: instants
    # no training view shows (D-NeRF's test split)
    last = 2 * args.frames - 1
    info = dataset_io.export_dataset(scene, layer, str(out), aabb=aabb, over_time="RANDOM", frame_range=(1, last, 2),
                                     test_frame_range=(2, last - 1, 2 * args.test_every),
                                     progress=lambda i, n: print(f"\rrendered {i}/{n}", end="", flush=True))
    print(f"\nrendering: {time.perf_counter() - t0:.1f} s")
    arrays = {"frames": np.arange(1, last + 1, 2)}
    for f in arrays["frames"]:
        scene.frame_set(f)
        v, tri = surface_scene.gt_mesh(layer)
        arrays[f"v_{int(f):04d}"], arrays[f"f_{int(f):04d}"] = v, tri.astype(np.int32)
    np.savez_compressed(out / "ground_truth.npz", **arrays)
    info.update(frames=args.frames, size=args.size, samples=args.samples, aabb=aabb.tolist())
    (out / "scene.json").write_text(json.dumps(info, indent=1))
    print(f"{info['train']} training views (one a frame), {info['test']} held out, {args.frames} frames of "
          f"ground truth -> {out}")
    return 0


def cmd_score(args) -> int:
    import torch

    from fit_implicit.backend.export.mesh import extract_mesh
    from fit_implicit.backend.export.tracks import follow_vertices
    from fit_implicit.backend.fitting.metrics import chamfer
    from fit_implicit.backend.fitting.runs import load_run

    model = load_run(args.run, device=args.device)
    if not model.dynamic:
        raise SystemExit(f"{args.run}: not a fit over time")
    truth = np.load(Path(args.data) / "ground_truth.npz")
    frames = truth["frames"]
    first, last = int(frames[0]), int(frames[-1])
    scored_frames = frames[::args.every]
    times = [(int(f) - first) / (last - first) for f in scored_frames]
    # One Moving Mesh: the middle frame's mesh followed through the scored frames (export/tracks.py)
    model.time = times[len(times) // 2]
    ref_verts, ref_faces, _ = extract_mesh(model, args.mesh_resolution)
    followed, follow_facts = (follow_vertices(model, ref_verts, times) if len(ref_faces) else (None, {}))
    rows = []
    for i, f in enumerate(scored_frames):
        model.time = times[i]
        verts, faces, _ = extract_mesh(model, args.mesh_resolution)
        gv, gf = truth[f"v_{int(f):04d}"], truth[f"f_{int(f):04d}"]
        if not len(faces):
            rows.append({"frame": int(f), "time": round(model.time, 4), "faces": 0})
            print(json.dumps(rows[-1]), "(no surface at this instant)", flush=True)
            continue
        scores = chamfer(gv, gf, verts, faces)
        diagonal = float(np.linalg.norm(gv.max(0) - gv.min(0)))
        row = {"frame": int(f), "time": round(model.time, 4), "faces": int(len(faces)),
               "chamfer_pct": round(100.0 * scores["chamfer"] / diagonal, 4), **scores}
        if followed is not None:
            moving = chamfer(gv, gf, followed[i], ref_faces)
            row.update(followed_chamfer_pct=round(100.0 * moving["chamfer"] / diagonal, 4),
                       followed_fscore=moving.get("fscore", float("nan")))
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    scored = [r for r in rows if r["faces"]]
    keys = [k for k in (scored[0] if scored else {}) if k not in ("frame", "time") and isinstance(scored[0][k], float)]
    mean = {k: round(float(np.mean([r[k] for r in scored])), 4) for k in keys}
    mean["frames_without_surface"] = len(rows) - len(scored)
    mean.update({k: round(v, 6) for k, v in follow_facts.items()})
    print("mean over frames:", json.dumps(mean))
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(args.run), "frames": rows, "mean": mean,
                                              "device": str(model.device), "torch": torch.__version__}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="build, animate and render the scene (needs bpy)")
    r.add_argument("--out", required=True)
    r.add_argument("--frames", type=int, default=120, help="training frames (one view each)")
    r.add_argument("--test-every", type=int, default=6, help="a held-out view every this many frames, between two "
                   "training frames")
    r.add_argument("--size", type=int, default=400)
    r.add_argument("--samples", type=int, default=16)
    r.set_defaults(func=cmd_render)
    s = sub.add_parser("score", help="Chamfer / F-score of a fit's meshes against every frame's geometry")
    s.add_argument("--data", required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--every", type=int, default=10)
    s.add_argument("--mesh-resolution", type=int, default=256)
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="")
    s.set_defaults(func=cmd_score)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
