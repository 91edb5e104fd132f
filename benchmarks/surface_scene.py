"""The evaluation scenes of the surfaces issues (4 and 12): known geometry, textured materials,
two light setups, cameras on a sphere, a transforms.json dataset WITH passes.

    python benchmarks/surface_scene.py --out out/surface [--scene shapes|still_life] [--views 100]
                                       [--holdout 10] [--size 256] [--samples 64]

Builds, with the bpy wheel (Cycles on the CPU):
- "Ground Truth" collection, under one parent empty that offsets everything to (1.5, -0.8, 0.6)
  and scales it by 1.3 (nothing sits at the origin at unit scale):
  - ``shapes`` (issue 4): a UV sphere, a torus and a bevelled cube; procedural textures with
    clear colour variation (checker, noise, waves) and varying roughness (noise-driven on the
    sphere, constants elsewhere);
  - ``still_life`` (issue 12: thin parts, holes, sharp edges, text-like texture detail): a plain,
    textureless pedestal; on it a small table (a thin top on four legs 0.036 across), a box
    printed with lines of letters (an image texture) and a thin antenna, a plate with three
    round holes through it, a thin upright ring and a four-sided pyramid with unbevelled edges.
- "Training Lights" (a sun + a grey world, used for every render here) and "Novel Lights" (a warm
  area light from the other side + a dim blue world, hidden; benchmarks/relight.py uses it).
- ``views + holdout`` cameras on a Fibonacci sphere (blender_addon.rig), ``holdout`` of them
  held out (the "test" split).
Writes into ``--out``:
    train/r_000.png ... RGBA renders (sRGB, transparent film), test/... the held-out views;
    <stem>_albedo.png, <stem>_normal.png, <stem>_depth.png next to each (encodings:
    backend/fitting/data.py PASS_FILE_KEYS; "depth_scale" at the top level of the json files);
    transforms_train.json, transforms_test.json, transforms.json (all frames + split lists);
    ground_truth.ply (the evaluated geometry in world units, binary), scene.blend, scene.json.
A 100 + 10 view dataset at 256^2 is about 15-25 MB.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

OFFSET = (1.5, -0.8, 0.6)
SCALE = 1.3
GT_COLLECTION = "Ground Truth"
TRAIN_LIGHTS, NOVEL_LIGHTS = "Training Lights", "Novel Lights"
TRAIN_WORLD, NOVEL_WORLD = "Training World", "Novel World"


# --------------------------------------------------------------------------------------------
# Materials
# --------------------------------------------------------------------------------------------
def _principled(name: str):
    import bpy

    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:
        mat.use_nodes = True
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    return mat, mat.node_tree, bsdf


def _ramp(tree, colors):
    ramp = tree.nodes.new("ShaderNodeValToRGB")
    ramp.color_ramp.elements[0].color = (*colors[0], 1.0)
    ramp.color_ramp.elements[1].color = (*colors[1], 1.0)
    return ramp


def checker_material():
    mat, tree, bsdf = _principled("Checker")
    tex = tree.nodes.new("ShaderNodeTexChecker")
    tex.inputs["Color1"].default_value = (0.75, 0.12, 0.08, 1.0)
    tex.inputs["Color2"].default_value = (0.85, 0.8, 0.6, 1.0)
    tex.inputs["Scale"].default_value = 3.0
    tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.6
    return mat


def _ramped(name: str, texture: str, scale: float, colors):
    """A Principled material whose base colour is ``texture``'s Fac through a two-colour ramp:
    (material, node tree, BSDF, texture node, ramp node)."""
    mat, tree, bsdf = _principled(name)
    tex = tree.nodes.new(texture)
    tex.inputs["Scale"].default_value = scale
    ramp = _ramp(tree, colors)
    tree.links.new(tex.outputs["Fac"], ramp.inputs["Fac"])
    tree.links.new(ramp.outputs["Color"], bsdf.inputs["Base Color"])
    return mat, tree, bsdf, tex, ramp


def noise_material():
    mat, tree, bsdf, tex, ramp = _ramped("Noise", "ShaderNodeTexNoise", 4.0, [(0.05, 0.15, 0.6), (0.9, 0.75, 0.1)])
    ramp.color_ramp.elements[0].position, ramp.color_ramp.elements[1].position = 0.4, 0.6   # noise ~ 0.5 +- 0.1
    rough = tree.nodes.new("ShaderNodeMapRange")
    rough.inputs["To Min"].default_value, rough.inputs["To Max"].default_value = 0.15, 0.85
    tree.links.new(tex.outputs["Fac"], rough.inputs["Value"])
    tree.links.new(rough.outputs["Result"], bsdf.inputs["Roughness"])
    return mat


def wave_material():
    mat, _, bsdf, _, _ = _ramped("Waves", "ShaderNodeTexWave", 3.0, [(0.1, 0.55, 0.15), (0.7, 0.1, 0.6)])
    bsdf.inputs["Roughness"].default_value = 0.35
    return mat


def plain_material(name: str, rgb, roughness: float):
    """A Principled material of one colour (no texture at all)."""
    mat, _, bsdf = _principled(name)
    bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    return mat


def letters_image(width: int = 1024, height: int = 512) -> np.ndarray:
    """(height, width, 4) uint8: dark lines of letters and digits on a cream ground, large to
    small (the smallest strokes are about a pixel of a 256-pixel view of the still life)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGBA", (width, height), (235, 225, 200, 255))
    draw = ImageDraw.Draw(img)
    lines = [("FIT IMPLICIT", 96, (20, 30, 90)), ("NEURAL FIELDS 2026", 56, (120, 20, 20)),
             ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 40, (10, 10, 10)), ("0123456789 0123456789", 32, (10, 60, 20)),
             ("the quick brown fox jumps over the lazy dog", 24, (10, 10, 10))]
    y, i = 16, 0
    while y + lines[i % len(lines)][1] < height:        # the lines again, until the image is full
        text, size, colour = lines[i % len(lines)]
        try:
            font = ImageFont.load_default(size=size)     # Pillow's own FreeType font
        except (TypeError, OSError, ImportError):        # no FreeType: the small bitmap font
            font = ImageFont.load_default()
        draw.text((24, y), text, fill=(*colour, 255), font=font)
        y, i = y + int(size * 1.35), i + 1
    return np.asarray(img)


