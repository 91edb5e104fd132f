"""Jobs run in this process through the backend's job queue (backend/service/jobs.py, real
training on the CPU), and the tiny fit over time that several test files share (conftest.py's
``clip_fit``).

* :func:`run_jobs` - each message as a job, one after the other; the messages each job sent.
* :func:`moving_submit` - the moving spheres (tests/synthetic.py) as a Submit with times.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import synthetic
from fit_implicit.shared import protocol


def moving_submit(**settings) -> protocol.Submit:
    """The moving spheres (tests/synthetic.py) seen by 6 cameras at 3 instants, 16 pixels a side,
    two held-out cameras at instants 0 and 1 (100 draft steps: meshes at 24 cells have a surface;
    the motion itself needs longer fits: tests/backend/fitting/test_dynamic_fit.py)."""
    views = synthetic.moving_views([0.0, 0.5, 1.0], 6, 16)
    held = synthetic.moving_views([0.0, 1.0], 1, 16, offset=1)
    values = dict(preset="draft", steps=100, mesh_resolution=24, preview_size=0, name="clip")
    values.update(settings)
    return protocol.Submit(
        images=views.images, intrinsics=views.intrinsics, poses=views.poses, aabb=views.aabb,
        times=views.times, eval_intrinsics=held.intrinsics, eval_poses=held.poses,
        eval_sizes=np.full((2, 2), 16, np.int32), eval_times=held.times, **values).validate()


def run_jobs(runs_dir: Path, *messages) -> list[list]:
    """Each message as a job of one queue keeping its folders in ``runs_dir``, one after the other
    (a callable message gets the first job's id); the messages each job sent."""
    from fit_implicit.backend.service.fit_job import run_fit_job
    from fit_implicit.backend.service.jobs import JobQueue
    from fit_implicit.backend.service.outbox import Outbox
    from fit_implicit.backend.service.render_job import with_render_jobs

    outbox = Outbox()
    jobs = JobQueue(with_render_jobs(run_fit_job, lambda: runs_dir), outbox, device="cpu", runs_dir=runs_dir,
                    checkpoint_interval=0)
    jobs.start()
    out = []
    try:
        for message in messages:
            if callable(message):
                message = message(out[0][-1].job_id)
            jobs.submit(b"a", message)
            sent = []
            while not any(isinstance(m, protocol.JOB_END_TYPES) for m in sent):
                sent += [m for _, m in outbox.drain()]
                jobs.join(0.01)
            out.append(sent)
    finally:
        jobs.stop()
        jobs.join(30)
    return out
