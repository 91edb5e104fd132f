"""Hash-grid encoding: layout, indexing (dense and hashed) against a per-point loop, gradients,
continuity, and the fast gather against the plain-indexing reference."""
import math

import pytest
import torch

from fit_implicit.backend.fields.hashgrid import (PRIMES, HashGrid, HashGridConfig, corner_lookup, hashgrid_encode,
                                                  hashgrid_encode_reference, level_layout)
from fit_implicit.backend.fields.layers import sh_encode
from fit_implicit.backend.fields.nerf import NerfField, NerfFieldConfig


def naive_encode(x, table, resolutions, offsets, dense):
    """One point, one level, one corner at a time, in Python integers."""
    out = []
    for p in x.tolist():
        feats = []
        for lv in range(len(resolutions)):
            r, off, size = int(resolutions[lv]), int(offsets[lv]), int(offsets[lv + 1] - offsets[lv])
            pos = [min(max(c, 0.0), 1.0) * (r - 1) for c in p]
            cell = [min(int(math.floor(c)), r - 2) for c in pos]
            frac = [c - i for c, i in zip(pos, cell)]
            acc = torch.zeros(table.shape[1], dtype=torch.float64)
            for corner in range(8):
                ijk = [cell[a] + ((corner >> a) & 1) for a in range(3)]
                w = 1.0
                for a in range(3):
                    w *= frac[a] if (corner >> a) & 1 else 1.0 - frac[a]
                if dense[lv]:
                    row = ijk[0] + r * (ijk[1] + r * ijk[2])
                else:
                    row = ((ijk[0] * PRIMES[0]) ^ (ijk[1] * PRIMES[1]) ^ (ijk[2] * PRIMES[2])) % size
                assert 0 <= row < size
                acc += w * table[off + row].double()
            feats.append(acc)
        out.append(torch.cat(feats))
    return torch.stack(out)


def test_level_layout():
    res, off, dense = level_layout(levels=8, log2_table=12, base_res=4, max_res=256)
    assert res[0] == 4 and res[-1] == 256
    growth = (256 / 4) ** (1 / 7)
    assert res.tolist() == [math.floor(4 * growth ** i + 1e-6) for i in range(8)]
    assert dense.tolist() == [r ** 3 <= 4096 for r in res.tolist()]
    assert dense.tolist() == [True, True, True, False, False, False, False, False]   # 4, 7, 12 | 21 ...
    sizes = (off[1:] - off[:-1]).tolist()
    assert sizes == [r ** 3 if d else 4096 for r, d in zip(res.tolist(), dense.tolist())]
    with pytest.raises(ValueError):
        level_layout(levels=0, log2_table=12, base_res=4, max_res=256)


@pytest.mark.parametrize("layout", [(4, 16, 4, 32), (6, 10, 4, 256), (5, 8, 16, 1024)])
def test_matches_per_point_loop(layout):
    torch.manual_seed(0)
    res, off, dense = level_layout(*layout)
    table = torch.randn(int(off[-1]), 2)
    x = torch.rand(40, 3) * 1.2 - 0.1                     # some outside [0, 1]: clamped
    x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.5, 0.5, 0.5]])
    expected = naive_encode(x, table, res, off, dense)
    got = hashgrid_encode(x, table, res, off, dense)
    assert got.shape == (40, layout[0] * 2) and got.dtype == torch.float32
    # float32 positions at resolution ~1000 leave ~1e-4 of interpolation error; a wrong row is O(1)
    assert torch.allclose(got.double(), expected, atol=5e-4)


def test_dense_level_returns_table_rows_at_grid_points():
    res, off, dense = level_layout(3, 16, 8, 24)
    assert dense.all()
    table = torch.randn(int(off[-1]), 2)
    r = int(res[1])
    ijk = torch.tensor([[0, 0, 0], [3, 5, 2], [r - 1, r - 1, r - 1], [r - 1, 0, 4]])
    x = ijk.float() / (r - 1)
    got = hashgrid_encode(x, table, res, off, dense)[:, 2:4]            # level 1
    rows = off[1] + ijk[:, 0] + r * (ijk[:, 1] + r * ijk[:, 2])
    assert torch.allclose(got, table[rows], atol=1e-6)


def test_corner_weights_sum_to_one_and_rows_stay_in_their_level():
    res, off, dense = level_layout(8, 10, 4, 512)
    x = torch.rand(500, 3)
    rows, w = corner_lookup(x, res, off, int(dense.sum()))
    assert rows.shape == w.shape == (500, 8, 8)
    assert torch.allclose(w.sum(-1), torch.ones(500, 8))
    assert (rows >= off[:-1][None, :, None]).all() and (rows < off[1:][None, :, None]).all()


def test_fast_path_agrees_with_reference_values_and_gradients():
    torch.manual_seed(2)
    res, off, dense = level_layout(10, 12, 8, 512)
    table = torch.randn(int(off[-1]), 2, requires_grad=True)
    x = torch.rand(3000, 3)
    a = hashgrid_encode(x, table, res, off, dense)
    b = hashgrid_encode_reference(x, table, res, off, dense)
    g = torch.randn_like(a)
    (ga,) = torch.autograd.grad(a, table, g)
    (gb,) = torch.autograd.grad(b, table, g)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_gradient_reaches_only_the_touched_rows():
    grid = HashGrid(levels=4, features=2, log2_table=10, base_res=4, max_res=64)
    x = torch.tensor([[0.3, 0.6, 0.9]])
    grid(x).sum().backward()
    touched = (grid.table.grad.abs().sum(1) > 0).sum().item()
    assert 0 < touched <= 4 * 8
    assert grid.table.grad.sum().item() == pytest.approx(4 * 2, abs=1e-4)   # weights sum to 1 per level


