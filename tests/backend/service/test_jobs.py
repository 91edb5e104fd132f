"""The job queue and its worker, in-process with fake runners (no sockets, no torch unless noted)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fit_implicit.backend.service.jobs import JobQueue, JobState, QueueFull, ShuttingDown, clean_summary
from fit_implicit.backend.service.outbox import Outbox
from helpers import fake_runner, make_submit
from fit_implicit.shared import protocol

CLIENT = b"client-1"


def collect(outbox: Outbox, until_end_of: str, timeout: float = 10.0) -> list[protocol.Message]:
    """Drain the outbox until the end message of job ``until_end_of``."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, message in outbox.drain():
            out.append(message)
            if isinstance(message, protocol.JOB_END_TYPES) and message.job_id == until_end_of:
                return out
        time.sleep(0.005)
    raise TimeoutError(f"job {until_end_of} did not end; got {[m.TYPE for m in out]}")


@pytest.fixture
def queue_and_outbox():
    outbox = Outbox()
    jobs = JobQueue(fake_runner, outbox, device="cpu", max_queue=2)
    jobs.start()
    yield jobs, outbox
    jobs.stop()
    assert jobs.join(5.0)


def test_a_job_runs_to_done(queue_and_outbox):
    jobs, outbox = queue_and_outbox
    job, position = jobs.submit(CLIENT, make_submit(eval_count=2, steps=10))
    assert position == 0
    messages = collect(outbox, job.id)
    kinds = [m.TYPE for m in messages]
    assert kinds[0] == "progress" and kinds[-4:] == ["mesh", "render", "render", "done"]
    done = messages[-1]
    assert isinstance(done, protocol.Done) and done.summary["steps"] == 10 and done.summary["device"] == "cpu"
    assert done.summary["seconds"] > 0
    assert [m.index for m in messages if isinstance(m, protocol.RenderResult)] == [0, 1]
    assert job.state is JobState.DONE and job.submit is None


def test_fifo_positions_and_queue_full(queue_and_outbox):
    jobs, outbox = queue_and_outbox
    first, p0 = jobs.submit(CLIENT, make_submit(steps=30))
    while jobs.running() is None:   # the worker took it: 2 places left in the queue
        time.sleep(0.002)
    second, p1 = jobs.submit(CLIENT, make_submit(steps=5))
    third, p2 = jobs.submit(CLIENT, make_submit(steps=5))
    assert (p0, p1, p2) == (0, 1, 2)
    with pytest.raises(QueueFull, match="queue full"):
        jobs.submit(CLIENT, make_submit())
    ends = [m for m in collect(outbox, third.id) if isinstance(m, protocol.JOB_END_TYPES)]
    assert [m.job_id for m in ends] == [first.id, second.id, third.id]


def test_cancel_a_queued_job_removes_it(queue_and_outbox):
    jobs, outbox = queue_and_outbox
    running, _ = jobs.submit(CLIENT, make_submit(steps=50))
    while jobs.running() is None:   # the worker took the first (on a loaded machine this takes a while)
        time.sleep(0.002)
    waiting, _ = jobs.submit(CLIENT, make_submit(steps=5))
    job, removed = jobs.cancel(waiting.id)
    assert job is waiting and removed and waiting.state is JobState.CANCELLED
    assert jobs.waiting() == []
    messages = collect(outbox, running.id)
    assert not any(getattr(m, "job_id", "") == waiting.id for m in messages)   # the server sends its Cancelled
    assert jobs.cancel("no-such-job") == (None, False)
    assert jobs.cancel(running.id) == (running, False)   # ended: known, nothing to do


def test_cancel_a_running_job(queue_and_outbox):
    jobs, outbox = queue_and_outbox
    job, _ = jobs.submit(CLIENT, make_submit(steps=100_000))
    while jobs.running() is None:
        time.sleep(0.005)
    start = time.monotonic()
    jobs.cancel(job.id)
    end = collect(outbox, job.id)[-1]
    assert isinstance(end, protocol.Cancelled) and time.monotonic() - start < 1.0
    assert job.state is JobState.CANCELLED


@pytest.mark.parametrize("name, text", [
    ("fail", "RuntimeError: fake failure"),
    ("bad-mesh", "invalid mesh message: mesh.faces"),
])
def test_failures_become_failed_with_a_clear_text(queue_and_outbox, name, text):
    jobs, outbox = queue_and_outbox
    job, _ = jobs.submit(CLIENT, make_submit(steps=10, name=name))
    end = collect(outbox, job.id)[-1]
    assert isinstance(end, protocol.Failed) and text in end.message
    assert end.code == "" and end.detail == ""
    assert job.state is JobState.FAILED


def test_gpu_out_of_memory_says_what_to_do(queue_and_outbox):
    pytest.importorskip("torch")
    jobs, outbox = queue_and_outbox
    job, _ = jobs.submit(CLIENT, make_submit(steps=4, name="oom"))
    end = collect(outbox, job.id)[-1]
    assert isinstance(end, protocol.Failed)
    assert end.message.startswith("GPU out of memory") and "lower the preset" in end.message
    # The code and the error's own words travel too: a client gives its own advice by the code.
    assert end.code == "out_of_memory" and end.detail.startswith("CUDA out of memory")


def test_stop_fails_waiting_and_running_jobs():
    outbox = Outbox()
    jobs = JobQueue(fake_runner, outbox, device="cpu", max_queue=4)
    jobs.start()
    running, _ = jobs.submit(CLIENT, make_submit(steps=100_000))
    waiting, _ = jobs.submit(CLIENT, make_submit())
    while jobs.running() is None:
        time.sleep(0.005)
    assert jobs.stop() == [waiting] and waiting.state is JobState.FAILED
    end = collect(outbox, running.id)[-1]
    assert isinstance(end, protocol.Failed) and "shut down" in end.message
    assert jobs.join(5.0)
    with pytest.raises(ShuttingDown):
        jobs.submit(CLIENT, make_submit())


