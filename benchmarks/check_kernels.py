"""Check that the Triton kernels (hash grid, space-time planes, ray marchers, the rasteriser's z-buffer)
agree with their plain PyTorch references.

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
import time

import torch


from fit_implicit.backend.fields.hashgrid import hashgrid_encode_reference, level_layout  # noqa: E402
from fit_implicit.backend.fields.hashgrid_triton import hashgrid_encode_triton  # noqa: E402
from fit_implicit.backend.fields.motion import plane_features_reference  # noqa: E402
from fit_implicit.backend.fields.planes_triton import layout_of, plane_features_triton  # noqa: E402
from fit_implicit.backend.render.occupancy_grid import OccupancyGrid  # noqa: E402
from fit_implicit.backend.render.raster import rasterize_2d  # noqa: E402
from fit_implicit.backend.render.volume import (composite, composite_fixed, composite_packed, march_fixed,
                                                march_fixed_reference, march_packed, ray_aabb, sample_grid)

# (levels, log2 table, coarsest, finest, features): dense-only, mixed, hashed-heavy; F = 2 and 1.
LAYOUTS = [(4, 16, 4, 32, 2), (8, 12, 4, 256, 2), (6, 10, 16, 2048, 1), (16, 19, 16, 2048, 2)]


def _fwd_bwd(fn, x, table, res, off, dense, g, **kw):
    t = table.detach().clone().requires_grad_(True)
    out = fn(x, t, res, off, dense, **kw)
    (grad,) = torch.autograd.grad(out, t, g.to(out.dtype))
    return out.double(), grad.double()


def _x_grad(fn, x, table, res, off, dense, g, smooth):
    """The points' gradient (and the table's, taken in the same backward)."""
    xs, t = x.detach().clone().requires_grad_(True), table.detach().clone().requires_grad_(True)
    out = fn(xs, t, res, off, dense, smooth_grad=smooth)
    gx, gt = torch.autograd.grad(out, (xs, t), g.to(out.dtype))
    return gx.double(), gt.double()


def _time_backward(x, table, res, off, dense, g, points: bool, repeat: int = 20) -> float:
    """Median milliseconds of the fused forward + backward on CUDA, with the points' gradient or without."""
    times = []
    for _ in range(repeat + 3):
        xs, t = x.detach().clone().requires_grad_(points), table.detach().clone().requires_grad_(True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = hashgrid_encode_triton(xs, t, res, off, dense, smooth_grad=points)
        torch.autograd.grad(out, (xs, t) if points else (t,), g)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times[3:])[repeat // 2]


def check_hashgrid(device: str, n: int) -> list[dict]:
    """Forward, the table's gradient and the points' gradient (trilinear and half-cosine slopes).

    The trilinear slope jumps at every cell face, so a point within rounding of a face takes the
    other cell's slope in one float32 path and not in the other: for it, the points' gradient is
    compared by the count of points off by more than 1e-3 of the largest (bound: twice the float32
    reference's count + 2).  The half-cosine slope is continuous there: its worst error is bounded
    like the forward's."""
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
        ok = row["tri_fwd"] <= 2 * row["ref_fwd"] + 1e-6 and row["tri_bwd"] <= 2 * row["ref_bwd"] + 1e-6
        for smooth in (False, True):
            truth_x, _ = _x_grad(hashgrid_encode_reference, x.double(), table.double(), res, off, dense, g, smooth)
            ref_x, _ = _x_grad(hashgrid_encode_reference, x, table, res, off, dense, g, smooth)
            tri_x, tri_t = _x_grad(hashgrid_encode_triton, x, table, res, off, dense, g, smooth)
            scale_x = truth_x.abs().max().clamp_min(1e-12)
            ref_err, tri_err = (ref_x - truth_x).abs() / scale_x, (tri_x - truth_x).abs() / scale_x
            key = "x_smooth" if smooth else "x"
            row[f"ref_{key}"], row[f"tri_{key}"] = ref_err.max().item(), tri_err.max().item()
            row[f"ref_{key}_off"], row[f"tri_{key}_off"] = int((ref_err > 1e-3).sum()), int((tri_err > 1e-3).sum())
            table_err = ((tri_t - truth_b).abs().max() / scale_b).item()      # the same table gradient
            if smooth:
                ok = ok and row[f"tri_{key}"] <= 2 * row[f"ref_{key}"] + 1e-5
            else:
                ok = ok and row[f"tri_{key}_off"] <= 2 * row[f"ref_{key}_off"] + 2
            ok = ok and table_err <= 2 * row["ref_bwd"] + 1e-6
        row["ok"] = ok
        if device == "cuda":        # what a refined camera's points' gradient costs (fitting/camera_refine.py)
            row["ms_table"] = _time_backward(x, table, res, off, dense, g, points=False)
            row["ms_points"] = _time_backward(x, table, res, off, dense, g, points=True)
        rows.append(row)
    return rows


def check_planes(device: str, n: int) -> list[dict]:
    """The fused space-time plane lookup (fields/planes_triton.py) against plane_features_reference:
    forward, the planes' gradient and the points' (and times') gradient, each against the
    reference in float64; the points' gradient jumps at cell faces like the hash grid's, so it is
    compared by the count of points off by more than 1e-3 of the largest (bound: twice the float32
    reference's + 2)."""
    torch.manual_seed(3)
    rows = []
    for scales, channels, res, time_res in ((2, 16, 64, 30), (1, 4, 8, 2)):
        planes = []
        for k in range(scales):
            r = max(2, res >> (scales - 1 - k))
            for pair in range(6):
                h = time_res if pair >= 3 else r
                planes.append(torch.rand(1, channels, h, r, device=device) + 0.5)
        xt = torch.rand(n, 4, device=device) * 2.0 - 1.0
        xt[:2] = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]], device=device)
        g = torch.randn(n, scales * channels, device=device)
        layout = layout_of(planes)

        def run(fn, dtype, *extra):
            ps = [p.detach().to(dtype).requires_grad_(True) for p in planes]
            x = xt.detach().to(dtype).requires_grad_(True)
            out = fn(x, ps, *extra)
            grads = torch.autograd.grad(out, [x, *ps], g.to(out.dtype))
            return out.double(), grads[0].double(), torch.cat([q.reshape(-1) for q in grads[1:]]).double()

        truth, ref, tri = (run(plane_features_reference, torch.float64), run(plane_features_reference, torch.float32),
                           run(plane_features_triton, torch.float32, layout))
        scale_p, scale_x = truth[2].abs().max().clamp_min(1e-12), truth[1].abs().max().clamp_min(1e-12)
        row = {"layout": (scales, channels, res, time_res),
               "ref_fwd": (ref[0] - truth[0]).abs().max().item(), "tri_fwd": (tri[0] - truth[0]).abs().max().item(),
               "ref_bwd": ((ref[2] - truth[2]).abs().max() / scale_p).item(),
               "tri_bwd": ((tri[2] - truth[2]).abs().max() / scale_p).item(),
               "ref_x_off": int(((ref[1] - truth[1]).abs() / scale_x > 1e-3).sum()),
               "tri_x_off": int(((tri[1] - truth[1]).abs() / scale_x > 1e-3).sum())}
        row["ok"] = (row["tri_fwd"] <= 2 * row["ref_fwd"] + 1e-6 and row["tri_bwd"] <= 2 * row["ref_bwd"] + 1e-6
                     and row["tri_x_off"] <= 2 * row["ref_x_off"] + 2)
        rows.append(row)
    return rows


