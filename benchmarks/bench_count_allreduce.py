"""Latency of the count all-reduce: NCCL (torch.distributed) vs NVSHMEM (nvshmem4py).

Spawns one process per GPU (EP = number of GPUs, or --ep), all-reduces an int32
``[L]`` count vector (L = 256 and 1024) on the current stream, and times it with CUDA
events: ``back_to_back_us`` = mean of 500 launches in a row / 500 (throughput-bound,
what a training step sees when the reduction overlaps), ``single_us`` = median over
200 isolated launch+synchronise rounds (latency-bound).  Prints one JSON object from
rank 0.  Needs >= 2 GPUs; NVSHMEM rows need nvshmem4py.

    python benchmarks/bench_count_allreduce.py [--ep 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _time(fn, n_back: int = 500, n_single: int = 200) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n_back):
        fn()
    end.record()
    torch.cuda.synchronize()
    back = start.elapsed_time(end) * 1e3 / n_back
    singles = []
    for _ in range(n_single):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        singles.append(start.elapsed_time(end) * 1e3)
    return back, statistics.median(singles)


def worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from lplb_plugin.stats.reducers import NvshmemReducer, TorchAllReduce

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    rows = []
    try:
        import nvshmem.core  # noqa: F401

        have_nvshmem = True
    except Exception as exc:
        have_nvshmem = False
        nvshmem_reason = f"{type(exc).__name__}: {exc}"
    for n in (256, 1024):
        counts = torch.randint(0, 1000, (n,), dtype=torch.int32, device="cuda")
        torch_red = TorchAllReduce(group)
        expect = torch_red.reduce(counts)
        back, single = _time(lambda: torch_red.reduce_async(counts).wait())
        rows.append({"backend": "nccl", "experts": n, "back_to_back_us": round(back, 2), "single_us": round(single, 2)})
        if have_nvshmem:
            nv = NvshmemReducer(group, n)
            got = nv.reduce(counts)
            torch.cuda.synchronize()
            assert torch.equal(got, expect), "NVSHMEM sum differs from NCCL's"
            back, single = _time(lambda: nv.reduce_async(counts))
            rows.append({"backend": "nvshmem", "experts": n, "back_to_back_us": round(back, 2), "single_us": round(single, 2)})
            nv.close()
    if rank == 0:
        result = {
            "benchmark": "count_allreduce", "ep": world, "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "rows": rows,
        }
        if not have_nvshmem:
            result["nvshmem"] = f"not run: {nvshmem_reason}"
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ep", type=int, default=torch.cuda.device_count())
    args = ap.parse_args()
    if args.ep < 2 or torch.cuda.device_count() < args.ep:
        print(json.dumps({"benchmark": "count_allreduce", "skipped": f"needs {max(args.ep, 2)} GPUs, found {torch.cuda.device_count()}"}))
        return
    from dist_workers import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        mp.start_processes(worker, args=(args.ep, free_port(), out), nprocs=args.ep, start_method="spawn", join=True)
        with open(out) as f:
            print(f.read())


if __name__ == "__main__":
    main()
