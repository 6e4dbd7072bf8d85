"""Spawn real multi-process gloo jobs for the Megatron tests (no mocks: each process
initialises torch.distributed and Megatron's parallel state for real)."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, backend):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
    )
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from integration.megatron import cpu_shims

    cpu_shims.apply()
    result, error = None, None
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
    except BaseException:  # reported to the parent, which fails the test
        error = traceback.format_exc()
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump((result, error), f)


def run(fn, world_size: int, *args, backend: str = "gloo"):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes (``gloo``, or
    ``nccl`` with one GPU per rank); return the list of per-rank results (raises with
    the worker traceback on failure)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, out_dir, backend), nprocs=world_size,
            join=True, start_method="spawn",
        )
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
                result, error = pickle.load(f)
            if error:
                raise AssertionError(f"rank {r} failed:\n{error}")
            results.append(result)
        return results
