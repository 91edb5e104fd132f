"""Two gloo ranks on the CPU for tests/backend/fitting/test_distributed.py (a script, not a test:
torch.multiprocessing.spawn re-imports it in each rank).

    python distributed_worker.py OUT_DIR

Each rank holds the same radiance field (draft preset) and takes one half of a fixed batch of
points; after Group.average_gradients rank 0 saves the averaged gradients, and the script saves
the whole batch's gradients from one process beside them.  Each rank also writes what
Group.agree and Group.from_first gave it."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fit_implicit.backend.fitting.config import make_config
from fit_implicit.backend.fitting.distributed import Group, free_port
from fit_implicit.backend.fitting.model import build_field

POINTS = 512


def field_and_batch():
    torch.manual_seed(0)
    field = build_field(make_config("nerf", "draft", device="cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(POINTS, 3, generator=g) * 1.6 - 0.8
    d = F.normalize(torch.randn(POINTS, 3, generator=g), dim=-1)
    target = torch.rand(POINTS, 3, generator=g)
    return field, x, d, target


def loss_of(field, x, d, target):
    sigma, rgb = field(x, d)
    return ((rgb - target) ** 2).mean() + 1e-3 * sigma.mean()


def rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        group = Group(rank, 2)
        field, x, d, target = field_and_batch()
        half = slice(rank * POINTS // 2, (rank + 1) * POINTS // 2)
        loss_of(field, x[half], d[half], target[half]).backward()
        params = list(field.parameters())
        group.average_gradients(params)
        if rank == 0:
            torch.save([p.grad for p in params], Path(out) / "averaged.pt")
        fraction, stop = group.agree(0.3 if rank == 0 else 0.7, rank == 0)
        mine = torch.full((4,), float(rank + 1))
        group.from_first([mine])
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"fraction": fraction, "stop": stop,
                                                                "from_first": mine.tolist()}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    torch.multiprocessing.spawn(rank_main, args=(free_port(), out), nprocs=2, join=True)
    field, x, d, target = field_and_batch()
    loss_of(field, x, d, target).backward()
    torch.save([p.grad for p in field.parameters()], Path(out) / "whole.pt")
    np.save(Path(out) / "done.npy", np.ones(1))
