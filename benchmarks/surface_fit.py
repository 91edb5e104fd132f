"""Surface benchmark: train an SDF (or occupancy / radiance) field, mesh it, score it against a
ground-truth mesh.

    python benchmarks/surface_fit.py --data out/surface --gt out/surface/ground_truth.ply \\
        [--method sdf] [--preset standard] [--seconds 180] [--mesh-resolution 512] [--out runs/bench_surface.json]

Training views: the folder's transforms_train.json (or transforms.json); held-out views: its
transforms_test.json if there is one, else every ``--holdout``-th view.  The clock runs from the
first step (no previews).  The mesh is the product's (backend/export/mesh.py extract_mesh, with
``--mesh-resolution`` grid points along the box's longest side): what no training camera saw is
closed flat (backend/export/unseen.py) unless ``--keep-unseen``.  Prints and writes: steps,
steps/s, training time, Chamfer distance (world units and % of the ground-truth box diagonal),
F-score at 1% of that diagonal, both over everything and over what the training cameras see
("seen_"), held-out PSNR (white background, 8-bit), meshing time.  Targets (issue 12): Chamfer
<= 0.3%, F-score >= 0.95.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from fit_implicit.backend.export.mesh import extract_mesh  # noqa: E402
from fit_implicit.backend.fitting import metrics  # noqa: E402
from fit_implicit.backend.cli import _overrides  # noqa: E402
from fit_implicit.backend.fitting.data import load_transforms, split_holdout  # noqa: E402
from fit_implicit.backend.fitting.config import make_config  # noqa: E402
from fit_implicit.backend.fitting.loop import Callbacks, fit  # noqa: E402
from fit_implicit.backend.fitting.runs import save_run  # noqa: E402
from fit_implicit.backend.fitting.metrics import evaluate  # noqa: E402


class Printer(Callbacks):
    def __init__(self, every: float = 10.0):
        self.every, self.last = every, -1e9

    def on_progress(self, info: dict) -> None:
        if info["elapsed"] - self.last >= self.every or info["fraction"] >= 1.0:
            self.last = info["elapsed"]
            print(f"  step {info['step']}  loss {info['loss']:.5f}  psnr {info['psnr']:.2f}  rays {info['rays']}  "
                  f"occupied {info['occupied']:.3f}  {info['elapsed']:.1f} s", flush=True)


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 and triangles (F, 3) int64 of a .ply (ascii or binary little
    endian; faces as lists, polygons fanned) or .obj file."""
    path = Path(path)
    if path.suffix.lower() == ".obj":
        v, f = [], []
        for line in path.read_text().splitlines():
            if line.startswith("v "):
                v.append([float(t) for t in line.split()[1:4]])
            elif line.startswith("f "):
                idx = [int(t.split("/")[0]) - 1 for t in line.split()[1:]]
                f.extend([idx[0], idx[i], idx[i + 1]] for i in range(1, len(idx) - 1))
        return np.array(v, np.float64), np.array(f, np.int64)
    data = path.read_bytes()
    end = data.index(b"end_header") + len(b"end_header")
    end = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii").splitlines()
    fmt = header[1].split()[1]
    types = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
             "char": "i1", "int8": "i1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
             "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4"}
    elements, current = [], None
    for line in header:
        parts = line.split()
        if parts[:1] == ["element"]:
            current = {"name": parts[1], "count": int(parts[2]), "props": []}
            elements.append(current)
        elif parts[:1] == ["property"] and current is not None:
            current["props"].append(parts[1:])
    verts = faces = None
    if fmt == "ascii":
        rows = data[end:].decode("ascii").split("\n")
        at = 0
        for el in elements:
            lines = rows[at:at + el["count"]]
            at += el["count"]
            if el["name"] == "vertex":
                names = [p[-1] for p in el["props"]]
                arr = np.array([[float(t) for t in ln.split()] for ln in lines])
                verts = arr[:, [names.index(c) for c in "xyz"]]
            elif el["name"] == "face":
                faces = [[int(t) for t in ln.split()[1:]] for ln in lines]
    elif fmt == "binary_little_endian":
        offset = end
        for el in elements:
            if el["props"] and el["props"][0][0] == "list":
                _, count_t, index_t, _ = el["props"][0]
                ct, it = np.dtype("<" + types[count_t]), np.dtype("<" + types[index_t])
                out = []
                for _ in range(el["count"]):
                    n = int(np.frombuffer(data, ct, 1, offset)[0])
                    offset += ct.itemsize
                    out.append(np.frombuffer(data, it, n, offset).tolist())
                    offset += n * it.itemsize
                if el["name"] == "face":
                    faces = out
            else:
                dt = np.dtype([(p[1], "<" + types[p[0]]) for p in el["props"]])
                arr = np.frombuffer(data, dt, el["count"], offset)
                offset += arr.nbytes
                if el["name"] == "vertex":
                    verts = np.stack([arr[c].astype(np.float64) for c in "xyz"], -1)
    else:
        raise ValueError(f"{path}: PLY format {fmt!r} is not supported")
    if verts is None or not faces:
        raise ValueError(f"{path}: no vertices or faces")
    tris = [[p[0], p[i], p[i + 1]] for p in faces for i in range(1, len(p) - 1)]
    return verts, np.array(tris, np.int64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (transforms_train.json / transforms.json)")
    ap.add_argument("--gt", required=True, help="ground-truth mesh (.ply or .obj), world units")
    ap.add_argument("--method", default="sdf", choices=["sdf", "occupancy", "nerf"])
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--seconds", type=float, default=180.0, help="training budget (0: the preset's steps)")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--mesh-resolution", type=int, default=512, help="marching-cubes grid along the longest side")
    ap.add_argument("--holdout", type=int, default=8, help="without transforms_test.json: hold out every K-th")
    ap.add_argument("--downscale", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--set", action="append", default=[], help="FitConfig override KEY=VALUE (repeatable)")
    ap.add_argument("--keep-unseen", action="store_true", help="mesh without closing what no camera saw")
    ap.add_argument("--run", default="", help="also save the fitted run to this folder")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_surface.json"))
    args = ap.parse_args(argv)

    folder = Path(args.data)
    data = load_transforms(folder, downscale=args.downscale)
    test_file = folder / "transforms_test.json" if folder.is_dir() else None
    if test_file is not None and test_file.is_file():
        train, held = data, load_transforms(test_file, downscale=args.downscale)
    else:
        train, held = split_holdout(data, args.holdout)
    steps = args.steps or (10 ** 7 if args.seconds else 0)
    cfg = make_config(args.method, args.preset, device=args.device, steps=steps, seconds=args.seconds,
                      preview_size=0, **_overrides(args.set, args.method))
    passes = sorted(getattr(train, "passes", {}) or {})
    print(f"data: {len(train)} training views, {len(held) if held is not None else 0} held out, "
          f"{train.width}x{train.height}, passes {passes or 'none'}; method {cfg.method}, preset {cfg.preset}, "
          f"device {cfg.device}, budget {args.seconds:g} s", flush=True)
    model = fit(train, cfg, Printer())
    steps_done, train_s = int(model.meta["steps"]), float(model.meta["seconds"])
    if args.run:
        save_run(model, args.run)

    t0 = time.perf_counter()
    facts: dict = {}            # the product's meshing: unseen regions closed unless --keep-unseen
    views = None if args.keep_unseen else train
    verts, faces, _ = extract_mesh(model, args.mesh_resolution, views=views, facts=facts)
    mesh_s = time.perf_counter() - t0
    row = {"method": cfg.method, "preset": cfg.preset, "device": cfg.device,
           "gpu": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else None,
           "steps": steps_done, "train_s": round(train_s, 2), "steps_per_s": round(steps_done / max(train_s, 1e-9), 2),
           "samples_per_s": round(model.meta.get("samples", 0) / max(train_s, 1e-9)),
           "first_step_s": model.meta.get("first_step_s"), "inv_s": model.meta.get("inv_s"),
           "lighting_baked": model.meta.get("lighting_baked"), "passes": passes,
           "mesh_resolution": args.mesh_resolution, "mesh_s": round(mesh_s, 2), "faces": int(len(faces)),
           "unseen": facts.get("unseen")}
    gt_v, gt_f = read_mesh(args.gt)
    diag = float(np.linalg.norm(gt_v.max(0) - gt_v.min(0)))
    if len(faces):
        s = metrics.chamfer(gt_v, gt_f, verts, faces, views=train)
        row.update({"chamfer": round(s["chamfer"], 6), "chamfer_pct_diag": round(100 * s["chamfer"] / diag, 4),
                    "fscore_1pct": round(s["fscore"], 4), "accuracy": round(s["accuracy"], 6),
                    "completeness": round(s["completeness"], 6), "gt_diag": round(diag, 4)})
        if "seen_chamfer" in s:     # over what the training cameras see of each mesh
            row.update({"seen_chamfer_pct_diag": round(100 * s["seen_chamfer"] / diag, 4),
                        "seen_fscore_1pct": round(s["seen_fscore"], 4), "seen_share": round(s["seen_share"], 4)})
    else:
        row.update({"chamfer": None, "fscore_1pct": 0.0})
    if held is not None:
        t1 = time.perf_counter()
        row["holdout_psnr"] = round(float(np.mean(evaluate(model, held))), 3)
        row["holdout_views"] = len(held)
        row["eval_s"] = round(time.perf_counter() - t1, 2)
    for k, v in row.items():
        print(f"{k:>18}: {v}")
    ok = row.get("chamfer_pct_diag") is not None and row["chamfer_pct_diag"] <= 0.3 and row["fscore_1pct"] >= 0.95
    print(f"targets (Chamfer <= 0.3% of the diagonal, F-score@1% >= 0.95, over everything): {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
