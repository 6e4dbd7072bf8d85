"""Real multi-process runs for the DeepSpeed tests: ``torch.multiprocessing`` spawns
``world_size`` processes on localhost (free port), each calls
``deepspeed.init_distributed("gloo")`` and then a worker function; results come back
pickled through ``torch.save``.

DeepSpeed's first gloo init JIT-builds its shm comm op (about 35 s to 2 min); it is
cached in ``TORCH_EXTENSIONS_DIR``, which defaults here to ``<repo>/.ci-cache/
torch_extensions`` (git-ignored, kept by CI between runs).
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
EXT_DIR = str(REPO / ".ci-cache" / "torch_extensions")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, queue, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size), OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
    )
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    torch.set_num_threads(1)
    try:
        import deepspeed

        deepspeed.init_distributed("gloo", verbose=False)
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_workers(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the
    per-rank results (rank order).  Raises ``RuntimeError`` with the workers'
    tracebacks when any fails."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # the others may be blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
