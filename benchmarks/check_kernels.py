"""Check that the fused Triton kernels agree with their plain PyTorch references.

    python benchmarks/check_kernels.py [--device cuda] [--points 262144]

Runs on a GPU, or on the CPU under Triton's interpreter (set TRITON_INTERPRET=1 before the
process starts).  Exits non-zero when the kernel is off; prints the worst errors.

Both float32 paths are measured against the reference evaluated in float64.  On the GPU the
compiler contracts ``x * (res - 1) - floor(...)`` into one fused multiply-add, so the kernel's
cell fractions are *more* exact than the reference's (which rounds the product first); at the
finest level (2048 cells) that is a 1e-4 difference in the fraction.  So the bound is: the
kernel's error against float64 stays within twice the float32 reference's own error (+1e-6).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.fields.hashgrid import hashgrid_encode_reference, level_layout  # noqa: E402
from backend.fields.hashgrid_triton import hashgrid_encode_triton  # noqa: E402

# (levels, log2 table, coarsest, finest, features): dense-only, mixed, hashed-heavy; F = 2 and 1.
LAYOUTS = [(4, 16, 4, 32, 2), (8, 12, 4, 256, 2), (6, 10, 16, 2048, 1), (16, 19, 16, 2048, 2)]


def _fwd_bwd(fn, x, table, res, off, dense, g):
    t = table.detach().clone().requires_grad_(True)
    out = fn(x, t, res, off, dense)
    (grad,) = torch.autograd.grad(out, t, g.to(out.dtype))
    return out.double(), grad.double()


def check_hashgrid(device: str, n: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for levels, log2_t, base, top, feats in LAYOUTS:
        if device == "cpu" and log2_t > 16:
            continue  # the interpreter is slow; the GPU run covers the production layout
        res, off, dense = (t.to(device) for t in level_layout(levels, log2_t, base, top))
        table = torch.randn(int(off[-1]), feats, device=device)
        x = torch.rand(n, 3, device=device) * 1.2 - 0.1        # some points outside [0, 1]: clamped
        x[:3] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]], device=device)
        g = torch.randn(n, levels * feats, device=device)
        truth_f, truth_b = _fwd_bwd(hashgrid_encode_reference, x.double(), table.double(), res, off, dense, g)
        ref_f, ref_b = _fwd_bwd(hashgrid_encode_reference, x, table, res, off, dense, g)
        tri_f, tri_b = _fwd_bwd(hashgrid_encode_triton, x, table, res, off, dense, g)
        scale_b = truth_b.abs().max().clamp_min(1e-12)
        row = {"layout": (levels, log2_t, base, top, feats),
               "ref_fwd": (ref_f - truth_f).abs().max().item(), "tri_fwd": (tri_f - truth_f).abs().max().item(),
               "ref_bwd": ((ref_b - truth_b).abs().max() / scale_b).item(),
               "tri_bwd": ((tri_b - truth_b).abs().max() / scale_b).item()}
        row["ok"] = row["tri_fwd"] <= 2 * row["ref_fwd"] + 1e-6 and row["tri_bwd"] <= 2 * row["ref_bwd"] + 1e-6
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--points", type=int, default=None)
    args = ap.parse_args(argv)
    n = args.points or (1 << 18 if args.device == "cuda" else 160)
    rows = check_hashgrid(args.device, n)
    print(f"hash grid, {n} points on {args.device}: max error against the float64 reference")
    print(f"{'layout (L, log2T, base, max, F)':<34} {'fwd ref32':>10} {'fwd triton':>10} {'bwd ref32':>10} {'bwd triton':>10}")
    for r in rows:
        print(f"{str(r['layout']):<34} {r['ref_fwd']:>10.2e} {r['tri_fwd']:>10.2e} {r['ref_bwd']:>10.2e} "
              f"{r['tri_bwd']:>10.2e}  {'OK' if r['ok'] else 'MISMATCH'}")
    ok = all(r["ok"] for r in rows)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
