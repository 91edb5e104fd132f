"""Time the post-fit texture step: unwrap (xatlas) + bake (rasterise, field queries, dilation)
+ .glb writing, on a ~100k-face mesh with a real FittedField (SDF method, untrained: the cost of
a field query does not depend on the weights).

    python benchmarks/texture_speed.py                      # CUDA if available, 2048^2, ~100k faces
    python benchmarks/texture_speed.py --device cpu --size 512 --faces 20000

Prints one line per stage and the total; the target on the H100 is <= 10 s at 2048^2.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np



def bumpy_torus(faces: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed marching-cubes torus with surface ripples, about ``faces`` triangles, in a box
    of half-side 1 (world units)."""
    from skimage.measure import marching_cubes

    n = int(np.sqrt(faces / 4.2)) + 1      # ~4.2 n^2 triangles for this shape
    x = np.linspace(-1.0, 1.0, n)
    gx, gy, gz = np.meshgrid(x, x, x, indexing="ij")
    ring = np.sqrt(gx ** 2 + gy ** 2) - 0.6
    d = np.sqrt(ring ** 2 + gz ** 2) - 0.25 + 0.02 * np.sin(12 * gx) * np.sin(12 * gy)
    verts, tris, _, _ = marching_cubes(d, 0.0, spacing=(x[1] - x[0],) * 3)
    return (verts - 1.0).astype(np.float32), np.ascontiguousarray(tris[:, ::-1], dtype=np.int32)


def main() -> int:
    import torch

    from fit_implicit.backend.export import glb
    from fit_implicit.backend.export import texture as tx
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.model import FittedField

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faces", type=int, default=100_000)
    p.add_argument("--size", type=int, default=tx.DEFAULT_SIZE)
    p.add_argument("--piece-faces", type=int, default=tx.PIECE_FACES, help="faces per xatlas piece (0: one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", default="sdf", choices=["sdf", "occupancy", "nerf"])
    args = p.parse_args()

    cfg = make_config(method=args.method, preset="standard", device=args.device)
    model = FittedField.build(cfg, np.array([[-1.0, -1, -1], [1, 1, 1]]))
    verts, faces = bumpy_torus(args.faces)
    print(f"mesh: {len(verts)} vertices, {len(faces)} faces; texture {args.size}^2; device {args.device}; "
          f"xatlas pieces of {args.piece_faces} faces", flush=True)
    tx.bake(model, tx.unwrap(verts[:3000], faces[faces.max(1) < 3000][:2000], size=64), 64)   # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    mesh, baked = tx.texture_mesh(model, verts, faces, args.size, piece_faces=args.piece_faces)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        glb.write_textured(Path(tmp) / "x.glb", mesh, baked)
        size_mb = (Path(tmp) / "x.glb").stat().st_size / 1e6
    t2 = time.perf_counter()
    for key in ("decimate", "unwrap", "raster", "query", "images"):
        print(f"  {key:9s} {baked.timings.get(key, 0.0):7.2f} s", flush=True)
    print(f"  {'glb':9s} {t2 - t1:7.2f} s ({size_mb:.1f} MB)")
    print(f"total {t2 - t0:.2f} s for {len(mesh.faces)} faces, {int(baked.coverage.sum())} texels baked "
          f"({baked.coverage.mean():.0%} of the atlas)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
