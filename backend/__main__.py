"""Command line: ``python -m backend {fit,render,mesh,serve} ...``.

fit, render and mesh need only torch, numpy, scikit-image and Pillow (never pyzmq or bpy);
``serve`` imports :mod:`backend.server` (pyzmq) when it runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import serve_options


def _print(*args) -> None:
    print(*args, flush=True)


def _overrides(pairs: list[str]) -> dict:
    """``["key=value", ...]`` -> FitConfig overrides, values typed like the field they set."""
    import dataclasses

    from .train import FitConfig

    types = {f.name: type(f.default) for f in dataclasses.fields(FitConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(types))}")
        kind = types[key]
        try:
            if kind is bool:
                out[key] = value.strip().lower() in ("1", "true", "yes", "on")
            elif kind is int:
                out[key] = int(float(value))
            else:
                out[key] = kind(value)
        except ValueError:
            raise ValueError(f"--set {pair!r}: {value!r} is not a valid {kind.__name__}") from None
    return out


def cmd_fit(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import load_transforms, split_holdout
    from .train import Callbacks, evaluate, fit, make_config

    t0 = time.perf_counter()
    data = load_transforms(args.data, downscale=args.downscale)
    train, held = split_holdout(data, args.holdout) if args.holdout else (data, None)
    cfg = make_config(args.method, args.preset, device=args.device, steps=args.steps, seconds=args.seconds,
                      seed=args.seed, preview_size=0, **_overrides(args.set))
    _print(f"data: {len(train)} training views"
           + (f", {len(held)} held out" if held is not None else "")
           + f", {data.width}x{data.height}, box {np.round(data.aabb, 3).tolist()} "
           f"(loaded in {time.perf_counter() - t0:.1f} s)")
    _print(f"fit: method {cfg.method}, preset {cfg.preset}, {cfg.steps} steps"
           + (f" or {cfg.seconds:g} s" if cfg.seconds else "") + f", device {cfg.device}")

    class Printer(Callbacks):
        last = -1.0

        def on_progress(self, info: dict) -> None:
            if info["elapsed"] - self.last >= args.log_every or info["fraction"] >= 1.0:
                self.last = info["elapsed"]
                _print(f"step {info['step']}/{info['total_steps']}  loss {info['loss']:.5f}  "
                       f"psnr {info['psnr']:.2f} dB  {info['elapsed']:.1f} s  eta {info['eta']:.1f} s")

    model = fit(train, cfg, Printer())
    _print(f"trained {model.meta['steps']} steps in {model.meta['seconds']:.1f} s")
    if held is not None:
        scores = evaluate(model, held)
        model.meta["holdout_psnr"] = float(np.mean(scores))
        model.meta["holdout_views"] = len(held)
        _print(f"held-out PSNR {np.mean(scores):.2f} dB over {len(held)} views (white background)")
    model.save(args.out)
    _print(f"saved {args.out}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from PIL import Image

    from .data import image_size, read_frames
    from .model import FittedField
    from .train import to_rgba8

    model = FittedField.load(args.run, device=args.device)
    _, frames, _ = read_frames(args.cameras)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default = (model.meta.get("width"), model.meta.get("height"))
    for f in frames:
        size = f.declared_size() or (image_size(f.image_path) if f.image_path else None) or default
        if not size[0] or not size[1]:
            raise ValueError(f"frame {f.name!r}: no image size in the cameras file, no image, no run size")
        w, h = int(size[0]), int(size[1])
        img = model.render(f.intrinsics(w, h), f.c2w, w, h)
        Image.fromarray(to_rgba8(img), "RGBA").save(out / f"{f.name}.png")
        _print(f"rendered {out / (f.name + '.png')} ({w}x{h})")
    return 0


def _opacity_arg(text: str) -> float | str:
    """--opacity: "auto" or a number in (0, 1)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1) or 'auto', got {text!r}")
    return value


