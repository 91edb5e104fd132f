"""Where a training step's time goes on lego: ms per step per variant, and a kernel profile.

    python benchmarks/profile_step.py [--data ../shared/data/lego] [--method nerf|sdf|occupancy]
                                      [--warmup 300] [--steps 100]

For each variant (fused Triton kernels of the encoding and a fit over time's motion planes on/off) it trains ``warmup`` steps
(past the occupancy grid's warm-up), then times ``steps`` steps with a device synchronise on both
ends.  Then it profiles 20 steps of the default variant with torch.profiler and prints the kernels
that take the most device time, grouped into encoding / MLP / sampling+occupancy / compositing /
optimiser, and how busy the GPU was (kernel time over wall time: far below 100 % means the step
waits on the host, launching kernels and synchronising, not on the GPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from fit_implicit.backend.fitting.data import load_transforms, split_holdout  # noqa: E402
from fit_implicit.backend.fields.hashgrid import HashGrid  # noqa: E402
from fit_implicit.backend.fields.motion import Deformation  # noqa: E402
from fit_implicit.backend.fitting.config import FitConfig, make_config  # noqa: E402
from fit_implicit.backend.fitting.loop import make_trainer  # noqa: E402
from fit_implicit.backend.fitting.trainer import Trainer  # noqa: E402


def run(trainer: Trainer, steps: int, start: int) -> tuple[float, float]:
    """Mean ms per step and mean samples per step over ``steps`` steps."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    samples = 0
    for i in range(steps):
        trainer.update_step(start + i, (start + i) / trainer.cfg.steps)
        samples = samples + trainer.step()[2]
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / steps, float(samples) / steps


CATEGORIES = [
    ("encoding", ("hashgrid", "embedding_bag", "index_add", "_hashgrid")),
    ("mlp", ("gemm", "gemv", "linear", "addmm", "mm", "relu", "sigmoid", "cutlass", "sm90", "nvjet")),
    ("optimiser", ("adam", "foreach", "multi_tensor")),
    ("compositing", ("cumsum", "scan", "exp")),
    ("sampling/occupancy", ("nonzero", "masked", "index", "where", "gather", "scatter", "cat", "copy")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lego"))
    ap.add_argument("--method", default="nerf", choices=("nerf", "sdf", "occupancy"))
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--triton-only", action="store_true", help="skip the plain PyTorch encoding variant")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = FitConfig.for_method(args.method).parse(args.set)
    train, _ = split_holdout(load_transforms(args.data), 8)
    cfg = make_config(args.method, args.preset, device="cuda", steps=20000, preview_size=0, **overrides)

    for use_triton in ((True,) if args.triton_only else (False, True)):
        HashGrid.use_triton = Deformation.use_triton = use_triton
        torch.manual_seed(0)
        # the plain radiance field: the eager trainer (the graph trainer's step needs the fused kernel)
        trainer = Trainer(train, cfg) if not use_triton and args.method == "nerf" else make_trainer(train, cfg)
        t0 = time.perf_counter()
        trainer.step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        run(trainer, args.warmup, 1)
        ms, spp = run(trainer, args.steps, args.warmup + 1)
        print(f"triton={use_triton}: first step {first:.2f} s; {ms:.2f} ms/step, {spp / 1e3:.0f}k samples/step, "
              f"{trainer.rays} rays/step, {spp / ms / 1e3:.1f} M samples/s", flush=True)

    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    wall = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        if hasattr(trainer, "_body"):    # graph trainer: profile the same step run eagerly
            for _ in range(20):
                trainer.optimizer.zero_grad(set_to_none=True)
                trainer._body(trainer.rays)
            torch.cuda.synchronize()
        else:
            run(trainer, 20, args.warmup + args.steps + 1)
    wall = time.perf_counter() - wall
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
    per_cat: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        rows.append((t, e.key))
        per_cat[category(e.key)] = per_cat.get(category(e.key), 0.0) + t
    total = sum(per_cat.values())
    print(f"\ndevice time per step {total / 20 / 1e3:.2f} ms (kernels only; the profiled wall time "
          f"{wall / 20 * 1e3:.2f} ms a step, profiler overhead included), by category:")
    for cat, t in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<20} {100 * t / total:5.1f} %  {t / 20 / 1e3:.3f} ms")
    print("\ntop kernels:")
    for t, key in sorted(rows, reverse=True)[:25]:
        print(f"  {t / 20 / 1e3:8.3f} ms  [{category(key)}] {key[:110]}")
    kernels = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages() if e.device_type.name == "CUDA")
    print(f"GPU busy: kernels {kernels / 20 / 1e3:.2f} ms of {wall / 20 * 1e3:.2f} ms wall a step "
          f"({100 * kernels / 1e6 / wall:.0f} %)")
    host = sorted(((getattr(e, "self_cpu_time_total", 0), e.count, e.key) for e in prof.key_averages()), reverse=True)
    print("\ntop host operators (self CPU time; syncs show as aten::item / _local_scalar_dense / nonzero):")
    for t, count, key in host[:15]:
        print(f"  {t / 20 / 1e3:8.3f} ms  x{count / 20:6.1f}/step  {key[:100]}")
    del events
    return 0


if __name__ == "__main__":
    sys.exit(main())
