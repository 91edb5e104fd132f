"""Error-weighted choice of training pixels (fitting/error_map.py, setting error_sampling): the cells
cover each photo's own pixels, draws follow the recorded errors, the sampler mixes them with uniform
draws, and the trainers feed the map."""
import numpy as np
import pytest
import torch

import synthetic
from fit_implicit.backend.fitting.config import make_config
from fit_implicit.backend.fitting.data import PosedImages, RaySampler, load_transforms
from fit_implicit.backend.fitting.error_map import ErrorMap


def test_cells_cover_each_photos_own_pixels_and_draws_stay_inside_them():
    """Photos of 20x10 and 13x7 pixels padded to 20x10, cells of 8: partial cells at the right and
    bottom edges, none in the second photo's padding; with no error recorded every pixel is as likely."""
    m = ErrorMap(torch.tensor([20, 13]), torch.tensor([10, 7]), 20, 10, 8)
    assert (m.tx, m.ty, m.cells) == (3, 2, 12)
    area = m.area.reshape(2, 2, 3)
    assert area[0].tolist() == [[64, 64, 32], [16, 16, 8]] and area[1].tolist() == [[56, 35, 0], [0, 0, 0]]
    assert float(m.area.sum()) == 20 * 10 + 13 * 7
    img, y, x = m.draw(60_000, torch.Generator().manual_seed(0))
    w, h = torch.tensor([20, 13])[img], torch.tensor([10, 7])[img]
    assert bool(((x >= 0) & (x < w) & (y >= 0) & (y < h)).all())
    counts = np.bincount((img * 200 + y * 20 + x).numpy(), minlength=400)
    own = counts[np.r_[np.arange(200), 200 + (np.arange(7)[:, None] * 20 + np.arange(13)).ravel()]]
    assert own.min() > 0.6 * own.mean() and own.max() < 1.4 * own.mean()       # ~206 draws a pixel
    assert counts.sum() == own.sum()                                            # none in the padding


def test_draws_follow_the_recorded_errors():
    """One cell's rays err 9 times as much as the rest: it is drawn in proportion to its mean error
    times its pixels; the running means forget old errors (the decay)."""
    m = ErrorMap(torch.tensor([32]), torch.tensor([32]), 32, 32, 8)        # 16 cells of 64 pixels
    cells = torch.arange(16).repeat(50)
    errors = torch.where(cells == 5, 0.09, 0.01)
    m.record(cells, errors)
    mean = m.mean_error()
    assert float(mean[5]) == pytest.approx(0.09, rel=0.05) and float(mean[0]) == pytest.approx(0.01, rel=0.05)
    img, y, x = m.draw(40_000, torch.Generator().manual_seed(1))
    share = float((m.cell_of(img, y, x) == 5).float().mean())
    assert share == pytest.approx(9 / (9 + 15), abs=0.01), share
    for _ in range(300):             # later steps where cell 5 is as good as the rest
        m.record(cells[:16], torch.full((16,), 0.01))
    assert float(m.mean_error()[5]) < 0.02
    # a ray that was not trained (weight 0) changes nothing
    before = m.mean_error().clone()
    m.record(torch.tensor([3]), torch.tensor([5.0]), torch.tensor([0.0]))
    assert torch.allclose(m.mean_error()[3], before[3] * 1.0, rtol=1e-5)


def test_the_sampler_mixes_error_draws_with_uniform_ones(tmp_path):
    """RaySampler(error_sampling=0.5) over photos of different sizes: half of each draw uniform, half
    by error; after errors recorded only in the first photo's top-left cell, that cell gets its
    uniform share plus the error-drawn half; every ray still carries its own pixel's colour."""
    sizes = [(32, 24), (24, 32), (16, 12)]
    data = load_transforms(synthetic.write_transforms(tmp_path / "mixed", count=3, sizes=sizes))
    sampler = RaySampler(data, "cpu", error_sampling=0.5, error_tile=8)
    gen = torch.Generator().manual_seed(0)
    sampler._draw(4096, gen)
    first = sampler.error_map.cell_of(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    errors = torch.where(sampler.last_cells == first, 0.5, 0.0)
    sampler.record_errors(errors)
    img, y, x, o, d, rgba = sampler._draw(20_000, gen)
    in_cell = (img == 0) & (y < 8) & (x < 8)
    uniform = 64 / data.sizes.prod(1).sum()
    assert float(in_cell.float().mean()) == pytest.approx(0.5 + 0.5 * uniform, abs=0.02)
    # spread evenly through the batch (the graph trainer drops a batch's last rays when its slots run out)
    assert float(in_cell[-2000:].float().mean()) == pytest.approx(0.5 + 0.5 * uniform, abs=0.04)
    assert bool(((x < torch.as_tensor(data.sizes[:, 0])[img]) & (y < torch.as_tensor(data.sizes[:, 1])[img])).all())
    assert torch.allclose(rgba * 255, torch.as_tensor(data.images)[img, y, x].float(), atol=1e-3)
    with pytest.raises(ValueError, match="error_sampling must be in"):
        RaySampler(data, "cpu", error_sampling=1.5)
    with pytest.raises(ValueError, match="error_tile must be at least 1"):
        make_config("nerf", "draft", device="cpu", error_tile=0)


def test_the_trainers_feed_the_map_and_a_resumed_fit_keeps_it():
    """With error_sampling on, a step of each trainer (the graph trainer's fixed-shape step as plain
    PyTorch) records its rays' errors; the trainer's state carries the map to a resumed fit."""
    from fit_implicit.backend.fitting.graph_trainer import GraphTrainer
    from fit_implicit.backend.fitting.surface_trainer import SurfaceTrainer
    from fit_implicit.backend.fitting.trainer import Trainer

    images, intrinsics, poses, aabb = synthetic.make_scene(count=4, size=16)
    data = PosedImages(images, intrinsics, poses, aabb, [f"v{i}" for i in range(4)])
    for method, make in (("nerf", Trainer), ("nerf", GraphTrainer), ("sdf", SurfaceTrainer)):
        cfg = make_config(method, "draft", device="cpu", steps=4, preview_size=0, seed=0, target_samples=1 << 12,
                          error_sampling=0.5, error_tile=4)
        trainer = make(data, cfg)
        rays = trainer.rays                  # (the eager steps then adapt their ray count)
        trainer.step() if make is not GraphTrainer else trainer._body(trainer.rays)
        counts = trainer.sampler.error_map.counts
        assert 0 < float(counts.sum()) <= rays and float(trainer.sampler.error_map.sums.sum()) > 0, make
        again = make(data, cfg)
        again.load_state_dict(trainer.state_dict())
        assert torch.equal(again.sampler.error_map.sums, trainer.sampler.error_map.sums), make
