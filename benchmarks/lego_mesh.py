"""Textured mesh vs held-out photos (issue 4, "also measure on lego"): fit, export, then score
the exported asset in Blender.  Two phases, one script.

Phase 1 (GPU box: torch, no bpy, no pyzmq needed)::

    python benchmarks/lego_mesh.py fit --data .data/lego --out OUTDIR [--method sdf] [--seconds 120]
        [--mesh-resolution 512] [--texture-size 2048] [--faces 200000] [--preset standard] [--downscale 1]

Holds out every 8th view (backend.fitting.data.split_holdout, as benchmarks/lego.py), trains with the
backend's own fit path (``make_config`` + ``fit``, what ``fit-implicit fit`` runs; the photos'
alpha is the mask), extracts the mesh in world units and bakes base-colour + normal textures with
the code behind ``fit-implicit mesh RUN --out x.glb --texture-size 2048`` (``extract_mesh``,
``texture_mesh`` decimating to ``--faces``, ``write_textured``).  Writes into OUTDIR:
``lego.glb``; ``fit.json`` (steps, steps/s, training and export seconds, faces, sizes, the
volume-rendered held-out PSNR of the field itself, device, commit); ``holdout.json`` (the held-out
cameras at the photos' full size: intrinsics, poses, width, height, file names), so that phase 2
needs only OUTDIR and the dataset.  Each file is kept under ``--max-mb`` (16 MB: what the GPU box
returns): if the .glb is larger, its images are re-encoded (PNG at maximum compression, then the
base colour as JPEG quality 95, then also the normal map as JPEG; the normal map does not affect
the score below); the sizes are reported.  Passes in the dataset are ignored unless ``--passes``
(lego has none: a photo-only fit, lighting baked into the base colour).  A radiance field is cut
at its own level (chosen to match its renders, backend/export/iso.py; in fit.json as
``mesh_opacity``); ``--extra-levels 0.4,0.5`` also exports the same field cut at those opacities
into OUTDIR/level_0.4/ ... (each with its holdout.json and fit.json: score each on its own).

Phase 2 (here, CPU, the bpy 5.0.1 wheel)::

    python benchmarks/lego_mesh.py score --data .data/lego --run OUTDIR [--samples 16] [--size 800]

Imports OUTDIR/lego.glb with the add-on's importer (``blender_addon.importer.import_mesh``, the
path a MeshResult takes: welded seams, UV layer, Principled BSDF with the baked textures;
``--importer gltf`` uses Blender's glTF importer instead), makes one Blender camera per held-out
view with the exact intrinsics (``blender_addon.dataset_io.create_cameras``, i.e.
``shared.cameras.blender_camera_from_intrinsics``), and renders with Cycles on the CPU.

What is rendered: the asset UNLIT.  Every imported material's surface becomes an Emission shader
(strength 1) fed by whatever fed the Principled BSDF's Base Color (the base-colour texture), and
light paths stop at the camera ray (max bounces 0), so a pixel is exactly the base colour the
texture holds: for a photo-only fit that base colour IS the photos' shaded colour (lighting baked
in), which is what is compared.  The normal map and roughness play no part.  Film transparent,
Standard view transform, no dither, no denoising, Blender's default pixel filter (the lego photos
were rendered by Blender too); the 8-bit sRGB RGBA render is composited on white and compared
with the held-out photo composited on white, whole image (docs/benchmarks.md conventions, as
backend.fitting.metrics.evaluate).  Prints per-view and mean PSNR with the anchors (nerf2mesh about
30.9 dB mean on NeRF-synthetic; issue 12's targets: 30 dB from a radiance field, 29 dB from a
surface field) and writes ``score.json`` and
``side_by_side.png`` (prediction | truth, first held-out view) into ``--out`` (default OUTDIR).

CPU smoke run (a few minutes)::

    python benchmarks/lego_mesh.py fit --data .data/lego_small --out /tmp/lm --preset draft \\
        --seconds 20 --texture-size 256 --mesh-resolution 128 --downscale 8 --device cpu
    python benchmarks/lego_mesh.py score --data .data/lego_small --run /tmp/lm --downscale 8 --samples 8
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from fit_implicit.backend.fitting.metrics import on_white, psnr_white  # noqa: E402

GLB_NAME, FIT_JSON, HOLDOUT_JSON, SCORE_JSON = "lego.glb", "fit.json", "holdout.json", "score.json"
SIDE_BY_SIDE = "side_by_side.png"
FIELD_DIR = "field"            # the field's own held-out renders (RGBA PNG, the fit's size)
ANCHOR_DB = 30.9
TARGET_DB = {"nerf": 30.0, "sdf": 29.0, "occupancy": 29.0}     # issue 12, by the fit's method
MAX_MB = 16.0


# --------------------------------------------------------------------------------------------
# Pure helpers (no torch, no bpy): PSNR, held-out cameras, the .glb's images and arrays
# --------------------------------------------------------------------------------------------
def psnr_on_white(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR (dB) of two (H, W, 4) uint8 RGBA images of the same shape, both composited on white
    and taken to 8 bits, whole image: backend.fitting.metrics.psnr_white."""
    if pred.shape != truth.shape:
        raise ValueError(f"image shapes differ: {pred.shape} vs {truth.shape}")
    return psnr_white(pred, truth)


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of the two RGBA images' silhouettes (alpha >= 128): geometry and
    camera agreement, whatever the colours."""
    a, b = pred[..., 3] >= 128, truth[..., 3] >= 128
    union = int((a | b).sum())
    return 1.0 if union == 0 else float((a & b).sum()) / union


def holdout_doc(data_dir: Path, every: int) -> dict:
    """The held-out views of a transforms dataset at the photos' full size: the same split as
    backend.fitting.data.split_holdout (every ``every``-th frame).  Intrinsics (fx, fy, cx, cy) and
    camera-to-world poses (Blender convention), file paths relative to the dataset folder."""
    from fit_implicit.backend.fitting.data import holdout_indices, image_size, read_frames

    file, frames, _ = read_frames(data_dir)
    _, held = holdout_indices(len(frames), every)
    sizes = {image_size(frames[i].image_path) for i in held if frames[i].image_path is not None}
    if len(sizes) != 1 or any(frames[i].image_path is None for i in held):
        raise ValueError(f"{file}: the held-out photos must all exist and share one size, got {sorted(sizes)}")
    (w, h), = sizes
    base = os.path.abspath(file.parent)
    return {"dataset": base, "transforms": file.name, "holdout_every": int(every), "width": w, "height": h,
            "indices": [int(i) for i in held], "names": [frames[i].name for i in held],
            "files": [os.path.relpath(os.path.abspath(frames[i].image_path), base) for i in held],
            "intrinsics": [frames[i].intrinsics(w, h).tolist() for i in held],
            "poses": [np.asarray(frames[i].c2w, np.float64).tolist() for i in held]}


def _encode(image: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """(H, W, C) uint8 -> (file bytes, mime type); fmt "png" (maximum compression) or "jpeg"."""
    from PIL import Image

    from fit_implicit.backend.export.textured import png_bytes

    if fmt == "png":
        return png_bytes(image, compress_level=9, optimize=True), "image/png"
    arr = image[..., 0] if image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue(), "image/jpeg"


def rewrite_glb_images(path: Path, formats: dict[int, str]) -> int:
    """Re-encode images of a .glb in place; ``formats`` maps image index -> "png" | "jpeg".
    Everything else (JSON, geometry) is kept; buffer views are laid out again.  Returns the
    new file size in bytes."""
    from fit_implicit.backend.export import glb

    doc, binary = glb.read_glb(path)
    new_data: dict[int, bytes] = {}
    for i, fmt in formats.items():
        image = glb.glb_image(doc, binary, i)
        new_data[doc["images"][i]["bufferView"]], doc["images"][i]["mimeType"] = _encode(image, fmt)
    chunk = glb.BinaryChunk()
    for v, view in enumerate(doc["bufferViews"]):
        start = view.get("byteOffset", 0)
        laid = chunk.views[chunk.add(new_data.get(v, binary[start:start + view["byteLength"]]))]
        view["byteOffset"], view["byteLength"] = laid["byteOffset"], laid["byteLength"]
    doc["buffers"][0]["byteLength"] = chunk.size
    glb.write_container(path, doc, chunk.data())
    return path.stat().st_size


def _material_images(doc: dict) -> dict[str, int]:
    """Image indices of the first material's textures: "albedo", "normal", "metallicRoughness"."""
    mat = doc.get("materials", [{}])[0]
    pbr = mat.get("pbrMetallicRoughness", {})
    refs = {"albedo": pbr.get("baseColorTexture"), "normal": mat.get("normalTexture"),
            "metallicRoughness": pbr.get("metallicRoughnessTexture")}
    return {k: doc["textures"][r["index"]]["source"] for k, r in refs.items() if r is not None}


