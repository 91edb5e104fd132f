"""Warm starts (backend/fields/warm_start.py): held-out PSNR with and without, side by side.

    python benchmarks/warm_start.py --data ../shared/data/lego [--data ...] [--method nerf]
        (--budgets 2,5,10,30,60 | --steps 25,50,100,200) [--preset standard] [lego.py options]
        [--out runs/bench_warm_start.json]

For each ``--data`` scene (anything benchmarks/lego.py reads; the scenes the warm starts were
meta-learned on are benchmarks/random_scenes.py's, so lego, the flower and DTU are unseen), runs
benchmarks/lego.py twice, ``--set warm_start=false`` then the default (warm start on), each a
fresh fit per budget, and prints the two curves and their difference.  Other options go to
lego.py unchanged (``--downscale 8`` for CPU runs).  A one-step fit runs first and is thrown
away (``--no-prime`` skips it): it pays the process's one-time compilation (Triton's cache, the
first CUDA graph), which a served backend pays at start-up (backend/service/warmup.py); without it
the first (cold) fit at a 2 s budget spends its budget compiling.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lego  # noqa: E402  (benchmarks/lego.py)

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", required=True, help="a scene (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_warm_start.json"))
    ap.add_argument("--no-prime", action="store_true", help="no throw-away one-step fit first")
    args, rest = ap.parse_known_args(argv)
    records = []
    with tempfile.TemporaryDirectory(prefix="warm_start_") as tmp:
        if not args.no_prime:
            prime = ["--data", args.data[0], *rest, "--steps", "1", "--holdout", "1000000",
                     "--out", str(Path(tmp) / "prime.json")]
            if lego.main(prime) != 0:
                return 1
        for data in args.data:
            pair = {}
            for name, extra in (("cold", ["--set", "warm_start=false"]), ("warm", [])):
                out = Path(tmp) / f"{len(records)}_{name}.json"
                if lego.main(["--data", data, *rest, *extra, "--out", str(out)]) != 0:
                    return 1
                pair[name] = json.loads(out.read_text())
            records.append(pair)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=2))
    for pair in records:
        cold, warm = pair["cold"], pair["warm"]
        print(f"\n{cold['scene']}, {cold['method']}, preset {cold['preset']}, on {cold['device']} ({cold['commit']}); "
              f"warm start: {warm['results'][0].get('warm_start') or 'none for this architecture'}")
        print(f"{'budget':>8} {'steps':>7} {'cold dB':>8} {'warm dB':>8} {'gain dB':>8}")
        for c, w in zip(cold["results"], warm["results"]):
            budget = f"{c['budget_s']:g} s" if c["budget_s"] else f"{c['steps']} st"
            print(f"{budget:>8} {w['steps']:>7d} {c['psnr']:>8.2f} {w['psnr']:>8.2f} {w['psnr'] - c['psnr']:>+8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
