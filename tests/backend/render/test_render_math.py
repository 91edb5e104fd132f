"""Volume rendering, ray/box intersection and the occupancy grid against values worked out by hand."""
import math

import pytest
import torch

from fit_implicit.backend.render.occupancy_grid import OccupancyGrid
from fit_implicit.backend.render.volume import composite, ray_aabb, render_rays, render_rays_segmented, sample_grid

UNIT_BOX = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def test_composite_weights_by_hand():
    # densities 1, 2, 0, 3 over segments of 0.5: optical depths 0.5, 1, 0, 1.5
    sigmas = torch.tensor([[1.0, 2.0, 0.0, 3.0]], dtype=torch.float64)
    w, after = composite(sigmas, 0.5)
    e = math.exp
    expected = [1 - e(-0.5),                    # T = 1
                e(-0.5) * (1 - e(-1.0)),        # T = e^-0.5
                0.0,                            # no density
                e(-1.5) * (1 - e(-1.5))]        # T = e^-(0.5+1+0)
    assert w[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert w.sum().item() == pytest.approx(1 - e(-3.0), abs=1e-12)   # opacity = 1 - exp(-total)
    assert after.item() == pytest.approx(3.0)
    # literal values, in case both sides above shared a mistake
    assert w[0].tolist() == pytest.approx([0.39346934, 0.38340049, 0.0, 0.17334309], abs=1e-8)


def test_composite_prior_optical_depth_scales_weights():
    sigmas = torch.tensor([[1.0, 2.0], [4.0, 0.5]])
    deltas = torch.tensor([[0.1, 0.2], [0.3, 0.1]])
    w0, a0 = composite(sigmas, deltas)
    w1, a1 = composite(sigmas, deltas, torch.tensor([0.7, 0.0]))
    assert torch.allclose(w1[0], w0[0] * math.exp(-0.7))
    assert torch.allclose(w1[1], w0[1])
    assert torch.allclose(a1, a0 + torch.tensor([0.7, 0.0]))


def test_composite_in_pieces_equals_whole():
    torch.manual_seed(0)
    sigmas, deltas = torch.rand(5, 12) * 4, torch.rand(5, 12) * 0.3
    w, _ = composite(sigmas, deltas)
    wa, after = composite(sigmas[:, :7], deltas[:, :7])
    wb, _ = composite(sigmas[:, 7:], deltas[:, 7:], after)
    assert torch.allclose(torch.cat([wa, wb], 1), w, atol=1e-6)


@pytest.mark.parametrize("origin, direction, t_near, t_far, hit", [
    ((-2.0, 0.5, 0.5), (1.0, 0.0, 0.0), 2.0, 3.0, True),                # straight through along x
    ((0.5, 0.5, 0.5), (0.0, 0.0, 1.0), 0.0, 0.5, True),                 # starts inside
    ((-2.0, 2.0, 0.5), (1.0, 0.0, 0.0), None, None, False),             # passes beside
    ((2.0, 0.5, 0.5), (1.0, 0.0, 0.0), None, None, False),              # box behind the origin
    ((0.5, 0.2, -1.0), (0.0, 0.6, 0.8), 1.25, 4.0 / 3.0, True),         # enters at z = 0, leaves at y = 1
])
def test_ray_aabb_by_hand(origin, direction, t_near, t_far, hit):
    tn, tf, h = ray_aabb(torch.tensor([origin]), torch.tensor([direction]), UNIT_BOX)
    assert bool(h[0]) == hit
    if hit:
        assert tn.item() == pytest.approx(t_near)
        assert tf.item() == pytest.approx(t_far)


def test_ray_aabb_diagonal():
    d = torch.tensor([[1.0, 1.0, 1.0]]) / math.sqrt(3)
    tn, tf, h = ray_aabb(torch.tensor([[-1.0, -1.0, -1.0]]), d, UNIT_BOX)
    assert h.item() and tn.item() == pytest.approx(math.sqrt(3)) and tf.item() == pytest.approx(2 * math.sqrt(3))


def test_sample_grid_uniform_steps():
    t = sample_grid(torch.tensor([1.0, 2.0]), 0.25, 2, 3, offset=0.5)
    assert t.tolist() == [[1.625, 1.875, 2.125], [2.625, 2.875, 3.125]]


def _ball_field(sigma: float, radius: float = 0.5):
    """A ball of constant density at the origin, coloured by the sign of x."""
    def field(x, d):
        inside = (x.norm(dim=-1) < radius).float()
        rgb = torch.stack([(x[:, 0] > 0).float(), torch.full_like(x[:, 0], 0.5), torch.zeros_like(x[:, 0])], -1)
        return sigma * inside, rgb
    return field


def _everywhere(x):
    return torch.ones(x.shape[:-1], dtype=torch.bool)


BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def test_homogeneous_ball_opacity_matches_beer_lambert():
    # A ray through the centre crosses a chord of 1 at density 2: opacity 1 - e^-2.
    o, d = torch.tensor([[0.0, 0.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    out = render_rays(_ball_field(2.0), _everywhere, o, d, BOX, step=1e-3, max_steps=4000)
    assert out.opacity.item() == pytest.approx(1 - math.exp(-2.0), abs=2e-3)
    # a ray missing the ball stays transparent; the field was queried along the box only
    out = render_rays(_ball_field(2.0), _everywhere, torch.tensor([[0.0, 0.9, -3.0]]), d, BOX, 1e-2, 400)
    assert out.opacity.item() == 0.0 and out.samples == 200


def test_opaque_ball_depth_and_colour():
    o = torch.tensor([[0.0, 0.0, -3.0], [-3.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    out = render_rays(_ball_field(1e4), _everywhere, o, d, BOX, step=1e-3, max_steps=4000)
    assert out.opacity.tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert out.depth.tolist() == pytest.approx([2.5, 2.5], abs=2e-3)     # surface at distance 3 - 0.5
    # ray 2 enters at x = -0.5 (red channel 0): premultiplied colour (0, 0.5, 0)
    assert out.rgb[1].tolist() == pytest.approx([0.0, 0.5, 0.0], abs=1e-3)


def test_segmented_rendering_equals_single_pass():
    torch.manual_seed(1)
    o = torch.randn(64, 3) * 0.3 + torch.tensor([0.0, 0.0, -2.5])
    d = torch.nn.functional.normalize(torch.randn(64, 3) * 0.2 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    field = _ball_field(3.0, 0.6)
    a = render_rays(field, _everywhere, o, d, BOX, 0.01, 400)
    b = render_rays_segmented(field, _everywhere, o, d, BOX, 0.01, 400, segment=37, min_transmittance=0.0)
    for x, y in [(a.rgb, b.rgb), (a.opacity, b.opacity), (a.depth, b.depth)]:
        assert torch.allclose(x, y, atol=1e-5)
    # early termination only drops what lies behind nearly opaque samples
    c = render_rays_segmented(_ball_field(1e3, 0.6), _everywhere, o, d, BOX, 0.01, 400, segment=16)
    full = render_rays(_ball_field(1e3, 0.6), _everywhere, o, d, BOX, 0.01, 400)
    assert torch.allclose(c.opacity, full.opacity, atol=1e-3) and c.samples < full.samples


def test_colour_only_where_it_shows_changes_pixels_by_less_than_a_level():
    """render_rays_segmented(split=...): colour is asked only for samples of weight >= min_weight;
    opacity and depth stay exact, colour moves by less than one 8-bit level."""
    torch.manual_seed(2)
    o = torch.randn(256, 3) * 0.3 + torch.tensor([0.0, 0.0, -2.5])
    d = torch.nn.functional.normalize(torch.randn(256, 3) * 0.2 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    field = _ball_field(3.0, 0.6)
    asked = []

    def geometry(x):
        sigma, _ = field(x, None)
        return sigma, x                               # the features: the position

    def colour(x, dirs):
        asked.append(len(x))
        return field(x, dirs)[1]

    whole = render_rays_segmented(field, _everywhere, o, d, BOX, 0.01, 400, segment=37)
    split = render_rays_segmented(field, _everywhere, o, d, BOX, 0.01, 400, segment=37, split=(geometry, colour))
    assert torch.equal(whole.opacity, split.opacity) and torch.equal(whole.depth, split.depth)
    assert (whole.rgb - split.rgb).abs().max() < 1.0 / 255 and sum(asked) < whole.samples


def test_occupancy_mask_culls_samples():
    o, d = torch.tensor([[0.0, 0.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    out = render_rays(_ball_field(2.0), lambda x: x[..., 2] > 0, o, d, BOX, 1e-3, 4000)
    assert out.opacity.item() == pytest.approx(1 - math.exp(-1.0), abs=2e-3)   # only the far half counts


def test_occupancy_grid_cells_and_update():
    grid = OccupancyGrid(resolution=4, threshold=0.01)
    points = torch.tensor([[-0.99, -0.99, -0.99], [0.99, 0.99, 0.99], [0.1, -0.6, 0.6], [1.5, 0, 0]])
    idx, inside = grid.cell_index(points)
    assert idx.tolist()[:3] == [0, 63, 2 + 4 * (0 + 4 * 3)]
    assert inside.tolist() == [True, True, True, False]
    assert torch.equal(grid.cell_index(grid.cell_centers(torch.arange(64)))[0], torch.arange(64))
    assert grid.occupied(torch.zeros(5, 3)).all()                 # everything occupied before any update

    step = 0.01            # threshold: 1 - exp(-sigma * step) > 0.01  <=>  sigma > 1.005
    grid.update(lambda x: torch.where(x[:, 0] > 0, 50.0, 0.0), step, fraction=1.0)
    centers = grid.cell_centers(torch.arange(64))
    assert torch.equal(grid.mask, centers[:, 0] > 0)
    assert not grid.occupied(torch.tensor([[-0.5, 0.0, 0.0]])).item()
    # decay: a cell keeps its estimate for a while after its density goes away
    grid.update(lambda x: torch.zeros(x.shape[0]), step, fraction=1.0)
    assert grid.density.max().item() == pytest.approx(50.0 * 0.95)


def _fixed_batch(rays=24, res=8, capacity=None, seed=3):
    from fit_implicit.backend.render.volume import march_fixed_reference

    g = torch.Generator().manual_seed(seed)
    o = torch.randn(rays, 3, generator=g) * 0.2 + torch.tensor([0.0, 0.0, -2.5])
    d = torch.nn.functional.normalize(torch.randn(rays, 3, generator=g) * 0.2 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    box = torch.tensor([[-1.0, -1, -1], [1, 1, 1]])
    tn, tf, hit = ray_aabb(o, d, box)
    tf = torch.where(hit, tf, tn)
    bits = (torch.rand(res ** 3, generator=g) < 0.5).to(torch.uint8)
    step = 2 * math.sqrt(3) / 64
    jitter = torch.rand(rays, generator=g)
    cap = capacity or rays * 64
    return march_fixed_reference(o, d, tn, tf, jitter, step, 64, bits, res, cap), step


def test_fixed_slots_composite_like_packed_rays():
    """Fixed-slot compositing gives each kept ray the weights of compositing it alone."""
    from fit_implicit.backend.render.volume import composite_fixed

    s, step = _fixed_batch(capacity=200)
    assert 0 < int(s.kept.sum()) < 24 and int(s.used) <= 200
    sig = torch.rand(200) * 30
    w = composite_fixed(sig, step, s)
    start = 0
    for r in range(24):
        n = int(s.counts[r])
        if n:
            alone, _ = composite(sig[start:start + n][None], step)
            assert torch.allclose(w[start:start + n], alone[0], atol=1e-6)
        start += n
    assert torch.all(w[int(s.used):] == 0)


def test_early_termination_drops_only_occluded_samples():
    """Samples behind transmittance 1e-3 are dropped; what remains composites to the same colour
    and opacity within 1e-3, and the repacked slots hold each ray's leading samples."""
    from fit_implicit.backend.render.volume import composite_fixed, terminate_fixed, transmittance_fixed

    s, step = _fixed_batch()
    m = s.t.shape[0]
    sig = torch.rand(m) * 200.0                      # dense: rays turn opaque after a few samples
    trans = transmittance_fixed(sig, step, s)
    w_full = composite_fixed(sig, step, s)
    short = terminate_fixed(s, trans, capacity=m, min_transmittance=1e-3)
    assert int(short.used) < int(s.used) // 2        # most samples sit behind the first opaque ones
    # the kept samples of each ray are its first ones
    sig_short = torch.zeros(m)
    src = 0
    dst = 0
    for r in range(s.counts.shape[0]):
        n, k = int(s.counts[r]), int(short.counts[r])
        assert k <= n
        assert torch.equal(short.t[dst:dst + k], s.t[src:src + k])
        sig_short[dst:dst + k] = sig[src:src + k]
        src, dst = src + n, dst + k
    w_short = composite_fixed(sig_short, step, short)
    r = s.counts.shape[0]
    op_full = torch.zeros(r + 1).index_add(0, s.ray, w_full)[:r]
    op_short = torch.zeros(r + 1).index_add(0, short.ray, w_short)[:r]
    assert torch.allclose(op_full, op_short, atol=1e-3)
    # a small capacity keeps a prefix of the rays, whole
    tight = terminate_fixed(s, trans, capacity=int(short.used) // 2, min_transmittance=1e-3)
    kept = tight.kept
    assert 0 < int(kept.sum()) < int(short.kept.sum())
    assert torch.equal(tight.counts[kept], short.counts[kept])
    assert int(tight.used) <= int(short.used) // 2


def _distortion_by_hand(w, t, step):
    """The double sum as written in mip-NeRF 360 (uniform intervals of length ``step``)."""
    w = w.detach()
    return float((w[:, None] * w[None, :] * (t[:, None] - t[None, :]).abs()).sum() + (w * w).sum() * step / 3)


def test_distortion_is_small_for_a_surface_and_large_for_fog():
    """All of a ray's weight in one sample costs step / 3; the same weight split between two samples
    a distance D apart costs 2 (1/2)(1/2) D + step / 6; two rays in one batch do not mix."""
    from fit_implicit.backend.render.volume import distortion

    step = 0.1
    t = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.05, 0.15, 0.25, 0.35])
    w = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.5])
    ray = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    got = distortion(w, t, step, ray * 4, ray, 2)
    assert got.tolist() == pytest.approx([step / 3, 2 * 0.25 * 0.3 + 2 * 0.25 * step / 3], abs=1e-6)


def test_distortion_of_fixed_slots_and_of_the_dense_path_match_the_double_sum():
    """distortion_fixed against the double sum ray by ray (a march with empty cells, unused slots);
    render_rays' dense path (the CPU's) against the same sum over its own weights; gradients flow."""
    from fit_implicit.backend.render.volume import composite_fixed, distortion_fixed

    s, step = _fixed_batch(capacity=400)
    sig = (torch.rand(400) * 30).requires_grad_()
    w = composite_fixed(sig, step, s)
    got = distortion_fixed(w, step, s)
    start = 0
    for r in range(s.counts.shape[0]):
        n = int(s.counts[r])
        want = _distortion_by_hand(w[start:start + n], s.t[start:start + n], step) if n else 0.0
        assert float(got[r].detach()) == pytest.approx(want, rel=1e-4, abs=1e-7)
        start += n
    got.sum().backward()
    assert torch.isfinite(sig.grad).all() and sig.grad[:int(s.used)].abs().sum() > 0

    o = torch.tensor([[0.0, 0.0, -3.0], [0.3, 0.0, -3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = render_rays(_ball_field(3.0, 0.6), _everywhere, o, d, BOX, 0.05, 100, with_distortion=True)
    t = sample_grid(ray_aabb(o, d, BOX)[0], 0.05, 0, 41)         # the box from t = 2 to 4: 41 candidates
    sigma = torch.stack([_ball_field(3.0, 0.6)(o[i] + t[i, :, None] * d[i], d[i].expand(41, 3))[0] for i in range(2)])
    weights, _ = composite(sigma * (t < 4.0).float(), 0.05)
    for i in range(2):
        assert float(out.distortion[i]) == pytest.approx(_distortion_by_hand(weights[i], t[i], 0.05), rel=1e-4)
