"""Meta-learn the warm starts that fresh fits begin from (backend/fields/warm_start.py).

    python benchmarks/random_scenes.py --out .data/random_scenes --count 32
    python scripts/train_warm_starts.py --scenes .data/random_scenes --method nerf --preset draft
        [--iterations 60] [--inner-steps 120] [--set NAME=VALUE ...] [--device cpu] [--out FOLDER]

Reptile (first-order meta-learning): the shared initial weights of the field's MLPs move, scene
after scene, a step of size ``outer_lr`` (falling linearly to 0) towards the weights that
``inner-steps`` steps of this project's own fit (fitting/loop.py, the preset's learning-rate
schedule, hash tables fresh every time) reach from them.  The fit is the real one, stopped early:
the warm start learns where the first seconds of a real fit go.  Settings that do not change the
MLPs' shapes or what their inputs mean (``--set target_samples=...``, ``log2_table``) may be
lowered to make the inner fits cheaper.  Writes ``<kind>-<encoding>-<key>.npz`` into ``--out``
(default: the package's warm_starts folder) with how it was trained; prints each scene's
training-batch PSNR at the end of its inner fit (it rises as the warm start improves).

Cost (2 CPU cores, draft preset, 64 x 64 scenes): about 0.1-0.2 s an inner step; see
docs/benchmarks.md "Warm starts" for each shipped file's time.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fit_implicit.backend.fields import warm_start
from fit_implicit.backend.fitting.config import FitConfig, make_config
from fit_implicit.backend.fitting.data import load_transforms
from fit_implicit.backend.fitting.loop import Callbacks, Cancelled, make_trainer, train_fresh
from fit_implicit.backend.fitting.model import build_field


class StopAt(Callbacks):
    """Stops the fit after ``steps`` steps (the fit's schedule stays that of its full length)."""

    def __init__(self, steps: int):
        self.steps, self.done, self.psnr = int(steps), 0, float("nan")

    def on_checkpoint(self, step, state) -> None:
        self.done = step

    def on_progress(self, info: dict) -> None:
        self.psnr = float(info["psnr"])

    def should_stop(self) -> bool:
        return self.done >= self.steps


def inner_fit(data, cfg: FitConfig, init: dict[str, np.ndarray], steps: int) -> tuple[dict[str, np.ndarray], float]:
    """The warm-started weights after ``steps`` steps of a fit of ``data`` from ``init``, and the
    training-batch PSNR of its last progress report."""
    def build():
        trainer = make_trainer(data, cfg)
        warm_start.apply(trainer.model.field, init)      # in place: the optimiser keeps its parameters
        return trainer

    stop = StopAt(steps)
    try:
        model = train_fresh(build, data, cfg, stop, None)
    except Cancelled as exc:
        model = exc.model
    return warm_start.current(model.field), stop.psnr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", required=True, help="folder of scene folders (benchmarks/random_scenes.py)")
    ap.add_argument("--method", default="nerf", choices=["nerf", "sdf", "occupancy"])
    ap.add_argument("--preset", default="draft")
    ap.add_argument("--iterations", type=int, default=60, help="inner fits (scenes visited, in a shuffled cycle)")
    ap.add_argument("--inner-steps", type=int, default=120, help="steps of each inner fit")
    ap.add_argument("--outer-lr", type=float, default=1.0, help="Reptile's step at the start (falls linearly to 0)")
    ap.add_argument("--set", action="append", default=[], help="inner-fit setting NAME=VALUE (repeatable)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(warm_start.WARM_START_DIR), help="folder to write the warm start into")
    args = ap.parse_args(argv)

    folders = sorted(p.parent for p in Path(args.scenes).glob("*/transforms.json"))
    if not folders:
        raise SystemExit(f"no scene folders with a transforms.json under {args.scenes}")
    overrides = FitConfig.for_method(args.method).parse(args.set)
    cfg = make_config(args.method, args.preset, device=args.device, preview_size=0, seed=args.seed,
                      **{**overrides, "warm_start": False})
    scenes = [load_transforms(f) for f in folders]
    torch.manual_seed(args.seed)
    probe = build_field(cfg)
    init = warm_start.current(probe)                      # PyTorch's default initialisation
    rng = np.random.default_rng(args.seed)
    order: list[int] = []
    t0 = time.perf_counter()
    psnrs = []
    for it in range(args.iterations):
        if not order:
            order = list(rng.permutation(len(scenes)))
        k = order.pop()
        cfg.seed = args.seed + it
        weights, psnr = inner_fit(scenes[k], cfg, init, args.inner_steps)
        eps = args.outer_lr * (1.0 - it / args.iterations)
        init = {name: init[name] + eps * (weights[name] - init[name]) for name in init}
        psnrs.append(psnr)
        print(f"{it + 1:4d}/{args.iterations}  {folders[k].name}  step {eps:.3f}  training PSNR {psnr:6.2f} dB  "
              f"{time.perf_counter() - t0:7.1f} s", flush=True)
    seconds = time.perf_counter() - t0
    n = max(1, args.iterations // 4)                      # the first and the last quarter of the inner fits
    info = {"method": args.method, "preset": args.preset, "iterations": args.iterations,
            "inner_steps": args.inner_steps, "outer_lr": args.outer_lr, "inner_settings": overrides,
            "scenes": len(scenes), "scene_folder": Path(args.scenes).name, "seconds": round(seconds, 1),
            "device": str(cfg.device), "date": datetime.date.today().isoformat(),
            "first_psnr": round(float(np.mean(psnrs[:n])), 2), "last_psnr": round(float(np.mean(psnrs[-n:])), 2)}
    path = warm_start.save(Path(args.out) / warm_start.file_name(warm_start.signature(probe)), probe, init, info)
    print(f"warm start for {args.method} / {args.preset}: {path} ({seconds:.0f} s; training PSNR of the inner fits "
          f"{info['first_psnr']} dB over the first quarter, {info['last_psnr']} dB over the last)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
