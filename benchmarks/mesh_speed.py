"""Mesh extraction speed: field evaluation (dense and coarse-to-fine), marching cubes, clean-up
and the whole ``extract_mesh``, timed separately, at each resolution.

    python benchmarks/mesh_speed.py                      # analytic SDF, 256^3 and 512^3, CUDA if any
    python benchmarks/mesh_speed.py --run runs/lego      # also a fitted model (FittedField.save folder)
    python benchmarks/mesh_speed.py --device cpu --resolutions 128

The analytic field is a sphere with a torus through it and 200 small bumps on it (about the
surface area of a busy object).  Times are the best of ``--repeat`` runs after one warm-up.
Issue 4's target: the extraction at 512^3 in at most 2 s on the H100.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402


class AnalyticSdf:
    """Stand-in with the FittedField surface contract (method, aabb, device, inside_field)."""

    method = "sdf"

    def __init__(self, device: torch.device):
        self.device = device
        self.aabb = np.array([[-1.3, -1.1, -1.0], [1.3, 1.1, 1.2]])
        g = torch.Generator().manual_seed(0)
        dirs = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=1)
        self.bumps = (0.8 * dirs).to(device)                                   # (200, 3)

    @torch.no_grad()
    def inside_field(self, x: torch.Tensor) -> torch.Tensor:
        sphere = 0.8 - x.norm(dim=1)
        torus = 0.15 - torch.sqrt((x[:, [0, 2]].norm(dim=1) - 1.0) ** 2 + x[:, 1] ** 2)
        bumps = 0.05 - torch.cdist(x, self.bumps).amin(dim=1)
        return torch.maximum(torch.maximum(sphere, torus), bumps)


def timed(fn, device, repeat: int):
    """(best seconds, last result) of ``repeat`` calls after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench(name: str, model, resolution: int, device: torch.device, repeat: int, block: int) -> None:
    from fit_implicit.backend.export.cleanup import is_watertight, keep_large_components, vertex_normals
    from fit_implicit.backend.export.marching_cubes import marching_cubes
    from fit_implicit.backend.export.mesh import (OUTSIDE, evaluate_grid, evaluate_grid_sparse, extract_mesh,
                                                  grid_shape, _fill_nerf_interior, field_method, inside_function,
                                                  mesh_colors)

    fn = inside_function(model)
    shape = grid_shape(model.aabb, resolution)
    t_dense, vol = timed(lambda: evaluate_grid(fn, model.aabb, shape, device), device, repeat)
    t_sparse, vol_s = timed(lambda: evaluate_grid_sparse(fn, model.aabb, shape, device, block), device, repeat)
    same = bool(((vol > 0) == (vol_s > 0)).all())
    fill = ""
    if field_method(model) == "nerf":      # radiance fields: the enclosed space is filled first
        t_fill, vol = timed(lambda: _fill_nerf_interior(vol), device, repeat)
        fill = f"interior fill {t_fill:.3f} s; "
    padded = torch.nn.functional.pad(vol, (1, 1, 1, 1, 1, 1), value=OUTSIDE)
    t_mc, (v, f) = timed(lambda: marching_cubes(padded), device, repeat)
    verts, faces = v.cpu().numpy(), f.cpu().numpy()
    t_clean, _ = timed(lambda: keep_large_components(verts, faces, 0.01), device, 1)
    normals = vertex_normals(verts, faces)
    t_color, _ = timed(lambda: mesh_colors(model, verts, normals, offset=0.01), device, 1)
    del vol, vol_s, padded
    kw = dict(device=device)
    t_all_dense, _ = timed(lambda: extract_mesh(model, resolution, **kw), device, repeat)
    t_all_sparse, (mv, mf, _) = timed(lambda: extract_mesh(model, resolution, block=block, **kw), device, repeat)
    print(f"{name} {shape[0]}x{shape[1]}x{shape[2]} on {device}: "
          f"field dense {t_dense:.3f} s, field coarse-to-fine (block {block}) {t_sparse:.3f} s "
          f"(same signs: {same}); {fill}marching cubes {t_mc:.3f} s -> {len(faces)} faces; "
          f"components {t_clean:.3f} s; colours {t_color:.3f} s; extract_mesh dense {t_all_dense:.3f} s, "
          f"coarse-to-fine {t_all_sparse:.3f} s ({len(mf)} faces, watertight {is_watertight(mf)})")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        torch.cuda.reset_peak_memory_stats(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--run", default=None, help="a run folder written by FittedField.save")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--block", type=int, default=4, help="coarse-to-fine block size in grid cells")
    args = ap.parse_args(argv)
    from fit_implicit.backend.fitting.model import pick_device

    device = pick_device(args.device)
    models = [("analytic sdf", AnalyticSdf(device))]
    if args.run:
        from fit_implicit.backend.fitting.runs import load_run

        model = load_run(args.run, device=device)
        models.append((f"run {args.run} ({getattr(model, 'method', model.config.method)})", model))
    for name, model in models:
        for res in args.resolutions:
            bench(name, model, res, device, args.repeat, args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