def letters_material(out_dir: Path):
    """Principled, base colour from :func:`letters_image` (written to ``out_dir/letters.png``
    and packed into the .blend), mapped onto every face of a box by its generated coordinates."""
    import bpy
    from PIL import Image

    path = out_dir / "letters.png"
    Image.fromarray(letters_image(), "RGBA").save(path)
    image = bpy.data.images.load(str(path.resolve()))
    image.pack()
    mat, tree, bsdf = _principled("Letters")
    coords = tree.nodes.new("ShaderNodeTexCoord")
    tex = tree.nodes.new("ShaderNodeTexImage")
    tex.image, tex.projection, tex.interpolation = image, "BOX", "Cubic"
    tree.links.new(coords.outputs["Generated"], tex.inputs["Vector"])
    tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.5
    return mat


# --------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------
def _world(name: str, rgb, strength: float):
    import bpy

    world = bpy.data.worlds.new(name)
    if world.node_tree is None:
        world.use_nodes = True
    bg = world.node_tree.nodes.get("Background")
    bg.inputs["Color"].default_value = (*rgb, 1.0)
    bg.inputs["Strength"].default_value = strength
    world.use_fake_user = True       # the unused one must survive saving the .blend
    return world


def _light(collection, name, kind, location, energy, color=(1.0, 1.0, 1.0), size=1.0):
    import bpy
    from mathutils import Vector

    data = bpy.data.lights.new(name, kind)
    data.energy, data.color = energy, color
    if kind == "AREA":
        data.size = size
    ob = bpy.data.objects.new(name, data)
    ob.location = location
    target = Vector(OFFSET)
    ob.rotation_euler = (target - ob.location).to_track_quat("-Z", "Y").to_euler()
    collection.objects.link(ob)
    return ob


def add(op, name, material, smooth, **kw):
    """A primitive made by the operator ``op(**kw)``, named, moved into the ground truth under the
    scene root (built by :func:`build_scene`), with one material, smooth or flat shaded."""
    import bpy

    op(**kw)
    ob = bpy.context.object
    ob.name = name
    for coll in list(ob.users_collection):
        coll.objects.unlink(ob)
    bpy.data.collections[GT_COLLECTION].objects.link(ob)
    ob.parent = bpy.data.objects["Scene Root"]
    ob.data.materials.append(material)
    for poly in ob.data.polygons:
        poly.use_smooth = smooth
    return ob


