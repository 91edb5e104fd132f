"""The main job, headless: Blender scene -> backend -> imported mesh, with a report.

    python scripts/demo.py --out out        (what `make demo` runs)

1. starts a backend process (`fit-implicit serve`, on a free loopback port);
2. builds a small scene in bpy: a two-tone Suzanne, off-centre, rotated and scaled, one sun;
3. fits it through the add-on's own code path (``fit_scene``, what the Fit Implicit button
   runs) with the panel's method, a signed distance field: a ring of cameras is placed around
   the selection, the views are rendered with Cycles with their albedo, normal, depth and
   roughness passes, sent over ZeroMQ, trained on, and the mesh comes back with baked textures
   (base colour, normal map, roughness) and is imported;
4. writes out/demo.blend, out/demo_compare.png (held-out camera: ground truth | field render |
   imported mesh render) and out/demo_report.json (timings, held-out PSNR, Chamfer distance).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from fit_implicit.backend.fitting.metrics import chamfer, psnr_white  # noqa: E402


def start_backend(device: str | None) -> tuple[subprocess.Popen, str]:
    """Start `fit-implicit serve` on a free port; return the process and its address."""
    # Its own job folder: the demo must not resume (and wait behind) unfinished jobs that another
    # backend left in the user's default runs folder.
    runs = tempfile.mkdtemp(prefix="fit_implicit_demo_runs_")
    cmd = [sys.executable, "-m", "fit_implicit.backend", "serve", "--bind", "tcp://127.0.0.1:0", "--runs-dir", runs]
    if device:
        cmd += ["--device", device]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.kill()
    raise SystemExit("the backend did not start (see its output above)")


def build_scene(resolution: int):
    """A small scene: Suzanne (subdivided, two-tone checker material) off the origin, one sun."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 24
    scene.cycles.use_denoising = False
    scene.render.resolution_x = scene.render.resolution_y = resolution
    scene.render.resolution_percentage = 100

    bpy.ops.mesh.primitive_monkey_add(size=1.6, location=(0.6, -0.4, 1.1), rotation=(0.2, 0.0, math.radians(35)))
    obj = bpy.context.active_object
    obj.name = "Suzanne"
    obj.scale = (1.0, 1.0, 1.15)
    mod = obj.modifiers.new("Subdivision", "SUBSURF")
    mod.levels = mod.render_levels = 1
    bpy.ops.object.shade_smooth()

    mat = bpy.data.materials.new("Two tone")
    mat.use_nodes = True
    nt = mat.node_tree
    bsdf = nt.nodes.get("Principled BSDF")
    checker = nt.nodes.new("ShaderNodeTexChecker")
    checker.inputs["Scale"].default_value = 3.0
    checker.inputs["Color1"].default_value = (0.80, 0.28, 0.05, 1.0)
    checker.inputs["Color2"].default_value = (0.05, 0.45, 0.60, 1.0)
    nt.links.new(checker.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.6
    obj.data.materials.append(mat)

    sun = bpy.data.lights.new("Sun", "SUN")
    sun.energy = 3.0
    sun_ob = bpy.data.objects.new("Sun", sun)
    sun_ob.rotation_euler = (math.radians(40), math.radians(10), math.radians(30))
    scene.collection.objects.link(sun_ob)
    world = bpy.data.worlds.new("World")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.5, 0.5, 0.5, 1.0)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.6
    scene.world = world

    bpy.ops.object.select_all(action="DESELECT")
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    return scene, obj


def add_heldout_camera(scene, target, distance: float):
    """A camera between the ring's views (azimuth and elevation no ring camera uses)."""
    import bpy
    from mathutils import Matrix

    from fit_implicit.shared import cameras

    center = np.array(target, dtype=np.float64)
    elev, azim = math.radians(32.0), math.radians(100.0)
    eye = center + distance * np.array([math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)])
    data = bpy.data.cameras.new("Held-out")
    data.lens = 50.0
    ob = bpy.data.objects.new("Held-out", data)
    ob.matrix_world = Matrix(cameras.look_at(eye, center).tolist())
    scene.collection.objects.link(ob)
    return ob


