"""Fused space-time plane lookup in Triton: the motion's six planes a scale, bilinear reads and
their feature-by-feature product, in one kernel forward and one backward.

Same maths as :func:`backend.fields.motion.plane_features_reference` (``F.grid_sample`` with
``align_corners=True``, border padding, then products and a concatenation of the scales), which
stays the reference: ``benchmarks/check_kernels.py`` checks that the two agree, forward and
backward (``tests/backend/test_triton_kernels.py`` runs it, in Triton's interpreter on the CPU).

The reference reads each plane with its own ``grid_sample`` (channels first: a corner's C
features lie a plane apart), writes six (N, C) lookups a scale and multiplies them; its backward
scatters with atomics into the same channels-first layout.  Here the planes are packed channels
last (a corner's C features adjacent: one vector load), every lookup stays in registers, and the
backward recomputes them and scatters ``w * prod_{j != k} f_j * grad`` per corner in one pass; the
points' gradient (where the positions need one) is summed in registers over planes and scales.

Layout: ``packed`` is the planes in :func:`pack_planes` order, plane p's (H, W, C) block starting
at ``layout[p, 0]``, with ``layout[p, 1:] = (H, W)``; plane p = 6 * scale + pair, the pairs as
fields/motion.py's PAIRS: (x, y), (x, z), (y, z), (x, t), (y, t), (z, t); u along W reads the
pair's first axis, v along H its second.  Coordinates in [-1, 1] (the caller clamps them).
"""
from __future__ import annotations

import torch

try:  # Triton is optional: the CPU build of PyTorch ships without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

AVAILABLE = triton is not None
BLOCK = 32


def usable(xt: torch.Tensor, channels: int) -> bool:
    """Whether the fused kernel runs here: a CUDA tensor, Triton, and a power-of-two channel count."""
    return AVAILABLE and xt.is_cuda and channels >= 1 and channels & (channels - 1) == 0


def layout_of(planes) -> torch.Tensor:
    """(P, 3) int64 (first element, H, W) of each plane of ``planes`` ((1, C, H, W) each) packed
    channels last, on the planes' device (build it once: a capture may not copy host data)."""
    rows, start = [], 0
    for p in planes:
        _, c, h, w = p.shape
        rows.append((start, h, w))
        start += c * h * w
    return torch.tensor(rows, dtype=torch.int64, device=planes[0].device)


def pack_planes(planes) -> torch.Tensor:
    """The planes, channels last, in one flat tensor (differentiable: the gradient returns to them)."""
    return torch.cat([p[0].permute(1, 2, 0).reshape(-1) for p in planes])


