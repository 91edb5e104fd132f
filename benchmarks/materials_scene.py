"""The materials stage alone (issue 19), on a scene's own mesh: what inverse rendering gets from
the beauty renders when the geometry is right, without a fit (CPU minutes, not a GPU run).

    python benchmarks/materials_scene.py --data .data/still_life --out /tmp/materials [--steps 2000]
        [--downscale 2] [--texture-size 1024] [--set material_field=false] [--relight]

The dataset is benchmarks/surface_scene.py's (ground_truth.ply, the beauty renders, the albedo
pass, scene.blend).  Its ground-truth mesh is decimated to ``--faces`` and unwrapped
(export/texture.py), a base colour is fitted to the training photos (export/refine.py
refine_albedo: the "radiance baked into base colour" baseline, and the bounce the estimate reads),
then export/materials.py estimates materials and light from the same photos (every 8th view
held out, as lego_mesh.py holds them out).  Printed and written to ``OUT/materials.json``:

* ``reshade_train`` / ``reshade_held``: PSNR of the estimate drawn again under its own light
  (materials.reshade) against the training and held-out photos: how well it explains them;
* ``albedo``: PSNR of the base colour (the estimate's, and the bake's) against the scene's albedo
  pass at the held-out views' pixels, in sRGB after the per-channel scale in linear light that
  the anchors apply (benchmarks/relight.py aligned);
* with ``--relight``: benchmarks/relight.py on the two assets (Cycles, the novel light and the
  training one, the albedo pass too), OUT/relight.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SUBDIVIDE_EDGE = 0.01      # the truth's triangles split until no edge is longer than this share of its diagonal


def albedo_psnr(texture: np.ndarray, mesh, held, device) -> float:
    """PSNR (dB) of ``texture`` (S, S, 3) uint8 sRGB seen at ``held``'s pixels against its albedo
    pass, after the per-channel linear scale (least squares) that no photo decides."""
    import torch

    from fit_implicit.backend.export.materials import surface_samples, to_linear, to_srgb
    from fit_implicit.backend.fitting import metrics
    from fit_implicit.backend.render.raster import sample_texture

    truth_data = dataclasses.replace(held, images=np.concatenate([held.passes["albedo"], held.images[..., 3:]], -1),
                                     passes={})
    s = surface_samples(mesh, truth_data, device)
    est = to_linear(sample_texture(torch.as_tensor(texture, device=device).float() / 255.0, s["uv"]))
    truth = to_linear(s["rgb"])
    scale = (est * truth).sum(0) / (est * est).sum(0).clamp_min(1e-12)
    return metrics.psnr(float((to_srgb(est * scale) - s["rgb"]).pow(2).mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a dataset of benchmarks/surface_scene.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000, help="material steps")
    ap.add_argument("--bake-steps", type=int, default=300, help="steps fitting the baked base colour")
    ap.add_argument("--downscale", type=int, default=1)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--faces", type=int, default=200_000)
    ap.add_argument("--holdout", type=int, default=8, help="hold out every K-th view")
    ap.add_argument("--device", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a MaterialConfig setting")
    ap.add_argument("--relight", action="store_true", help="also run benchmarks/relight.py (Cycles) on the assets")
    ap.add_argument("--relight-size", type=int, default=128)
    ap.add_argument("--relight-samples", type=int, default=32)
    args = ap.parse_args(argv)

    import torch
    from surface_fit import read_mesh       # benchmarks/surface_fit.py

    from fit_implicit.backend.export.cleanup import decimate
    from fit_implicit.backend.export.files import write_textured
    from fit_implicit.backend.export.materials import MaterialConfig, estimate_materials, reshade, write_hdr
    from fit_implicit.backend.export.refine import refine_albedo, view_samples
    from fit_implicit.backend.export.texture import BakedTextures, unwrap
    from fit_implicit.backend.fitting import metrics
    from fit_implicit.backend.fitting.data import load_transforms, split_holdout

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_transforms(args.data, downscale=args.downscale)
    if "albedo" not in data.passes:
        raise ValueError(f"{args.data}: no albedo pass to score the base colour against")
    train, held = split_holdout(data, args.holdout)
    train = dataclasses.replace(train, passes={})         # the beauty renders alone, as photos
    fields = {f.name: f for f in dataclasses.fields(MaterialConfig)}
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"--set {key}: not a MaterialConfig setting ({', '.join(fields)})")
        kind = type(getattr(MaterialConfig(), key))
        overrides[key] = value.lower() in ("1", "true", "on", "yes") if kind is bool else kind(value)
    cfg = MaterialConfig(material_steps=args.steps, **overrides)

    t0 = time.perf_counter()
    verts, faces = read_mesh(Path(args.data) / "ground_truth.ply")
    # A low-poly truth (flat faces meeting at sharp edges) is split into small triangles first: the
    # unwrapped mesh's normals are smooth vertex normals, right on a fitted (dense) mesh, wrong across
    # a large flat face whose corners average their neighbours' directions.
    import trimesh

    side = float(np.linalg.norm(verts.max(0) - verts.min(0))) * SUBDIVIDE_EDGE
    verts, faces = trimesh.remesh.subdivide_to_size(verts, faces, max_edge=side, max_iter=12)
    verts, faces = decimate(verts.astype(np.float32), faces.astype(np.int64), args.faces, at_most=True)
    mesh = unwrap(verts, faces, size=args.texture_size)
    t1 = time.perf_counter()
    bake, _ = refine_albedo(np.zeros((args.texture_size,) * 2 + (3,), np.uint8),
                            *view_samples(mesh, train, dev, "image"), steps=args.bake_steps, lr=0.05)
    t2 = time.perf_counter()
    print(f"mesh {len(faces)} triangles, {args.texture_size}^2 ({t1 - t0:.1f} s); bake {args.bake_steps} steps "
          f"({t2 - t1:.1f} s); {len(train)} training, {len(held)} held-out views at {data.width}x{data.height}", flush=True)
    got = estimate_materials(mesh, bake, train, cfg, dev,
                             log=lambda step, loss: print(f"  step {step}  loss {loss:.5f}", flush=True))
    t3 = time.perf_counter()
    row = {"config": dataclasses.asdict(cfg), "faces": int(len(faces)), "texture_size": args.texture_size,
           "downscale": args.downscale, "device": str(dev), "seconds": {"bake": round(t2 - t1, 1),
                                                                        "materials": round(t3 - t2, 1)},
           "facts": got.facts}
    for name, views in (("reshade_train", train), ("reshade_held", held)):
        pred, truth = reshade(mesh, bake, got, views, dev, got.facts["shadow_size"])
        row[name] = round(metrics.psnr(float((pred - truth).pow(2).mean())), 3)
    row["albedo"] = {"estimated": round(albedo_psnr(got.albedo, mesh, held, dev), 3),
                     "baked": round(albedo_psnr(bake, mesh, held, dev), 3)}
    print(json.dumps({k: row[k] for k in ("reshade_train", "reshade_held", "albedo", "seconds")}), flush=True)

    flat_normal = np.broadcast_to(np.array([128, 128, 255], np.uint8), bake.shape).copy()
    covered = np.ones(bake.shape[:2], bool)
    textures = {"baked": BakedTextures(bake, flat_normal, None, covered),
                "estimated": got.on(BakedTextures(bake, flat_normal, None, covered))}
    for label, baked in textures.items():
        (out / label).mkdir(exist_ok=True)
        write_textured(out / label / "asset.glb", mesh, baked)
    write_hdr(out / "estimated" / "light.hdr", got.environment)
    (out / "materials.json").write_text(json.dumps(row, indent=1))
    if args.relight:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "relight.py"), "--scene", str(Path(args.data) / "scene.blend"),
               "--size", str(args.relight_size), "--samples", str(args.relight_samples), "--albedo",
               "--out", str(out / "relight")] + [a for k in textures for a in ("--asset", f"{k}={out / k / 'asset.glb'}")]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