def test_gradient_with_respect_to_points_on_request():
    grid = HashGrid(levels=4, features=2, log2_table=10, base_res=4, max_res=64)
    torch.nn.init.normal_(grid.table)
    x = torch.rand(16, 3, requires_grad=True)
    grid(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_continuous_across_cell_boundaries():
    torch.manual_seed(3)
    grid = HashGrid(levels=6, features=2, log2_table=12, base_res=4, max_res=128)
    torch.nn.init.normal_(grid.table)
    r = int(grid.resolutions[-1])
    boundary = 37 / (r - 1)                                  # a cell face of the finest level
    eps = 1e-5
    x = torch.tensor([[boundary - eps, 0.41, 0.77], [boundary + eps, 0.41, 0.77]])
    with torch.no_grad():
        y = grid(x)
    assert (y[0] - y[1]).abs().max().item() < 50 * eps * (r - 1)


def test_nerf_field_shapes_and_positive_density():
    field = NerfField(NerfFieldConfig(grid=HashGridConfig(levels=4, log2_table=10, max_res=64)))
    x = torch.rand(32, 3) * 2 - 1
    d = torch.nn.functional.normalize(torch.randn(32, 3), dim=-1)
    sigma, rgb = field(x, d)
    assert sigma.shape == (32,) and rgb.shape == (32, 3)
    assert (sigma > 0).all() and ((rgb > 0) & (rgb < 1)).all()
    assert torch.allclose(field.density(x), sigma)


def test_spherical_harmonics_are_orthonormal():
    # Monte-Carlo check of the normalisation: E[Y_i Y_j] over the sphere = delta_ij / (4 pi)
    torch.manual_seed(4)
    d = torch.nn.functional.normalize(torch.randn(400_000, 3, dtype=torch.float64), dim=-1)
    y = sh_encode(d)
    gram = (y.T @ y) / d.shape[0] * 4 * math.pi
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=0.02)


def test_smooth_grad_keeps_values_and_makes_the_points_gradient_continuous():
    """Camera refinement's hash weights (fields/hashgrid.py ``smooth_grad``): the same features, but
    the gradient with respect to x falls to zero at every cell face (trilinear: it jumps there) and
    keeps the trilinear gradient's mean over a cell."""
    torch.manual_seed(1)
    res, off, dense = level_layout(levels=1, log2_table=12, base_res=5, max_res=5)   # cells 0.25 wide
    table = torch.randn(int(off[-1]), 2)

    def grad_x(points, smooth):
        x = points.clone().requires_grad_(True)
        hashgrid_encode(x, table, res, off, dense, smooth_grad=smooth)[:, 0].sum().backward()
        return x.grad[:, 0]

    face, eps = 0.5, 1e-4                           # x crosses the face between cells 1 and 2
    pts = torch.tensor([[face - eps, 0.3, 0.6], [face + eps, 0.3, 0.6]])
    plain, smooth = grad_x(pts, False), grad_x(pts, True)
    assert abs(plain[0] - plain[1]) > 0.1                                    # trilinear: a jump at the face
    assert smooth.abs().max() < 1e-2 * plain.abs().max()                     # smooth: ~0 on both sides
    xs = torch.tensor([[v, 0.3, 0.6] for v in torch.linspace(0.25, 0.5, 2001)[1:-1].tolist()])
    assert torch.allclose(hashgrid_encode(xs, table, res, off, dense, smooth_grad=True),
                          hashgrid_encode(xs, table, res, off, dense))
    # mean slope over one cell: the same (the features' change across the cell), within quadrature error
    assert torch.allclose(grad_x(xs, True).mean(), grad_x(xs, False).mean(), rtol=1e-3, atol=1e-5)
    grid = HashGrid(levels=1, features=2, log2_table=12, base_res=5, max_res=5)
    assert not grid.smooth_grad                                              # off unless cameras are refined


def test_the_level_normalised_decay_weighs_each_level_alike():
    """HashGrid.level_mean_square: each level's mean squared feature, summed over levels, so a small
    dense level counts as much as a large hashed one (setting grid_decay_weight)."""
    grid = HashGrid(levels=3, features=2, log2_table=10, base_res=4, max_res=32)
    sizes = (grid.offsets[1:] - grid.offsets[:-1]).tolist()
    with torch.no_grad():
        for level, value in enumerate((1.0, 2.0, 3.0)):
            grid.table[int(grid.offsets[level]):int(grid.offsets[level + 1])] = value
    assert sizes[0] < sizes[-1]
    assert float(grid.level_mean_square().detach()) == pytest.approx(1.0 + 4.0 + 9.0)
    grid.level_mean_square().backward()
    first = grid.table.grad[0, 0].item()
    assert first == pytest.approx(2.0 / (sizes[0] * 2))         # d/dv of mean(v^2) over the level's values
