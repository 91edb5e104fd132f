"""The radiance field's automatic iso-level (backend/export/iso.py): the mesh covers what the
renders cover, whether the field builds a haze around a hard core (long fits) or stays faint
everywhere (short fits); and the volume step that fills space no straight line from outside
reaches (backend/export/cleanup.py).

Analytic densities in a box away from the origin (world centre (10, -4, 2), half-size 3), so a
leak of the normalised frame would be off by metres.
"""
import numpy as np
import pytest
import torch
from torch import nn

from fit_implicit.backend.export.iso import CANDIDATES, agreement, choose_opacity
from fit_implicit.backend.export.iso import iso_level, model_opacity, surface_offset
from fit_implicit.backend.export.mesh import extract_mesh
from fit_implicit.backend.fitting.model import FittedField
from fit_implicit.backend.render.occupancy_grid import OccupancyGrid
from fit_implicit.backend.fitting.config import make_config

AABB = np.array([[7.0, -7.0, -1.0], [13.0, -1.0, 5.0]])   # world; half-size 3
CENTRE = np.array([10.0, -4.0, 2.0])
CORE = 0.5        # normalised radius of the dense core (1.5 world)
HAZE = 0.1        # normalised thickness of the haze shell around it (0.3 world)


class Shells(nn.Module):
    """Density ``core`` inside radius CORE, ``haze`` in the shell out to CORE + HAZE, 0 beyond (steps
    0.01 wide, smooth so the exporter can take normals from its gradient); grey everywhere."""

    def __init__(self, core: float, haze: float):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.core, self.haze = core, haze

    def density(self, x):
        r = x.norm(dim=-1)
        inside_core, inside_haze = torch.sigmoid(400 * (CORE - r)), torch.sigmoid(400 * (CORE + HAZE - r))
        return self.core * inside_core + self.haze * (inside_haze - inside_core)

    def forward(self, x, d):
        return self.density(x), torch.full_like(x, 0.5)


def model(core: float, haze: float, **settings) -> FittedField:
    cfg = make_config(preset="draft", device="cpu", march_steps=512, **settings)
    return FittedField(Shells(core, haze), OccupancyGrid(16), AABB, cfg)


def mesh_radius(m: FittedField) -> float:
    verts, faces, _ = extract_mesh(m, mesh_resolution=64)
    assert len(faces) > 100
    return float(np.median(np.linalg.norm(verts - CENTRE, axis=1)))


def test_the_mesh_skips_a_haze_the_renders_see_through():
    # Around a dense core, a haze (density 0.8, 0.1 thick) that no ray crosses with opacity 0.5
    # (chords through it alone are 0.66 long at most: optical depth 0.53 < ln 2).  Opacity 0.01
    # (density 0.5) would mesh it.
    hazy = model(core=200.0, haze=0.8)
    assert iso_level(0.01) < 0.8
    chosen = model_opacity(hazy)                  # the fit set none: chosen from the renders
    assert 0.8 < iso_level(chosen) < 200.0, chosen
    voxel = 6.0 / 63
    assert mesh_radius(hazy) == pytest.approx(CORE * 3.0, abs=voxel)
    fixed = model(core=200.0, haze=0.8, mesh_opacity=0.01)       # a fixed level is honoured
    assert mesh_radius(fixed) == pytest.approx((CORE + HAZE) * 3.0, abs=voxel)


def test_a_faint_field_still_gets_its_mesh():
    # A short fit: density 6 at most, opaque only through its whole thickness (optical depth 6 across
    # the core).  Opacity 0.5 (density 34.7) would give no mesh at all.
    faint = model(core=6.0, haze=0.0)
    chosen = choose_opacity(faint)
    assert iso_level(chosen) < 6.0, chosen
    assert mesh_radius(faint) == pytest.approx(CORE * 3.0, abs=6.0 / 63)


def test_agreement_is_the_coverage_iou():
    scores = agreement(model(core=200.0, haze=0.8))
    assert scores.shape == (len(CANDIDATES),) and np.all((scores >= 0) & (scores <= 1))
    levels = np.array([iso_level(o) for o in CANDIDATES])
    # Levels below the haze cover the disc of radius 0.6, the renders about the core's of radius
    # 0.5 (and the haze's grazing rays next to it): IoU about (0.5 / 0.6)^2 = 0.69, measured 0.75;
    # levels within the core: about 1, measured 0.95.
    assert scores[levels < 0.8] == pytest.approx((CORE / (CORE + HAZE)) ** 2, abs=0.08)
    assert np.all(scores[(levels > 0.8) & (levels < 200.0)] > 0.9), scores
    assert np.all(scores[levels > 200.0] == 0)                       # above everything: no mesh
    assert np.all(agreement(model(core=0.0, haze=0.0)) == 0)          # empty: nothing to agree on