def _rays_and_grid(device: str, rays: int, res: int):
    """Rays from around (0, 0, -2.5) towards +z, the unit box, and a grid with ~10 % of cells occupied."""
    o = torch.randn(rays, 3, device=device) * 0.3 + torch.tensor([0.0, 0.0, -2.5], device=device)
    d = torch.nn.functional.normalize(torch.randn(rays, 3, device=device) * 0.3
                                      + torch.tensor([0.0, 0.0, 1.0], device=device), dim=-1)
    box = torch.tensor([[-1.0, -1, -1], [1, 1, 1]], device=device)
    grid = OccupancyGrid(res).to(device)
    grid.mask.copy_(torch.rand(res ** 3, device=device) < 0.1)
    return o, d, box, grid


def check_march(device: str, rays: int, res: int) -> dict:
    """The packed Triton ray marcher against the dense candidate grid, and packed compositing
    (plain PyTorch) against dense compositing, forward and backward.

    The marcher computes ``t_near + (k + jitter) * step`` with a fused multiply-add, so a
    candidate lying within rounding of a cell face or of t_far can fall on the other side:
    rays whose sample count differs are counted (bound: 0.2 % of rays), the others must give the
    same positions to 1e-5.
    """
    torch.manual_seed(1)
    o, d, box, grid = _rays_and_grid(device, rays, res)
    step = 2 * 3 ** 0.5 / (8 * res)
    tn, tf, hit = ray_aabb(o, d, box)
    tf = torch.where(hit, tf, tn)
    count = int(float((tf - tn).max()) / step) + 1
    jitter = torch.rand(rays, 1, device=device)
    t = sample_grid(tn, step, 0, count, jitter)
    x = o[:, None] + t[..., None] * d[:, None]
    mask = (t < tf[:, None]) & grid.occupied(x)
    tp, xp, rp, counts = march_packed(o, d, tn, tf, jitter, step, count, *grid.march_bits())
    same = counts == mask.sum(1)
    row = {"rays": rays, "samples": int(mask.sum()), "rays_differing": int((~same).sum())}
    keep_dense = mask & same[:, None]
    keep_packed = same[rp]
    row["t_err"] = (tp[keep_packed] - t[keep_dense]).abs().max().item() if keep_dense.any() else 0.0
    row["x_err"] = (xp[keep_packed] - x[keep_dense]).abs().max().item() if keep_dense.any() else 0.0
    # compositing on the same samples
    sig = (torch.rand(rays, count, device=device) * 20).requires_grad_()
    w, _ = composite(sig * mask, step)
    (g_dense,) = torch.autograd.grad((w * t).sum(), sig)
    ray_ids = mask.nonzero()[:, 0]
    sp = sig[mask].detach().requires_grad_()
    wp = composite_packed(sp, step, ray_ids, mask.sum(1))
    (g_packed,) = torch.autograd.grad((wp * t[mask]).sum(), sp)
    row["w_err"] = (wp - w[mask]).abs().max().item()
    row["grad_err"] = ((g_packed - g_dense[mask]).abs().max() / g_dense.abs().max().clamp_min(1e-12)).item()
    row["ok"] = (row["rays_differing"] <= max(1, 0.002 * rays) and row["t_err"] < 1e-5 and row["x_err"] < 1e-5
                 and row["w_err"] < 1e-5 and row["grad_err"] < 1e-4)
    return row


