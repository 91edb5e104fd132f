"""Lego benchmark: held-out PSNR at fixed training budgets, speed and memory.

    python benchmarks/lego.py [--data ../shared/data/lego] [--budgets 5,10,20,30,60] [--out runs/bench.json]

``--data`` may also name any capture the fit reads (a transforms.json folder, an LLFF folder such
as ``llff_flower/images_8``, an IDR/NeuS folder such as ``dtu_scan24``): the same figures for it,
under its folder's name.  Holds out every 8th view (0, 8, 16, ...: NeRF's LLFF convention; on
lego 10 of the 80 views), trains one fresh field per budget (the clock
runs from the first step, data already on the device, no previews), and reports for each:
held-out PSNR (white background, 8-bit, docs/benchmarks.md conventions), steps, steps/s,
samples/s, peak GPU memory, and the warm-up time (model build + first step, which includes any
compilation).  Prints a table and writes the same figures to a JSON file.

``--pose-noise SIGMA`` (issue 15, BARF's protocol): the training cameras are perturbed first
(benchmarks/pose_noise.py: N(0, SIGMA^2) per rotation-vector component and per axis of the
shift), and each row adds the camera errors before and after the fit (mean rotation error in
degrees, centre error; after aligning the estimate to the true cameras by a similarity) and
``psnr_aligned``, the held-out views moved by that similarity into the fit's frame.  Pair it
with ``--set camera_refine=on``; without refinement "after" is the perturbed cameras.  Cameras refined
from exact poses (``--set camera_refine=on`` alone) get the same figures, as BARF scores its noiseless row.
``--test FILE``: train on every view of ``--data`` and score FILE's views (D-NeRF's datasets:
transforms_test.json, each view at its own instant; benchmarks/dynamic_scene.py makes one).
``--save-renders DIR``: each held-out view as truth | render | error (the absolute difference on
white, 4x) in one JPEG, DIR/<budget>s/<view>.jpg, to see where a fit loses; every row lists the
views' own PSNRs (``psnr_views``) either way.
``--focal-noise F``: the training cameras' focal lengths are all F (a fraction) too long; pair it
with ``--set camera_refine=focal``; each row adds the refined ``focal_scale`` and ``focal_error``
(the fraction still wrong).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from fit_implicit.backend.fitting.data import load_layout, load_transforms, split_holdout  # noqa: E402
from fit_implicit.backend.fitting.config import FitConfig, make_config  # noqa: E402
from fit_implicit.backend.fitting.loop import Callbacks, fit  # noqa: E402
from fit_implicit.backend.fitting.metrics import evaluate, on_white, psnr_white  # noqa: E402
from fit_implicit.backend.render.image import to_rgba8  # noqa: E402
from fit_implicit.shared import layouts  # noqa: E402
import pose_noise  # noqa: E402  (benchmarks/pose_noise.py)


class Meter(Callbacks):
    """Counts samples from the progress reports (diagnostic keys of the trainer)."""

    def __init__(self):
        self.last: dict = {}
        self.curve: list = []       # [step, training-batch PSNR, occupied share of the grid, rays] a report

    def on_progress(self, info: dict) -> None:
        self.last = info
        self.curve.append([int(info["step"]), round(float(info["psnr"]), 2), round(float(info["occupied"]), 4),
                           int(info["rays"])])


def commit() -> str:
    """The checkout's commit ($FIT_IMPLICIT_COMMIT where the tree was copied without its history)."""
    if os.environ.get("FIT_IMPLICIT_COMMIT"):
        return os.environ["FIT_IMPLICIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


@torch.no_grad()
def motion_stats(model, n: int = 1 << 18) -> dict | None:
    """A field over time's deformation at random points of occupied cells at random instants: mean
    and 99th-percentile displacement (normalised units) and the share carried out of the box (where
    the canonical field reads its border and passes no gradient back); None for a still field."""
    deformation = getattr(model.field, "deformation", None)
    if deformation is None:
        return None
    grid = model.occupancy
    cells = grid.mask.nonzero().squeeze(1)
    if cells.numel() == 0:
        return {"occupied_cells": 0}
    pick = cells[torch.randint(0, cells.numel(), (n,), device=cells.device)]
    x = grid.cell_centers(pick) + (torch.rand(n, 3, device=cells.device) - 0.5) * (2.0 / grid.resolution)
    d = deformation.displacement(x, torch.rand(n, device=cells.device)).float()
    size = d.norm(dim=-1)
    return {"mean_displacement": round(float(size.mean()), 5), "p99_displacement": round(float(size.quantile(0.99)), 5),
            "out_of_box": round(float(((x + d).abs() > 1.0).any(-1).float().mean()), 5),
            "occupied_cells": int(cells.numel())}


EDGE_RANGE = 0.2     # an "edge" pixel: the truth (on white) varies by more than this within its 3x3 neighbourhood


def edge_mask(truth: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose 3x3 neighbourhood in ``truth`` (H, W, 3), on white in [0, 1], spans more
    than EDGE_RANGE in some channel: outlines, occlusion edges and sharp texture edges."""
    pad = np.pad(truth, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = truth.shape[:2]
    shifted = [pad[i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return (np.max(shifted, axis=0) - np.min(shifted, axis=0)).max(-1) > EDGE_RANGE


def error_regions(sq_edges: float, sq_rest: float, n_edges: int, n_rest: int) -> dict:
    """Where the held-out error lies: the edge pixels' share of the pixels and of the squared error, and
    the PSNR over each part (summed over views)."""
    def psnr(sq, n):
        return round(float(-10.0 * np.log10(max(sq / max(n, 1), 1e-12))), 3)

    return {"edge_pixels": round(n_edges / max(n_edges + n_rest, 1), 4),
            "edge_error_share": round(sq_edges / max(sq_edges + sq_rest, 1e-12), 4),
            "psnr_edges": psnr(sq_edges, n_edges), "psnr_rest": psnr(sq_rest, n_rest)}


@torch.no_grad()
def save_renders(model, held, folder: Path) -> tuple[list[float], dict]:
    """Render each view of ``held``, write truth | render | 4x error side by side to
    ``folder/<view>.jpg``; return the views' PSNRs (the same as metrics.evaluate's) and
    :func:`error_regions` over all of them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    scores, sums = [], np.zeros(4)
    for i in range(len(held)):
        render = to_rgba8(model.render(held.intrinsics[i], held.poses[i], *held.size(i), time=held.time(i)))
        truth = held.image(i)
        scores.append(psnr_white(render, truth))
        a, b = on_white(truth), on_white(render)
        sq, edges = ((np.round(a * 255.0) - np.round(b * 255.0)) / 255.0) ** 2, edge_mask(a)
        sums += (sq[edges].sum(), sq[~edges].sum(), 3 * edges.sum(), 3 * (~edges).sum())
        row = np.concatenate([a, b, np.clip(4.0 * np.abs(a - b), 0.0, 1.0)], axis=1)
        Image.fromarray(np.round(row * 255.0).astype(np.uint8)).save(folder / f"{Path(held.names[i]).stem}.jpg",
                                                                      quality=90)
    return scores, error_regions(*sums)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lego"))
    ap.add_argument("--budgets", default="5,10,20,30,60", help="training seconds, comma-separated")
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--method", default="nerf", choices=["nerf", "sdf", "occupancy"])
    ap.add_argument("--steps", default="",
                    help="train this many steps instead of the time budgets (comma-separated: one fresh run "
                         "each; comparable across runs that share the GPU, and on CPUs)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--test", default="",
                    help="score on this transforms file's views instead of holding out (D-NeRF's datasets: "
                         "transforms_test.json, at instants no training view shows)")
    ap.add_argument("--downscale", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--dense-march", action="store_true", help="dense (rays x candidates) sampling path")
    ap.add_argument("--eval-march-steps", default="",
                    help="also score the held-out views rendered with these numbers of steps along the box "
                         "diagonal (comma-separated)")
    ap.add_argument("--eval-supersample", default="",
                    help="also score the held-out views rendered with s x s rays a pixel, averaged "
                         "(comma-separated s; photos' pixels are area averages)")
    ap.add_argument("--pose-noise", type=float, default=0.0, metavar="SIGMA",
                    help="perturb the training cameras (radians and scene units per component; BARF: 0.15)")
    ap.add_argument("--pose-noise-seed", type=int, default=0)
    ap.add_argument("--refine-test-poses", type=int, default=0, metavar="STEPS",
                    help="with --pose-noise or refined cameras: also score the held-out views after STEPS of BARF's test-time pose "
                         "optimisation against the frozen field, from their aligned poses (psnr_test_refined)")
    ap.add_argument("--focal-noise", type=float, default=0.0, metavar="F",
                    help="the training cameras' focal lengths F (a fraction, e.g. 0.05) too long")
    ap.add_argument("--save-renders", default="", metavar="DIR",
                    help="write each held-out view as truth | render | 4x error to DIR/<budget>s/<view>.jpg, and "
                         "split the error between edge pixels and the rest (error_regions)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_lego.json"))
    args = ap.parse_args(argv)

    if args.dense_march:
        from fit_implicit.backend.render import volume as render
        render.PACKED = False
    overrides = FitConfig.for_method(args.method).parse(args.set)
    layout = layouts.read(args.data)
    if layout is not None:
        data, scene = load_layout(layout, downscale=args.downscale), layout.folder.name
    else:
        data, scene = load_transforms(args.data, downscale=args.downscale), Path(args.data).resolve().name
    if args.test:       # a separate test split (its frames' times too)
        train, held = data, load_transforms(args.test, downscale=args.downscale)
    else:
        train, held = split_holdout(data, args.holdout)
    true_poses = train.poses
    if args.pose_noise < 0:
        raise SystemExit("--pose-noise must not be negative")
    if args.pose_noise > 0:
        train = dataclasses.replace(train, poses=pose_noise.perturb(true_poses, args.pose_noise, args.pose_noise_seed))
    if not -0.5 < args.focal_noise < 1.0:
        raise SystemExit("--focal-noise must be in (-0.5, 1)")
    if args.focal_noise:
        lens = np.array(train.intrinsics, dtype=np.float64, copy=True)
        lens[:, :2] *= 1.0 + args.focal_noise
        train = dataclasses.replace(train, intrinsics=lens)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    rows = []
    step_counts = [int(v) for v in str(args.steps).split(",") if v.strip()]
    if any(n < 1 for n in step_counts):
        raise SystemExit("--steps must be positive step counts")
    runs = [(0.0, n) for n in step_counts] or [(float(b), 10**7) for b in args.budgets.split(",")]
    for budget, steps in runs:
        cfg = make_config(args.method, args.preset, device=str(dev), seconds=budget, steps=steps,
                          preview_size=0, **overrides)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        meter = Meter()
        t0 = time.perf_counter()
        model = fit(train, cfg, meter)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
        train_peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        t1 = time.perf_counter()
        scores, regions = (save_renders(model, held, Path(args.save_renders) / f"{budget:g}s") if args.save_renders
                           else (evaluate(model, held), None))
        eval_s = time.perf_counter() - t1
        smooth = {s: round(float(np.mean(evaluate(model, held, supersample=s))), 3)    # (before the
                  for s in [int(v) for v in args.eval_supersample.split(",") if v]}      # quadrature changes)
        fine = {}
        for n in [int(v) for v in args.eval_march_steps.split(",") if v]:  # same field, other quadrature
            model.render_step_size, model.render_max_steps = 2.0 * 3.0 ** 0.5 / n, n
            if model.is_surface:    # surface fields render with their training step (FittedField.trace_surface)
                model.step_size, model.max_steps = model.render_step_size, n
            fine[n] = round(float(np.mean(evaluate(model, held))), 3)
        cams, refine = {}, model.meta.get("camera_refine") or {}     # run.json's camera report (fitting/loop.py)
        # the cameras as fitted against the true ones, and held-out views in the fit's frame: with noise, or
        # refined from exact poses (BARF's protocol scores every noise level so, none included)
        if args.pose_noise > 0 or refine.get("poses") is not None:
            refined = refine.get("poses")
            estimated = np.asarray(refined, np.float64) if refined is not None else train.poses
            moved = pose_noise.apply(held.poses, *pose_noise.align(true_poses, estimated))
            cams = {"pose_noise": args.pose_noise, "pose_error_before": pose_noise.errors(true_poses, train.poses),
                    "pose_error": pose_noise.errors(true_poses, estimated),
                    "psnr_aligned": round(float(np.mean(evaluate(model, dataclasses.replace(held, poses=moved)))), 3)}
            if args.refine_test_poses > 0:     # BARF's protocol: each held-out pose fitted against the frozen field
                fitted = np.stack([pose_noise.refine_view(model, held.image(i), held.intrinsics[i], moved[i],
                                                          steps=args.refine_test_poses, seed=i) for i in range(len(held))])
                cams["psnr_test_refined"] = round(float(np.mean(evaluate(model, dataclasses.replace(held, poses=fitted)))), 3)
                cams["test_pose_moved_deg"] = round(float(np.mean(pose_noise.turn_deg(moved, fitted))), 4)
        if args.focal_noise:
            scale = refine.get("focal_scale", 1.0)
            cams.update(focal_noise=args.focal_noise, focal_scale=scale,
                        focal_error=round(abs((1.0 + args.focal_noise) * scale - 1.0), 5))
        steps = int(model.meta["steps"])
        train_s = float(model.meta["seconds"])
        samples = float(model.meta.get("samples", 0))
        row = {
            "budget_s": budget, "psnr": round(float(np.mean(scores)), 3), "views": len(held),
            "psnr_views": [round(float(v), 2) for v in scores], "error_regions": regions,
            "render_march_steps": cfg.march.max_steps(rendering=True), "psnr_by_render_steps": fine,
            "psnr_by_supersample": smooth,
            "steps": steps, "train_s": round(train_s, 2), "steps_per_s": round(steps / max(train_s, 1e-9), 1),
            "samples_per_s": round(samples / max(train_s, 1e-9)) if samples else None,
            "warmup_s": model.meta.get("first_step_s"), "wall_s": round(wall, 2), "eval_s": round(eval_s, 2),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None,
            "train_peak_mem_gb": round(train_peak, 3) if train_peak is not None else None,
            "train_psnr": model.meta.get("train_psnr"), "graph_captures": model.meta.get("graph_captures"),
            "inv_s": model.meta.get("inv_s"), "background": model.meta.get("background"),
            "time_resolution": model.meta.get("time_resolution"),
            "camera_moved_deg": refine.get("mean_rotation_deg"), **cams,
            "levels_in_at": refine.get("levels_in_at"),
            "window_moves": refine.get("window_moves"),
            "motion": motion_stats(model), "warm_start": model.meta.get("warm_start"), "curve": meter.curve,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    doc = {"scene": scene, "method": args.method, "device": device_name, "torch": torch.__version__, "commit": commit(),
           "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "overrides": overrides,
           "holdout_every": args.holdout, "downscale": args.downscale, "results": rows}
    # Write the record, then print the table: alike in shape to benchmarks/surface_scene.py's
    # report (a deliberate repeat: each script reports its own figures).
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"\n{scene}, {args.method}, on {device_name} ({doc['commit']}, preset {args.preset}, {overrides or 'defaults'})")
    print(f"{'budget s':>8} {'PSNR dB':>8} {'steps':>7} {'steps/s':>8} {'Msamples/s':>10} {'peak GB':>8} {'train GB':>8} {'warm-up s':>9}")
    for r in rows:
        ms = f"{r['samples_per_s'] / 1e6:.1f}" if r["samples_per_s"] else "-"
        print(f"{r['budget_s']:>8g} {r['psnr']:>8.2f} {r['steps']:>7d} {r['steps_per_s']:>8.1f} {ms:>10} "
              f"{r['peak_mem_gb'] if r['peak_mem_gb'] is not None else '-':>8} "
              f"{r['train_peak_mem_gb'] if r['train_peak_mem_gb'] is not None else '-':>8} {r['warmup_s'] or '-':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