def test_surface_offset_is_where_the_mesh_sits_against_the_renders():
    offsets = surface_offset(model(core=200.0, haze=0.8))
    levels = np.array([iso_level(o) for o in CANDIDATES])
    # Below the haze the mesh is its outer skin; the renders put the surface on the core, at least
    # the haze's thickness (0.1) behind along every ray that reaches the core.
    assert np.all(offsets[levels < 0.8] > HAZE), offsets
    # Within the core: the core's edge is 0.01 wide (more along grazing rays), so a low level sits at
    # its foot, ahead of the renders' depth (optical depth ln 2 is reached 0.0035 inside the core at
    # density 200); the level nearest the renders' is within a fifth of a sample (2/256).
    core = offsets[(levels > 0.8) & (levels < 200.0)]
    assert np.all(core < 0.03) and core.min() < 0.0016, offsets
    assert np.all(np.isnan(offsets[levels > 200.0]))                   # no mesh: nothing to compare


def test_mesh_opacity_setting_is_checked():
    with pytest.raises(ValueError, match="mesh_opacity"):
        make_config(preset="draft", mesh_opacity=1.0)
    with pytest.raises(ValueError, match="mesh_opacity"):
        make_config(preset="draft", mesh_opacity=-0.1)
    with pytest.raises(ValueError, match="opacity"):
        extract_mesh(model(core=200.0, haze=3.0), mesh_resolution=16, mesh_opacity=1.5)


def hollow_box(n: int = 24) -> torch.Tensor:
    """A closed box (cells 4..19) with walls 2 cells thick around a hollow (cells 6..17)."""
    solid = torch.zeros(n, n, n, dtype=torch.bool)
    solid[4:20, 4:20, 4:20] = True
    solid[6:18, 6:18, 6:18] = False
    return solid


def test_space_no_straight_line_reaches_is_found():
    from fit_implicit.backend.export.cleanup import seen_from_outside
    closed = hollow_box()
    seen = seen_from_outside(~closed)
    assert seen[0, 0, 0] and seen[2, 12, 12] and not seen[6:18, 6:18, 6:18].any()   # enclosed: hidden
    shaft = hollow_box()
    shaft[11:13, 11:13, 4:6] = False                       # a shaft through the bottom wall
    seen = seen_from_outside(~shaft)
    assert seen[11, 11, 5] and seen[11:13, 11:13, 6:18].all()       # straight up the shaft
    assert not seen[7, 16, 16] and not seen[16, 7, 16]             # round the corner from it
    cup = hollow_box()
    cup[6:18, 6:18, 18:20] = False                          # the lid taken off: an open cup
    assert seen_from_outside(~cup)[6:18, 6:18, 6:18].all()


@pytest.mark.slow   # two tiny real fits (20 CPU steps each) through the backend's job runner
def test_a_surface_level_in_the_submit_is_used_and_reported(tmp_path):
    """Submit.mesh_opacity (the add-on's Surface Level) reaches the mesher: the job meshes at that
    level and says so in its summary; 0 keeps the level chosen per field; out of range is refused
    on the wire."""
    import time
    from fit_implicit.backend.service.fit_job import run_fit_job
    from fit_implicit.backend.service.jobs import JobQueue
    from fit_implicit.backend.service.outbox import Outbox
    from fit_implicit.backend.export.iso import CANDIDATES
    from helpers import make_submit
    from fit_implicit.shared import protocol

    outbox = Outbox()
    jobs = JobQueue(run_fit_job, outbox, device="cpu", runs_dir=tmp_path, checkpoint_interval=0)
    jobs.start()
    try:
        summaries = {}
        for level in (0.3, 0.0):
            job, _ = jobs.submit(b"c", make_submit(method="nerf", mesh_opacity=level))
            deadline = time.monotonic() + 120
            while job.id not in summaries:
                assert time.monotonic() < deadline, "the job did not end"
                for _, m in outbox.drain():
                    if isinstance(m, protocol.JOB_END_TYPES) and m.job_id == job.id:
                        assert isinstance(m, protocol.Done), m
                        summaries[job.id] = (level, m.summary)
                time.sleep(0.01)
    finally:
        jobs.stop()
        jobs.join(30)
    (fixed, auto) = sorted(summaries.values(), key=lambda x: -x[0])
    assert fixed[1]["mesh_opacity"] == pytest.approx(0.3)
    assert auto[1]["mesh_opacity"] in CANDIDATES
    with pytest.raises(protocol.ProtocolError, match="submit.mesh_opacity"):
        make_submit(mesh_opacity=1.0)