def check_march_fixed(device: str, rays: int, res: int) -> dict:
    """The fixed-capacity marcher (Triton on CUDA) against its PyTorch reference, with a capacity
    that leaves rays out; and its compositing against packed compositing of the kept rays."""
    torch.manual_seed(2)
    o, d, box, grid = _rays_and_grid(device, rays, res)
    bits, _ = grid.march_bits()
    step = 2 * 3 ** 0.5 / (8 * res)
    tn, tf, hit = ray_aabb(o, d, box)
    tf = torch.where(hit, tf, tn)
    count = 8 * res
    jitter = torch.rand(rays, device=device)
    full = march_fixed_reference(o, d, tn, tf, jitter, step, count, bits, res, rays * count)
    capacity = max(1, int(full.used) * 2 // 3)             # about a third of the rays left out
    ref = march_fixed_reference(o, d, tn, tf, jitter, step, count, bits, res, capacity)
    got = march_fixed(o, d, tn, tf, jitter, step, count, bits, res, capacity, kernel=True)
    row = {"rays": rays, "capacity": capacity, "used": int(got.used), "kept": int(got.kept.sum()),
           "ref_kept": int(ref.kept.sum())}
    # Exact: the kernel's own packed output (march_packed, checked above), cut after the last ray
    # that fits.  Against the PyTorch reference: like the packed marcher, a ray can differ by a
    # sample where the kernel's fused multiply-add rounds across a cell face or t_far.
    tp, xp, rp, cp = march_packed(o, d, tn, tf, jitter.reshape(-1, 1), step, count, bits, res)
    kept = cp.cumsum(0) <= capacity
    m = int(cp[kept].sum())
    row["slots_ok"] = bool((got.kept == kept).all() and int(got.used) == m and (got.ray[:m] == rp[:m]).all()
                           and (got.ray[m:] == rays).all() and torch.equal(got.t[:m], tp[:m]))
    row["ref_rays_differing"] = int((got.counts != ref.counts).sum())
    same = bool((got.counts == ref.counts).all())
    row["t_err"] = (got.t[:m] - ref.t[:m]).abs().max().item() if same and m else 0.0
    sig = torch.rand(capacity, device=device) * 20
    w = composite_fixed(sig, step, ref)
    valid = ref.ray < rays
    wp = composite_packed(sig[valid], step, ref.ray[valid], ref.counts)
    row["w_err"] = (w[valid] - wp).abs().max().item() if valid.any() else 0.0
    row["pad_zero"] = bool((w[~valid] == 0).all())
    row["ok"] = (row["slots_ok"] and row["t_err"] < 1e-5 and row["w_err"] < 1e-6 and row["pad_zero"]
                 and 0 < row["kept"] < rays and row["used"] <= capacity
                 and row["ref_rays_differing"] <= max(2, 0.002 * rays))
    return row


def _raster_scene(device: str, n: int, size: int):
    """``n`` triangles of every size, from a pixel to most of the image, overlapping at random
    depths, and a sphere's worth of small ones sharing edges (as a mesh's do)."""
    g = torch.Generator().manual_seed(3)
    centre = torch.rand(n, 1, 2, generator=g) * size
    scale = torch.exp(torch.rand(n, 1, 1, generator=g) * torch.log(torch.tensor(size * 0.6)))
    loose = (centre + (torch.rand(n, 3, 2, generator=g) - 0.5) * scale).reshape(-1, 2)
    rows = cols = max(4, int((n / 2) ** 0.5))                  # a grid of 2 * rows * cols triangles
    y, x = torch.meshgrid(torch.linspace(0.1, 0.9, rows + 1), torch.linspace(0.1, 0.9, cols + 1), indexing="ij")
    grid = torch.stack([x, y], -1).reshape(-1, 2) * size + torch.rand((rows + 1) * (cols + 1), 2, generator=g) * 0.3
    i = torch.arange(rows * cols)
    v00 = (i // cols) * (cols + 1) + i % cols
    quads = torch.stack([v00, v00 + 1, v00 + cols + 2, v00 + cols + 1], -1)
    tiles = torch.cat([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]]) + len(loose)
    points = torch.cat([loose, grid])
    faces = torch.cat([torch.arange(3 * n).reshape(n, 3), tiles])
    inv = torch.cat([torch.rand(3 * n, generator=g) + 0.2,
                     0.5 + 0.3 * torch.rand(len(grid), generator=g)])  # the grid at depths among the loose ones
    return points.to(device), faces.to(device), inv.to(device)


def check_raster(device: str, n: int, size: int, repeats: int = 0) -> dict:
    """The Triton z-buffer (render/raster_triton.py) against the PyTorch reference, with and
    without depths: the triangle each pixel sees and its barycentric weights.  A pixel centre
    within rounding of an edge two triangles share may go to either, as may one where two depths
    round apart (bound: 0.1 % of the covered pixels).  With ``repeats`` on CUDA, both are also timed (ms a frame, median)."""
    points, faces, inv = _raster_scene(device, n, size)
    row = {"triangles": len(faces), "size": size}
    ok = True
    for name, depth in (("depth", inv), ("any", None)):
        f_ref, b_ref = rasterize_2d(points, faces, size, size, depth, kernel=False)
        f_tri, b_tri = rasterize_2d(points, faces, size, size, depth, kernel=True)
        covered = int((f_ref >= 0).sum())
        differ = int((f_ref != f_tri).sum())
        same = (f_ref == f_tri) & (f_ref >= 0)
        err = (b_ref[same] - b_tri[same]).abs().max().item() if same.any() else 0.0
        row[name] = {"covered": covered, "differ": differ, "bary_err": err}
        ok &= covered > 0 and differ <= max(2, covered // 1000) and err < 1e-5
    if repeats and device == "cuda":
        for kernel in (False, True):
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                rasterize_2d(points, faces, size, size, inv, kernel=kernel)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            row["ms_triton" if kernel else "ms_reference"] = sorted(times)[len(times) // 2]
    row["ok"] = ok
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--points", type=int, default=None)
    args = ap.parse_args(argv)
    n = args.points or (1 << 18 if args.device == "cuda" else 160)
    rows = check_hashgrid(args.device, n)
    print(f"hash grid, {n} points on {args.device}: max error against the float64 reference")
    print(f"{'layout (L, log2T, base, max, F)':<34} {'fwd ref32':>10} {'fwd triton':>10} {'bwd ref32':>10} "
          f"{'bwd triton':>10}  points' gradient: trilinear ref32 / triton (points off), half-cosine ref32 / triton")
    for r in rows:
        print(f"{str(r['layout']):<34} {r['ref_fwd']:>10.2e} {r['tri_fwd']:>10.2e} {r['ref_bwd']:>10.2e} "
              f"{r['tri_bwd']:>10.2e}  {r['ref_x']:.1e} ({r['ref_x_off']}) / {r['tri_x']:.1e} ({r['tri_x_off']}), "
              f"{r['ref_x_smooth']:.1e} / {r['tri_x_smooth']:.1e}  {'OK' if r['ok'] else 'MISMATCH'}"
              + (f"  forward + backward {r['ms_table']:.2f} ms, with the points' gradient {r['ms_points']:.2f} ms"
                 if "ms_table" in r else ""))
    planes = check_planes(args.device, n)
    print(f"space-time planes, {n} points: (scales, C, res, time res): fwd ref32 / triton, planes' gradient "
          "ref32 / triton, points' gradient off (ref32 / triton)")
    for r in planes:
        print(f"  {str(r['layout']):<18} {r['ref_fwd']:.1e} / {r['tri_fwd']:.1e}, {r['ref_bwd']:.1e} / {r['tri_bwd']:.1e}, "
              f"{r['ref_x_off']} / {r['tri_x_off']}  {'OK' if r['ok'] else 'MISMATCH'}")
    m = check_march(args.device, 8192 if args.device == "cuda" else 48, 128 if args.device == "cuda" else 16)
    print(f"ray marcher, {m['rays']} rays, {m['samples']} samples: {m['rays_differing']} rays differ in count "
          f"(rounding at cell faces), t err {m['t_err']:.1e}, x err {m['x_err']:.1e}; packed compositing "
          f"weights err {m['w_err']:.1e}, grad rel err {m['grad_err']:.1e}  {'OK' if m['ok'] else 'MISMATCH'}")
    f = check_march_fixed(args.device, 4096 if args.device == "cuda" else 40, 128 if args.device == "cuda" else 16)
    print(f"fixed-capacity marcher, {f['rays']} rays into {f['capacity']} slots: {f['kept']} rays kept "
          f"(reference {f['ref_kept']}, {f['ref_rays_differing']} rays differ in count), {f['used']} slots used, "
          f"same as the packed kernel: {f['slots_ok']}, t err {f['t_err']:.1e}, compositing err "
          f"{f['w_err']:.1e}, padding weights zero: {f['pad_zero']}  {'OK' if f['ok'] else 'MISMATCH'}")
    cuda = args.device == "cuda"
    z = check_raster(args.device, 200_000 if cuda else 40, 800 if cuda else 48, repeats=10 if cuda else 0)
    timing = (f"; a frame {z['ms_reference']:.2f} ms (reference) / {z['ms_triton']:.2f} ms (triton)"
              if "ms_triton" in z else "")
    print(f"rasteriser z-buffer, {z['triangles']} triangles at {z['size']}x{z['size']}: nearest "
          f"{z['depth']['differ']} of {z['depth']['covered']} pixels differ, weights err {z['depth']['bary_err']:.1e}; "
          f"any triangle {z['any']['differ']} differ, err {z['any']['bary_err']:.1e}{timing}  "
          f"{'OK' if z['ok'] else 'MISMATCH'}")
    ok = all(r["ok"] for r in rows + planes) and m["ok"] and f["ok"] and z["ok"]
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
