"""Worker functions for the multi-process tests (spawned processes import this
module by name, so it must live at the top of tests/)."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_idx(seed: int, rank: int, world: int, scenario: str, n_logical: int) -> torch.Tensor:
    """Deterministic router output of one rank for a scenario (parent and workers
    regenerate the same tensors)."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    if scenario == "empty" and rank == world - 1:
        return torch.empty(0, 4, dtype=torch.int64)
    tokens = 300 + 97 * rank
    if scenario == "skewed":
        # each rank routes mostly to its own narrow band of experts
        hot = torch.arange(rank * 2, rank * 2 + 3) % n_logical
        idx = hot[torch.randint(0, hot.numel(), (tokens, 4), generator=gen)]
    else:
        idx = torch.randint(0, n_logical, (tokens, 4), generator=gen)
    if scenario in ("dropped", "skewed"):
        idx[torch.rand(tokens, 4, generator=gen) < 0.2] = -1
    return idx.to(torch.int32 if rank % 2 else torch.int64)


def _init(rank: int, world: int, port: int, backend: str, timeout_s: float = 60.0) -> torch.device:
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def split_worker(rank, world, port, backend, outdir, scenario, config_dict, seed, n_logical):
    """Count, all-reduce, plan and redirect on one rank; save everything."""
    from lplb_plugin import LPLBConfig, Planner

    try:
        device = _init(rank, world, port, backend)
        cfg = LPLBConfig.from_dict(config_dict)
        planner = Planner.from_config(cfg, n_logical, ep_size=world, group=dist.group.WORLD)
        idx = rank_idx(seed, rank, world, scenario, n_logical).to(device)
        counts = planner.stats.local_counts(idx)
        pending = planner.global_counts_async(counts)
        global_counts = pending.wait()
        plan = planner.plan(global_counts)
        phys = planner.redirect(idx, plan)
        phys_run = planner.run(idx)  # the one-call path agrees
        torch.save(
            {
                "global_counts": global_counts.cpu(), "x": plan.x, "optimal": plan.optimal,
                "phys": phys.cpu(), "phys_run": phys_run.cpu(), "phy2log": planner.phy2log,
                "reducer": planner.stats.reducer.name,
            },
            os.path.join(outdir, f"rank{rank}.pt"),
        )
        dist.barrier()
    except Exception:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def mismatch_worker(rank, world, port, outdir, configs, n_logicals):
    """Ranks built with different configs: every rank must raise a clear error."""
    from lplb_plugin import LPLBConfig, Planner

    try:
        _init(rank, world, port, "gloo")
        cfg = LPLBConfig.from_dict(configs[rank])
        planner = Planner.from_config(cfg, n_logicals[rank], ep_size=world, group=dist.group.WORLD)
        idx = torch.randint(0, n_logicals[rank], (64, 2))
        planner.run(idx)
        msg = "no error"
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(outdir, f"rank{rank}.msg"), "w") as f:
        f.write(msg)
    if dist.is_initialized():
        dist.destroy_process_group()


def absent_rank_worker(rank, world, port, outdir, timeout_s):
    """The last rank never reaches the plugin: the others must fail within the
    timeout with a message, not hang."""
    from lplb_plugin import LPLBConfig, Planner

    msg = "no error"
    try:
        _init(rank, world, port, "gloo", timeout_s=timeout_s + 30)
        cfg = LPLBConfig.from_dict({"placement": {"topology": "ring", "topology_shape": [world], "redundant_per_rank": 1},
                                    "stats": {"timeout_s": timeout_s}})
        if rank == world - 1:
            time.sleep(timeout_s + 3)  # alive but elsewhere
        else:
            planner = Planner.from_config(cfg, 8 * world, ep_size=world, group=dist.group.WORLD)
            start = time.monotonic()
            try:
                planner.run(torch.randint(0, 8 * world, (32, 2)))
            except Exception as exc:
                msg = f"{type(exc).__name__} after {time.monotonic() - start:.1f}s: {exc}"
    except Exception as exc:
        msg = f"setup failed: {type(exc).__name__}: {exc}"
    with open(os.path.join(outdir, f"rank{rank}.msg"), "w") as f:
        f.write(msg)
    # no destroy: the peers' barrier state is broken on purpose