def save_compare(path: Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """Side-by-side RGBA panels composited on white, with a caption strip under each."""
    from PIL import Image, ImageDraw

    zoom = max(1, 256 // max(p.shape[0] for _, p in panels))     # small renders: enlarge, no smoothing
    h = zoom * max(p.shape[0] for _, p in panels)
    w = zoom * sum(p.shape[1] for _, p in panels)
    canvas = Image.new("RGB", (w, h + 18), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, rgba in panels:
        a = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = (rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)
        img = Image.fromarray(rgb)
        img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
        canvas.paste(img, (x, 0))
        draw.text((x + 4, h + 3), title, fill=(0, 0, 0))
        x += img.width
    canvas.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out")
    ap.add_argument("--resolution", type=int, default=128, help="render size (square), pixels")
    ap.add_argument("--views", type=int, default=24, help="ring cameras to train on")
    ap.add_argument("--method", default="sdf", choices=("sdf", "occupancy", "nerf"),
                    help="the field (default: the panel's, a signed distance field)")
    ap.add_argument("--preset", default="draft", choices=("draft", "standard", "high"))
    ap.add_argument("--steps", type=int, default=600, help="training steps (0: the preset's)")
    # No time budget by default: with one, the schedule follows the clock wherever the clock runs
    # ahead of the steps (previews, one-time costs), and the result varies from run to run.
    ap.add_argument("--seconds", type=float, default=0.0, help="training time budget, 0: none (else it may stop "
                                                                "the fit before --steps)")
    ap.add_argument("--texture-size", type=int, default=512,
                    help="side of the baked textures (0: vertex colours); 512 holds the 128-pixel views' detail")
    ap.add_argument("--device", default=None, help="backend device (default: cuda if present, else cpu)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    t = time.perf_counter()
    backend, address = start_backend(args.device)
    timings["backend_start"] = time.perf_counter() - t
    try:
        import bpy

        from fit_implicit import blender_addon
        from fit_implicit.blender_addon.fit_session import fit_scene

        t = time.perf_counter()
        scene, source = build_scene(args.resolution)
        blender_addon.register()
        from fit_implicit.blender_addon.capture import world_triangles
        src_v, src_f = world_triangles([source], bpy.context.evaluated_depsgraph_get())
        center = 0.5 * (src_v.min(0) + src_v.max(0))
        diag = float(np.linalg.norm(src_v.max(0) - src_v.min(0)))
        heldout = add_heldout_camera(scene, center, distance=1.45 * diag)
        timings["scene"] = time.perf_counter() - t

        print(f"fitting through the add-on (backend {address}) ...", flush=True)
        t = time.perf_counter()
        result = fit_scene(bpy.context, address, method=args.method, preset=args.preset, steps=args.steps,
                           seconds=args.seconds, texture_size=args.texture_size, ring_count=args.views,
                           eval_cameras=[heldout], ring_holdout=0, preview_size=96)
        timings["fit_total"] = time.perf_counter() - t
        timings.update({f"fit_{k}": v for k, v in result.timings.items()})

        if result.object is None or not result.asset_renders:
            raise SystemExit(f"the fit came back without a mesh: {result.message} (summary {result.summary})")
        # The add-on rendered the imported mesh at the held-out camera with the scene's light, the
        # source hidden (blender_addon/asset_check.py): what an artist sees after Fit.
        truth, field, mesh_view = result.eval_reference[0], result.renders[0], result.asset_renders[0]

        out_v, out_f = world_triangles([result.object], bpy.context.evaluated_depsgraph_get())
        cd = chamfer(src_v, src_f, out_v, out_f, samples=100_000)
        report = {
            "scene": "Suzanne (subdivided, two-tone), off-centre, rotated, scaled",
            "views": len(result.camera_names), "resolution": args.resolution,
            "method": args.method, "preset": args.preset, "seconds_budget": args.seconds,
            "texture_size": args.texture_size,
            "backend_device": result.summary.get("device", ""),
            "training_steps": result.summary.get("steps"),
            "heldout_psnr_field_db": round(psnr_white(field, truth), 2),
            "heldout_psnr_mesh_db": round(psnr_white(mesh_view, truth), 2),
            # the asset against the field (positive: the imported mesh loses that much)
            "heldout_psnr_gap_db": round(psnr_white(field, truth) - psnr_white(mesh_view, truth), 2),
            "chamfer": round(cd["chamfer"], 5),
            "chamfer_relative_to_bbox_diagonal": round(cd["chamfer"] / diag, 5),
            "fscore_1pct": round(cd["fscore"], 4),
            "source_bbox_diagonal": round(diag, 4),
            "mesh_vertices": int(len(out_v)), "mesh_faces": int(len(out_f)),
            "mesh_center_offset": round(float(np.linalg.norm(0.5 * (out_v.min(0) + out_v.max(0)) - center)), 4),
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "host": platform.node(), "cpu_count": os.cpu_count(),
        }
        save_compare(args.out / "demo_compare.png",
                     [("ground truth (held out)", truth), ("field render", field), ("imported mesh", mesh_view)])
        bpy.ops.wm.save_as_mainfile(filepath=str((args.out / "demo.blend").resolve()))
        report["timings_s"]["total"] = round(time.perf_counter() - t_all, 2)
        (args.out / "demo_report.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    finally:
        backend.terminate()
        try:
            backend.wait(timeout=10)
        except subprocess.TimeoutExpired:
            backend.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