def fit_glb_under(path: Path, max_bytes: int) -> list[str]:
    """Shrink the .glb's images until the file is under ``max_bytes`` (see the module doc).
    Returns the steps taken (empty when it already fits); raises if it cannot fit."""
    from fit_implicit.backend.export import glb

    steps: list[str] = []
    if path.stat().st_size < max_bytes:
        return steps
    doc, _ = glb.read_glb(path)
    images = _material_images(doc)
    plans = [("all images PNG at compression 9", {i: "png" for i in images.values()})]
    if "albedo" in images:
        plans.append(("base colour as JPEG q95", {images["albedo"]: "jpeg"}))
    if "normal" in images:
        plans.append(("normal map as JPEG q95", {images["normal"]: "jpeg"}))
    for label, formats in plans:
        size = rewrite_glb_images(path, formats)
        steps.append(f"{label}: {size / 2**20:.2f} MB")
        if size < max_bytes:
            return steps
    raise ValueError(f"{path}: {path.stat().st_size / 2**20:.1f} MB even with JPEG textures; lower --faces "
                     f"or --texture-size to stay under {max_bytes / 2**20:.2f} MB")


def read_textured_glb(path: Path) -> dict:
    """A .glb written by backend.export.glb.write_textured, back in Blender's frame: vertices (V, 3)
    float32 world (Z up), faces (F, 3) int64, uvs (V, 2) float32 (v up), textures kind -> (S, S, C)
    uint8 top row first ("albedo", "normal", "roughness" (S, S, 1) from the G channel)."""
    from fit_implicit.backend.export import glb

    doc, binary = glb.read_glb(path)
    prim = doc["meshes"][0]["primitives"][0]
    attrs = prim["attributes"]
    if "TEXCOORD_0" not in attrs:
        raise ValueError(f"{path}: the mesh has no UVs (TEXCOORD_0): not a textured export")
    pos = glb.glb_accessor(doc, binary, attrs["POSITION"]).astype(np.float32)
    uv = glb.glb_accessor(doc, binary, attrs["TEXCOORD_0"]).astype(np.float32)
    faces = glb.glb_accessor(doc, binary, prim["indices"]).astype(np.int64).reshape(-1, 3)
    textures = {}
    for kind, i in _material_images(doc).items():
        img = glb.glb_image(doc, binary, i)
        if kind == "metallicRoughness":
            textures["roughness"] = np.ascontiguousarray(img[..., 1:2])
        else:
            textures[kind] = np.ascontiguousarray(img[..., :3]) if img.shape[2] >= 3 else np.repeat(img, 3, 2)
    verts = np.stack([pos[:, 0], -pos[:, 2], pos[:, 1]], axis=1)        # glTF Y up -> Blender Z up
    uvs = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1)
    return {"vertices": verts, "faces": faces, "uvs": uvs, "textures": textures}


