"""Data-parallel fits: one fit over several processes (one a GPU, or several on the CPU) through
torch.distributed (NCCL between GPUs, gloo on the CPU).

Every process (a *rank*) holds the whole field; the photos are shared out (rank r of N keeps
photos r, r + N, r + 2N, ... on its device: :meth:`Group.share`, so a capture too large for
one GPU's memory fits on several) and each rank draws its own rays from its share: the batch a
step is split across the ranks (``batch_rays``, ``target_samples`` and ``max_rays`` divided by
their number), one part from each share.  Every pixel stays equally likely where the shares
hold as many pixels each (N divides the photos, one size); otherwise a smaller share's pixels
are drawn a little more often.  After each backward pass the gradients are averaged over the ranks
(one all-reduce of one flat buffer), so every rank takes the same Adam step and the weights stay
identical: for the same total batch the fit is the one a single process would make, up to which
rays were drawn (tests/backend/fitting/test_distributed.py checks the averaged gradient against
the whole batch's).  The occupancy grid is refreshed on every rank at the same steps and then
taken from rank 0, so all ranks march the same cells.  The ranks agree every step on how far
the fit is (the furthest clock: the same learning rate everywhere) and whether it was cancelled
(rank 0 hears a cancel), so none waits on a collective that the others left.

Eager steps only (the CUDA-graph trainer's captured step holds no collective); rank 0 reports
progress and returns the model, the others return None.
"""
from __future__ import annotations

import copy
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

SEED_STRIDE = 1_000_003     # rank r draws its rays from seed + r * SEED_STRIDE


@dataclass
class Group:
    """This process's place among ``world`` ranks (an initialised default process group)."""

    rank: int
    world: int

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over the ranks (a missing gradient counts
        as zeros, so every rank sends the same buffer)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        start = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[start:start + n].view_as(p).clone()
            start += n

    def agree(self, fraction: float, stop: bool) -> tuple[float, bool]:
        """(the largest ``fraction`` of the fit done over the ranks, whether any rank stops): one
        small all-reduce, so that every rank schedules its learning rate from the same fraction
        and all leave the loop at the same step."""
        t = torch.tensor([float(fraction), float(bool(stop))], dtype=torch.float64, device=_device_of_group())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0]), bool(t[1] > 0)

    def share(self, photos: int) -> np.ndarray:
        """The photos this rank holds and draws rays from: every ``world``-th from its rank."""
        if photos < self.world:
            raise ValueError(f"{photos} photos cannot be shared out over {self.world} processes: "
                             f"each needs at least one")
        return np.arange(self.rank, photos, self.world, dtype=np.int64)

    def rank_seed(self, seed: int) -> int:
        """The seed this rank draws its rays from (each rank its own)."""
        return int(seed) + self.rank * SEED_STRIDE

    def from_first(self, tensors) -> None:
        """Overwrite ``tensors`` in place with rank 0's."""
        for t in tensors:
            dist.broadcast(t.data, src=0)


def _device_of_group() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def split_config(cfg, world: int):
    """A copy of ``cfg`` whose batch settings are each rank's share of ``world`` ranks."""
    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    tc.batch_rays = max(1, tc.batch_rays // world)
    tc.max_rays = max(1, tc.max_rays // world)
    if tc.target_samples > 0:
        tc.target_samples = max(1, tc.target_samples // world)
    return cfg


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank``: GPU ``rank`` for a CUDA fit, else the CPU."""
    return f"cuda:{rank}" if str(device).startswith("cuda") else "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fit_parallel(data, cfg, processes: int, log_every: float = 0.0):
    """Fit ``data`` as ``cfg`` says over ``processes`` ranks on this machine (``cfg.device``
    "cuda": one GPU each, which must exist; "cpu": processes on the CPU) and return rank 0's
    model (loaded back from the run it saved)."""
    from fit_implicit.backend.fitting.model import pick_device
    from fit_implicit.backend.fitting.runs import load_run

    processes = int(processes)
    if processes < 2:
        raise ValueError(f"a data-parallel fit needs at least 2 processes, got {processes}")
    Group(0, processes).share(len(data))      # enough photos for every rank: said here, not in a rank
    cfg = copy.deepcopy(cfg)
    cfg.device = str(pick_device(cfg.device))
    if cfg.device.startswith("cuda"):
        have = torch.cuda.device_count()
        if have < processes:
            raise ValueError(f"--gpus {processes} asks for more GPUs than this machine has ({have})")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fit_parallel_") as tmp:
        torch.multiprocessing.spawn(_rank_main, args=(processes, port, data, cfg, tmp, float(log_every)),
                                    nprocs=processes, join=True)
        return load_run(Path(tmp), rank_device(cfg.device, 0))


def _rank_main(rank: int, world: int, port: int, data, cfg, out: str, log_every: float) -> None:
    from fit_implicit.backend.fitting.loop import Callbacks, fit
    from fit_implicit.backend.fitting.runs import save_run

    device = rank_device(cfg.device, rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(device.split(":")[1]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rank_cfg = split_config(cfg, world)
        rank_cfg.device = device

        class Report(Callbacks):
            last = -1e9

            def on_progress(self, info: dict) -> None:
                if log_every > 0 and info["elapsed"] - self.last >= log_every:
                    self.last = info["elapsed"]
                    print(f"  step {info['step']}/{info['total_steps']}  psnr {info['psnr']:.2f}  "
                          f"({world} processes)", flush=True)

        model = fit(data, rank_cfg, Report() if rank == 0 else None, group=Group(rank, world))
        if rank == 0:
            model.meta["processes"] = world
            save_run(model, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


__all__ = ["Group", "fit_parallel", "split_config", "SEED_STRIDE"]
