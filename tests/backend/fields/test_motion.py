"""Fields over time (fields/motion.py, issue 17): the deformation starts still, moves the fields it
is attached to the way it says, keeps a surface's derivatives in the scene's frame, and its
settings and the photos' times are checked with clear errors."""
import json

import numpy as np
import pytest
import torch

from fit_implicit.backend.fields.motion import Deformation, MotionConfig, is_dynamic
from fit_implicit.backend.fields.nerf import NerfField
from fit_implicit.backend.fields.sdf import SdfField
from fit_implicit.backend.fitting.config import make_config
from fit_implicit.backend.fitting.data import load_transforms
from fit_implicit.backend.fitting.model import build_field


def test_a_new_deformation_is_still_and_learns_a_motion_that_depends_on_time():
    torch.manual_seed(0)
    deform = Deformation(MotionConfig(motion_resolution=16), time_resolution=8)
    x = torch.rand(500, 3) * 2 - 1
    t = torch.rand(500)
    assert torch.equal(deform(x, t), x)                 # a fit starts as a still scene
    # Teach it x -> x + (0.3 t, 0, 0): a translation growing with time
    opt = torch.optim.Adam(deform.parameters(), lr=1e-2)
    for _ in range(300):
        xs, ts = torch.rand(2048, 3) * 2 - 1, torch.rand(2048)
        loss = (deform.displacement(xs, ts) - torch.stack([0.3 * ts, 0 * ts, 0 * ts], 1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = deform.displacement(x, t)
    assert (d[:, 0] - 0.3 * t).abs().mean() < 0.02 and d[:, 1:].abs().mean() < 0.02
    # no time given: the deformation's own instant (what renders and meshes use)
    deform.time = 1.0
    assert torch.allclose(deform.displacement(x)[:, 0], torch.full((500,), 0.3), atol=0.05)
    with pytest.raises(ValueError, match="one per point"):
        deform(x, t[:10])


def test_fields_read_the_deformed_space_and_a_surface_keeps_its_normals_in_the_scene_frame():
    torch.manual_seed(0)
    cfg = make_config("sdf", "draft", device="cpu")
    still = build_field(cfg)
    moving = build_field(cfg, time_resolution=4)
    moving.load_state_dict(still.state_dict(), strict=False)
    assert isinstance(moving, SdfField) and moving.deformation is not None
    with torch.no_grad():                               # a constant shift of (0.2, -0.1, 0) at every time
        moving.deformation.decoder[-1].bias.copy_(torch.tensor([0.2, -0.1, 0.0]))
    x = torch.rand(200, 3) * 1.2 - 0.6
    t = torch.rand(200)
    shift = torch.tensor([0.2, -0.1, 0.0])
    with torch.no_grad():
        assert torch.allclose(moving.value(x, t), still.value(x + shift), atol=1e-5)
        v, _, grad, lap = moving.geometry_with_derivatives(x, moving.fd_step, t)
        v0, _, grad0, lap0 = still.geometry_with_derivatives(x + shift, still.fd_step)
    assert torch.allclose(v, v0, atol=1e-5) and torch.allclose(grad, grad0, atol=1e-4)
    # the radiance field too, and its parameters include the motion's planes as their own group
    nerf_cfg = make_config("nerf", "draft", device="cpu")
    field = build_field(nerf_cfg, time_resolution=4)
    assert isinstance(field, NerfField)
    groups = field.param_groups()
    assert {id(p) for p in groups["motion"]} == {id(p) for p in field.deformation.planes}
    assert all(any(p is q for q in groups["mlp"]) for p in field.deformation.decoder.parameters())


def test_the_finer_motion_scales_fade_in_coarse_to_fine():
    """motion_anneal_share: the fine scale's features are off at the start, half in a quarter of
    the way through a 0.5 share, full from then on; the coarse scale is never dimmed."""
    torch.manual_seed(0)
    deform = Deformation(MotionConfig(motion_resolution=16, motion_scales=2, motion_features=4,
                                      motion_anneal_share=0.5), time_resolution=8)
    x, t = torch.rand(64, 3) * 2 - 1, torch.rand(64)
    full = deform.features(x, t)                        # the weights start at 1 until the first fade
    for fraction, fine in ((0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)):
        deform.fade(fraction)
        f = deform.features(x, t)
        assert torch.allclose(f[:, :4], full[:, :4]) and torch.allclose(f[:, 4:], fine * full[:, 4:], atol=1e-6)
    with pytest.raises(ValueError, match="motion_anneal_share"):
        make_config("nerf", "draft", device="cpu", motion_anneal_share=1.5)


def test_occupancy_updates_of_a_field_over_time_keep_the_largest_of_several_instants():
    """motion_occupancy_times: each cell read at that many random instants, the largest kept (the
    mean of the largest of 4 uniform draws is 0.8; of one, 0.5)."""
    from fit_implicit.backend.fitting.model import FittedField

    torch.manual_seed(0)
    box = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    for draws, mean in ((1, 0.5), (4, 0.8)):
        cfg = make_config("nerf", "draft", device="cpu", motion_occupancy_times=draws)
        model = FittedField.build(cfg, box, {"time_resolution": 4}, torch.device("cpu"))
        assert abs(float(model._over_time(lambda t: t, 20000).mean()) - mean) < 0.01
    with pytest.raises(ValueError, match="motion_occupancy_times"):
        make_config("nerf", "draft", device="cpu", motion_occupancy_times=0)


def test_which_fits_are_dynamic_and_bad_motion_settings():
    cfg = MotionConfig()
    assert not is_dynamic(None, cfg) and not is_dynamic(np.zeros(5), cfg)     # one instant: still
    assert is_dynamic(np.linspace(0, 1, 5), cfg)
    assert not is_dynamic(np.linspace(0, 1, 5), MotionConfig(dynamic="off"))
    with pytest.raises(ValueError, match="dynamic=on needs a time for every photo"):
        is_dynamic(None, MotionConfig(dynamic="on"))
    assert cfg.time_cells(np.linspace(0, 1, 5)) == 5 and cfg.time_cells(np.linspace(0, 1, 200)) == 50
    assert MotionConfig(motion_time_resolution=7).time_cells(np.linspace(0, 1, 200)) == 7
    for bad, match in [(dict(dynamic="maybe"), "dynamic"), (dict(motion_time_resolution=1), "motion_time_resolution"),
                       (dict(motion_resolution=8, motion_scales=4), "motion_scales"), (dict(motion_lr=-1.0), "motion_lr")]:
        with pytest.raises(ValueError, match=match):
            make_config("nerf", "draft", device="cpu", **bad)


@pytest.mark.parametrize("times, match", [
    ([0.0, None, 1.0], "frame 1 has no 'time'"),
    ([0.0, 0.5, 1.5], r"frame 2: 'time' must be a number in \[0, 1\], got 1.5"),
    ([0.0, "soon", 1.0], "frame 1: 'time' must be a number"),
    ([0.0, True, 1.0], "frame 1: 'time' must be a number"),
])
def test_a_dataset_with_times_missing_or_out_of_range_is_a_clear_error(tmp_path, times, match):
    frames = [{"file_path": f"missing_{i}.png", "transform_matrix": np.eye(4).tolist(),
               **({} if t is None else {"time": t})} for i, t in enumerate(times)]
    (tmp_path / "transforms.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": frames}))
    with pytest.raises(ValueError, match=match):        # before any image is read
        load_transforms(tmp_path)
