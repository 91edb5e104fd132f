"""Data-parallel fits (backend/fitting/distributed.py, issue 20) on the CPU: real gloo process
groups, real spawned processes.  The averaged gradient of two ranks holding one half of a batch
each is the whole batch's gradient; the ranks agree on the fit's clock and a cancel, and take
rank 0's weights and grid.  (A whole fit over two processes: tests/backend/test_cli.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_two_ranks_average_to_the_whole_batch_gradient_and_agree(tmp_path):
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    averaged, whole = torch.load(tmp_path / "averaged.pt"), torch.load(tmp_path / "whole.pt")
    assert len(averaged) == len(whole) > 0
    for a, w in zip(averaged, whole):
        if w is None:           # a parameter the batch does not reach: zeros after averaging
            assert not a.any()
            continue
        torch.testing.assert_close(a, w, atol=1e-7, rtol=1e-5)
    assert any(w is not None and w.abs().max() > 0 for w in whole)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["fraction"] == pytest.approx(0.7) and got["stop"] is True    # the furthest clock; rank 0's cancel
        assert got["from_first"] == [1.0] * 4                                     # rank 0's values everywhere


def test_split_config_divides_the_batch_between_the_ranks():
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.distributed import split_config

    cfg = make_config("nerf", "standard", device="cpu")
    half = split_config(cfg, 2)
    assert half.train.batch_rays == cfg.train.batch_rays // 2 and half.train.max_rays == cfg.train.max_rays // 2
    assert half.train.target_samples == cfg.train.target_samples // 2
    assert cfg.train.batch_rays == make_config("nerf", "standard", device="cpu").train.batch_rays   # a copy


def test_each_photo_is_held_by_exactly_one_rank():
    """Group.share: the photos shared out over the ranks, every one held once, the shares within one
    photo of each other; more ranks than photos is refused before any rank starts."""
    import numpy as np

    from fit_implicit.backend.fitting.distributed import Group

    for photos, world in ((70, 2), (71, 4), (3, 3)):
        shares = [Group(rank, world).share(photos) for rank in range(world)]
        assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(photos))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="5 photos cannot be shared out over 8 processes"):
        Group(0, 8).share(5)
