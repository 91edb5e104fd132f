"""Many jobs behind one address: a job's time alone, then ``--jobs`` K of them at once, on a backend
with worker processes (issue 20's target: two simultaneous jobs on 2 GPUs each finish within 10 %
of their solo time).  Each job is a real fit sent over ZeroMQ by its own client (its own token).

    python benchmarks/many_jobs.py --data .data/lego --jobs 2 --steps 5000 --serve "--gpus all"
    python benchmarks/many_jobs.py --tiny        # CPU check: a generated ball, 2 CPU workers

Prints one row a job: wall seconds from Submit to Done as the client sees them, the fit's own
seconds and steps (a fixed count: time is what is compared), its training PSNR, the worker's
device, and its time over the solo time.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def job_client():
    """The add-on's JobClient class, also where Blender is not installed (the GPU box): the add-on
    package's ``__init__`` registers its panels with bpy, while its client needs only pyzmq and
    shared/.  Without bpy the package is entered without running its ``__init__``."""
    try:
        from fit_implicit.blender_addon.client import JobClient
    except ModuleNotFoundError as exc:
        if exc.name != "bpy":
            raise
        import importlib
        import types

        import fit_implicit
        package = types.ModuleType("fit_implicit.blender_addon")
        package.__path__ = [os.path.join(fit_implicit.__path__[0], "blender_addon")]
        sys.modules[package.__name__] = package
        JobClient = importlib.import_module("fit_implicit.blender_addon.client").JobClient
    return JobClient


def dataset_submit(path: str, steps: int, preset: str, downscale: int, **settings):
    """A Submit of a transforms.json dataset's training views (``settings``: other Submit fields)."""
    from fit_implicit.backend.fitting.data import load_transforms
    from fit_implicit.shared import protocol

    data = load_transforms(path, downscale=downscale)
    return protocol.Submit(images=data.images, intrinsics=data.intrinsics.astype(np.float32),
                           poses=data.poses.astype(np.float32), aabb=data.aabb.astype(np.float32),
                           preset=preset, steps=steps, **{"mesh_resolution": 0, "preview_size": 0,
                                                          "name": Path(path).name, **settings}).validate()


def tiny_submit(steps: int, **settings):
    from fit_implicit.backend.service.warmup import tiny_scene
    from fit_implicit.shared import protocol

    images, ks, poses, aabb = tiny_scene(views=8, size=32)
    return protocol.Submit(images=images, intrinsics=ks.astype(np.float32), poses=poses.astype(np.float32),
                           aabb=aabb.astype(np.float32), preset="draft", steps=steps,
                           **{"mesh_resolution": 0, "preview_size": 0, "name": "ball", **settings}).validate()


class Backend:
    """``fit-implicit serve`` in a subprocess on a free loopback port; ``started``: when it was
    launched, ``listening``: when it said so (perf_counter seconds)."""

    def __init__(self, serve_args: list[str]):
        self.started = time.perf_counter()
        self.runs = tempfile.mkdtemp(prefix="many-jobs-")
        cmd = [sys.executable, "-m", "fit_implicit.backend", "serve", "--bind", "tcp://127.0.0.1:0",
               "--runs-dir", self.runs, *serve_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            found = re.match(r"backend listening on (\S+)", line)
            if found:
                self.address, self.listening = found.group(1), time.perf_counter()
                break
        else:
            raise SystemExit(f"the backend did not start (exit {self.proc.wait()})")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def run_jobs(address: str, submit, count: int, first_user: int) -> list[dict]:
    """Start ``count`` copies of ``submit`` at once, one client (user) each; wait for all."""
    JobClient = job_client()

    clients = [JobClient(address, heartbeat_interval=0.5, dead_after=30.0, token=f"{first_user + i:02x}" * 16)
               for i in range(count)]
    started = []
    for c in clients:
        c.start(submit)
        started.append(time.perf_counter())
    rows = [None] * count
    while any(r is None for r in rows):
        for i, c in enumerate(clients):
            if rows[i] is None:
                messages = c.poll()
                if c.finished:
                    done = next((m for m in messages if m.TYPE == "done"), None)
                    if done is None:
                        raise SystemExit(f"job {i} did not finish: {c.error}")
                    rows[i] = dict(wall=time.perf_counter() - started[i], **done.summary)
        time.sleep(0.02)
    for c in clients:
        c.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a transforms.json dataset (default with --tiny: a generated ball)")
    ap.add_argument("--tiny", action="store_true", help="a generated ball on 2 CPU workers (checks the chain)")
    ap.add_argument("--jobs", type=int, default=2, help="jobs at once (default 2)")
    ap.add_argument("--steps", type=int, default=5000, help="each fit's training steps (default 5000; --tiny: 150)")
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--downscale", type=int, default=1)
    ap.add_argument("--serve", default="--gpus all", help="options of `fit-implicit serve` (default '--gpus all')")
    args = ap.parse_args(argv)
    if args.tiny:
        submit, serve = tiny_submit(min(args.steps, 150)), ["--device", "cpu", "--workers", "2"]
    elif args.data:
        submit, serve = dataset_submit(args.data, args.steps, args.preset, args.downscale), shlex.split(args.serve)
    else:
        ap.error("give --data DATASET or --tiny")
    backend = Backend(serve)
    try:
        run_jobs(backend.address, submit, 1, 0)                  # every worker process pays its first-use costs...
        run_jobs(backend.address, submit, args.jobs, 16)         # ...on a first round that is not counted
        solo = run_jobs(backend.address, submit, 1, 32)[0]
        together = run_jobs(backend.address, submit, args.jobs, 48)
    finally:
        backend.close()
    print(f"serve {' '.join(serve)}; {len(submit.images)} views of {submit.images.shape[2]} x {submit.images.shape[1]}, "
          f"{submit.steps} steps a fit, commit {os.environ.get('FIT_IMPLICIT_COMMIT', '?')}")
    print(f"{'job':>8} {'wall s':>8} {'fit s':>8} {'steps':>7} {'PSNR':>6} {'device':>8} {'/ solo':>7}")
    for name, row in [("solo", solo)] + [(f"{i + 1} of {args.jobs}", r) for i, r in enumerate(together)]:
        print(f"{name:>8} {row['wall']:8.1f} {row.get('seconds', 0):8.1f} {row.get('steps', 0):7d} "
              f"{row.get('psnr') or 0:6.2f} {str(row.get('device')):>8} {row['wall'] / solo['wall']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
