"""Vectorised EPLB-style placement vs a per-layer Python loop, DeepSeek-V3 scale.

Run from the repository root:  python benchmarks/bench_placement.py
Prints one JSON object.  Both implementations get the same loads (58 MoE layers x 256
experts of a measured DeepSeek-V3 profile when one is found, else seeded random loads),
288 slots, 8 groups, 4 nodes, 32 GPUs; they are timed alternately and the median of
each is reported.  The outputs are checked to be identical before timing.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from eplb_loop_reference import rebalance_experts_loop  # noqa: E402

from lplb_plugin.placement import rebalance_experts  # noqa: E402

LAYERS, EXPERTS, REPLICAS, GROUPS, NODES, GPUS = 58, 256, 288, 8, 4, 32
# Measured token counts per expert (61 rows; rows 0-2 are dense layers, all zero).
PROFILE_CANDIDATES = [
    ROOT / "lplb_plugin" / "data" / "deepseek_v3_prefill_in4096.json",
    Path("/work/shared/data/deepseek-v3-expert-load/prefill_in4096.json"),
]
VECTORISED_RUNS, LOOP_RUNS = 21, 7


def load_weights() -> tuple[torch.Tensor, str]:
    """``[58, 256]`` loads and a label saying where they came from."""
    for path in PROFILE_CANDIDATES:
        if path.is_file():
            with open(path) as f:
                counts = json.load(f)["logical_count"]
            return torch.tensor(counts[3 : 3 + LAYERS], dtype=torch.float64), path.name
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.lognormal(0.0, 1.0, size=(LAYERS, EXPERTS)) * 1e4), "random(seed=0)"


def time_once(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    weight, source = load_weights()
    args = (weight, REPLICAS, GROUPS, NODES, GPUS)
    fast, slow = rebalance_experts(*args), rebalance_experts_loop(*args)
    identical = all(torch.equal(a, b) for a, b in zip(fast, slow))

    fast_ms, loop_ms = [], []
    for i in range(max(VECTORISED_RUNS, LOOP_RUNS)):
        if i < VECTORISED_RUNS:
            fast_ms.append(time_once(rebalance_experts, *args))
        if i < LOOP_RUNS:
            loop_ms.append(time_once(rebalance_experts_loop, *args))
    vectorised, loop = statistics.median(fast_ms), statistics.median(loop_ms)
    print(json.dumps({
        "benchmark": "placement",
        "weights": source,
        "layers": LAYERS,
        "experts": EXPERTS,
        "num_replicas": REPLICAS,
        "num_groups": GROUPS,
        "num_nodes": NODES,
        "num_gpus": GPUS,
        "torch_threads": torch.get_num_threads(),
        "vectorised_ms": round(vectorised, 3),
        "loop_ms": round(loop, 3),
        "speedup": round(loop / vectorised, 1),
        "runs": {"vectorised": VECTORISED_RUNS, "loop": LOOP_RUNS},
        "outputs_identical": identical,
    }))


if __name__ == "__main__":
    main()
