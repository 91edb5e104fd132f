"""Relighting evaluation (issue 4): the ground truth and fitted assets under a light that was
NOT used for training, rendered in Cycles at the held-out cameras, compared by PSNR.

    python benchmarks/relight.py --scene out/surface/scene.blend \\
        --asset albedo=runs/sdf/mesh.glb --asset baked=runs/nerf/mesh.ply [--size 256] [--samples 64]

Each ``--asset LABEL=PATH`` is a .glb/.gltf (the fit's mesh with its PBR textures; imported with
blender_addon.importer's asset importer when it has one, else Blender's glTF importer) or a
.ply/.obj with vertex colours (wired into a Principled BSDF's Base Color).  An asset whose base
colour is the radiance seen in training (e.g. a radiance-field mesh, or an SDF trained without
the albedo pass) is the "radiance baked into base colour" baseline.

For every held-out camera of the scene (custom property ``implicit_holdout``, written by
benchmarks/surface_scene.py) it renders the ground truth and each asset (ground truth hidden)
under the "novel" light setup, and under the "training" one for reference.  PSNR is over the
pixels either image covers (RGB composited on black, 8-bit sRGB), averaged over cameras.

    python benchmarks/relight.py --tiny --out /tmp/relight_tiny

runs the whole chain small on the CPU (a 64^2 scene, a short radiance-field fit with
``fit-implicit fit``, its mesh as the baked baseline, and the same mesh coloured with the
albedo pass projected from the training views, see projected_albedo) to show that it works end
to end.  ``--albedo-from LABEL=DATASET`` does that recolouring for any asset.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from fit_implicit.backend.fitting import metrics  # noqa: E402

ASSET_COLLECTION = "Relight Asset"
NOISE_FLOOR = "ground truth, seed + 1"     # --noise-floor's row


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two (H, W, 4) uint8 RGBA images composited on black, over covered pixels
    (not backend.fitting.metrics.psnr_white's whole image on white: the relit renders are
    compared where either shows the object)."""
    fa = a[..., :3].astype(np.float64) * (a[..., 3:] / 255.0) / 255.0
    fb = b[..., :3].astype(np.float64) * (b[..., 3:] / 255.0) / 255.0
    mask = (a[..., 3] > 0) | (b[..., 3] > 0)
    if not mask.any():
        return float("inf")
    return metrics.psnr(float(np.mean((fa[mask] - fb[mask]) ** 2)))