def empty_scene(size: int, samples: int, seed: int = 0):
    """Blender's empty factory file; its scene renders size x size with Cycles on the CPU,
    ``samples`` a pixel, no denoising, noise seed ``seed``."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    scene.cycles.seed = seed
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    return scene


def build_scene(size: int, samples: int, which: str = "shapes", out_dir: Path | None = None):
    """A fresh scene with the ground-truth objects of ``which`` ("shapes" or "still_life"; the
    latter writes its letters texture into ``out_dir``), both light setups (training active)."""
    import bpy

    scene = empty_scene(size, samples)

    gt = bpy.data.collections.new(GT_COLLECTION)
    scene.collection.children.link(gt)
    root = bpy.data.objects.new("Scene Root", None)
    root.location, root.scale = OFFSET, (SCALE, SCALE, SCALE)
    gt.objects.link(root)

    if which == "still_life":
        still_life(add, scene, out_dir or Path(tempfile.mkdtemp(prefix="still_life_")))
    else:
        add(bpy.ops.mesh.primitive_uv_sphere_add, "Sphere", noise_material(), True,
            radius=0.45, segments=96, ring_count=48, location=(0.45, -0.35, 0.1))
        add(bpy.ops.mesh.primitive_torus_add, "Torus", wave_material(), True, major_radius=0.45,
            minor_radius=0.15, major_segments=96, minor_segments=32, location=(-0.45, 0.3, 0.05),
            rotation=(math.radians(60.0), 0.0, math.radians(20.0)))
        cube = add(bpy.ops.mesh.primitive_cube_add, "Cube", checker_material(), False, size=0.6,
                   location=(0.05, 0.45, -0.2), rotation=(0.0, 0.0, math.radians(30.0)))
        bevel = cube.modifiers.new("Bevel", "BEVEL")
        bevel.width, bevel.segments = 0.04, 3

    train = bpy.data.collections.new(TRAIN_LIGHTS)
    novel = bpy.data.collections.new(NOVEL_LIGHTS)
    scene.collection.children.link(train)
    scene.collection.children.link(novel)
    sun = _light(train, "Sun", "SUN", (OFFSET[0] + 3, OFFSET[1] - 2, OFFSET[2] + 4), 3.0)
    sun.data.angle = math.radians(10.0)
    _light(novel, "Warm Area", "AREA", (OFFSET[0] - 3.0, OFFSET[1] + 2.5, OFFSET[2] + 1.0), 250.0,
           color=(1.0, 0.75, 0.5), size=1.5)
    _light(novel, "Cool Rim", "POINT", (OFFSET[0] + 1.0, OFFSET[1] + 3.0, OFFSET[2] - 1.5), 120.0,
           color=(0.5, 0.7, 1.0))
    _world(TRAIN_WORLD, (0.8, 0.8, 0.8), 0.35)
    _world(NOVEL_WORLD, (0.3, 0.4, 0.6), 0.1)
    use_lighting(scene, "training")
    bpy.context.view_layer.update()
    return scene


def still_life(add, scene, out_dir: Path) -> None:
    """The still life's objects (see the module doc), in the root's frame (before its scale
    1.3): the pedestal's top at z = -0.5, everything else standing on it or on the table."""
    import bpy

    top = -0.5
    add(bpy.ops.mesh.primitive_cylinder_add, "Pedestal", plain_material("Plaster", (0.72, 0.72, 0.7), 0.9), False,
        radius=0.75, depth=0.12, vertices=128, location=(0.0, 0.0, top - 0.06))
    # the table: a 0.025-thick top on four legs of radius 0.018 (0.036 * 1.3 = 0.047 across in the world)
    wood = wave_material()
    plate = add(bpy.ops.mesh.primitive_cube_add, "Table Top", wood, False, size=1.0,
                location=(0.1, -0.1, -0.05))
    plate.scale = (0.6, 0.4, 0.025)
    for i, (dx, dy) in enumerate([(-1, -1), (-1, 1), (1, -1), (1, 1)]):
        add(bpy.ops.mesh.primitive_cylinder_add, f"Table Leg {i}", wood, True, radius=0.018, depth=0.4375,
            vertices=24, location=(0.1 + 0.26 * dx, -0.1 + 0.16 * dy, top + 0.4375 / 2))
    # the printed box on the table, with a thin antenna (radius 0.012) on its top
    box_bottom = -0.05 + 0.0125
    box = add(bpy.ops.mesh.primitive_cube_add, "Letters Box", letters_material(out_dir), False, size=1.0,
              location=(0.12, -0.1, box_bottom + 0.08), rotation=(0.0, 0.0, math.radians(15.0)))
    box.scale = (0.34, 0.2, 0.16)
    add(bpy.ops.mesh.primitive_cylinder_add, "Antenna", plain_material("Steel", (0.55, 0.57, 0.6), 0.3), True,
        radius=0.012, depth=0.3, vertices=16, location=(0.22, -0.1, box_bottom + 0.16 + 0.15))
    # an upright plate (0.04 thick) with three round holes through it (boolean cutters, not rendered)
    holed = add(bpy.ops.mesh.primitive_cube_add, "Holed Plate", checker_material(), False, size=1.0,
                location=(-0.3, 0.35, top + 0.18))
    holed.scale = (0.5, 0.04, 0.36)
    cutters = bpy.data.collections.new("Cutters")
    scene.collection.children.link(cutters)
    cutters.hide_render = cutters.hide_viewport = True
    for i, x in enumerate((-0.44, -0.3, -0.16)):
        bpy.ops.mesh.primitive_cylinder_add(radius=0.05, depth=0.3, vertices=48, location=(x, 0.35, top + 0.18),
                                            rotation=(math.radians(90.0), 0.0, 0.0))
        cutter = bpy.context.object
        cutter.name = f"Hole Cutter {i}"
        for coll in list(cutter.users_collection):
            coll.objects.unlink(cutter)
        cutters.objects.link(cutter)
        cutter.parent = holed.parent
        boolean = holed.modifiers.new(f"Hole {i}", "BOOLEAN")
        boolean.operation, boolean.object = "DIFFERENCE", cutter
    # a thin upright ring (tube radius 0.015) and a four-sided pyramid
    add(bpy.ops.mesh.primitive_torus_add, "Ring", plain_material("Brass", (0.8, 0.55, 0.15), 0.25), True,
        major_radius=0.18, minor_radius=0.015, major_segments=96, minor_segments=16,
        location=(-0.42, -0.32, top + 0.195), rotation=(math.radians(90.0), 0.0, math.radians(25.0)))
    add(bpy.ops.mesh.primitive_cone_add, "Pyramid", noise_material(), False, vertices=4, radius1=0.2,
        radius2=0.0, depth=0.3, location=(0.45, 0.3, top + 0.15), rotation=(0.0, 0.0, math.radians(10.0)))


