"""The encodings side by side on a natural image (issue 16 item 4; docs/benchmarks.md "Image
fitting"): each encoding fits the same 512 x 512 photo for a time budget (backend/fitting/image_fit.py,
the sizes of its ``image_config``); printed: PSNR after 1, 2, 5, 10, ... seconds of training, the
time to reach 30, 35 and 40 dB, and the parameter count.

The image: ``--image``, or by default a 512 x 512 centre crop of the first llff_flower photo
(../shared/data/llff_flower/images_4, a real capture), written once to .data/images/flower_512.png
so that it can travel to a GPU machine (benchmarks/gpu_suite.sh section "image").

    python benchmarks/image_fit.py --device cuda --seconds 10 --out image_fit.json
    python benchmarks/image_fit.py --device cpu --seconds 60 --set batch_pixels=16384
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO / ".data" / "images" / "flower_512.png"
FLOWER = REPO.parent / "shared" / "data" / "llff_flower" / "images_4" / "image000.png"


def default_image() -> Path:
    """The 512 x 512 crop of the flower photo, made on first use (module doc)."""
    if not DEFAULT_IMAGE.exists():
        from PIL import Image

        if not FLOWER.exists():
            raise SystemExit(f"no --image given and neither {DEFAULT_IMAGE} nor {FLOWER} exists")
        with Image.open(FLOWER) as im:
            w, h = im.size
            left, top = (w - 512) // 2, (h - 512) // 2
            DEFAULT_IMAGE.parent.mkdir(parents=True, exist_ok=True)
            im.convert("RGB").crop((left, top, left + 512, top + 512)).save(DEFAULT_IMAGE)
    return DEFAULT_IMAGE


def at_time(curve: list, seconds: float) -> float | None:
    """The PSNR of the last record at or before ``seconds`` of training."""
    before = [p for _, t, p in curve if t <= seconds]
    return before[-1] if before else None


def main() -> int:
    from fit_implicit.backend.fitting.data import read_image
    from fit_implicit.backend.fitting.image_fit import ImageFitConfig, fit_image, image_config
    from fit_implicit.backend.fitting.model import pick_device
    from fit_implicit.shared.methods import ENCODINGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=None, help="image file (default: the flower crop, module doc)")
    ap.add_argument("--encodings", default=",".join(ENCODINGS))
    ap.add_argument("--seconds", type=float, default=10.0, help="training time per encoding")
    ap.add_argument("--steps", type=int, default=1_000_000, help="most steps per encoding")
    ap.add_argument("--device", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out", default=None, help="JSON file for the results (with the curves)")
    args = ap.parse_args()

    path = Path(args.image) if args.image else default_image()
    image = read_image(path)
    height, width = image.shape[:2]
    device = str(pick_device(args.device))
    settings = ImageFitConfig().parse(args.set)
    marks = [t for t in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600) if t <= args.seconds]
    print(f"image {path.name} {width}x{height}, device {device}, {args.seconds:g} s per encoding")
    print(f"{'encoding':>10} {'params':>10} {'steps':>7} " + " ".join(f"{f'@{t}s':>7}" for t in marks)
          + "   to 30 / 35 / 40 dB (s)")
    results = {}
    for name in args.encodings.split(","):
        cfg = image_config(width, height, name, steps=args.steps, seconds=args.seconds, device=device,
                           eval_every=50 if device.startswith("cuda") else 25, **settings)
        fit = fit_image(image, cfg)
        reach = {str(db): next((t for _, t, p in fit.curve if p >= db), None) for db in (30, 35, 40)}
        params = sum(p.numel() for p in fit.model.parameters())
        results[name] = {"psnr": fit.psnr, "steps": fit.steps, "seconds": fit.seconds, "parameters": params,
                         "seconds_to": reach, "curve": fit.curve,
                         "settings": {k: v for k, v in cfg.flat().items()}}
        cells = " ".join(f"{at_time(fit.curve, t) or float('nan'):7.2f}" for t in marks)
        reached = " / ".join("-" if reach[k] is None else f"{reach[k]:.1f}" for k in ("30", "35", "40"))
        print(f"{name:>10} {params:>10,} {fit.steps:>7} {cells}   {reached}   (final {fit.psnr:.2f} dB)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"image": str(path), "device": device, "seconds": args.seconds,
                                              "results": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
