"""Wall time and peak memory of the torch reference ``redirect`` (and of the whole
``Planner.run``: count + solve + redirect) on CPU.

1M tokens x top-8 int64 ids (L = 256 logical experts, -1 sprinkled in), a placement of
288 slots on 32 EP ranks (each rank: 8 home experts + 1 copy of another rank's expert),
and a random split ``x``.  The measurement runs in a fresh subprocess: after the inputs
are built, the process's peak-RSS mark is reset (``echo 5 > /proc/self/clear_refs``,
Linux >= 4.0) and ``VmHWM`` is read after the call, so the reported peak increase is
exactly what ``redirect`` (plus ``copy_fractions``) added on top of the resident inputs.
Where the reset is not available the script falls back to ``ru_maxrss`` after the call
minus the current RSS before it (an upper bound).  torch's CPU allocations are invisible
to ``tracemalloc``, hence RSS.

Run from the repository root::

    python benchmarks/bench_redirect_memory.py

Prints one JSON object.  Target: peak increase within 2 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

N_TOKENS, TOPK, N_LOGICAL, N_PHYSICAL, N_RANKS = 1_000_000, 8, 256, 288, 32
TARGET_BYTES = 2 * 1024**3


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child() -> None:
    import resource
    import time

    import torch

    sys.path.insert(0, os.getcwd())
    from lplb_plugin.layout import ExpertPlacement
    from lplb_plugin.redirect import copy_fractions, redirect

    g = torch.Generator().manual_seed(0)
    per_rank_home = N_LOGICAL // N_RANKS
    homes = torch.arange(N_LOGICAL).view(N_RANKS, per_rank_home)
    # one copy per rank of an expert homed on another rank
    other = (torch.arange(N_RANKS) + 1 + torch.randint(0, N_RANKS - 1, (N_RANKS,), generator=g)) % N_RANKS
    copies = homes[other, torch.randint(0, per_rank_home, (N_RANKS,), generator=g)]
    phy2log = torch.cat([homes, copies.unsqueeze(1)], dim=1).reshape(-1)
    placement = ExpertPlacement.from_phy2log(phy2log, N_RANKS, N_LOGICAL)
    assert placement.n_physical == N_PHYSICAL

    idx = torch.randint(0, N_LOGICAL, (N_TOKENS, TOPK), generator=g, dtype=torch.int64)
    idx[torch.rand(N_TOKENS, TOPK, generator=g) < 0.01] = -1
    flat = idx.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=N_LOGICAL).double()
    # global split: each copy of e gets a random share of c[e] (x 32 ranks' worth)
    w = torch.rand(N_PHYSICAL, generator=g, dtype=torch.float64)
    w_sum = torch.zeros(N_LOGICAL, dtype=torch.float64).index_add_(0, placement.phy2log, w)
    x = w / w_sum[placement.phy2log] * counts[placement.phy2log] * N_RANKS
    del flat, w, w_sum

    def call():
        cum = copy_fractions(x, placement.log2phy, placement.logcnt)
        return redirect(idx, cum, placement.log2phy)

    rss_before_kb = _status_kb("VmRSS")
    reset_ok = _reset_peak()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = call()
    first_s = time.perf_counter() - t0
    hwm_kb = _status_kb("VmHWM")
    maxrss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset_ok and hwm_kb is not None:
        peak_increase_kb = hwm_kb - rss_before_kb
        method = "VmHWM after clear_refs reset - VmRSS before"
    else:
        peak_increase_kb = maxrss_after_kb - (rss_before_kb or maxrss_before_kb)
        method = "ru_maxrss after - RSS before (upper bound)"
    out_bytes = out.numel() * out.element_size()
    del out

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    times.sort()

    live = idx >= 0
    ok = bool(torch.equal(placement.phy2log[call()[live]], idx[live]))
    peak_bytes = peak_increase_kb * 1024

    # the whole Planner path on the same batch: count + solve + redirect
    from lplb_plugin.planner import Planner

    planner = Planner.from_placement(placement)
    planner.run(idx[:1000])  # warm-up: graph caches, lazy imports
    rss_before_run_kb = _status_kb("VmRSS")
    run_reset_ok = _reset_peak()
    t0 = time.perf_counter()
    phys = planner.run(idx)
    run_s = time.perf_counter() - t0
    run_hwm_kb = _status_kb("VmHWM")
    run_peak_kb = (run_hwm_kb - rss_before_run_kb) if (run_reset_ok and run_hwm_kb) else None
    run_ok = bool(torch.equal(placement.phy2log[phys[live]], idx[live]))
    print(json.dumps({
        "benchmark": "redirect_memory",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tokens": N_TOKENS,
        "topk": TOPK,
        "entries": N_TOKENS * TOPK,
        "dtype": "int64",
        "n_logical": N_LOGICAL,
        "n_physical": N_PHYSICAL,
        "n_ranks": N_RANKS,
        "max_copies": int(placement.log2phy.shape[1]),
        "input_bytes": idx.numel() * idx.element_size(),
        "output_bytes": out_bytes,
        "wall_s_first": round(first_s, 4),
        "wall_s_median_of_3": round(times[1], 4),
        "rss_before_mb": round(rss_before_kb / 1024, 1) if rss_before_kb else None,
        "peak_rss_increase_mb": round(peak_bytes / 1024**2, 1),
        "peak_rss_increase_bytes_per_entry": round(peak_bytes / (N_TOKENS * TOPK), 2),
        "peak_method": method,
        "target_mb": TARGET_BYTES // 1024**2,
        "within_target": peak_bytes <= TARGET_BYTES,
        "maps_to_own_expert": ok,
        "planner_run_wall_s": round(run_s, 4),
        "planner_run_peak_rss_increase_mb": round(run_peak_kb / 1024, 1) if run_peak_kb is not None else None,
        "planner_run_within_target": run_peak_kb is not None and run_peak_kb * 1024 <= TARGET_BYTES,
        "planner_run_maps_to_own_expert": run_ok,
    }))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child"],
        cwd=os.getcwd(), capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        sys.exit(proc.returncode)
    sys.stdout.write(proc.stdout.strip().splitlines()[-1] + "\n")


if __name__ == "__main__":
    main()