# --------------------------------------------------------------------------------------------
# Phase 1: fit, mesh, textures (torch)
# --------------------------------------------------------------------------------------------
def raster_psnr(vertices, faces, held, device, uvs=None, texture=None, colors=None,
                supersample: int = 2) -> tuple[list[float], list[float]]:
    """The mesh drawn unlit by backend/render/raster.py (``supersample`` x anti-aliased) at each
    held-out view of ``held`` (PosedImages), coloured by ``texture`` (S, S, 3) uint8 at ``uvs`` or
    by vertex ``colors`` (V, 3) sRGB in [0, 1]: PSNR against its photo on white, and silhouette IoU
    per view.  A quick stand-in for phase 2's Cycles score, on the fit's own machine."""
    import torch

    from fit_implicit.backend.render.raster import render_unlit

    verts = torch.as_tensor(vertices, dtype=torch.float32, device=device)
    tris = torch.as_tensor(faces, dtype=torch.long, device=device)
    attrs = torch.as_tensor(uvs if texture is not None else colors, dtype=torch.float32, device=device)
    tex = None if texture is None else torch.as_tensor(texture[..., :3], device=device).float() / 255.0
    scores, ious = [], []
    for i in range(len(held)):
        rgba = render_unlit(verts, tris, attrs, held.intrinsics[i], held.poses[i], held.width, held.height,
                            tex, supersample)
        pred = (rgba.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        scores.append(psnr_white(pred, held.images[i]))
        ious.append(mask_iou(pred, held.images[i]))
    return scores, ious


def diagnose(model, args: argparse.Namespace, held, dev) -> list[dict]:
    """Where the asset loses, without textures: the field cut at its own level and at each of
    ``--diagnose-levels``, all triangles and decimated to ``--faces``, drawn with the field's
    vertex colours (raster_psnr)."""
    from fit_implicit.backend.export.cleanup import decimate, vertex_normals
    from fit_implicit.backend.export.mesh import extract_mesh, mesh_colors

    rows = []
    aabb = np.asarray(model.aabb, np.float64)
    offset = 2.0 * float((aabb[1] - aabb[0]).max()) / args.mesh_resolution     # as extract_mesh's colours
    for level in [None, *args.diagnose_levels]:
        verts, faces, colors = extract_mesh(model, args.mesh_resolution, level)
        for target in (0, args.faces):
            t0 = time.perf_counter()
            v, f, c = verts, faces, colors
            if target and len(f) > target:
                v, f = decimate(v, f, target)
                c = mesh_colors(model, v, vertex_normals(v, f), offset)
            scores, ious = raster_psnr(v, f, held, dev, colors=c)
            rows.append({"level": level, "faces": int(len(f)), "psnr": round(float(np.mean(scores)), 3),
                         "iou": round(float(np.mean(ious)), 4), "seconds": round(time.perf_counter() - t0, 2)})
            print(f"  diagnose: level {level} {len(f)} triangles: vertex colours {rows[-1]['psnr']:.2f} dB, "
                  f"IoU {rows[-1]['iou']:.4f}", flush=True)
    return rows


def iso_table(model) -> dict:
    """What the level's choice saw (backend/export/iso.py): each candidate's coverage IoU against the
    renders and how far its mesh sits from the renders' depth (normalised units)."""
    from fit_implicit.backend.export.iso import CANDIDATES, agreement, surface_offset

    table = {"opacities": list(CANDIDATES), "agreement": [round(float(a), 5) for a in agreement(model)],
             "surface_offset": [None if np.isnan(o) else round(float(o), 5) for o in surface_offset(model)]}
    for row in zip(*table.values()):
        print("  iso: opacity %.2f  coverage IoU %.5f  offset %s" % row, flush=True)
    return table


def export_glb(model, out: Path, args: argparse.Namespace, size: int, opacity: float | None = None,
               train=None, held=None, refine_steps: tuple[int, ...] = ()) -> dict:
    """Mesh (at ``opacity``; None: the fit's level), texture (refined against ``train``, the
    training views, where the fit's ``texture_refine_steps`` asks for it, as the fit job does)
    and write ``out/lego.glb`` (shrunk under ``--max-mb``); returns the figures for fit.json.
    With ``held`` (the held-out PosedImages) the asset is also scored by :func:`raster_psnr`;
    each of ``refine_steps`` refines the same bake that many steps into ``out/refine_<steps>/``."""
    import torch

    from fit_implicit.backend.export.mesh import extract_mesh
    from fit_implicit.backend.export.refine import refine_textures
    from fit_implicit.backend.export.texture import texture_mesh

    dev = torch.device(model.device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    mesh_facts: dict = {}       # the training views close what none of them saw, as in the fit job
    views = train if train is not None and model.config.mesh.mesh_close_unseen else None
    verts, faces, _ = extract_mesh(model, args.mesh_resolution, opacity, views=views, facts=mesh_facts)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    mesh_s = time.perf_counter() - t0
    if not len(faces):
        raise ValueError("the field has no surface: nothing to export")
    t1 = time.perf_counter()
    unrefined, bake = texture_mesh(model, verts, faces, size, max_faces=args.faces or None)
    mesh, baked, refined = unrefined, bake, {}
    if train is not None:
        mesh, baked, refined = refine_textures(unrefined, bake, train, model.config.refine, device=dev)
    texture_s = time.perf_counter() - t1
    materials = {}
    if getattr(args, "materials", 0) and train is not None:      # base colour, roughness, metallic and light
        baked, materials = _estimate_materials(mesh, baked, train, args.materials, dev, out)
    if refined and held is not None:        # what the refinement gained, on the held-out views
        before, _ = raster_psnr(unrefined.vertices, unrefined.faces, held, dev, uvs=unrefined.uvs, texture=bake.albedo)
        refined["raster_holdout_psnr_unrefined"] = round(float(np.mean(before)), 3)
    if getattr(args, "gt", None):       # geometry against the ground truth: the full mesh and the asset
        mesh_facts["surface"] = {"mesh": surface_scores(args.gt, verts, faces, train),
                                 "asset": surface_scores(args.gt, mesh.vertices, mesh.faces, train)}
        for k, v in mesh_facts["surface"].items():
            print(f"  {k}: Chamfer {v['chamfer_pct_diag']:.3f} % of the diagonal, F-score@1 % {v['fscore_1pct']:.3f}; "
                  f"seen by the cameras: {v.get('seen_chamfer_pct_diag')} % / {v.get('seen_fscore_1pct')}", flush=True)
    info = {"mesh_resolution": args.mesh_resolution, "mesh_faces": int(len(faces)), "mesh_s": round(mesh_s, 3),
            "texture_size": size, "faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices)),
            "texture_s": round(texture_s, 3), "texture_timings": {k: round(v, 3) for k, v in baked.timings.items()},
            "export_s": round(mesh_s + texture_s, 3), **refined, **mesh_facts, **materials,
            **_write_glb(out, mesh, baked, held, dev, args.max_mb)}
    print(f"mesh: {len(faces)} triangles at {args.mesh_resolution} ({mesh_s:.2f} s); textures {size}^2 on "
          f"{len(mesh.faces)} triangles ({texture_s:.2f} s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in baked.timings.items()) + ")", flush=True)
    variants = {}
    for steps in refine_steps:           # the same bake refined more or less, each scored on its own
        folder = out / f"refine_{steps}"
        folder.mkdir(exist_ok=True)
        (folder / HOLDOUT_JSON).write_bytes((out / HOLDOUT_JSON).read_bytes())
        cfg = dataclasses.replace(model.config.refine, **{args.refine_setting: steps})
        v_mesh, variant, facts = refine_textures(unrefined, bake, train, cfg, device=dev)
        row = {args.refine_setting: steps, **facts, **_write_glb(folder, v_mesh, variant, held, dev, args.max_mb)}
        (folder / FIT_JSON).write_text(json.dumps(row, indent=1))
        variants[str(steps)] = row
    if variants:
        info["refine_variants"] = variants
    return info


def _estimate_materials(mesh, baked, train, steps: int, dev, out: Path):
    """--materials: the textures' base colour, roughness and metallic and the light estimated from
    the training photos (backend/export/materials.py, as ``fit-implicit mesh --materials``); the
    light goes to ``out/lego_light.hdr``.  Returns (textures, figures for fit.json)."""
    from fit_implicit.backend.export.materials import MaterialConfig, estimate_materials, write_hdr

    if train.passes:
        raise ValueError("--materials is for photos without passes (drop --passes)")
    t0 = time.perf_counter()
    got = estimate_materials(mesh, baked.albedo, train, MaterialConfig(material_steps=int(steps)), dev)
    write_hdr(out / "lego_light.hdr", got.environment)
    facts = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in got.facts.items()}
    print(f"  materials: {steps} steps, {time.perf_counter() - t0:.1f} s; the light's strongest bin towards "
          f"{np.round(facts['light_direction'], 2).tolist()} ({100 * facts['light_share']:.0f} %)", flush=True)
    textures = got.on(baked)
    return textures, {"materials": {"steps": int(steps), "seconds": round(time.perf_counter() - t0, 3), **facts}}


@functools.lru_cache(maxsize=2)
def _ground_truth(path: str):
    from surface_fit import read_mesh       # benchmarks/surface_fit.py

    return read_mesh(path)


def surface_scores(gt_path: str, verts, faces, views) -> dict:
    """Chamfer distance (% of the ground truth's box diagonal) and F-score at 1 % of it, over
    everything and over what ``views`` (the training views) see: backend/fitting/metrics.py.
    The ground truth is read once for every mesh scored against it."""
    from fit_implicit.backend.fitting import metrics

    gt_v, gt_f = _ground_truth(str(gt_path))
    diag = float(np.linalg.norm(gt_v.max(0) - gt_v.min(0)))
    s = metrics.chamfer(gt_v, gt_f, np.asarray(verts, np.float64), np.asarray(faces), views=views)
    row = {"chamfer_pct_diag": round(100 * s["chamfer"] / diag, 4), "fscore_1pct": round(s["fscore"], 4),
           "accuracy_pct_diag": round(100 * s["accuracy"] / diag, 4),
           "completeness_pct_diag": round(100 * s["completeness"] / diag, 4), "faces": int(len(faces))}
    if "seen_chamfer" in s:
        row.update(seen_chamfer_pct_diag=round(100 * s["seen_chamfer"] / diag, 4),
                   seen_fscore_1pct=round(s["seen_fscore"], 4), seen_share=round(s["seen_share"], 4))
    return row


def _write_glb(out: Path, mesh, baked, held, dev, max_mb: float) -> dict:
    """Write ``out/lego.glb`` (shrunk under the size limit), score it with :func:`raster_psnr`
    where ``held`` is given; returns those figures."""
    from fit_implicit.backend.export.files import write_textured

    glb = write_textured(out / GLB_NAME, mesh, baked)
    raw_mb = glb.stat().st_size / 2**20
    try:
        shrink = fit_glb_under(glb, int(max_mb * 2**20))
    except ValueError as exc:        # keep the fit's figures; say so loudly
        shrink = [f"FAILED: {exc}"]
        print(f"warning: {exc}", flush=True)
    row = {"glb_mb_raw": round(raw_mb, 3), "glb_mb": round(glb.stat().st_size / 2**20, 3), "glb_shrink": shrink}
    if held is not None:
        scores, ious = raster_psnr(mesh.vertices, mesh.faces, held, dev, uvs=mesh.uvs, texture=baked.albedo)
        row["raster_holdout_psnr"] = round(float(np.mean(scores)), 3)
        row["raster_holdout_psnr_views"] = [round(s, 3) for s in scores]
        row["raster_mask_iou"] = round(float(np.mean(ious)), 4)
    print(f"  {glb}: {raw_mb:.2f} MB" + (f" -> {'; '.join(shrink)}" if shrink else "")
          + (f"; rasterised vs held-out photos {row['raster_holdout_psnr']:.2f} dB" if held is not None else ""),
          flush=True)
    return row


def _levels(text: str) -> list[float]:
    """--extra-levels: comma-separated opacities in (0, 1)."""
    try:
        levels = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        levels = [-1.0]
    if not levels or not all(0 < x < 1 for x in levels):
        raise argparse.ArgumentTypeError(f"expected opacities in (0, 1) separated by commas, got {text!r}")
    return levels


def _counts(text: str) -> tuple[int, ...]:
    """--refine-steps: comma-separated step counts >= 0."""
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        counts = (-1,)
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected step counts >= 0 separated by commas, got {text!r}")
    return counts


def cmd_fit(args: argparse.Namespace) -> int:
    import torch
    from lego import commit     # benchmarks/lego.py (imports torch, as this phase does)

    from fit_implicit.backend.cli import _overrides
    from fit_implicit.backend.fitting.data import load_transforms, split_holdout
    from fit_implicit.backend.export.iso import model_opacity
    from fit_implicit.backend.export.texture import check_size
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.loop import Callbacks, fit
    from fit_implicit.backend.fitting.runs import save_run
    from fit_implicit.backend.fitting.metrics import evaluate
    from fit_implicit.backend.render.image import to_rgba8

    if args.extra_levels and args.method != "nerf":
        raise ValueError(f"--extra-levels cuts radiance fields; a {args.method} field's surface is its zero level")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = check_size(args.texture_size)
    data = load_transforms(args.data, downscale=args.downscale)
    if data.passes and not args.passes:
        data = dataclasses.replace(data, passes={})       # photo-only, as on lego
    train, held = split_holdout(data, args.holdout)
    if held is None:
        raise ValueError("--holdout must hold some views out")
    doc = holdout_doc(Path(args.data), args.holdout)
    if doc["names"] != held.names:
        raise RuntimeError(f"held-out views disagree: {doc['names']} vs {held.names}")
    (out / HOLDOUT_JSON).write_text(json.dumps(doc, indent=1))
    cfg = make_config(args.method, args.preset, device=args.device, steps=args.steps, seconds=args.seconds,
                      seed=args.seed, preview_size=0, **_overrides(args.set, args.method))
    dev = torch.device(cfg.device)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    print(f"data: {len(train)} training + {len(held)} held-out views at {data.width}x{data.height}, "
          f"passes {sorted(train.passes) or 'none'}; {cfg.method}, preset {cfg.preset}, {cfg.steps} steps"
          + (f" or {cfg.seconds:g} s" if cfg.seconds else "") + f", {device_name}", flush=True)

    class Printer(Callbacks):
        last = -1e9

        def on_progress(self, info: dict) -> None:
            if info["elapsed"] - self.last >= args.log_every or info["fraction"] >= 1.0:
                self.last = info["elapsed"]
                print(f"  step {info['step']}  loss {info['loss']:.5f}  psnr {info['psnr']:.2f}  "
                      f"{info['elapsed']:.1f} s", flush=True)

    model = fit(train, cfg, Printer())
    steps, train_s = int(model.meta["steps"]), float(model.meta["seconds"])
    if args.save_run:
        save_run(model, out / "run")

    diagnosis = diagnose(model, args, held, torch.device(model.device)) if args.diagnose_levels is not None else None
    iso = iso_table(model) if args.method == "nerf" else None
    export = export_glb(model, out, args, size, train=train, held=held, refine_steps=args.refine_steps)
    for level in args.extra_levels:      # the same field cut at other levels, each scored on its own
        folder = out / f"level_{level:g}"
        folder.mkdir(exist_ok=True)
        (folder / HOLDOUT_JSON).write_text(json.dumps(doc, indent=1))
        extra = export_glb(model, folder, args, size, opacity=level, train=train, held=held)
        (folder / FIT_JSON).write_text(json.dumps({"mesh_opacity": level, **extra}, indent=1))
        print(f"  -> {folder / GLB_NAME}: score it with `score --run {folder}`", flush=True)

    t2 = time.perf_counter()
    scores = evaluate(model, held)
    eval_s = time.perf_counter() - t2
    if args.field_renders:          # diagnostics for the score phase: export loss vs fit loss
        from PIL import Image

        (out / FIELD_DIR).mkdir(exist_ok=True)
        for i, name in enumerate(held.names):
            img = model.render(held.intrinsics[i], held.poses[i], held.width, held.height)
            Image.fromarray(to_rgba8(img), "RGBA").save(out / FIELD_DIR / f"{name}.png")
    row = {
        "scene": Path(args.data).resolve().name, "method": cfg.method, "preset": cfg.preset,
        "device": device_name, "torch": torch.__version__, "commit": commit(), "date": time.strftime("%Y-%m-%d"),
        "downscale": args.downscale, "width": data.width, "height": data.height,
        "train_views": len(train), "holdout_views": len(held), "passes": sorted(train.passes),
        "lighting_baked": bool(model.meta.get("lighting_baked", True)),
        "steps": steps, "train_s": round(train_s, 2), "steps_per_s": round(steps / max(train_s, 1e-9), 2),
        "first_step_s": model.meta.get("first_step_s"), "train_psnr": model.meta.get("train_psnr"),
        "field_holdout_psnr": round(float(np.mean(scores)), 3),
        "field_holdout_psnr_views": [round(float(s), 3) for s in scores], "eval_s": round(eval_s, 2),
        "mesh_opacity": model_opacity(model) if model.method == "nerf" else None,   # the iso-level used
        **export, "extra_levels": args.extra_levels, "overrides": args.set, "diagnose": diagnosis,
        "iso": iso,
    }
    (out / FIT_JSON).write_text(json.dumps(row, indent=1))
    for k in ("steps", "train_s", "steps_per_s", "field_holdout_psnr", "mesh_opacity", "mesh_s", "texture_s", "export_s",
              "faces", "glb_mb"):
        print(f"{k:>20}: {row[k]}")
    too_big = [p.name for p in out.iterdir() if p.is_file() and p.stat().st_size >= args.max_mb * 2**20]
    if too_big:
        print(f"warning: over {args.max_mb} MB: {too_big}")
    return 0


# --------------------------------------------------------------------------------------------
# Phase 2: Blender (bpy)
# --------------------------------------------------------------------------------------------
def make_unlit(objects) -> int:
    """Every material of ``objects``: the surface becomes an Emission shader (strength 1) fed by
    what fed its Principled BSDF's Base Color (or that colour), so a render shows the base colour
    as stored.  Returns the number of materials changed."""
    changed = 0
    seen = set()
    for ob in objects:
        for slot in getattr(ob, "material_slots", []):
            mat = slot.material
            if mat is None or mat.name in seen or mat.node_tree is None:
                continue
            seen.add(mat.name)
            tree = mat.node_tree
            bsdf = next((n for n in tree.nodes if n.bl_idname == "ShaderNodeBsdfPrincipled"), None)
            out = next((n for n in tree.nodes if n.bl_idname == "ShaderNodeOutputMaterial"), None)
            if bsdf is None or out is None:
                raise ValueError(f"material {mat.name!r} has no Principled BSDF and output to make unlit")
            emit = tree.nodes.new("ShaderNodeEmission")
            emit.inputs["Strength"].default_value = 1.0
            base = bsdf.inputs["Base Color"]
            if base.is_linked:
                tree.links.new(base.links[0].from_socket, emit.inputs["Color"])
            else:
                emit.inputs["Color"].default_value = base.default_value
            tree.links.new(emit.outputs["Emission"], out.inputs["Surface"])
            changed += 1
    return changed


def import_glb(scene, path: Path, importer_kind: str) -> list:
    """Import the asset: the add-on's importer (default) or Blender's glTF importer."""
    import bpy

    from fit_implicit.blender_addon import importer

    if importer_kind == "gltf":
        before = set(bpy.data.objects)
        bpy.ops.import_scene.gltf(filepath=str(path))
        return [ob for ob in bpy.data.objects if ob not in before and ob.type == "MESH"]
    asset = read_textured_glb(path)
    ob = importer.import_mesh(scene, asset["vertices"], asset["faces"], None, name="Lego Mesh",
                              uvs=asset["uvs"], textures=asset["textures"])
    return [ob]


def load_truth(data_dir: Path, file: str, width: int, height: int) -> np.ndarray:
    """(height, width, 4) uint8 RGBA photo, box-filtered to that size if it differs."""
    from PIL import Image

    with Image.open(data_dir / file) as im:
        im = im.convert("RGBA")
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.BOX)
        return np.asarray(im, dtype=np.uint8).copy()


