"""Per-photo appearance (issue 15, item 3): photos shot at different exposures and white
balances; with appearance on, the field learns their mean appearance and the held-out photos
(shot at that mean) come out right; without it the field bakes the differences in."""
import numpy as np
import pytest

import synthetic
from fit_implicit.backend.fitting.config import make_config
from fit_implicit.backend.fitting.data import PosedImages
from fit_implicit.backend.fitting.loop import fit
from fit_implicit.backend.fitting.metrics import evaluate

pytestmark = pytest.mark.timeout(300)


def _scenes(n=16, size=24, every=4):
    """Photos of the test scene; the training ones at random exposures (log sigma 0.3) and white
    balances (0.1 a channel), mean-free over them, so the held-out ones show their mean appearance."""
    ks, poses = synthetic.camera_rig(n, size)
    images = np.stack([synthetic.render(k, p, size, size, ss=1) for k, p in zip(ks, poses)])
    held = np.arange(n) % every == 0
    rng = np.random.default_rng(5)
    log_gain = rng.normal(0.0, 0.3, (n, 1)).repeat(3, 1) + rng.normal(0.0, 0.1, (n, 3))
    log_gain -= log_gain[~held].mean(0)
    shot = images.copy()
    rgb = images[~held, ..., :3].astype(np.float32) * np.exp(log_gain[~held])[:, None, None, :]
    shot[~held, ..., :3] = np.clip(rgb, 0, 255).round().astype(np.uint8)
    train = PosedImages(shot[~held], ks[~held], poses[~held], synthetic.aabb(), [f"t{i}" for i in range(int((~held).sum()))])
    test = PosedImages(images[held], ks[held], poses[held], synthetic.aabb(), [f"h{i}" for i in range(int(held.sum()))])
    return train, test, np.exp(log_gain[~held])


@pytest.mark.slow   # two 300-step fits on the CPU, ~80 s on one core
def test_appearance_absorbs_each_photos_exposure_and_white_balance():
    """Measured 2026-12-04 (2 cores): 19.92 dB without, 21.48 dB with; the learnt log gains
    correlate 0.65 with the true ones (a short fit identifies them only in part).  From PyTorch's
    initialisation, to see the appearance model alone: a warm start (fields/warm_start.py) lifts
    both fits to 24.26 / 24.57 dB at 300 steps and the correlation to 0.725 (2026-12-06).  With half the
    draft's samples a step (2^14; 2026-12-06, make test's time): 20.50 / 21.78 dB, correlation 0.622."""
    train, test, gains = _scenes()
    scores = {}
    for on in (False, True):
        cfg = make_config("nerf", "draft", device="cpu", steps=300, preview_size=0, seed=0, appearance=on,
                          warm_start=False, target_samples=1 << 14)
        model = fit(train, cfg)
        scores[on] = float(np.mean(evaluate(model, test)))
    learnt = np.array(model.meta["appearance"]["gain"])
    print(f"held-out PSNR without {scores[False]:.2f} dB, with {scores[True]:.2f} dB; log-gain correlation "
          f"{np.corrcoef(np.log(learnt).ravel(), np.log(gains).ravel())[0, 1]:.3f}")
    assert scores[True] > scores[False] + 1.0, scores
    assert np.corrcoef(np.log(learnt).ravel(), np.log(gains).ravel())[0, 1] > 0.5
