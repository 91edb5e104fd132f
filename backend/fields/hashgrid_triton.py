"""Fused hash-grid encoding in Triton: forward gather and backward scatter in one kernel each.

Same maths, layout and signature as :func:`backend.fields.hashgrid.hashgrid_encode` (the plain
PyTorch reference), so the two are interchangeable; ``tests/backend/test_triton_kernels.py`` checks
that they agree, forward and backward.  The reference materialises (N, L, 8) index, weight and
(N, L, 8, F) feature tensors; these kernels keep them in registers, so a step moves only the
points, the gathered table rows and the output.

Where the points need a gradient too (a deformed position of a fit over time, fields/motion.py;
a sample on a camera being refined, fitting/camera_refine.py) a second backward kernel scatters
the table's gradient as the first does and adds each level's share of the position's gradient
(atomically, one program a block of points and a level): per corner, the feature's dot product with
the incoming gradient times the weight's derivative along each axis, times the level's cells a side.
With ``smooth_grad`` the derivative is the half-cosine's (fields/hashgrid.py's module doc).  The
backward is not itself differentiable (nothing in the project takes a second derivative through
the grid; a surface's normals are finite differences).

Hashing: the reference XORs int64 products and takes ``% T``.  Hashed levels have a power-of-two
``T <= 2**32``, so the low 32 bits decide the result, and uint32 arithmetic that wraps gives the
same index.
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


def usable(x: torch.Tensor) -> bool:
    """True where the fused kernel can run for this tensor (CUDA tensor and Triton present)."""
    return AVAILABLE and x.is_cuda


if AVAILABLE:

    @triton.jit
    def _corner_index(cx, cy, cz, r, size, is_dense):
        # cx, cy, cz: int32 corner coordinates (BLOCK,); returns int64 row within the level.
        dense_idx = cx + r * (cy + r * cz)
        h = (cx.to(tl.uint32) * 1) ^ (cy.to(tl.uint32) * 2654435761) ^ (cz.to(tl.uint32) * 805459861)
        hashed = (h & (size - 1).to(tl.uint32)).to(tl.int32)
        return tl.where(is_dense, dense_idx, hashed).to(tl.int64)

    @triton.jit
    def _level_cell(x_ptr, rows, mask, res_ptr, off_ptr, dense_ptr, lvl):
        # The cell of each point at level ``lvl``: lower corner (ix, iy, iz), fractions
        # (fx, fy, fz), and the level's resolution, first table row, size and dense flag.
        r = tl.load(res_ptr + lvl).to(tl.int32)
        base = tl.load(off_ptr + lvl)
        size = (tl.load(off_ptr + lvl + 1) - base).to(tl.int32)
        is_dense = tl.load(dense_ptr + lvl) != 0
        scale = (r - 1).to(tl.float32)
        px = tl.minimum(tl.maximum(tl.load(x_ptr + rows * 3 + 0, mask=mask, other=0.0), 0.0), 1.0) * scale
        py = tl.minimum(tl.maximum(tl.load(x_ptr + rows * 3 + 1, mask=mask, other=0.0), 0.0), 1.0) * scale
        pz = tl.minimum(tl.maximum(tl.load(x_ptr + rows * 3 + 2, mask=mask, other=0.0), 0.0), 1.0) * scale
        ix = tl.minimum(tl.floor(px).to(tl.int32), r - 2)
        iy = tl.minimum(tl.floor(py).to(tl.int32), r - 2)
        iz = tl.minimum(tl.floor(pz).to(tl.int32), r - 2)
        return ix, iy, iz, px - ix.to(tl.float32), py - iy.to(tl.float32), pz - iz.to(tl.float32), \
            r, base, size, is_dense

    @triton.jit
    def _axis_weights(c: tl.constexpr, fx, fy, fz):
        # Corner c = (c & 1, c >> 1 & 1, c >> 2 & 1): its linear weight along each axis.
        ox = c & 1
        oy = (c >> 1) & 1
        oz = (c >> 2) & 1
        return ox * fx + (1 - ox) * (1.0 - fx), oy * fy + (1 - oy) * (1.0 - fy), oz * fz + (1 - oz) * (1.0 - fz)

    @triton.jit
    def _corner(c: tl.constexpr, ix, iy, iz, fx, fy, fz, r, base, size, is_dense):
        # Trilinear weight and table row of corner c.
        wx, wy, wz = _axis_weights(c, fx, fy, fz)
        return wx * wy * wz, base + _corner_index(ix + (c & 1), iy + ((c >> 1) & 1), iz + ((c >> 2) & 1),
                                                  r, size, is_dense)

    @triton.jit
    def _hashgrid_fwd(x_ptr, table_ptr, res_ptr, off_ptr, dense_ptr, out_ptr, n,
                      L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
        lvl = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        ix, iy, iz, fx, fy, fz, r, base, size, is_dense = _level_cell(x_ptr, rows, mask, res_ptr, off_ptr,
                                                                      dense_ptr, lvl)
        # A (BLOCK, F) tile: a corner's F features are adjacent in the table, so each is one
        # F-wide (8-byte for F = 2) load.
        feat = tl.arange(0, F)[None, :]
        mask2 = mask[:, None]
        acc = tl.zeros([BLOCK, F], dtype=tl.float32)
        for c in tl.static_range(8):
            w, idx = _corner(c, ix, iy, iz, fx, fy, fz, r, base, size, is_dense)
            acc += w[:, None] * tl.load(table_ptr + idx[:, None] * F + feat, mask=mask2, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * (L * F) + lvl * F + feat, acc, mask=mask2)

    # The backward kernel opens like the forward one (a level's cell of each row): a deliberate
    # repeat, as Triton kernels take their set-up inline; _level_cell already holds the maths.
    @triton.jit
    def _hashgrid_bwd(x_ptr, grad_out_ptr, res_ptr, off_ptr, dense_ptr, grad_table_ptr, n,
                      L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
        lvl = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        ix, iy, iz, fx, fy, fz, r, base, size, is_dense = _level_cell(x_ptr, rows, mask, res_ptr, off_ptr,
                                                                      dense_ptr, lvl)
        feat = tl.arange(0, F)[None, :]
        g = tl.load(grad_out_ptr + rows.to(tl.int64)[:, None] * (L * F) + lvl * F + feat, mask=mask[:, None],
                    other=0.0).to(tl.float32)                                   # (BLOCK, F)
        # Points with no gradient add nothing: skip their atomics (padding slots of fixed-size
        # batches all sit at one point, and piling atomics onto one address serialises them).
        mask2 = (mask & (tl.max(tl.abs(g), axis=1) != 0.0))[:, None]
        for c in tl.static_range(8):
            w, idx = _corner(c, ix, iy, iz, fx, fy, fz, r, base, size, is_dense)
            # One F-wide atomic per corner (a vector red.v2.f32 on sm_90 for F = 2).
            tl.atomic_add(grad_table_ptr + idx[:, None] * F + feat, w[:, None] * g, mask=mask2)


    @triton.jit
    def _hashgrid_bwd_x(x_ptr, table_ptr, grad_out_ptr, res_ptr, off_ptr, dense_ptr, grad_table_ptr, grad_x_ptr,
                        n, L: tl.constexpr, F: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
        # One level of a block of points (a program per block and level, as _hashgrid_bwd: a program
        # walking all levels of its block left the GPU waiting on each level's loads in turn): the
        # table's gradient as in _hashgrid_bwd, and the level's share of the points' gradient added
        # into grad_x (module doc).
        lvl = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        feat = tl.arange(0, F)[None, :]
        ix, iy, iz, fx, fy, fz, r, base, size, is_dense = _level_cell(x_ptr, rows, mask, res_ptr, off_ptr,
                                                                      dense_ptr, lvl)
        g = tl.load(grad_out_ptr + rows.to(tl.int64)[:, None] * (L * F) + lvl * F + feat, mask=mask[:, None],
                    other=0.0).to(tl.float32)                               # (BLOCK, F)
        live = mask & (tl.max(tl.abs(g), axis=1) != 0.0)
        mask2 = live[:, None]
        lx = tl.zeros([BLOCK], dtype=tl.float32)
        ly = tl.zeros([BLOCK], dtype=tl.float32)
        lz = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.static_range(8):
            wx, wy, wz = _axis_weights(c, fx, fy, fz)
            w, idx = _corner(c, ix, iy, iz, fx, fy, fz, r, base, size, is_dense)
            tl.atomic_add(grad_table_ptr + idx[:, None] * F + feat, w[:, None] * g, mask=mask2)
            dot = tl.sum(g * tl.load(table_ptr + idx[:, None] * F + feat, mask=mask2, other=0.0).to(tl.float32),
                         axis=1)
            # d(weight)/d(fraction) along an axis: + for the far corner, - for the near one
            lx += dot * ((c & 1) * 2 - 1) * wy * wz
            ly += dot * (((c >> 1) & 1) * 2 - 1) * wx * wz
            lz += dot * (((c >> 2) & 1) * 2 - 1) * wx * wy
        scale = (r - 1).to(tl.float32)
        if SMOOTH:   # the fractions' slope is the half-cosine's: (pi / 2) sin(pi t)
            lx *= 1.5707963267948966 * tl.sin(3.141592653589793 * fx)
            ly *= 1.5707963267948966 * tl.sin(3.141592653589793 * fy)
            lz *= 1.5707963267948966 * tl.sin(3.141592653589793 * fz)
        # Outside [0, 1] the point is clamped: no gradient along that axis (torch.clamp's rule, ends included).
        _add_inside(x_ptr, grad_x_ptr, rows, live, 0, lx * scale)
        _add_inside(x_ptr, grad_x_ptr, rows, live, 1, ly * scale)
        _add_inside(x_ptr, grad_x_ptr, rows, live, 2, lz * scale)

    @triton.jit
    def _add_inside(x_ptr, grad_x_ptr, rows, mask, axis: tl.constexpr, grad):
        v = tl.load(x_ptr + rows * 3 + axis, mask=mask, other=0.0)
        tl.atomic_add(grad_x_ptr + rows * 3 + axis, grad, mask=mask & (v >= 0.0) & (v <= 1.0))


BLOCK = 128


class _HashGridFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, resolutions, offsets, dense, smooth_grad=False):
        n, L, F = x.shape[0], resolutions.shape[0], table.shape[1]
        x = x.contiguous().float()
        out = torch.empty(n, L * F, device=x.device, dtype=torch.float32)
        dense_i = dense.to(torch.int32)
        if n:
            grid = (triton.cdiv(n, BLOCK), L)
            _hashgrid_fwd[grid](x, table, resolutions, offsets, dense_i, out, n, L=L, F=F, BLOCK=BLOCK)
        ctx.save_for_backward(x, table, resolutions, offsets, dense_i)
        ctx.smooth_grad = bool(smooth_grad)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, table, resolutions, offsets, dense_i = ctx.saved_tensors
        n, L, F = x.shape[0], resolutions.shape[0], table.shape[1]
        grad_table = torch.zeros(table.shape, device=x.device, dtype=torch.float32)
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        if n and grad_x is not None:
            _hashgrid_bwd_x[(triton.cdiv(n, BLOCK), L)](x, table, grad_out.contiguous(), resolutions, offsets, dense_i,
                                                      grad_table, grad_x, n, L=L, F=F, SMOOTH=ctx.smooth_grad,
                                                      BLOCK=BLOCK)
        elif n:
            grid = (triton.cdiv(n, BLOCK), L)
            _hashgrid_bwd[grid](x, grad_out.contiguous(), resolutions, offsets, dense_i, grad_table, n,
                                L=L, F=F, BLOCK=BLOCK)
        return grad_x, grad_table.to(table.dtype), None, None, None, None


def hashgrid_encode_triton(x: torch.Tensor, table: torch.Tensor, resolutions: torch.Tensor,
                           offsets: torch.Tensor, dense: torch.Tensor, smooth_grad: bool = False) -> torch.Tensor:
    """Fused version of :func:`backend.fields.hashgrid.hashgrid_encode` (same arguments).

    Args:
        x: (N, 3) float32 points in [0, 1]^3 (clamped); a gradient reaches it where it requires one
            (half-cosine weights' slope with ``smooth_grad``).
        table: (offsets[-1], F) float32 (or float16) table, F in {1, 2}.
        resolutions: (L,) int64; offsets: (L+1,) int64; dense: (L,) bool — all on x's device.
    Returns:
        (N, L*F) float32, level-major.
    """
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed: use backend.fields.hashgrid.hashgrid_encode")
    if table.shape[1] not in (1, 2):
        raise ValueError(f"the fused hash grid supports 1 or 2 features per level, got {table.shape[1]}")
    return _HashGridFn.apply(x, table, resolutions, offsets, dense, smooth_grad)