def use_lighting(scene, which: str) -> None:
    """Switch between the "training" and the "novel" light setup (lights + world)."""
    import bpy

    novel = which == "novel"
    for name, hidden in ((TRAIN_LIGHTS, novel), (NOVEL_LIGHTS, not novel)):
        coll = bpy.data.collections[name]
        coll.hide_render = coll.hide_viewport = hidden
    scene.world = bpy.data.worlds[NOVEL_WORLD if novel else TRAIN_WORLD]


def gt_objects(view_layer) -> list:
    import bpy

    return [ob for ob in bpy.data.collections[GT_COLLECTION].all_objects if ob.type == "MESH"]


def gt_mesh(view_layer) -> tuple[np.ndarray, np.ndarray]:
    """vertices (V, 3) float32 world, triangles (F, 3) int32 of the evaluated ground truth."""
    from fit_implicit.blender_addon.capture import world_triangles

    verts, faces = world_triangles(gt_objects(view_layer), view_layer.depsgraph)
    return verts.astype(np.float32), faces


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def frame_fields(intrinsics, width: int, height: int) -> dict:
    """Per-frame intrinsics keys (instant-ngp / nerfstudio names)."""
    from fit_implicit.shared import cameras

    fx, fy, cx, cy = (float(v) for v in intrinsics)
    ax, ay = cameras.fov_angles(intrinsics, width, height)
    return {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": int(width), "h": int(height),
            "camera_angle_x": ax, "camera_angle_y": ay}


