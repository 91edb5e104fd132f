"""benchmarks/lego.py (the GPU training curve) on a small synthetic dataset on the CPU: it fits,
scores the held-out views and writes its record, so a change that breaks it shows here and not
only on the GPU machine (tests/backend/fitting/test_fit.py bounds the quality of a fit)."""
import json
import subprocess
import sys

import synthetic
from helpers import REPO


def test_lego_benchmark_runs_small(tmp_path):
    data = synthetic.write_transforms(tmp_path / "data", count=9, size=24).parent
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lego.py"), "--data", str(data), "--budgets", "2",
                           "--preset", "draft", "--device", "cpu", "--holdout", "3", "--set", "target_samples=4096",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    assert doc["preset"] == "draft" and doc["overrides"] == {"target_samples": 4096}
    assert row["budget_s"] == 2.0 and row["views"] == 3 and row["steps"] > 0
    assert row["render_march_steps"] == 256             # the draft preset renders with its training step
    # the quality of a 2 s fit depends on the machine's load: only that it was scored (test_fit.py bounds it)
    assert 5.0 < row["psnr"] < 100.0 and row["train_s"] >= 2.0, row
    assert "2 " in proc.stdout.splitlines()[-1] and f"{row['psnr']:.2f}" in proc.stdout


def test_the_error_is_split_between_edge_pixels_and_the_rest():
    """lego.py's error_regions (--save-renders): on a white image with a black square, the edge pixels
    are the two-pixel ring along the square's outline; an error only there is all the edges' share."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import lego
    import numpy as np

    truth = np.ones((12, 12, 3))
    truth[4:8, 4:8] = 0.0
    edges = lego.edge_mask(truth)
    ring = np.zeros((12, 12), bool)
    ring[3:9, 3:9] = True
    ring[5:7, 5:7] = False
    assert np.array_equal(edges, ring)
    regions = lego.error_regions(sq_edges=0.32, sq_rest=0.0, n_edges=32, n_rest=112)
    assert regions == {"edge_pixels": round(32 / 144, 4), "edge_error_share": 1.0, "psnr_edges": 20.0,
                       "psnr_rest": 120.0}
