"""Check that the fused Triton kernels agree with their plain PyTorch references.

    python benchmarks/check_kernels.py [--device cuda] [--points 262144]

Runs on a GPU, or on the CPU under Triton's interpreter (set TRITON_INTERPRET=1 before the
process starts).  Exits non-zero when an error is over its bound; prints the worst errors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.fields.hashgrid import hashgrid_encode, level_layout  # noqa: E402
from backend.fields.hashgrid_triton import hashgrid_encode_triton  # noqa: E402

# (levels, log2 table, coarsest, finest, features): dense-only, mixed, hashed-heavy; F = 2 and 1.
LAYOUTS = [(4, 16, 4, 32, 2), (8, 12, 4, 256, 2), (6, 10, 16, 2048, 1), (16, 19, 16, 2048, 2)]


def check_hashgrid(device: str, n: int) -> tuple[float, float]:
    torch.manual_seed(0)
    worst_f = worst_b = 0.0
    for levels, log2_t, base, top, feats in LAYOUTS:
        if device == "cpu" and log2_t > 16:
            continue  # the interpreter is slow; the GPU run covers the production layout
        res, off, dense = (t.to(device) for t in level_layout(levels, log2_t, base, top))
        table = torch.randn(int(off[-1]), feats, device=device, requires_grad=True)
        x = torch.rand(n, 3, device=device) * 1.2 - 0.1        # some points outside [0, 1]: clamped
        x[:3] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]], device=device)
        ref = hashgrid_encode(x, table, res, off, dense)
        out = hashgrid_encode_triton(x, table, res, off, dense)
        g = torch.randn_like(ref)
        (g_ref,) = torch.autograd.grad(ref, table, g)
        (g_out,) = torch.autograd.grad(out, table, g)
        worst_f = max(worst_f, (ref - out).abs().max().item())
        # atomics add in another order than the reference's index_put: compare relative to scale
        worst_b = max(worst_b, ((g_ref - g_out).abs().max() / g_ref.abs().max().clamp_min(1e-6)).item())
    return worst_f, worst_b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--points", type=int, default=None)
    args = ap.parse_args(argv)
    n = args.points or (1 << 18 if args.device == "cuda" else 160)
    f, b = check_hashgrid(args.device, n)
    ok = f < 1e-5 and b < 1e-5
    print(f"hash grid ({args.device}, {n} points): forward max abs error {f:.2e}, "
          f"backward max relative error {b:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
