"""Small random scenes for meta-learning the warm starts (backend/fields/warm_start.py).

    python benchmarks/random_scenes.py --out .data/random_scenes [--count 16] [--views 24] [--size 64]
                                       [--samples 16] [--seed 0]

Each scene (``scene_000``, ...), built with the bpy wheel and rendered by Cycles on the CPU: 2 to
5 primitives (spheres, cubes, cylinders, cones, tori, Suzannes, icospheres) at random places,
turns and sizes, each with a random material (one colour, or a checker, noise or wave texture
between two random colours; random roughness and metallic), lit by a sun from a random direction
and a grey world of random strength, all under a root at a random offset and scale; ``views``
cameras on a sphere (blender_addon.rig) with transparent film, no passes.  Written as
benchmarks/surface_scene.py writes its datasets (transforms.json; no held-out split).
Unlike lego, the flower or DTU on purpose: warm starts are scored on scenes they never saw.
16 scenes of 24 views at 64 x 64: about 2-3 minutes on 2 cores, 2 MB.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import surface_scene  # noqa: E402  (benchmarks/surface_scene.py: materials, lights, the dataset writer)

PRIMITIVES = ("uv_sphere", "cube", "cylinder", "cone", "torus", "monkey", "ico_sphere")
TEXTURES = ("ShaderNodeTexChecker", "ShaderNodeTexNoise", "ShaderNodeTexWave")


def random_material(rng: np.random.Generator, name: str):
    """One colour (a third of the time) or a texture between two random colours."""
    colours = [tuple(float(c) for c in rng.uniform(0.03, 0.95, 3)) for _ in range(2)]
    if rng.random() < 1 / 3:
        mat = surface_scene.plain_material(name, colours[0], float(rng.uniform(0.1, 0.9)))
        bsdf = mat.node_tree.nodes.get("Principled BSDF")
    else:
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        if texture == "ShaderNodeTexChecker":
            mat, tree, bsdf = surface_scene._principled(name)
            tex = tree.nodes.new(texture)
            tex.inputs["Color1"].default_value = (*colours[0], 1.0)
            tex.inputs["Color2"].default_value = (*colours[1], 1.0)
            tex.inputs["Scale"].default_value = float(rng.uniform(2.0, 8.0))
            tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
        else:
            mat, _, bsdf, _, _ = surface_scene._ramped(name, texture, float(rng.uniform(2.0, 8.0)), colours)
        bsdf.inputs["Roughness"].default_value = float(rng.uniform(0.1, 0.9))
    bsdf.inputs["Metallic"].default_value = float(rng.uniform(0.0, 1.0)) if rng.random() < 0.25 else 0.0
    return mat


def add_primitive(rng: np.random.Generator, index: int) -> None:
    """One random primitive under the scene root (benchmarks/surface_scene.py ``add``)."""
    import bpy

    kind = PRIMITIVES[rng.integers(len(PRIMITIVES))]
    size = float(rng.uniform(0.2, 0.55))
    kw = {"uv_sphere": dict(radius=size, segments=48, ring_count=24), "cube": dict(size=1.6 * size),
          "cylinder": dict(radius=0.6 * size, depth=2.0 * size, vertices=48),
          "cone": dict(radius1=size, depth=2.0 * size, vertices=48),
          "torus": dict(major_radius=size, minor_radius=size * float(rng.uniform(0.15, 0.4)),
                        major_segments=64, minor_segments=24),
          "monkey": dict(size=1.6 * size), "ico_sphere": dict(radius=size, subdivisions=int(rng.integers(1, 4)))}[kind]
    location = tuple(float(v) for v in rng.uniform(-0.55, 0.55, 3))
    rotation = tuple(float(v) for v in rng.uniform(0.0, 2.0 * math.pi, 3))
    material = random_material(rng, f"material {index}")
    smooth = kind not in ("cube", "ico_sphere") or rng.random() < 0.5
    surface_scene.add(getattr(bpy.ops.mesh, f"primitive_{kind}_add"), f"{kind} {index}", material, smooth,
                      location=location, rotation=rotation, **kw)


def build(rng: np.random.Generator, size: int, samples: int):
    """A fresh random scene (see the module doc); returns the bpy scene."""
    import bpy
    from mathutils import Vector

    scene = surface_scene.empty_scene(size, samples, seed=int(rng.integers(1 << 20)))
    gt = bpy.data.collections.new(surface_scene.GT_COLLECTION)
    scene.collection.children.link(gt)
    root = bpy.data.objects.new("Scene Root", None)
    root.location = tuple(float(v) for v in rng.uniform(-3.0, 3.0, 3))
    root.scale = (float(np.exp(rng.uniform(np.log(0.3), np.log(4.0)))),) * 3
    gt.objects.link(root)
    for i in range(int(rng.integers(2, 6))):
        add_primitive(rng, i)
    lights = bpy.data.collections.new("Lights")
    scene.collection.children.link(lights)
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    sun.data.energy = float(rng.uniform(1.5, 5.0))
    sun.data.angle = math.radians(float(rng.uniform(2.0, 30.0)))
    direction = Vector(tuple(float(v) for v in rng.normal(size=3))).normalized()
    direction.z = abs(direction.z) + 0.2
    sun.rotation_euler = (-direction).to_track_quat("-Z", "Y").to_euler()
    lights.objects.link(sun)
    scene.world = surface_scene._world("World", tuple(float(v) for v in rng.uniform(0.5, 1.0, 3)),
                                       float(rng.uniform(0.15, 0.6)))
    bpy.context.view_layer.update()
    return scene


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for scene_000, scene_001, ...")
    ap.add_argument("--count", type=int, default=16, help="scenes")
    ap.add_argument("--views", type=int, default=24, help="cameras a scene (a full sphere)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    ap.add_argument("--seed", type=int, default=0, help="the first scene's seed (scene i: seed + i)")
    args = ap.parse_args(argv)
    import bpy

    from fit_implicit.blender_addon import rig

    out = Path(args.out)
    t0 = time.perf_counter()
    for i in range(args.count):
        rng = np.random.default_rng(args.seed + i)
        scene = build(rng, args.size, args.samples)
        view_layer = bpy.context.view_layer
        cams = rig.add_camera_rig(scene, view_layer, count=args.views, hemisphere=bool(rng.random() < 0.3),
                                  objects=surface_scene.gt_objects(view_layer))
        folder = out / f"scene_{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        surface_scene.write_dataset(scene, view_layer, folder, cams, None, passes=False)
    print(f"{args.count} scenes of {args.views} views at {args.size}^2 in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