if AVAILABLE:

    @triton.jit
    def _corners(packed_ptr, layout_ptr, p, u, v, mask, C: tl.constexpr):
        # Plane p read at (u, v): the four corners' features (BLOCK, C), the fractions, the table
        # offset of the lower corner and the plane's width and height.
        off = tl.load(layout_ptr + p * 3)
        h = tl.load(layout_ptr + p * 3 + 1).to(tl.int32)
        w = tl.load(layout_ptr + p * 3 + 2).to(tl.int32)
        px = (u + 1.0) * 0.5 * (w - 1).to(tl.float32)
        py = (v + 1.0) * 0.5 * (h - 1).to(tl.float32)
        # border padding: a coordinate on or past the edge is clamped there and gets no gradient
        # (grid_sample's rule, the edges included)
        inside_u = (px > 0.0) & (px < (w - 1).to(tl.float32))
        inside_v = (py > 0.0) & (py < (h - 1).to(tl.float32))
        px = tl.minimum(tl.maximum(px, 0.0), (w - 1).to(tl.float32))
        py = tl.minimum(tl.maximum(py, 0.0), (h - 1).to(tl.float32))
        ix = tl.minimum(tl.floor(px).to(tl.int32), w - 2)
        iy = tl.minimum(tl.floor(py).to(tl.int32), h - 2)
        fx = px - ix.to(tl.float32)
        fy = py - iy.to(tl.float32)
        base = off + ((iy * w + ix) * C).to(tl.int64)
        ch = tl.arange(0, C)[None, :]
        m2 = mask[:, None]
        row = (w * C).to(tl.int64)
        f00 = tl.load(packed_ptr + base[:, None] + ch, mask=m2, other=0.0)
        f10 = tl.load(packed_ptr + base[:, None] + C + ch, mask=m2, other=0.0)
        f01 = tl.load(packed_ptr + base[:, None] + row + ch, mask=m2, other=0.0)
        f11 = tl.load(packed_ptr + base[:, None] + row + C + ch, mask=m2, other=0.0)
        return f00, f10, f01, f11, fx[:, None], fy[:, None], base, w, h, inside_u, inside_v

    @triton.jit
    def _lookup(packed_ptr, layout_ptr, p, u, v, mask, C: tl.constexpr):
        f00, f10, f01, f11, fx, fy, base, w, h, inside_u, inside_v = _corners(packed_ptr, layout_ptr, p, u, v, mask, C)
        return (f00 * (1.0 - fx) + f10 * fx) * (1.0 - fy) + (f01 * (1.0 - fx) + f11 * fx) * fy

    @triton.jit
    def _block_points(xt_ptr, n, BLOCK: tl.constexpr):
        # This program's rows (int64), their mask and their four coordinates.
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        r64 = rows.to(tl.int64)
        return (r64, mask, tl.load(xt_ptr + r64 * 4 + 0, mask=mask, other=0.0),
                tl.load(xt_ptr + r64 * 4 + 1, mask=mask, other=0.0), tl.load(xt_ptr + r64 * 4 + 2, mask=mask, other=0.0),
                tl.load(xt_ptr + r64 * 4 + 3, mask=mask, other=0.0))

    @triton.jit
    def _planes_fwd(xt_ptr, packed_ptr, layout_ptr, out_ptr, n, S: tl.constexpr, C: tl.constexpr,
                    BLOCK: tl.constexpr):
        r64, mask, x, y, z, t = _block_points(xt_ptr, n, BLOCK)
        ch = tl.arange(0, C)[None, :]
        for s in tl.static_range(S):
            p = 6 * s
            prod = _lookup(packed_ptr, layout_ptr, p + 0, x, y, mask, C)
            prod *= _lookup(packed_ptr, layout_ptr, p + 1, x, z, mask, C)
            prod *= _lookup(packed_ptr, layout_ptr, p + 2, y, z, mask, C)
            prod *= _lookup(packed_ptr, layout_ptr, p + 3, x, t, mask, C)
            prod *= _lookup(packed_ptr, layout_ptr, p + 4, y, t, mask, C)
            prod *= _lookup(packed_ptr, layout_ptr, p + 5, z, t, mask, C)
            tl.store(out_ptr + r64[:, None] * (S * C) + s * C + ch, prod, mask=mask[:, None])

    @triton.jit
    def _scatter(packed_ptr, layout_ptr, grad_packed_ptr, p, u, v, mask, gk, C: tl.constexpr):
        # Plane p's share of the backward: its corners' gradient (atomics) and d/du, d/dv (BLOCK,).
        f00, f10, f01, f11, fx, fy, base, w, h, inside_u, inside_v = _corners(packed_ptr, layout_ptr, p, u, v, mask, C)
        ch = tl.arange(0, C)[None, :]
        m2 = mask[:, None]
        row = (w * C).to(tl.int64)
        tl.atomic_add(grad_packed_ptr + base[:, None] + ch, gk * (1.0 - fx) * (1.0 - fy), mask=m2)
        tl.atomic_add(grad_packed_ptr + base[:, None] + C + ch, gk * fx * (1.0 - fy), mask=m2)
        tl.atomic_add(grad_packed_ptr + base[:, None] + row + ch, gk * (1.0 - fx) * fy, mask=m2)
        tl.atomic_add(grad_packed_ptr + base[:, None] + row + C + ch, gk * fx * fy, mask=m2)
        du = tl.sum(gk * ((f10 - f00) * (1.0 - fy) + (f11 - f01) * fy), axis=1) * 0.5 * (w - 1).to(tl.float32)
        dv = tl.sum(gk * ((f01 - f00) * (1.0 - fx) + (f11 - f10) * fx), axis=1) * 0.5 * (h - 1).to(tl.float32)
        return tl.where(inside_u, du, 0.0), tl.where(inside_v, dv, 0.0)

    @triton.jit
    def _planes_bwd(xt_ptr, packed_ptr, layout_ptr, grad_out_ptr, grad_packed_ptr, grad_xt_ptr, n,
                    S: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
        r64, mask, x, y, z, t = _block_points(xt_ptr, n, BLOCK)
        ch = tl.arange(0, C)[None, :]
        gx = tl.zeros([BLOCK], dtype=tl.float32)
        gy = tl.zeros([BLOCK], dtype=tl.float32)
        gz = tl.zeros([BLOCK], dtype=tl.float32)
        gt = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(S):
            p = 6 * s
            g = tl.load(grad_out_ptr + r64[:, None] * (S * C) + s * C + ch, mask=mask[:, None], other=0.0)
            f0 = _lookup(packed_ptr, layout_ptr, p + 0, x, y, mask, C)
            f1 = _lookup(packed_ptr, layout_ptr, p + 1, x, z, mask, C)
            f2 = _lookup(packed_ptr, layout_ptr, p + 2, y, z, mask, C)
            f3 = _lookup(packed_ptr, layout_ptr, p + 3, x, t, mask, C)
            f4 = _lookup(packed_ptr, layout_ptr, p + 4, y, t, mask, C)
            f5 = _lookup(packed_ptr, layout_ptr, p + 5, z, t, mask, C)
            # the product of the other five, without dividing (a feature may be zero)
            a01 = f0 * f1
            a45 = f4 * f5
            a012 = a01 * f2
            a345 = f3 * a45
            du, dv = _scatter(packed_ptr, layout_ptr, grad_packed_ptr, p + 0, x, y, mask, g * f1 * f2 * a345, C)
            gx += du
            gy += dv
            du, dv = _scatter(packed_ptr, layout_ptr, grad_packed_ptr, p + 1, x, z, mask, g * f0 * f2 * a345, C)
            gx += du
            gz += dv
            du, dv = _scatter(packed_ptr, layout_ptr, grad_packed_ptr, p + 2, y, z, mask, g * a01 * a345, C)
            gy += du
            gz += dv
            du, dv = _scatter(packed_ptr, layout_ptr, grad_packed_ptr, p + 3, x, t, mask, g * a012 * a45, C)
            gx += du
            gt += dv
            du, dv = _scatter(packed_ptr, layout_ptr, grad_packed_ptr, p + 4, y, t, mask, g * a012 * f3 * f5, C)
            gy += du
            gt += dv
            du, dv = _scatter(packed_ptr, layout_ptr, grad_packed_ptr, p + 5, z, t, mask, g * a012 * f3 * f4, C)
            gz += du
            gt += dv
        tl.store(grad_xt_ptr + r64 * 4 + 0, gx, mask=mask)
        tl.store(grad_xt_ptr + r64 * 4 + 1, gy, mask=mask)
        tl.store(grad_xt_ptr + r64 * 4 + 2, gz, mask=mask)
        tl.store(grad_xt_ptr + r64 * 4 + 3, gt, mask=mask)


class _PlanesFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xt, packed, layout, scales, channels):
        n = xt.shape[0]
        xt = xt.contiguous().float()
        out = torch.empty(n, scales * channels, device=xt.device, dtype=torch.float32)
        if n:
            _planes_fwd[(triton.cdiv(n, BLOCK),)](xt, packed, layout, out, n, S=scales, C=channels, BLOCK=BLOCK)
        ctx.save_for_backward(xt, packed, layout)
        ctx.scales, ctx.channels = scales, channels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xt, packed, layout = ctx.saved_tensors
        n = xt.shape[0]
        grad_packed = torch.zeros_like(packed)
        grad_xt = torch.empty_like(xt)
        if n:
            _planes_bwd[(triton.cdiv(n, BLOCK),)](xt, packed, layout, grad_out.contiguous().float(), grad_packed,
                                                  grad_xt, n, S=ctx.scales, C=ctx.channels, BLOCK=BLOCK)
        return (grad_xt if ctx.needs_input_grad[0] else None), grad_packed, None, None, None


def plane_features_triton(xt: torch.Tensor, planes, layout: torch.Tensor) -> torch.Tensor:
    """Fused :func:`backend.fields.motion.plane_features_reference`.

    Args:
        xt: (N, 4) float32 points and times in [-1, 1].
        planes: the 6 * S planes, (1, C, H, W) each, C a power of two.
        layout: :func:`layout_of` the planes, on their device.
    Returns:
        (N, S * C) float32: per scale, the product of its six bilinear lookups.
    """
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed: use backend.fields.motion.plane_features_reference")
    channels = int(planes[0].shape[1])
    if channels & (channels - 1):
        raise ValueError(f"the fused plane lookup needs a power-of-two feature count, got {channels}")
    return _PlanesFn.apply(xt, pack_planes(planes).float(), layout, len(planes) // 6, channels)