def cmd_mesh(args: argparse.Namespace) -> int:
    from .export.mesh import extract_mesh, write_mesh
    from .model import FittedField

    model = FittedField.load(args.run, device=args.device)
    resolution = args.resolution or model.config.mesh_resolution
    t0 = time.perf_counter()
    verts, faces, colors = extract_mesh(model, resolution, args.opacity)
    if not len(faces):
        raise ValueError("the field has no surface above the iso-level: nothing to export")
    _print(f"mesh: {len(verts)} vertices, {len(faces)} triangles at resolution {resolution} "
           f"({time.perf_counter() - t0:.1f} s)")
    if args.textures:
        from .export.gltf import write_textured
        from .export.texture import check_size, texture_mesh

        t1 = time.perf_counter()
        mesh, baked = texture_mesh(model, verts, faces, check_size(args.textures))
        path = write_textured(args.out, mesh, baked)
        times = ", ".join(f"{k} {v:.2f} s" for k, v in baked.timings.items())
        _print(f"textures: {args.textures}x{args.textures} ({', '.join(k for k, _ in baked.items())}), "
               f"{len(mesh.faces)} triangles, {time.perf_counter() - t1:.1f} s ({times}) -> {path}")
    else:
        path = write_mesh(args.out, verts, faces, colors)
        _print(f"vertex colours -> {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import server  # needs pyzmq; imported only here

    return server.main(args) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend", description="Fit Implicit backend")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a field on a transforms.json dataset")
    f.add_argument("data", help="folder with transforms_train.json / transforms.json, or the file")
    f.add_argument("--out", required=True, help="run folder to write (model.pt, run.json)")
    f.add_argument("--method", default="nerf", choices=["nerf", "sdf", "occupancy"],
                   help="radiance field, signed distance field (NeuS) or occupancy field (UNISURF)")
    f.add_argument("--preset", default="standard", choices=["draft", "standard", "high"])
    f.add_argument("--seconds", type=float, default=0.0, help="wall-clock budget (0: none)")
    f.add_argument("--steps", type=int, default=0, help="training steps (0: the preset's)")
    f.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    f.add_argument("--holdout", type=int, default=0,
                   help="hold out every K-th view (0, K, 2K, ...) and report its PSNR")
    f.add_argument("--downscale", type=int, default=1, help="shrink images by this integer factor")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--log-every", type=float, default=1.0, help="seconds between progress lines")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any FitConfig field, e.g. --set target_samples=65536 (repeatable)")
    f.set_defaults(func=cmd_fit)

    r = sub.add_parser("render", help="render the cameras of a transforms file")
    r.add_argument("run", help="run folder written by fit")
    r.add_argument("--cameras", required=True, help="transforms file (or folder holding one)")
    r.add_argument("--out", required=True, help="folder for one RGBA PNG per frame")
    r.add_argument("--device", default=None)
    r.set_defaults(func=cmd_render)

    m = sub.add_parser("mesh", help="extract a textured mesh (.glb, .obj, .ply) in world units")
    m.add_argument("run", help="run folder written by fit")
    m.add_argument("--out", required=True, help="mesh file; the suffix picks the format")
    m.add_argument("--resolution", type=int, default=0, help="grid along the longest side (0: preset's)")
    m.add_argument("--opacity", type=_opacity_arg, default=None,
                   help="radiance fields: iso-level as the opacity of a slab 1/100 of the box thick, in (0, 1), or "
                        "'auto': the level whose mesh best matches the field's renders (default: the fit's "
                        "mesh_opacity, 'auto' unless set)")
    m.add_argument("--textures", type=int, default=2048,
                   help="side of the baked UV textures (albedo, normal, roughness) written with the mesh "
                        "(.glb embeds them, .obj/.ply get PNGs beside); 0: vertex colours only")
    m.add_argument("--device", default=None)
    m.set_defaults(func=cmd_mesh)

    s = sub.add_parser("serve", help="serve jobs over ZeroMQ (needs pyzmq)")
    serve_options.add_arguments(s)      # --bind, --device, --max-queue, ... (no pyzmq needed)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