def test_cancel_client_stops_its_jobs_only(queue_and_outbox):
    jobs, outbox = queue_and_outbox
    mine, _ = jobs.submit(CLIENT, make_submit(steps=100_000))
    while jobs.running() is None:   # running, not waiting: cancel_client stops it instead of removing it
        time.sleep(0.002)
    theirs, _ = jobs.submit(b"other", make_submit(steps=5))
    also_mine, _ = jobs.submit(CLIENT, make_submit(steps=5))
    assert jobs.clients_with_jobs() == {CLIENT, b"other"}
    assert jobs.cancel_client(CLIENT) == [also_mine]
    ends = [m for m in collect(outbox, theirs.id) if isinstance(m, protocol.JOB_END_TYPES)]
    assert [(type(m), m.job_id) for m in ends] == [(protocol.Cancelled, mine.id), (protocol.Done, theirs.id)]


def test_progress_is_throttled_and_previews_coalesced():
    outbox = Outbox()

    def runner(submit, ctx):
        for step in range(1, 201):
            ctx.progress(step=step, total_steps=200, loss=float("nan"), fraction=step / 200)
            ctx.preview(np.full((4, 4, 3), step, np.uint8), step)
        return {"psnr": float("inf"), "array": np.float32(1.5)}

    jobs = JobQueue(runner, outbox, device="cpu", progress_interval=10.0)
    jobs.start()
    job, _ = jobs.submit(CLIENT, make_submit())
    messages = collect(outbox, job.id)
    jobs.stop()
    progress = [m for m in messages if isinstance(m, protocol.Progress)]
    assert [p.step for p in progress] == [1, 200]          # the first, then the last step only
    assert progress[0].loss == 0.0                        # NaN cannot travel: sent as 0
    previews = [m for m in messages if isinstance(m, protocol.Preview)]
    assert len(previews) < 50 and all(p.image.shape == (4, 4, 4) for p in previews)   # coalesced, RGB -> RGBA
    assert messages[-1].summary["psnr"] is None and messages[-1].summary["array"] == 1.5


def test_outbox_never_puts_a_preview_after_the_end():
    outbox = Outbox()
    preview = protocol.Preview(job_id="j", image=np.zeros((2, 2, 4), np.uint8))
    outbox.put_preview(CLIENT, preview)
    outbox.put(CLIENT, protocol.Done(job_id="j"), final=True)
    assert [m.TYPE for _, m in outbox.drain()] == ["done"]
    outbox.put_preview(CLIENT, preview)
    outbox.put_preview(CLIENT, preview)
    outbox.put(CLIENT, protocol.Progress(job_id="j"))
    assert [m.TYPE for _, m in outbox.drain()] == ["progress", "preview"] and outbox.previews_replaced == 1


def test_control_waits_for_room_instead_of_dropping():
    outbox = Outbox(max_control=2)
    sent = []

    def producer():
        for i in range(10):
            outbox.put(CLIENT, protocol.Ping(seq=i))
            sent.append(i)

    thread = threading.Thread(target=producer)
    thread.start()
    got = []
    while len(got) < 10:
        got += [m.seq for _, m in outbox.drain(max_items=1)]
        time.sleep(0.001)
    thread.join()
    assert got == list(range(10))


def test_clean_summary():
    assert clean_summary({"a": np.int64(3), "b": float("nan"), "c": [1], "d": "x" * 5000})["a"] == 3
    summary = protocol.Done(job_id="j", summary=clean_summary({"b": float("-inf"), "c": (1, 2)})).validate().summary
    assert summary == {"b": None, "c": "(1, 2)"}


def test_one_client_may_fill_half_the_queue_by_bytes_and_passes_count(tmp_path):
    outbox = Outbox()
    one = make_submit()
    size = sum(v.nbytes for v in vars(one).values() if isinstance(v, np.ndarray))
    with_passes = make_submit()
    with_passes.depth = np.ones((4, 16, 16), np.float32)     # a scene-mode pass: 4 KiB more
    jobs = JobQueue(fake_runner, outbox, device="cpu", max_queue=8, max_queued_bytes=4 * size + 8192,
                    runs_dir=tmp_path)
    jobs.start()
    try:
        jobs.submit(CLIENT, make_submit(steps=100_000))     # running: not counted
        while jobs.running() is None:
            time.sleep(0.005)
        first, _ = jobs.submit(CLIENT, with_passes)           # the first waiting job of a client always fits
        assert first.nbytes == size + 4096 and first.submit is None     # counted with its pass; held on disk only
        jobs.submit(CLIENT, one)
        with pytest.raises(QueueFull, match="one client may queue at most"):
            jobs.submit(CLIENT, one)                          # over half the bound for this client
        jobs.submit(b"someone-else", one)                     # the others still get in
        jobs.submit(b"someone-else", one)
    finally:
        jobs.stop()
        jobs.join(5.0)


def test_waiting_jobs_are_capped_by_bytes_too():
    outbox = Outbox()
    jobs = JobQueue(fake_runner, outbox, device="cpu", max_queue=8, max_queued_bytes=5000)
    jobs.start()
    try:
        jobs.submit(CLIENT, make_submit(steps=100_000))     # running: not counted
        while jobs.running() is None:
            time.sleep(0.005)
        jobs.submit(CLIENT, make_submit())                  # 4 * 16 * 16 * 4 = 4096 bytes waiting
        with pytest.raises(QueueFull, match="GiB of images"):
            jobs.submit(CLIENT, make_submit())
    finally:
        jobs.stop()
        jobs.join(5.0)
