"""Time to first preview: from calling fit() (fresh process, nothing compiled) to the first
preview image in hand, which includes model set-up, data upload, Triton compilation and the
first steps.  Also the time of the first few previews after it.

    python benchmarks/first_preview.py [--data ../shared/data/lego]
    python benchmarks/first_preview.py --backend [--data ...] [--serve "--no-warm-up"]

``--backend`` measures what an artist waits for instead (issue 18: a fresh ``serve`` reaches its
first preview of a new job within 2 s of the click): a real backend started from cold, the time
until it listens, then from each Submit to its first Preview over ZeroMQ, for a job sent the
moment it listens (its warm-up may still run) and for one sent after that job ended.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lego"))
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--breakdown", action="store_true", help="time the first-use costs one by one first")
    ap.add_argument("--backend", action="store_true", help="through a fresh `serve` process, Submit to Preview")
    ap.add_argument("--serve", default="", help="with --backend: more options of `fit-implicit serve`")
    ap.add_argument("--tiny", action="store_true", help="with --backend: a generated ball (draft), not --data")
    args = ap.parse_args(argv)
    if args.backend:
        return through_backend(args)
    t_import = time.perf_counter()
    from fit_implicit.backend.fitting.data import load_transforms
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.loop import Callbacks, fit

    import torch

    data = load_transforms(args.data)
    t_loaded = time.perf_counter()
    t_cuda = time.perf_counter()
    if torch.cuda.is_available():     # CUDA context: paid once per process (a running backend has it)
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    t_cuda = time.perf_counter() - t_cuda
    cfg = make_config("nerf", args.preset, seconds=args.seconds, steps=10**7, preview_size=128,
                      preview_interval=1.0)
    times: list[float] = []

    progress: list[tuple[int, float]] = []

    class Clock(Callbacks):
        def on_preview(self, step, image):
            times.append(time.perf_counter() - t0)
            progress.append((step, times[-1]))

        def on_progress(self, info):
            progress.append((info["step"], time.perf_counter() - t0))

    if args.breakdown:       # where a fresh process's first-time costs go (before the fits below)
        from fit_implicit.backend.fitting.loop import _preview_camera, make_trainer

        def timed(label, fn):
            t = time.perf_counter()
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            print(f"  {label}: {time.perf_counter() - t:.3f} s", flush=True)
            return out

        print("breakdown (fresh process):")
        trainer = timed("trainer set-up (model, optimiser, images to the device)", lambda: make_trainer(data, cfg))
        cam = _preview_camera(data, 128)
        timed("first preview render (young field)", lambda: trainer.model.render(*cam))
        timed("second preview render", lambda: trainer.model.render(*cam))
        for i in range(5):
            timed(f"step {i}", trainer.step)
        timed("occupancy update", lambda: trainer.update_step(cfg.occupancy.occupancy_warmup, 0.0))
        timed("preview render after the update", lambda: trainer.model.render(*cam))
        del trainer

    for run in ("first fit in this process (kernels compiled or loaded from Triton's disk cache)",
                "second fit in the same process (a running backend)"):
        times.clear()
        progress.clear()
        t0 = time.perf_counter()
        fit(data, cfg, Clock())
        print(f"{run}:")
        print("  previews at " + ", ".join(f"{t:.2f}" for t in times) + " s after fit() was called")
        print("  step at time: " + ", ".join(f"{k}@{t:.2f}" for k, t in progress[:12]))
        print(f"  time to first preview: {times[0]:.2f} s" if times else "  no preview")
    print(f"imports + data load {t_loaded - t_import:.2f} s, CUDA context {t_cuda:.2f} s (not counted); "
          f"device {cfg.device}")
    return 0


def through_backend(args) -> int:
    """Cold start to first preview through a real backend (see the module's text)."""
    import shlex

    from many_jobs import Backend, dataset_submit, job_client, tiny_submit   # benchmarks/many_jobs.py

    JobClient = job_client()

    settings = dict(preview_size=128, preview_interval=1.0, seconds=args.seconds)    # the add-on's previews
    submit = (tiny_submit(0, **settings) if args.tiny
              else dataset_submit(args.data, 0, args.preset, 1, **settings))
    backend = Backend(shlex.split(args.serve))
    try:
        print(f"serve {args.serve or '(defaults)'}: listening {backend.listening - backend.started:.2f} s after launch")
        for label in ("a job sent the moment it listens", "a job sent after the first ended"):
            client = JobClient(backend.address, heartbeat_interval=0.5, dead_after=60.0)
            sent = time.perf_counter()
            client.start(submit)
            first = None
            while not client.finished:
                for m in client.poll():
                    if first is None and m.TYPE == "preview":
                        first = time.perf_counter() - sent
                time.sleep(0.005)
            client.close()
            shown = f"{first:.2f} s" if first is not None else "none"
            print(f"  {label}: first preview {shown} after Submit; done after {time.perf_counter() - sent:.1f} s "
                  f"({client.error or 'ok'})")
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