def aligned(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` (H, W, 3 or 4) uint8 sRGB with each colour channel scaled, in linear light, to match
    ``b`` best (least squares) over the pixels both cover: the per-channel scale alignment of the
    inverse-rendering benchmarks (NeRFactor, TensoIR: a material and its light share one scale a
    channel that no photo decides).  Alpha is kept."""
    from fit_implicit.shared.color import linear_to_srgb, srgb_to_linear

    la, lb = srgb_to_linear(a[..., :3] / 255.0), srgb_to_linear(b[..., :3] / 255.0)
    both = np.ones(a.shape[:2], bool)
    if a.shape[-1] == 4:
        both &= a[..., 3] > 0
    if b.shape[-1] == 4:
        both &= b[..., 3] > 0
    if not both.any():
        return a.copy()
    scale = (la[both] * lb[both]).sum(0) / np.maximum((la[both] ** 2).sum(0), 1e-12)
    out = a.copy()
    out[..., :3] = (linear_to_srgb(np.clip(la * scale, 0.0, 1.0)) * 255.0 + 0.5).astype(np.uint8)
    return out


def albedo_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of two (H, W, 3) uint8 sRGB diffuse-colour passes over ``mask`` (pixels both
    renders cover), after the per-channel alignment (:func:`aligned`)."""
    a = aligned(np.concatenate([a, mask[..., None].astype(np.uint8) * 255], -1), b)[..., :3]
    diff = (a[mask].astype(np.float64) - b[mask].astype(np.float64)) / 255.0
    return metrics.psnr(float(np.mean(diff ** 2))) if mask.any() else float("inf")


def projected_albedo(points: np.ndarray, dataset: Path, tolerance: float = 0.02) -> np.ndarray:
    """(P, 3) float32 sRGB albedo of world points, averaged over the training views that see
    them: a point is seen where its z-depth matches the depth pass within ``tolerance`` times
    the depth.  Points no view sees get mid grey.  This is what an albedo-supervised fit
    aims at, without training one (an upper bound of "relightable by construction")."""
    from fit_implicit.backend.fitting.data import load_transforms
    from fit_implicit.shared import cameras

    data = load_transforms(dataset)
    if not {"albedo", "depth"} <= set(data.passes):
        raise ValueError(f"{dataset}: the dataset has no albedo and depth passes")
    total = np.zeros((len(points), 3))
    count = np.zeros(len(points))
    for i in range(len(data)):
        uv, z = cameras.project(points, data.intrinsics[i], data.poses[i])
        x, y = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        ok = (z > 0) & (x >= 0) & (y >= 0) & (x < data.width) & (y < data.height)
        d = np.zeros(len(points))
        d[ok] = data.passes["depth"][i, y[ok], x[ok]]
        ok &= (d > 0) & (np.abs(d - z) < tolerance * z)
        total[ok] += data.passes["albedo"][i, y[ok], x[ok]] / 255.0
        count[ok] += 1
    out = np.full((len(points), 3), 0.5)
    seen = count > 0
    out[seen] = total[seen] / count[seen, None]
    return out.astype(np.float32)


def recolor_with_albedo(objects, dataset: Path) -> None:
    """Replace the base colour of imported meshes by the albedo projected from ``dataset``."""
    from fit_implicit.blender_addon import importer

    for ob in objects:
        if ob.type != "MESH":
            continue
        co = np.empty(len(ob.data.vertices) * 3, np.float32)
        ob.data.vertices.foreach_get("co", co)
        m = np.array(ob.matrix_world, dtype=np.float64)
        world = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        importer.set_point_colors(ob.data, projected_albedo(world, dataset), "Albedo")
        ob.data.materials.clear()
        ob.data.materials.append(importer.vertex_color_material("Relight Albedo", "Albedo"))


def import_asset(scene, path: Path) -> list:
    """Import a .glb/.gltf/.ply/.obj into the collection ASSET_COLLECTION; returns its objects."""
    import bpy

    from fit_implicit.blender_addon import importer

    before = set(bpy.data.objects)
    suffix = path.suffix.lower()
    custom = next((getattr(importer, n) for n in ("import_asset", "import_glb") if hasattr(importer, n)), None)
    if suffix in (".glb", ".gltf") and custom is not None:
        custom(scene, str(path))
    elif suffix in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=str(path))
    elif suffix == ".ply":
        bpy.ops.wm.ply_import(filepath=str(path))
    elif suffix == ".obj":
        bpy.ops.wm.obj_import(filepath=str(path))
    else:
        raise ValueError(f"{path}: cannot import {suffix} files (use .glb, .gltf, .ply or .obj)")
    new = [ob for ob in bpy.data.objects if ob not in before]
    if not new:
        raise ValueError(f"{path}: nothing was imported")
    coll = importer.ensure_collection(scene, ASSET_COLLECTION)
    for ob in new:
        for c in list(ob.users_collection):
            c.objects.unlink(ob)
        coll.objects.link(ob)
        if ob.type == "MESH" and not ob.data.materials and len(ob.data.color_attributes):
            attr = ob.data.color_attributes[0].name
            ob.data.materials.append(importer.vertex_color_material(f"Relight {attr}", attr))
    bpy.context.view_layer.update()
    return new


def remove_asset() -> None:
    import bpy

    coll = bpy.data.collections.get(ASSET_COLLECTION)
    if coll is None:
        return
    for ob in list(coll.all_objects):
        bpy.data.objects.remove(ob, do_unlink=True)
    bpy.data.collections.remove(coll)


def render_set(scene, cams, folder: str) -> list[np.ndarray]:
    from fit_implicit.blender_addon import capture

    return [capture.render_view(scene, ob, f"{folder}/r_{i:03d}.png") for i, ob in enumerate(cams)]


def render_albedo_set(scene, cams, folder: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(beauty (H, W, 4) uint8, the albedo pass (H, W, 3) uint8 sRGB: the materials' diffuse base
    colour, blender_addon/passes.py) of every camera."""
    import bpy

    from fit_implicit.blender_addon import capture, passes

    out = []
    with capture.CaptureRenderSettings(scene), passes.PassOutput(scene, bpy.context.view_layer, folder) as po:
        for i, ob in enumerate(cams):
            po.prepare(f"a_{i:03d}_")
            path = f"{folder}/a_{i:03d}.png"
            capture._render_still(scene, ob, path)
            rgba = capture.load_png_rgba(path)
            out.append((rgba, po.read(f"a_{i:03d}_", rgba[..., 3].astype(np.float32) / 255.0)["albedo"]))
    return out


def evaluate(scene_path: Path, assets: dict[str, Path], size: int, samples: int, out: Path | None,
             albedo_from: dict[str, Path] | None = None, noise_floor: bool = False, albedo: bool = False) -> dict:
    """PSNR of every asset against the ground truth under both light setups, as rendered and
    after the per-channel alignment (:func:`aligned`; "novel_aligned", "training_aligned").
    ``albedo_from`` maps asset labels to a dataset whose albedo pass recolours that asset
    (projected_albedo).  ``noise_floor``: also the ground truth rendered with another Cycles seed
    against itself, the most any asset can score at these samples (results["noise_floor"]).
    ``albedo``: also each asset's albedo pass (its diffuse base colour) against the ground truth's ("albedo",
    aligned; Cycles renders the pass with the novel light, which it does not depend on)."""
    import bpy

    import surface_scene as ss
    from fit_implicit.blender_addon import capture

    bpy.ops.wm.open_mainfile(filepath=str(scene_path))
    scene = bpy.context.scene
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.cycles.samples = samples
    view_layer = bpy.context.view_layer
    cams = [ob for ob in capture.scene_cameras(view_layer, include_holdout=True) if capture.is_holdout(ob)]
    if not cams:
        raise SystemExit(f"{scene_path}: no held-out cameras (custom property implicit_holdout)")
    gt_coll = bpy.data.collections[ss.GT_COLLECTION]
    work = tempfile.mkdtemp(prefix="relight_")
    results: dict = {"cameras": len(cams), "size": size, "samples": samples, "assets": {}}
    renders: dict = {}
    for light in ("novel", "training"):
        ss.use_lighting(scene, light)
        gt_coll.hide_render = False
        if albedo and light == "novel":
            pairs = render_albedo_set(scene, cams, work)
            renders[("ground truth", light)] = [p[0] for p in pairs]
            renders[("ground truth", "albedo")] = [p[1] for p in pairs]
        else:
            renders[("ground truth", light)] = render_set(scene, cams, work)
        if noise_floor:
            seed = scene.cycles.seed
            scene.cycles.seed = seed + 1
            renders[(NOISE_FLOOR, light)] = render_set(scene, cams, work)
            scene.cycles.seed = seed
        gt_coll.hide_render = True
        for label, path in assets.items():
            objects = import_asset(scene, path)
            if albedo_from and label in albedo_from:
                recolor_with_albedo(objects, albedo_from[label])
            if albedo and light == "novel":
                pairs = render_albedo_set(scene, cams, work)
                renders[(label, light)] = [p[0] for p in pairs]
                renders[(label, "albedo")] = [p[1] for p in pairs]
            else:
                renders[(label, light)] = render_set(scene, cams, work)
            remove_asset()
        gt_coll.hide_render = False
    for label in ([NOISE_FLOOR] if noise_floor else []) + list(assets):
        row = {}
        for light in ("novel", "training"):
            pairs = list(zip(renders[(label, light)], renders[("ground truth", light)]))
            row[light] = float(np.mean([psnr(a, b) for a, b in pairs]))
            row[f"{light}_aligned"] = float(np.mean([psnr(aligned(a, b), b) for a, b in pairs]))
        if albedo and label != NOISE_FLOOR:
            row["albedo"] = float(np.mean([
                albedo_psnr(a, b, (beauty[..., 3] > 0) & (truth[..., 3] > 0)) for a, b, beauty, truth in zip(
                    renders[(label, "albedo")], renders[("ground truth", "albedo")], renders[(label, "novel")],
                    renders[("ground truth", "novel")])]))
        if label == NOISE_FLOOR:
            results["noise_floor"] = row
        else:
            results["assets"][label] = row
    if out is not None:
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        for light in ("novel", "training"):
            rows = [np.concatenate(renders[(label, light)], axis=1) for label in ["ground truth", *assets]]
            Image.fromarray(np.concatenate(rows, axis=0), "RGBA").save(out / f"relight_{light}.png")
        (out / "relight.json").write_text(json.dumps(results, indent=1))
    return results


def print_table(results: dict) -> None:
    print(f"\nrelighting PSNR (dB), {results['cameras']} held-out cameras at {results['size']}^2, "
          f"{results['samples']} samples")
    print(f"{'asset':<24}{'novel light':>14}{'aligned':>9}{'training light':>16}{'aligned':>9}{'albedo (aligned)':>18}")
    rows = list(results["assets"].items())
    if "noise_floor" in results:
        rows.append((NOISE_FLOOR, results["noise_floor"]))
    for label, row in rows:
        albedo = f"{row['albedo']:>18.2f}" if "albedo" in row else f"{'-':>18}"
        print(f"{label:<24}{row['novel']:>14.2f}{row['novel_aligned']:>9.2f}{row['training']:>16.2f}"
              f"{row['training_aligned']:>9.2f}{albedo}")


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def tiny(out: Path, steps: int) -> dict:
    """The whole chain, small, on the CPU: scene -> fit -> mesh -> relight."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "scene"
    py = sys.executable
    _run([py, "benchmarks/surface_scene.py", "--out", str(data), "--views", "16", "--holdout", "2",
          "--size", "64", "--samples", "8"])
    _run([py, "-m", "fit_implicit.backend", "fit", str(data / "transforms_train.json"), "--out", str(out / "run_nerf"),
          "--method", "nerf", "--preset", "draft", "--steps", str(steps), "--device", "cpu"])
    from fit_implicit.backend.export.files import write_mesh  # what `fit-implicit mesh` does
    from fit_implicit.backend.export.mesh import extract_mesh
    from fit_implicit.backend.fitting.runs import load_run

    model = load_run(out / "run_nerf", device="cpu")
    verts, faces, colors = extract_mesh(model, 64)
    write_mesh(out / "baked.ply", verts, faces, colors)
    _estimated_asset(model, verts, faces, data / "transforms_train.json", out / "estimated.glb")
    assets = {"radiance baked (nerf)": out / "baked.ply", "albedo pass (same mesh)": out / "baked.ply",
              "estimated materials": out / "estimated.glb"}
    return evaluate(data / "scene.blend", assets, 64, 8, out,
                    albedo_from={"albedo pass (same mesh)": data / "transforms_train.json"}, albedo=True)


def _estimated_asset(model, verts, faces, photos: Path, path: Path, steps: int = 150) -> None:
    """The mesh textured (64 texels), then base colour, roughness, metallic and light estimated from
    the beauty renders alone (the passes dropped), as ``fit-implicit mesh --materials`` does."""
    import dataclasses

    from fit_implicit.backend.export.files import write_textured
    from fit_implicit.backend.export.materials import MaterialConfig, estimate_materials
    from fit_implicit.backend.export.texture import texture_mesh
    from fit_implicit.backend.fitting.data import load_transforms

    mesh, baked = texture_mesh(model, verts, faces, 64)
    data = dataclasses.replace(load_transforms(photos), passes={})
    got = estimate_materials(mesh, baked.albedo, data, MaterialConfig(material_steps=steps), model.device)
    write_textured(path, mesh, got.on(baked))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", help="scene.blend written by benchmarks/surface_scene.py")
    ap.add_argument("--asset", action="append", default=[], metavar="LABEL=PATH",
                    help="an asset to evaluate (.glb/.gltf/.ply/.obj); repeat for several")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", default=None, help="folder for the comparison images and relight.json")
    ap.add_argument("--noise-floor", action="store_true",
                    help="also render the ground truth with another Cycles seed: what a perfect asset would score")
    ap.add_argument("--albedo-from", action="append", default=[], metavar="LABEL=DATASET",
                    help="recolour asset LABEL with the albedo pass of a dataset (transforms file)")
    ap.add_argument("--albedo", action="store_true",
                    help="also score each asset's albedo pass (diffuse base colour) against the ground truth's "
                         "(aligned per channel)")
    ap.add_argument("--tiny", action="store_true", help="run the whole chain small on the CPU")
    ap.add_argument("--steps", type=int, default=300, help="--tiny: training steps")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.tiny:
        results = tiny(Path(args.out or tempfile.mkdtemp(prefix="relight_tiny_")), args.steps)
    else:
        if not args.scene or not args.asset:
            ap.error("--scene and at least one --asset are needed (or --tiny)")
        assets = {}
        for item in args.asset:
            label, sep, path = item.partition("=")
            if not sep:
                label, path = Path(item).stem, item
            assets[label] = Path(path).resolve()
        albedo_from = dict(item.split("=", 1) for item in args.albedo_from)
        unknown = set(albedo_from) - set(assets)
        if unknown:
            ap.error(f"--albedo-from names unknown assets: {', '.join(sorted(unknown))}")
        results = evaluate(Path(args.scene).resolve(), assets, args.size, args.samples,
                           Path(args.out) if args.out else None,
                           {k: Path(v).resolve() for k, v in albedo_from.items()}, args.noise_floor, args.albedo)
    print_table(results)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