def field_render(run: Path, name: str, width: int, height: int) -> np.ndarray | None:
    """The field's own render of a held-out view saved by the fit phase, if it has this size."""
    path = run / FIELD_DIR / f"{name}.png"
    if not path.is_file():
        return None
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"), dtype=np.uint8).copy() if im.size == (width, height) else None


def cmd_score(args: argparse.Namespace) -> int:
    run = Path(args.run)
    out = Path(args.out) if args.out else run
    for name in (GLB_NAME, HOLDOUT_JSON):
        if not (run / name).is_file():
            raise ValueError(f"{run / name} is missing: run the fit phase first (it writes {GLB_NAME}, "
                             f"{HOLDOUT_JSON}, {FIT_JSON})")
    doc = json.loads((run / HOLDOUT_JSON).read_text())
    data_dir = Path(args.data) if args.data else Path(doc["dataset"])
    w0, h0 = int(doc["width"]), int(doc["height"])
    width = args.size or w0 // args.downscale
    height = max(1, round(h0 * width / w0))
    scale = np.array([width / w0, height / h0, width / w0, height / h0])
    fit_info = json.loads((run / FIT_JSON).read_text()) if (run / FIT_JSON).is_file() else {}

    import bpy

    from fit_implicit.blender_addon import capture, dataset_io

    t0 = time.perf_counter()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = args.samples
    scene.cycles.use_denoising = False
    scene.cycles.seed = 0
    scene.cycles.max_bounces = 0
    scene.render.dither_intensity = 0.0
    objects = import_glb(scene, run / GLB_NAME, args.importer)
    if not objects:
        raise ValueError(f"{run / GLB_NAME}: nothing was imported")
    changed = make_unlit(objects)
    views = [dataset_io.View(name=n, c2w=np.asarray(p, np.float64), intrinsics=np.asarray(k, np.float64) * scale,
                             width=width, height=height)
             for n, k, p in zip(doc["names"], doc["intrinsics"], doc["poses"])]
    cams, _ = dataset_io.create_cameras(scene, views, collection_name="Held-out Cameras", backgrounds=False)
    import_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="lego_mesh_score_"))
    rows, first = [], None
    for view, cam, file in zip(views, cams, doc["files"]):
        t = time.perf_counter()
        pred = capture.render_view(scene, cam, str(work / f"{view.name}.png"))
        truth = load_truth(data_dir, file, width, height)
        value, iou = psnr_on_white(pred, truth), mask_iou(pred, truth)
        field = field_render(run, view.name, width, height)
        vs_field = None if field is None else psnr_on_white(pred, field)
        rows.append({"name": view.name, "psnr": round(value, 3), "mask_iou": round(iou, 4),
                     "psnr_vs_field": None if vs_field is None else round(vs_field, 3),
                     "render_s": round(time.perf_counter() - t, 2)})
        print(f"  {view.name:<16} {value:6.2f} dB  silhouette IoU {iou:.4f}"
              + ("" if vs_field is None else f"  vs the field's render {vs_field:6.2f} dB")
              + f"  ({rows[-1]['render_s']:.1f} s)", flush=True)
        if first is None:
            first = (pred, truth)
    mean = float(np.mean([r["psnr"] for r in rows]))
    target = TARGET_DB.get(fit_info.get("method"), min(TARGET_DB.values()))
    vs_field = [r["psnr_vs_field"] for r in rows if r["psnr_vs_field"] is not None]
    result = {"mean_psnr": round(mean, 3), "mean_mask_iou": round(float(np.mean([r["mask_iou"] for r in rows])), 4),
              "mean_psnr_vs_field": round(float(np.mean(vs_field)), 3) if len(vs_field) == len(rows) else None,
              "views": rows, "width": width, "height": height,
              "samples": args.samples, "importer": args.importer, "unlit_materials": changed,
              "render": "unlit: Emission(base colour), max bounces 0, film transparent, on white, 8-bit sRGB",
              "import_s": round(import_s, 2), "total_s": round(time.perf_counter() - t0, 2),
              "target_db": target, "anchor_nerf2mesh_db": ANCHOR_DB,
              "field_holdout_psnr": fit_info.get("field_holdout_psnr"), "fit": fit_info}
    out.mkdir(parents=True, exist_ok=True)
    (out / SCORE_JSON).write_text(json.dumps(result, indent=1))
    from PIL import Image

    pair = np.concatenate([on_white(first[0]), on_white(first[1])], axis=1)
    Image.fromarray((pair * 255.0 + 0.5).astype(np.uint8), "RGB").save(out / SIDE_BY_SIDE)
    field = fit_info.get("field_holdout_psnr")
    print(f"\ntextured mesh vs {len(rows)} held-out views at {width}x{height} (Cycles, {args.samples} samples, "
          f"unlit base colour on white): mean {mean:.2f} dB"
          + (f"; the field itself (volume rendering) {field:.2f} dB" if field is not None else ""))
    print(f"target >= {target:g} dB: {'met' if mean >= target else 'NOT met'}; anchor: nerf2mesh about "
          f"{ANCHOR_DB:g} dB mean on NeRF-synthetic")
    print(f"wrote {out / SCORE_JSON} and {out / SIDE_BY_SIDE} ({time.perf_counter() - t0:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="phase 1: fit, mesh, bake textures (torch; the GPU box)")
    f.add_argument("--data", required=True, help="dataset folder (transforms_train.json / transforms.json)")
    f.add_argument("--out", required=True, help="folder for lego.glb, fit.json, holdout.json")
    f.add_argument("--method", default="sdf", choices=["sdf", "occupancy", "nerf"])
    f.add_argument("--preset", default="standard", choices=["draft", "standard", "high"])
    f.add_argument("--seconds", type=float, default=120.0, help="training budget (0: the preset's steps only)")
    f.add_argument("--steps", type=int, default=0, help="training steps (0: the preset's)")
    f.add_argument("--mesh-resolution", type=int, default=512, help="marching-cubes grid along the box's longest side")
    f.add_argument("--texture-size", type=int, default=2048, help="side of the baked textures")
    f.add_argument("--faces", type=int, default=200_000,
                   help="decimate to this many triangles before unwrapping (200k: what `fit-implicit "
                        "mesh` does; 0: keep all)")
    f.add_argument("--max-mb", type=float, default=MAX_MB, help="largest .glb size (MB); images re-encoded above")
    f.add_argument("--holdout", type=int, default=8, help="hold out every K-th view")
    f.add_argument("--downscale", type=int, default=1)
    f.add_argument("--device", default=None)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--passes", action="store_true", help="use the dataset's albedo/normal/depth passes if any")
    f.add_argument("--materials", type=int, default=0, metavar="STEPS",
                   help="photos without passes: estimate base colour, roughness, metallic and the light this many "
                        "steps after the bake (backend/export/materials.py); the light -> OUTDIR/lego_light.hdr")
    f.add_argument("--no-field-renders", dest="field_renders", action="store_false",
                   help="do not save the field's own held-out renders (OUTDIR/field/*.png)")
    f.add_argument("--save-run", action="store_true", help="also save the fitted model to OUTDIR/run (large)")
    f.add_argument("--gt", default=None, help="ground-truth mesh (.ply/.obj, world units): also score the full mesh "
                   "and the asset by Chamfer and F-score@1 %%, all and seen (fit.json 'surface')")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="FitConfig override")
    f.add_argument("--extra-levels", type=_levels, default=[], metavar="A,B",
                   help="radiance fields: also export the field cut at these opacities, each to "
                        "OUTDIR/level_<opacity>/ (score each with --run there)")
    f.add_argument("--refine-steps", type=_counts, default=(), metavar="A,B",
                   help="also refine the same bake with --refine-setting at A, B, ... steps into "
                        "OUTDIR/refine_<steps>/ (0: the bake as it is), each scored on its own")
    f.add_argument("--refine-setting", default="texture_refine_steps",
                   choices=["texture_refine_steps", "mesh_refine_steps", "mesh_refine_remesh"],
                   help="which count --refine-steps varies (steps, or mesh_refine_remesh's remeshing rounds)")
    f.add_argument("--diagnose-levels", type=_levels, default=None, metavar="A,B",
                   help="radiance fields: before the export, score the mesh with vertex colours at the fit's "
                        "level and these, all triangles and decimated (fit.json 'diagnose')")
    f.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    f.set_defaults(func=cmd_fit)
    s = sub.add_parser("score", help="phase 2: render the .glb at the held-out views in Blender (bpy)")
    s.add_argument("--run", required=True, help="OUTDIR of the fit phase")
    s.add_argument("--data", default=None, help="the dataset folder (default: the one named in holdout.json)")
    s.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel (anti-aliasing)")
    s.add_argument("--size", type=int, default=0, help="render width in pixels (0: the photos' / --downscale)")
    s.add_argument("--downscale", type=int, default=1, help="without --size: the photos' size divided by this")
    s.add_argument("--importer", default="addon", choices=["addon", "gltf"],
                   help="the add-on's importer (default) or Blender's glTF importer")
    s.add_argument("--out", default=None, help="folder for score.json and side_by_side.png (default: --run)")
    s.set_defaults(func=cmd_score)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("downscale", "samples", "size", "faces", "texture_size", "mesh_resolution", "holdout"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name in ("size", "faces") else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be {'>= 0' if name in ('size', 'faces') else '>= 1'}, got {value}")
    # The entry point's usual few lines, as in backend/cli.py main (ValueError -> "error: ..." on
    # stderr, exit status 2); a stand-alone script keeps its own (a deliberate repeat).
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
