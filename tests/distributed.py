"""Run a function on N CPU processes (gloo, file rendezvous) with a timeout, so a collective
that only some ranks call fails the test instead of hanging CI."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp_path: Path, *args, world_size: int = 2, timeout: float = 60.0) -> None:
    ctx = mp.get_context("spawn")
    init_file = str(tmp_path / "rendezvous")
    procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
    assert not hung, f"ranks {hung} did not finish within {timeout}s (a collective mismatch?)"
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    assert not failed, f"ranks {failed} exited with errors: {[procs[i].exitcode for i in failed]}"
