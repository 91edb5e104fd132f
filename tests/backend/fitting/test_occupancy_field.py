"""Occupancy fields (``--method occupancy``): UNISURF compositing and a small fit of a sphere,
meshed at probability 0.5 (logit 0 of ``inside_field``).

The sphere (radius 1.25) sits off the box centre, at (3, -2, 5) + (0.75, 0.5, -0.25), in a box
of half-size 2.875 around (3, -2, 5): the field's initial sphere (radius 1.44 at the box centre)
is far from it (Chamfer about 20% of the diagonal).

Bounds, and why (CPU fit of 200 draft steps, 16 views of 40x40; measured with seed 0 in
parentheses):
* Chamfer <= 2% of the ground-truth box diagonal (0.82%), F-score at 2% >= 0.85 (0.97): one 64^3
  marching-cubes voxel is 2.1% of that diagonal.
* logit at the sphere's centre > 2 (222) and 0.5 outside it < -2 (-142).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fit_implicit.backend.fields.occfield import OccField
from fit_implicit.backend.render.surface import occupancy_optical_depth
from fit_implicit.backend.fitting.runs import load_run
from shapes import CENTER, SCALE, fitted_run, shape_scene, surface_scores

SPHERE_CENTER = CENTER + np.array([0.3, 0.2, -0.1]) * SCALE
RADIUS = 0.5 * SCALE


def sphere_sdf(p: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p - SPHERE_CENTER, axis=-1) - RADIUS


def test_sample_opacity_is_the_occupancy_probability():
    logit = torch.tensor([-20.0, -2.0, 0.0, 3.0, 40.0])
    alpha = 1.0 - torch.exp(-occupancy_optical_depth(logit))
    assert torch.allclose(alpha, torch.sigmoid(logit), atol=1e-6)
    assert torch.isfinite(occupancy_optical_depth(torch.tensor([1e4]))).all()


def test_initial_occupancy_is_a_sphere_crossing_one_half_on_its_surface():
    field = OccField()
    r = torch.tensor([0.3, 0.5, 0.7])
    x = torch.stack([r, torch.zeros(3), torch.zeros(3)], -1)
    with torch.no_grad():
        p = torch.sigmoid(field.logit(x))
    assert p[0] > 0.99 and abs(float(p[1]) - 0.5) < 1e-4 and p[2] < 0.01


@pytest.fixture(scope="module")
def occupancy_run(tmp_path_factory):
    return fitted_run(tmp_path_factory, "occupancy", shape_scene(sphere_sdf, count=16, size=40), "occ_run")


@pytest.mark.slow   # a CPU fit (200 steps)
def test_occupancy_fit_of_a_sphere(occupancy_run):
    model, run = occupancy_run
    assert model.method == "occupancy"
    scores = surface_scores(model, sphere_sdf, threshold_share=0.02)
    assert scores["chamfer_share"] <= 0.02 and scores["fscore"] >= 0.85, scores
    # inside_field is the logit: positive at the centre, negative well outside
    probe = torch.tensor(np.array([SPHERE_CENTER, SPHERE_CENTER + [0, 0, RADIUS + 0.5]]), dtype=torch.float32)
    logit = model.inside_field(probe).numpy()
    assert logit[0] > 2.0 and logit[1] < -2.0, logit
    # the renders show the sphere where the images do
    assert json.loads((run / "run.json").read_text())["method"] == "occupancy"
    loaded = load_run(run, device="cpu")
    assert torch.equal(loaded.inside_field(probe), model.inside_field(probe))
    attrs = loaded.surface_attributes(np.array([SPHERE_CENTER + [0, 0, RADIUS]], np.float32))
    assert attrs["normal"][0, 2] > 0.9       # the top of the sphere faces up