def write_dataset(scene, view_layer, out: Path, cams: list, cache: str | None, passes: bool = True) -> dict:
    """Render every camera (with passes unless ``passes`` is False); write the splits, pass files
    and json files."""
    from PIL import Image

    from fit_implicit.backend.fitting.data import write_pass_files
    from fit_implicit.blender_addon import capture

    w, h = capture.render_size(scene)
    work = tempfile.mkdtemp(prefix="surface_scene_")
    renderer = capture.ViewRenderer(scene, view_layer, work, cache_dir=cache)
    t0 = time.perf_counter()
    views = renderer.render_all(cams, passes=passes,
                                progress=lambda i, n: print(f"\rrendered {i}/{n}", end="", flush=True))
    print(f"\nrendering: {time.perf_counter() - t0:.1f} s ({renderer.renders} rendered, "
          f"{renderer.cache_hits} from the cache)")
    shutil.rmtree(work, ignore_errors=True)
    max_depth = max(float(v.passes["depth"].max()) for v in views) if passes else 0.0
    depth_scale = max_depth * 1.05 / 65535.0
    aabb = capture.padded_aabb(capture.world_bbox(gt_objects(view_layer), view_layer.depsgraph))
    frames = {"train": [], "test": []}
    for ob, view in zip(cams, views):
        split = "test" if capture.is_holdout(ob) else "train"
        stem = f"{split}/r_{len(frames[split]):03d}"
        (out / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(view.rgba, "RGBA").save(out / f"{stem}.png")
        keys = write_pass_files(out, stem, view.passes, depth_scale) if passes else {}
        k = capture.camera_intrinsics(ob, scene)
        frames[split].append({"file_path": stem, "camera": ob.name, **frame_fields(k, w, h),
                              "transform_matrix": capture.camera_pose(ob).tolist(), **keys})
    top = {"aabb": aabb.tolist(), "camera_model": "OPENCV", **({"depth_scale": depth_scale} if passes else {})}
    for split, fr in frames.items():
        (out / f"transforms_{split}.json").write_text(json.dumps({**fr[0], **top, "frames": fr}, indent=1)
                                                      if fr else json.dumps({**top, "frames": []}))
    every = [{**f, "file_path": f["file_path"] + ".png"} for s in ("train", "test") for f in frames[s]]
    doc = {**top, "frames": every, "train_filenames": [f["file_path"] + ".png" for f in frames["train"]],
           "test_filenames": [f["file_path"] + ".png" for f in frames["test"]]}
    doc["val_filenames"] = doc["test_filenames"]
    (out / "transforms.json").write_text(json.dumps(doc, indent=1))
    return {"train": len(frames["train"]), "test": len(frames["test"]), "depth_scale": depth_scale,
            "aabb": aabb.tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument("--scene", choices=("shapes", "still_life"), default="shapes",
                    help="which objects: shapes (issue 4) or still_life (issue 12: thin parts, holes, letters)")
    ap.add_argument("--views", type=int, default=100, help="training views")
    ap.add_argument("--holdout", type=int, default=10, help="held-out views")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--samples", type=int, default=64, help="Cycles samples per pixel")
    ap.add_argument("--cache", default=None, help="render cache folder (resume an interrupted run)")
    args = ap.parse_args(argv)
    import bpy

    from fit_implicit.blender_addon import rig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scene = build_scene(args.size, args.samples, args.scene, out)
    view_layer = bpy.context.view_layer
    total = args.views + args.holdout
    cams = rig.add_camera_rig(scene, view_layer, count=total, hemisphere=False,
                              holdout_share=args.holdout / total, objects=gt_objects(view_layer))
    info = write_dataset(scene, view_layer, out, cams, args.cache)
    verts, faces = gt_mesh(view_layer)
    from fit_implicit.backend.export.files import write_mesh    # grey: the ground truth has no colours
    write_mesh(out / "ground_truth.ply", verts, faces, np.full(verts.shape, 0.5, np.float32))
    lo, hi = verts.min(0), verts.max(0)
    info.update(ground_truth={"vertices": len(verts), "triangles": len(faces), "bbox": [lo.tolist(), hi.tolist()],
                              "diagonal": float(np.linalg.norm(hi - lo))},
                scene=args.scene, size=args.size, samples=args.samples, lights={"training": TRAIN_LIGHTS, "novel": NOVEL_LIGHTS})
    (out / "scene.json").write_text(json.dumps(info, indent=1))
    bpy.ops.wm.save_as_mainfile(filepath=str((out / "scene.blend").resolve()))
    mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix in (".png", ".json")) / 2**20
    print(f"dataset: {info['train']} train + {info['test']} held-out views at {args.size}^2, "
          f"{mb:.1f} MB of images and json; ground truth {len(verts)} vertices, diagonal "
          f"{info['ground_truth']['diagonal']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
