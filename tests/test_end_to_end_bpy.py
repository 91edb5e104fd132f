"""The whole loop with the real trainer: Blender renders -> backend fits -> mesh lands on the object.

Opt-in (FIT_IMPLICIT_E2E=1): it needs a trainer that converges on a small sphere within its
60 s budget on the machine at hand.  Without it the fast tests still cover the loop with the
real client and server and a fake job runner (test_packaging.py).
"""
import os

import numpy as np
import pytest

from bpy_helpers import emission_material, fresh_scene, requires_bpy

pytestmark = [
    requires_bpy, pytest.mark.blender, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FIT_IMPLICIT_E2E") != "1",
                       reason="real-trainer end-to-end fit: set FIT_IMPLICIT_E2E=1 to run (about 90 s)"),
]

CENTRE = np.array([1.0, 2.0, 0.5])
RADIUS = 0.5


@pytest.fixture(scope="module")
def real_backend():
    from helpers import BackendProcess
    backend = BackendProcess(fake=False, startup_timeout=120)
    yield backend
    backend.close()


def test_fitted_mesh_lands_on_the_source_object(real_backend):
    import bpy
    from blender_addon import fit_session

    scene = fresh_scene(width=48, height=48, samples=4)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=RADIUS, location=tuple(CENTRE))
    ball = bpy.context.object
    ball.data.materials.append(emission_material("Orange", (0.8, 0.2, 0.05)))
    ball.select_set(True)
    try:
        r = fit_scene_or_fail(fit_session, scene, real_backend)
    finally:
        print(real_backend.log()[-3000:])
    verts, _, colors = r.mesh
    assert len(verts) > 100
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    # Same place and size as the sphere (a coarse draft fit: within 15 % of its diameter).
    assert np.allclose(lo, CENTRE - RADIUS, atol=0.15), (lo, hi)
    assert np.allclose(hi, CENTRE + RADIUS, atol=0.15), (lo, hi)
    assert np.abs(0.5 * (lo + hi) - CENTRE).max() < 0.08
    # Orange (sRGB of linear 0.8, 0.2, 0.05): red well above green above blue.
    mean = colors.mean(axis=0)
    assert mean[0] > mean[1] > mean[2], mean
    assert r.object is not None and np.allclose(np.array(r.object.matrix_world), np.eye(4))


def fit_scene_or_fail(fit_session, scene, backend):
    try:
        return fit_session.fit_scene(scene, backend.address, preset="draft", seconds=60.0, ring_count=12,
                                     mesh_resolution=48, timeout=300)
    except fit_session.FitError as exc:
        pytest.fail(f"{exc}\n--- backend log ---\n{backend.log()[-3000:]}")
