"""benchmarks/pose_noise.py (the pose-refinement benchmark's perturbation and alignment, issue 15)
and lego.py --pose-noise on a small synthetic dataset on the CPU."""
import json
import subprocess
import sys

import numpy as np
import pytest

import synthetic
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import pose_noise  # noqa: E402


def _rig(n=24):
    _, poses = synthetic.camera_rig(n, 16)
    return poses


def test_a_similarity_of_the_cameras_is_no_error_and_is_recovered():
    poses = _rig()
    rot = pose_noise.rotations(np.array([[0.3, -0.5, 0.8]]))[0]
    moved = pose_noise.apply(poses, 2.5, rot, np.array([1.0, -2.0, 0.5]))
    scale, r, t = pose_noise.align(poses, moved)
    assert scale == pytest.approx(2.5, rel=1e-9) and np.allclose(r, rot, atol=1e-9) and np.allclose(t, [1, -2, 0.5])
    e = pose_noise.errors(poses, moved)
    assert e["rotation_deg"] < 1e-5 and e["centre_error"] < 1e-9


def test_perturbation_has_barfs_size_and_the_error_measures_it():
    poses = _rig(400)
    noisy = pose_noise.perturb(poses, 0.15, seed=3)
    turn = np.swapaxes(poses[:, :3, :3], -1, -2) @ noisy[:, :3, :3]
    angle = np.degrees(np.arccos(np.clip((np.trace(turn, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    # |N(0, s^2 I3)| has mean 1.596 s: 0.15 rad -> 13.7 degrees; shifts likewise 0.239 units
    assert angle.mean() == pytest.approx(np.degrees(1.596 * 0.15), rel=0.08)
    shift = np.linalg.norm(noisy[:, :3, 3] - poses[:, :3, 3], axis=1)
    assert shift.mean() == pytest.approx(1.596 * 0.15, rel=0.08)
    e = pose_noise.errors(poses, noisy)      # alignment takes out only what all cameras share
    assert e["rotation_deg"] == pytest.approx(angle.mean(), rel=0.05)
    assert np.array_equal(pose_noise.perturb(poses, 0.0), poses)
    with pytest.raises(ValueError, match="at least 3"):
        pose_noise.align(poses[:2], poses[:2])


def test_lego_benchmark_reports_camera_errors_with_pose_noise(tmp_path):
    data = synthetic.write_transforms(tmp_path / "data", count=9, size=24).parent
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lego.py"), "--data", str(data), "--steps", "20",
                           "--preset", "draft", "--device", "cpu", "--holdout", "3", "--set", "target_samples=4096",
                           "--set", "camera_refine=on", "--pose-noise", "0.05", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["pose_noise"] == 0.05 and row["camera_moved_deg"] is not None
    assert 2.0 < row["pose_error_before"]["rotation_deg"] < 8.0       # 0.05 rad: about 4.6 degrees
    assert row["pose_error"]["rotation_deg"] >= 0 and 0 < row["psnr_aligned"] < 100
