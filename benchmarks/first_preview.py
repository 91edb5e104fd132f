"""Time to first preview: from calling fit() (fresh process, nothing compiled) to the first
preview image in hand, which includes model set-up, data upload, Triton compilation and the
first steps.  Also the time of the first few previews after it.

    python benchmarks/first_preview.py [--data ../shared/data/lego]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lego"))
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args(argv)
    t_import = time.perf_counter()
    from backend.data import load_transforms
    from backend.train import Callbacks, fit, make_config

    data = load_transforms(args.data)
    cfg = make_config("nerf", args.preset, seconds=args.seconds, steps=10**7, preview_size=128,
                      preview_interval=1.0)
    times: list[float] = []

    class Clock(Callbacks):
        def on_preview(self, step, image):
            times.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    fit(data, cfg, Clock())
    print(f"imports + data load {t0 - t_import:.2f} s (not counted); device {cfg.device}")
    print("previews at " + ", ".join(f"{t:.2f}" for t in times) + " s after fit() was called")
    print(f"time to first preview: {times[0]:.2f} s" if times else "no preview")
    return 0


if __name__ == "__main__":
    sys.exit(main())
