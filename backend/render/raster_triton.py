"""The rasteriser's z-buffer in one Triton kernel: which triangle each pixel centre sees.

Same decision as :func:`backend.render.raster.zbuffer_reference`, which stays the reference
(``benchmarks/check_kernels.py`` checks that the two agree; ``tests/backend/test_triton_kernels.py``
runs it in Triton's interpreter on the CPU).  The reference lists every (triangle, pixel of its
bounding box) pair as tensors, bucket by bucket of box size, each bucket a dozen kernel launches
and a host synchronisation.  Here one program a triangle walks its box in blocks of pixel
centres, tests each with the same edge functions, and keeps the nearest triangle with one 64-bit
atomic max a covered pixel, on the reference's key: the interpolated 1 / depth's float bits
above the triangle's index (a positive float's bits order as the float does), so the nearest
triangle wins and equally near ones go to the higher index.  Without depths (UV charts) the key
is the index alone.  The barycentric weights are computed afterwards, for the one triangle each
pixel sees (:func:`backend.render.raster.rasterize_2d`).
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
BLOCK = 128                 # pixel centres a program tests at once
INSIDE_EPS = 1e-5           # a centre this far outside an edge (in barycentric units) still counts, as in raster.py


def usable(points: torch.Tensor) -> bool:
    """Whether the kernel runs here: Triton and a CUDA tensor."""
    return AVAILABLE and points.is_cuda


if AVAILABLE:

    @triton.jit
    def _zbuffer_kernel(corner_ptr, inv_ptr, ids_ptr, box_ptr, key_ptr, width,
                        USE_DEPTH: tl.constexpr, BLOCK: tl.constexpr, EPS: tl.constexpr):
        prog = tl.program_id(0)
        tri = tl.load(ids_ptr + prog)                                   # int64 triangle index
        ax = tl.load(corner_ptr + tri * 6 + 0)
        ay = tl.load(corner_ptr + tri * 6 + 1)
        bx = tl.load(corner_ptr + tri * 6 + 2)
        by = tl.load(corner_ptr + tri * 6 + 3)
        cx = tl.load(corner_ptr + tri * 6 + 4)
        cy = tl.load(corner_ptr + tri * 6 + 5)
        x0 = tl.load(box_ptr + prog * 4 + 0)
        y0 = tl.load(box_ptr + prog * 4 + 1)
        bw = tl.load(box_ptr + prog * 4 + 2)
        bh = tl.load(box_ptr + prog * 4 + 3)
        area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        if USE_DEPTH:
            ia = tl.load(inv_ptr + tri * 3 + 0)
            ib = tl.load(inv_ptr + tri * 3 + 1)
            ic = tl.load(inv_ptr + tri * 3 + 2)
        n = bw * bh
        for start in range(0, n, BLOCK):
            k = start + tl.arange(0, BLOCK)
            live = k < n
            col = x0 + k % bw
            row = y0 + k // bw
            px = col.to(tl.float32) + 0.5
            py = row.to(tl.float32) + 0.5
            wa = ((bx - px) * (cy - py) - (by - py) * (cx - px)) / area
            wb = ((cx - px) * (ay - py) - (cy - py) * (ax - px)) / area
            wc = 1.0 - (wa + wb)
            hit = live & (wa >= -EPS) & (wb >= -EPS) & (wc >= -EPS)
            key = tri + tl.zeros([BLOCK], dtype=tl.int64)
            if USE_DEPTH:
                z = tl.maximum(wa, 0.0) * ia + tl.maximum(wb, 0.0) * ib + tl.maximum(wc, 0.0) * ic
                bits = z.to(tl.int32, bitcast=True).to(tl.int64)
                key = (bits << 32) | key
            tl.atomic_max(key_ptr + row.to(tl.int64) * width + col, key, mask=hit)


def zbuffer(pix: torch.Tensor, inv: torch.Tensor | None, ids: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            width: int, height: int) -> torch.Tensor:
    """(H * W,) int64: the triangle each pixel centre sees (-1: none), from
    :func:`backend.render.raster._boxes`' output, as :func:`backend.render.raster.zbuffer_reference`.

    ``pix`` (F, 3, 2) float32 the triangles' corners in pixels, ``inv`` (F, 3) their 1 / depth or
    None, ``ids`` (N,) the triangles to draw (finite, not degenerate, in front), ``lo`` / ``hi``
    (F, 2) int64 their pixel boxes (first and last column and row, inclusive, clipped to the image).
    """
    key = torch.full((width * height,), -1, dtype=torch.int64, device=pix.device)
    if not len(ids):
        return key
    corners = pix.reshape(-1, 6).contiguous()                                        # (F, 6)
    depth = inv.contiguous() if inv is not None else torch.zeros((1,), dtype=torch.float32, device=pix.device)
    box = torch.cat([lo[ids], hi[ids] - lo[ids] + 1], 1).to(torch.int32).contiguous()  # (N, 4) x0 y0 w h
    _zbuffer_kernel[(len(ids),)](corners, depth, ids.contiguous(), box, key, width,
                                 USE_DEPTH=inv is not None, BLOCK=BLOCK, EPS=INSIDE_EPS)
    return torch.where(key >= 0, key & 0xFFFFFFFF, key)
