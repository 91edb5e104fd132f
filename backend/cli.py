"""Command line: ``fit-implicit {fit,fit-points,fit-image,eval,render,mesh,serve} ...``.

fit, render and mesh need only torch, numpy, scikit-image and Pillow (never pyzmq or bpy);
``serve`` imports :mod:`backend.service.server` (pyzmq) when it runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from fit_implicit.backend.service import options as serve_options


def _print(*args) -> None:
    print(*args, flush=True)


def _overrides(pairs: list[str], method: str = "nerf") -> dict:
    """``["NAME=VALUE", ...]`` -> settings by name (backend/fitting/config.py), each value typed
    like the setting it sets."""
    from fit_implicit.backend.fitting.config import FitConfig

    return FitConfig.for_method(method).parse(pairs)


ARGS_FILE = "fit_args.json"     # a fit's settings, kept in its folder so --resume carries on with them
RESUMED_ARGS = ("data", "method", "preset", "seconds", "steps", "holdout", "downscale", "seed", "set")


def _prepare_out(args: argparse.Namespace) -> dict | None:
    """Check the run folder: an existing run (or an interrupted fit) is never overwritten
    silently.  With --resume, load the interrupted fit's settings into ``args`` and return its
    checkpoint (None: nothing to resume, so start over with those settings)."""
    from fit_implicit.backend.fitting.runs import is_run
    from fit_implicit.backend.service.checkpoint import CHECKPOINT_FILE, load_checkpoint

    out = Path(args.out)
    saved = out / ARGS_FILE
    if args.resume:
        if not saved.is_file():
            raise ValueError(f"--resume: {out} holds no interrupted fit ({ARGS_FILE} is missing)")
        if is_run(out) and not (out / CHECKPOINT_FILE).is_file():
            raise ValueError(f"--resume: the fit in {out} already finished")
        for name, value in json.loads(saved.read_text()).items():
            if name in RESUMED_ARGS:
                setattr(args, name, value)
        return load_checkpoint(out, _device_name(args.device))
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: --out names the run's folder")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            what = "a run" if is_run(out) else ("an interrupted fit (carry on with --resume)" if saved.is_file()
                                                else "files")
            raise ValueError(f"{out} already holds {what}: pass --overwrite to replace it, or choose another --out")
        for name in (CHECKPOINT_FILE, ARGS_FILE, "eval.json"):   # nothing of the old fit may be resumed later
            (out / name).unlink(missing_ok=True)
    return None


def _device_name(device: str | None) -> str:
    from fit_implicit.backend.fitting.model import pick_device

    return str(pick_device(device))


def _auto_preset(args: argparse.Namespace) -> None:
    """No --preset: standard on a GPU, draft on a CPU (the standard preset needs hours there)."""
    if args.preset is None:
        args.preset = "draft" if _device_name(args.device) == "cpu" else "standard"
        if args.preset == "draft":
            _print("no GPU: the draft preset (a preview-quality field in minutes); pass --preset standard "
                   "to train the full recipe on the CPU (hours)")


class _Progress:
    """The fit's progress: a bar on a terminal (tqdm), lines every --log-every seconds otherwise."""

    def __init__(self, every: float):
        from tqdm import tqdm

        self.every, self.last = every, -1e9
        self.bar = tqdm(total=1000, unit="‰", disable=None, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(self, info: dict) -> None:
        if not self.bar.disable:
            self.bar.n = int(1000 * info["fraction"])
            self.bar.set_postfix_str(f"step {info['step']}  {info['psnr']:.2f} dB", refresh=True)
        elif info["elapsed"] - self.last >= self.every or info["fraction"] >= 1.0:
            self.last = info["elapsed"]
            _print(f"step {info['step']}/{info['total_steps']}  loss {info['loss']:.5f}  "
                   f"psnr {info['psnr']:.2f} dB  {info['elapsed']:.1f} s  eta {info['eta']:.1f} s")

    def close(self) -> None:
        self.bar.close()


def cmd_fit(args: argparse.Namespace) -> int:
    import numpy as np

    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.data import load_dataset, split_holdout
    from fit_implicit.backend.fitting.loop import Callbacks, LongFitNotice, fit
    from fit_implicit.backend.fitting.runs import provenance, save_run
    from fit_implicit.backend.service.checkpoint import remove_checkpoint, save_checkpoint

    resume = _prepare_out(args)
    _auto_preset(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    data = load_dataset(args.data, downscale=args.downscale)
    origin = provenance(args.data, sys.argv, _device_name(args.device), skip=out)    # before training: it reads files
    for note in data.notes:
        _print(f"note: {note}")
    train, held = split_holdout(data, args.holdout) if args.holdout else (data, None)
    cfg = make_config(args.method, args.preset, device=args.device, steps=args.steps, seconds=args.seconds,
                      seed=args.seed, preview_size=0, **_overrides(args.set, args.method))
    out.mkdir(parents=True, exist_ok=True)
    (out / ARGS_FILE).write_text(json.dumps({k: getattr(args, k) for k in RESUMED_ARGS}, indent=1))
    _print(f"data: {len(train)} training views"
           + (f", {len(held)} held out" if held is not None else "")
           + (f", {data.width}x{data.height}" if data.uniform else
              f", sizes from {data.sizes.min(0)[0]}x{data.sizes.min(0)[1]} to {data.width}x{data.height}")
           + f", box {np.round(data.aabb, 3).tolist()} "
           f"(loaded in {time.perf_counter() - t0:.1f} s)")
    _print(f"fit: method {cfg.method}, preset {cfg.preset}, {cfg.steps} steps"
           + (f" or {cfg.seconds:g} s" if cfg.seconds else "") + f", device {cfg.device}"
           + (f"; resuming at step {resume['step']}" if resume else ""))
    progress = _Progress(args.log_every)

    class Printer(Callbacks):
        last_checkpoint = time.monotonic()
        told = False
        length_notice = LongFitNotice(cfg.preset)

        def on_progress(self, info: dict) -> None:
            progress.update(info)
            note = self.length_notice(info)
            if note:
                _print(f"note: {note} (--seconds)")

        def on_checkpoint(self, step: int, state) -> None:
            if args.checkpoint_every > 0 and time.monotonic() - self.last_checkpoint >= args.checkpoint_every:
                try:
                    save_checkpoint(out, state())
                except Exception as exc:   # noqa: BLE001 - a full disk (torch: RuntimeError) must not end the fit
                    if not self.told:
                        _print(f"warning: could not write a checkpoint ({type(exc).__name__}: {exc}); "
                               "training goes on without them")
                    self.told = True
                self.last_checkpoint = time.monotonic()

    try:
        if args.gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
        if args.gpus > 1:           # data-parallel (fitting/distributed.py): rank 0 reports
            from fit_implicit.backend.fitting.distributed import fit_parallel
            if resume:
                raise ValueError("--gpus fits start fresh: drop --resume (or fit on one GPU to resume)")
            where = "one a GPU" if _device_name(args.device).startswith("cuda") else "on the CPU"
            _print(f"data-parallel: {args.gpus} processes ({where}), {cfg.train.batch_rays // args.gpus} rays a step "
                   "each to start")
            model = fit_parallel(train, cfg, args.gpus, args.log_every)
        else:
            model = fit(train, cfg, Printer(), resume=resume)
    finally:
        progress.close()
    steps = int(model.meta["steps"])
    _print(f"trained {steps} steps in {model.meta['seconds']:.1f} s")
    if cfg.seconds and steps < cfg.steps:
        _print(f"warning: the {cfg.seconds:g} s budget stopped the fit at step {steps} of the {cfg.preset} preset's "
               f"{cfg.steps} ({100 * steps / cfg.steps:.0f}%): the field is undertrained; give more --seconds, or "
               f"--steps to train a fixed number")
    model.meta["provenance"] = origin
    save_run(model, out)            # before the evaluation: stopping that loses nothing
    remove_checkpoint(out)
    (out / ARGS_FILE).unlink(missing_ok=True)
    _print(f"saved {out}")
    if held is not None:
        scores = _evaluate(model, held, args.eval_seconds)
        model.meta.update(holdout_psnr=scores["psnr"], holdout_ssim=scores["ssim"], holdout_views=scores["views"])
        save_run(model, out)
    return 0


def cmd_fit_points(args: argparse.Namespace) -> int:
    from fit_implicit.backend.export.files import write_mesh
    from fit_implicit.backend.export.mesh import extract_mesh, voxel_resolution
    from fit_implicit.backend.fitting.loop import Callbacks
    from fit_implicit.backend.fitting.point_files import read_points
    from fit_implicit.backend.fitting.points_fit import fit_points, points_config
    from fit_implicit.backend.fitting.runs import is_run, provenance, save_run

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it")
    if args.run and Path(args.run).exists() and any(Path(args.run).iterdir()) and not args.overwrite:
        raise ValueError(f"{args.run} already holds {'a run' if is_run(args.run) else 'files'}: pass --overwrite")
    _auto_preset(args)
    settings = _overrides(args.set, "sdf")
    if args.detail is not None:
        settings["points_detail"] = args.detail
    cfg = points_config(args.preset, device=args.device, steps=args.steps, seconds=args.seconds, seed=args.seed,
                        **settings)
    t0 = time.perf_counter()
    cloud = read_points(args.file, mesh_samples=cfg.points.points_mesh_samples, seed=args.seed)
    facts = cloud.facts
    _print(f"points: {len(cloud):,} from {Path(args.file).name}"
           + (f" (a mesh of {facts['mesh_faces']:,} triangles, sampled)" if "mesh_faces" in facts else "")
           + (", with normals" if cloud.normals is not None else ", no normals (sign-agnostic)")
           + (", with colours" if cloud.colors is not None else "")
           + (f"; {facts['non_finite_dropped']:,} rows with NaN or infinite coordinates dropped"
              if "non_finite_dropped" in facts else "")
           + f" (read in {time.perf_counter() - t0:.1f} s)")
    if "normals_ignored" in facts:
        _print(f"note: normals ignored: {facts['normals_ignored']}")
    _print(f"fit: signed distance to points, preset {cfg.preset}, {cfg.steps} steps"
           + (f" or {cfg.seconds:g} s" if cfg.seconds else "") + f", device {cfg.device}, "
           f"detail {cfg.points.points_detail:g}")
    progress = _Progress(args.log_every)

    class Printer(Callbacks):
        def on_progress(self, info: dict) -> None:
            progress.update(info)

    try:
        model = fit_points(cloud, cfg, Printer())
    finally:
        progress.close()
    done = model.meta["points"]
    _print(f"trained {model.meta['steps']} steps in {model.meta['seconds']:.1f} s on {done['points_used']:,} points"
           + (f" ({done['outliers_removed']:,} outliers removed)" if done.get("outliers_removed") else "")
           + f"; the surface passes {done['mean_distance']:.4g} from them on average (world units)")
    if args.run:
        model.meta["provenance"] = provenance(args.file, sys.argv, str(cfg.device), single_file=True)
        save_run(model, args.run)
        _print(f"saved {args.run}")
    resolution = (voxel_resolution(model.aabb, args.voxel_size) if args.voxel_size
                  else args.mesh_resolution or cfg.mesh.mesh_resolution)
    t1 = time.perf_counter()
    verts, faces, colors = extract_mesh(model, resolution)
    if not len(faces):
        raise ValueError("the fitted field has no surface: nothing to export")
    path = write_mesh(out, verts, faces, colors)
    _print(f"mesh: {len(verts):,} vertices, {len(faces):,} triangles at resolution {resolution} "
           f"({time.perf_counter() - t1:.1f} s) -> {path}")
    return 0


def cmd_fit_image(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    from PIL import Image

    from fit_implicit.backend.fitting.data import read_image
    from fit_implicit.backend.fitting.image_fit import ImageFitConfig, fit_image, image_config, render_image
    from fit_implicit.backend.fitting.model import pick_device
    from fit_implicit.shared.methods import ENCODINGS

    names = list(ENCODINGS) if args.encoding == "all" else [e.strip() for e in args.encoding.split(",") if e.strip()]
    unknown = [e for e in names if e not in ENCODINGS]
    if unknown or not names:
        raise ValueError(f"--encoding {args.encoding!r}: give 'all' or names from {', '.join(ENCODINGS)}")
    image = read_image(Path(args.image), args.downscale)
    height, width = image.shape[:2]
    size = (width, height)
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.lower().split("x"))
            assert len(size) == 2
        except (ValueError, AssertionError):
            raise ValueError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    settings = ImageFitConfig().parse(args.set)
    device = str(pick_device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _print(f"image: {width}x{height} from {Path(args.image).name}; device {device}; "
           f"{args.steps} steps" + (f" or {args.seconds:g} s" if args.seconds else "") + " per encoding")
    summary, rows = {}, []
    for name in names:
        cfg = image_config(width, height, name, steps=args.steps, seconds=args.seconds, device=device,
                           seed=args.seed, **settings)
        fit = fit_image(image, cfg)
        reached = next(((s, t) for s, t, p in fit.curve if p >= args.target_psnr), None)
        path = out / f"{Path(args.image).stem}_{name}.png"
        picture = render_image(fit.model, *size)
        Image.fromarray((picture.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)).save(path)
        summary[name] = {"psnr": fit.psnr, "steps": fit.steps, "seconds": fit.seconds,
                         "parameters": sum(p.numel() for p in fit.model.parameters()),
                         "target_psnr": args.target_psnr,
                         "target_step": reached[0] if reached else None,
                         "target_seconds": reached[1] if reached else None, "image": path.name}
        rows += [(name, s, round(t, 4), round(p, 3)) for s, t, p in fit.curve]
        _print(f"{name:>10}: {fit.psnr:6.2f} dB after {fit.steps} steps, {fit.seconds:.1f} s; "
               + (f"{args.target_psnr:g} dB at step {reached[0]} ({reached[1]:.1f} s)" if reached
                  else f"{args.target_psnr:g} dB not reached") + f" -> {path}")
    with open(out / "curves.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["encoding", "step", "seconds", "psnr"])
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps({"image": str(args.image), "width": width, "height": height,
                                                  "device": device, "encodings": summary}, indent=1))
    _print(f"curves (PSNR against steps and seconds) -> {out / 'curves.csv'}")
    return 0


def _evaluate(model, data, seconds: float = 0.0, renders: Path | None = None) -> dict:
    """Render every view of ``data`` and score it on white (PSNR and SSIM), printing each;
    stop after ``seconds`` (0: no limit) and say how many views it scored."""
    import numpy as np
    from PIL import Image

    from fit_implicit.backend.fitting.metrics import psnr_white, ssim_white
    from fit_implicit.backend.render.image import to_rgba8

    start, psnrs, ssims = time.perf_counter(), [], []
    for i in range(len(data)):
        if i and seconds and time.perf_counter() - start > seconds:     # at least one view
            _print(f"evaluation stopped by its {seconds:g} s budget after {i} of {len(data)} views")
            break
        img = to_rgba8(model.render(data.intrinsics[i], data.poses[i], *data.size(i), time=data.time(i)))
        psnrs.append(psnr_white(img, data.image(i)))
        ssims.append(ssim_white(img, data.image(i)))
        if renders is not None:
            renders.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "RGBA").save(renders / f"{data.names[i]}.png")
        _print(f"  view {i + 1}/{len(data)} {data.names[i]}: {psnrs[-1]:.2f} dB, SSIM {ssims[-1]:.4f} "
               f"({time.perf_counter() - start:.1f} s)")
    if not psnrs:
        return {"psnr": None, "ssim": None, "views": 0, "per_view": []}
    result = {"psnr": round(float(np.mean(psnrs)), 3), "ssim": round(float(np.mean(ssims)), 4), "views": len(psnrs),
              "per_view": [{"name": data.names[i], "psnr": round(psnrs[i], 3), "ssim": round(ssims[i], 4)}
                           for i in range(len(psnrs))]}
    _print(f"held-out PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} over {len(psnrs)} views "
           f"(white background)")
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    from fit_implicit.backend.fitting.data import load_dataset
    from fit_implicit.backend.fitting.runs import load_run

    model = load_run(args.run, device=args.device)
    data = load_dataset(args.cameras, downscale=args.downscale)
    scores = _evaluate(model, data, args.seconds, Path(args.renders) if args.renders else None)
    doc = {**scores, "cameras": str(Path(args.cameras).resolve()), "downscale": args.downscale}
    out = Path(args.run) / "eval.json"
    out.write_text(json.dumps(doc, indent=1))
    _print(f"wrote {out}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from PIL import Image

    from fit_implicit.backend.fitting.data import image_size, read_frames
    from fit_implicit.backend.fitting.runs import load_run
    from fit_implicit.backend.render.image import to_rgba8, write_exr
    from fit_implicit.shared.transforms import frame_times

    model = load_run(args.run, device=args.device)
    file, frames, _ = read_frames(args.cameras)
    times = frame_times([f.meta for f in frames], file)       # D-NeRF's per-frame "time", else --time
    if times is None and args.time is not None:
        times = [args.time] * len(frames)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default = (model.meta.get("width"), model.meta.get("height"))
    for i, f in enumerate(frames):
        size = f.declared_size() or (image_size(f.image_path) if f.image_path else None) or default
        if not size[0] or not size[1]:
            raise ValueError(f"frame {f.name!r}: no image size in the cameras file, no image, no run size")
        w, h = int(size[0]), int(size[1])
        t0 = time.perf_counter()
        img = model.render(f.intrinsics(w, h), f.c2w, w, h, time=None if times is None else float(times[i]))
        if args.format == "exr":
            write_exr(out / f"{f.name}.exr", img)
        else:
            Image.fromarray(to_rgba8(img), "RGBA").save(out / f"{f.name}.png")
        _print(f"rendered {out / (f.name + '.' + args.format)} ({w}x{h}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _opacity_arg(text: str) -> float | str:
    """--mesh-opacity: "auto" or a number in (0, 1)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1) or 'auto', got {text!r}")
    return value


def _texture_size_arg(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of texels or 'auto', got {text!r}") from None


def _environment_height_arg(text: str) -> int | str:
    """--environment-height: "auto" or a number of pixels in [0, 8192]."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 8192:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number of pixels in [0, 8192] (0: none), got {text!r}")
    return value


OBJ_COLOUR_NOTE = ("note: Blender's OBJ importer reads every texture as sRGB (an .mtl cannot say otherwise): "
                   "set the normal and roughness images to Non-Color after importing, or write .glb, which "
                   "carries it")


def _time_arg(text: str) -> float:
    """--time: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected an instant in [0, 1], got {text!r}")
    return value


def cmd_mesh(args: argparse.Namespace) -> int:
    from fit_implicit.backend.fitting.runs import load_run

    model = load_run(args.run, device=args.device)
    if (args.frames or args.time is not None) and not model.dynamic:
        raise ValueError("--time and --frames are for fits over time; this run is of one instant")
    if args.frames < 0 or args.frames == 1:
        raise ValueError(f"--frames must be 0 (one mesh) or at least 2, got {args.frames}")
    if args.follow and not args.frames:
        raise ValueError("--follow needs --frames: the instants to follow the mesh through")
    if args.materials < 0 or (args.materials and not args.texture_size):
        raise ValueError("--materials takes a number of steps (0: off) and needs textures (--texture-size not 0)")
    if args.data and not args.materials:
        raise ValueError("--data is for --materials: the photos to estimate the materials from")
    if not args.frames:
        model.time = args.time or 0.0
        _mesh_one(model, args, Path(args.out))
        return 0
    out = Path(args.out)
    if args.follow:
        return _mesh_followed(model, args, out)
    sequence = []
    for i in range(args.frames):
        model.time = i / (args.frames - 1)
        path = out.with_name(f"{out.stem}_{i:04d}{out.suffix}")
        _print(f"frame {i + 1}/{args.frames}, time {model.time:.4f}:")
        written = _mesh_one(model, args, path)
        sequence.append({"time": round(model.time, 6), "file": written.name})
    index = out.with_name(f"{out.stem}_sequence.json")
    index.write_text(json.dumps({"frames": sequence}, indent=1))
    _print(f"mesh sequence of {len(sequence)} instants -> {index}")
    return 0


def _mesh_followed(model, args: argparse.Namespace, out: Path) -> int:
    """--frames N --follow: one mesh at --time, and where its vertices are at N instants from 0
    to 1 as a Point Cache 2 file beside it (export/tracks.py)."""
    import numpy as np

    from fit_implicit.backend.export.tracks import LOST, follow_vertices, write_cache_for

    model.time = args.time or 0.0
    written, verts = _mesh_one(model, args, out, with_vertices=True)
    times = np.linspace(0.0, 1.0, args.frames)
    t0 = time.perf_counter()
    tracks, facts = follow_vertices(model, verts, times)
    cache = write_cache_for(written, tracks)
    index = out.with_name(f"{out.stem}_sequence.json")
    index.write_text(json.dumps({"mesh": written.name, "mesh_time": round(model.time, 6), "point_cache": cache.name,
                                 "times": [round(float(t), 6) for t in times], **facts}, indent=1))
    _print(f"followed {len(verts)} vertices through {len(times)} instants ({time.perf_counter() - t0:.1f} s): "
           f"mean residual {facts['track_residual']:.2g} units, {100 * facts['track_lost']:.2f}% of positions "
           f"lost (residual above {100 * LOST:g}% of the box's diagonal) -> {cache} (sample k = instant k; "
           f"Blender: a Mesh Cache modifier on the imported {written.suffix} mesh, its Frame Start the frame of "
           f"instant 0), {index}")
    if facts["track_lost"] > 0.01:
        _print("note: the motion is not one-to-one everywhere (parts that split, merge or appear); --frames "
               "without --follow writes a mesh per instant instead")
    return 0


def _mesh_one(model, args: argparse.Namespace, out: Path, with_vertices: bool = False):
    """Mesh (and texture) ``model`` at its current time into ``out``; returns the mesh file (and,
    ``with_vertices``, the vertices as written: a textured mesh is split at its UV seams)."""
    from fit_implicit.backend.export.files import write_mesh
    from fit_implicit.backend.export.mesh import extract_mesh
    from fit_implicit.backend.export.unseen import Views

    resolution = args.mesh_resolution or model.config.mesh.mesh_resolution
    t0 = time.perf_counter()
    views = None if args.keep_unseen or not model.config.mesh.mesh_close_unseen else Views.of_run(model.meta)
    facts: dict = {}
    verts, faces, colors = extract_mesh(model, resolution, args.mesh_opacity, views=views, facts=facts)
    if not len(faces):
        raise ValueError("the field has no surface above the iso-level: nothing to export")
    _print(f"mesh: {len(verts)} vertices, {len(faces)} triangles at resolution {resolution} "
           f"({time.perf_counter() - t0:.1f} s)")
    if "unseen" in facts:
        u = facts["unseen"]
        _print(f"unseen regions: {u['regions']} closed flat ({100 * u['area_share']:.1f}% of the surface), "
               f"{u['kept_regions']} kept as fitted ({u['seconds']:.1f} s)")
    if args.texture_size:
        from fit_implicit.backend.export.files import write_textured
        from fit_implicit.backend.export.texture import check_size, texture_mesh
        from fit_implicit.shared.protocol import TEXTURE_AUTO

        t1 = time.perf_counter()
        auto = args.texture_size == "auto"
        if auto and Views.of_run(model.meta) is None:
            if model.meta.get("source") == "points":
                raise ValueError("--texture-size auto needs training cameras, and a fit to points has none: give a "
                                 "size, or 0 for vertex colours")
            raise ValueError("--texture-size auto needs the training cameras, which this run does not keep "
                             "(fitted before they were saved): give a size")
        size = TEXTURE_AUTO if auto else check_size(int(args.texture_size))
        mesh, baked = texture_mesh(model, verts, faces, size, views=Views.of_run(model.meta))
        if args.materials:
            baked, light = _estimate_materials(model, mesh, baked, args)
        path = write_textured(out, mesh, baked)
        if args.materials:
            _write_light(path, light)
        times = ", ".join(f"{k} {v:.2f} s" for k, v in baked.timings.items())
        size = baked.albedo.shape[0]
        _print(f"textures: {size}x{size} ({', '.join(k for k, _ in baked.items())}), "
               f"{len(mesh.faces)} triangles, {time.perf_counter() - t1:.1f} s ({times}) -> {path}")
        if path.suffix.lower() == ".obj":
            _print(OBJ_COLOUR_NOTE)
        verts = mesh.vertices
    else:
        path = write_mesh(out, verts, faces, colors)
        _print(f"vertex colours -> {path}")
    _write_environment(model, path, args.environment_height)
    return (path, verts) if with_vertices else path


def _estimate_materials(model, mesh, baked, args: argparse.Namespace):
    """--materials: base colour, roughness and metallic textures and the light estimated from the
    photos of --data on the textured mesh (export/materials.py); returns (textures, light)."""
    from fit_implicit.backend.export.materials import MaterialConfig, estimate_materials
    from fit_implicit.backend.fitting.data import load_dataset

    if not args.data:
        raise ValueError("--materials needs --data: the photos the fit was made from (the run does not keep them)")
    data = load_dataset(args.data)
    if data.passes:
        raise ValueError(f"{args.data} has Blender's passes ({', '.join(sorted(data.passes))}): its textures are "
                         "already free of lighting; --materials is for photos without passes")
    t0 = time.perf_counter()
    got = estimate_materials(mesh, baked.albedo, data, MaterialConfig(material_steps=int(args.materials)),
                             model.device, log=lambda step, loss: _print(f"  materials step {step}: loss {loss:.5f}"))
    facts = got.facts
    direction = ", ".join(f"{v:.2f}" for v in facts["light_direction"])
    _print(f"materials: {args.materials} steps on {facts['material_samples']} pixels, {time.perf_counter() - t0:.1f} s; "
           f"the light's strongest bin towards ({direction}), {100 * facts['light_share']:.0f} % of it")
    return got.on(baked), got.environment


def _write_light(mesh_path: Path, light) -> Path:
    """The light estimated with the materials, beside the mesh: ``<stem>_light.hdr`` (linear,
    equirectangular, Blender's World mapping)."""
    from fit_implicit.backend.export.materials import write_hdr

    path = mesh_path.with_name(f"{mesh_path.stem}_light.hdr")
    write_hdr(path, light)
    _print(f"light: {light.shape[1]}x{light.shape[0]} equirectangular HDR (Blender: World > Environment Texture) "
           f"-> {path}")
    return path


def _write_environment(model, mesh_path: Path, height: int | str) -> Path | None:
    """A fit that modelled its background (fields/background.py): write it beside the mesh
    (export/environment.py: ``<stem>_environment.png``, equirectangular, for Blender's World);
    nothing for other fits or ``height`` 0; "auto": the height for the model's device."""
    from fit_implicit.backend.export.environment import environment_height, write_environment

    if getattr(model, "background", None) is None or height == 0:
        return None
    height = environment_height(None, str(model.device)) if height == "auto" else int(height)
    t0 = time.perf_counter()
    path = write_environment(model, mesh_path, height)
    _print(f"environment: the background, {2 * height}x{height} equirectangular (Blender: World > "
           f"Environment Texture), {time.perf_counter() - t0:.1f} s -> {path}")
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    from fit_implicit.backend.service import server  # needs pyzmq; imported only here

    return server.main(args) or 0


def cmd_worker(args: argparse.Namespace) -> int:
    from fit_implicit.backend.service import worker_process  # needs pyzmq; imported only here

    return worker_process.run(args) or 0


_HELP = argparse.ArgumentDefaultsHelpFormatter    # --help shows every option's default


def build_parser() -> argparse.ArgumentParser:
    from fit_implicit.shared.methods import ENCODINGS, METHOD_INFO, METHODS, PRESET_INFO, PRESETS

    p = argparse.ArgumentParser(prog="fit-implicit", description="Fit Implicit backend")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", formatter_class=_HELP, help="train a field on a transforms.json dataset")
    f.add_argument("data", help="folder with transforms_train.json / transforms.json, or the file; or a COLMAP "
                                "project (a text or binary model in it or in sparse/0, photos in images/)")
    f.add_argument("--out", required=True, help="run folder to write (model.pt, run.json)")
    f.add_argument("--method", default="nerf", choices=METHODS,
                   help="; ".join(f"{m}: {METHOD_INFO[m][1]}" for m in METHODS))
    f.add_argument("--preset", default=None, choices=PRESETS,
                   help="; ".join(f"{name}: {PRESET_INFO[name][1]}" for name in PRESETS)
                   + " (default: standard on a GPU, draft on a CPU)")
    f.add_argument("--seconds", type=float, default=0.0, help="wall-clock budget (0: none)")
    f.add_argument("--steps", type=int, default=0, help="training steps (0: the preset's)")
    f.add_argument("--device", default=None,
                   help="cpu | cuda | cuda:N | mps (default: cuda if available, else mps if available, else cpu)")
    f.add_argument("--holdout", type=int, default=0,
                   help="hold out every K-th view (0, K, 2K, ...) and report its PSNR")
    f.add_argument("--downscale", type=int, default=1, help="shrink images by this integer factor")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--gpus", type=int, default=1,
                   help="fit over this many processes, the batch split between them and the gradients averaged: "
                        "one a GPU with --device cuda (NCCL), else processes on the CPU (gloo)")
    f.add_argument("--log-every", type=float, default=1.0, help="seconds between progress lines")
    f.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any setting by name (backend/fitting/config.py), e.g. --set target_samples=65536 "
                        "(repeatable)")
    f.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    f.add_argument("--resume", action="store_true",
                   help="carry on an interrupted fit in --out from its last checkpoint, with its settings")
    f.add_argument("--checkpoint-every", type=float, default=60.0,
                   help="seconds between checkpoints of the training state in --out (0: none)")
    f.add_argument("--eval-seconds", type=float, default=0.0,
                   help="time limit of the held-out evaluation after the fit (0: every held-out view)")
    f.set_defaults(func=cmd_fit)

    fp = sub.add_parser("fit-points", formatter_class=_HELP,
                        help="fit a signed distance field to a point cloud, scan or mesh; write a clean, closed mesh")
    fp.add_argument("file", help="points: .ply, .xyz/.txt/.pts/.csv, .las/.laz, .e57 (with pye57); or a mesh "
                                 "(.ply with faces, .obj, .stl, .off, .glb), whose surface is sampled")
    fp.add_argument("--out", required=True, help="mesh file to write, in the points' frame and units; the suffix "
                                                 "picks the format (.ply, .obj, .glb)")
    fp.add_argument("--run", default=None, help="also keep the fitted field in this run folder (for `mesh`)")
    fp.add_argument("--preset", default=None, choices=PRESETS,
                    help="field size and steps (default: standard on a GPU, draft on a CPU)")
    fp.add_argument("--detail", type=float, default=None,
                    help="0 = fill holes smoothly .. 1 = keep every detail (setting points_detail, default 0.5)")
    fp.add_argument("--voxel-size", type=float, default=0.0,
                    help="mesh resolution as a voxel size in the points' units, as Blender's Voxel Remesh "
                         "(0: --mesh-resolution)")
    fp.add_argument("--mesh-resolution", type=int, default=0,
                    help="marching-cubes grid along the longest side (0: the preset's mesh_resolution)")
    fp.add_argument("--seconds", type=float, default=0.0, help="wall-clock budget (0: none)")
    fp.add_argument("--steps", type=int, default=0, help="training steps (0: the preset's)")
    fp.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: the fastest there is)")
    fp.add_argument("--seed", type=int, default=0)
    fp.add_argument("--log-every", type=float, default=1.0, help="seconds between progress lines")
    fp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="any setting by name, e.g. --set points_orientation=unoriented (repeatable)")
    fp.add_argument("--overwrite", action="store_true", help="replace --out (and --run)")
    fp.set_defaults(func=cmd_fit_points)

    fi = sub.add_parser("fit-image", formatter_class=_HELP,
                        help="fit a 2D image with each encoding (hash grid, Fourier features, positional, SIREN): "
                             "PSNR against steps and time, reconstructions at any size")
    fi.add_argument("image", help="image file (.png, .jpg, .exr, ...); alpha is ignored")
    fi.add_argument("--out", required=True, help="folder for the reconstructions, curves.csv and summary.json")
    fi.add_argument("--encoding", default="all",
                    help="all, or a comma-separated list of: " + ", ".join(ENCODINGS))
    fi.add_argument("--steps", type=int, default=2000, help="training steps per encoding")
    fi.add_argument("--seconds", type=float, default=0.0, help="training time per encoding (0: none)")
    fi.add_argument("--size", default="", help="reconstruction size WIDTHxHEIGHT (default: the image's)")
    fi.add_argument("--target-psnr", type=float, default=40.0, help="report when each encoding first reaches this")
    fi.add_argument("--downscale", type=int, default=1, help="shrink the image by this integer factor first")
    fi.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: the fastest there is)")
    fi.add_argument("--seed", type=int, default=0)
    fi.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="any setting by name (backend/fitting/image_fit.py, fields/encodings.py), e.g. "
                         "--set fourier_scale=20 (repeatable)")
    fi.set_defaults(func=cmd_fit_image)

    e = sub.add_parser("eval", formatter_class=_HELP, help="render a dataset's cameras and score them (PSNR, SSIM on white)")
    e.add_argument("run", help="run folder written by fit")
    e.add_argument("--cameras", required=True,
                   help="transforms file with images, e.g. the dataset's transforms_test.json, or a COLMAP project")
    e.add_argument("--downscale", type=int, default=1, help="shrink the images by this integer factor")
    e.add_argument("--seconds", type=float, default=0.0, help="time limit (0: every view)")
    e.add_argument("--renders", default=None, help="also save the renders (RGBA PNG) into this folder")
    e.add_argument("--device", default=None)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("render", formatter_class=_HELP, help="render the cameras of a transforms file")
    r.add_argument("run", help="run folder written by fit")
    r.add_argument("--cameras", required=True, help="transforms file (or folder holding one)")
    r.add_argument("--out", required=True, help="folder for one RGBA image per frame")
    r.add_argument("--format", default="png", choices=("png", "exr"),
                   help="png: 8-bit sRGB, straight alpha; exr: 32-bit float, linear light, premultiplied alpha")
    r.add_argument("--time", type=_time_arg, default=None,
                   help="fits over time: the instant in [0, 1] of frames without their own 'time' key (default: 0)")
    r.add_argument("--device", default=None)
    r.set_defaults(func=cmd_render)

    m = sub.add_parser("mesh", formatter_class=_HELP, help="extract a textured mesh (.glb, .obj, .ply) in world units")
    m.add_argument("run", help="run folder written by fit")
    m.add_argument("--out", required=True, help="mesh file; the suffix picks the format")
    m.add_argument("--mesh-resolution", type=int, default=0,
                   help="marching-cubes grid along the longest side (0: the fit's mesh_resolution)")
    m.add_argument("--mesh-opacity", type=_opacity_arg, default=None,
                   help="radiance fields: iso-level as the opacity of a slab 1/100 of the box thick, in (0, 1), or "
                        "'auto': the level whose mesh best matches the field's renders (default: the fit's "
                        "mesh_opacity, 'auto' unless set)")
    m.add_argument("--texture-size", type=_texture_size_arg, default="auto",
                   help="side of the baked UV textures (albedo, normal, roughness) written with the mesh "
                        "(.glb embeds them, .obj/.ply get PNGs beside); 0: vertex colours only; 'auto' "
                        "(default): about one texel per pixel of the closest training camera")
    m.add_argument("--keep-unseen", action="store_true",
                   help="keep the surface where no training camera looked as fitted (default: closed flat)")
    m.add_argument("--environment-height", type=_environment_height_arg, default="auto",
                   help="fits that modelled the background: also write it beside the mesh as <stem>_environment.png, "
                        "an equirectangular image this many pixels high and twice as wide, for Blender's World "
                        "(0: not written; auto: 512 on a GPU, 256 on the CPU)")
    m.add_argument("--time", type=_time_arg, default=None,
                   help="fits over time: the instant in [0, 1] to mesh (default: 0)")
    m.add_argument("--frames", type=int, default=0,
                   help="fits over time: a mesh sequence of this many instants from 0 to 1, written as "
                        "<stem>_0000<suffix>, ... with <stem>_sequence.json listing each file's time")
    m.add_argument("--follow", action="store_true",
                   help="with --frames: one mesh (at --time) and where each of its vertices is at each instant, "
                        "<stem>.pc2 (Point Cache 2, in the mesh file's vertex order: Blender's Mesh Cache "
                        "modifier on the imported .ply or .obj), instead of a mesh per instant")
    m.add_argument("--materials", type=int, default=0,
                   help="photos without Blender's passes: estimate base colour, roughness and metallic and the light "
                        "from the photos of --data in this many steps (the shadows and shading leave the base colour; "
                        "the light is written as <stem>_light.hdr); 0: the textures keep the light as photographed")
    m.add_argument("--data", default=None, help="with --materials: the dataset the fit was made from")
    m.add_argument("--device", default=None)
    m.set_defaults(func=cmd_mesh)

    s = sub.add_parser("serve", formatter_class=_HELP, help="serve jobs over ZeroMQ (needs pyzmq)")
    serve_options.add_arguments(s)      # --bind, --device, --max-queue, ... (no pyzmq needed)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", formatter_class=_HELP,
                       help="run jobs for a backend on another host (its serve --worker-bind; needs pyzmq)")
    serve_options.add_worker_arguments(w)
    w.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    if sys.platform == "darwin":    # an operation Apple's GPU (MPS) lacks runs on the CPU instead of failing
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
