"""The tiny DeepSpeed MoE job with LPLB on, launched as two torchrun "nodes" on this
machine (``--nnodes 2 --node_rank 0|1``, localhost rendezvous, gloo): it trains exactly
like the single-node launch with the same world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

from ds_harness import EXT_DIR, REPO, _free_port  # noqa: E402

SCRIPT = str(REPO / "integration" / "deepspeed" / "train_tiny_moe.py")


def _launch(cwd, config, nnodes, node_rank, nproc, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
           SCRIPT, "--config", str(config), "--steps", "4"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return [json.loads(x) for x in out.splitlines() if x.startswith("{") and '"step"' in x]


@pytest.mark.parametrize(
    "lplb",
    [
        {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [2], "redundant_per_rank": 2,
                       "num_nodes": 2}, "lp": {"scope": "node"}},
        {"placement": {"policy": "eplb", "redundant_per_rank": 2, "num_nodes": 2}, "lp": {"scope": "global"}},
    ],
)
def test_two_node_launch_trains_like_one_node(tmp_path, lplb):
    base = json.loads((REPO / "configs" / "deepspeed_tiny_moe.json").read_text())
    base["lplb"] = lplb
    base["gradient_clipping"] = 0.0  # EPLB placements: see docs/deepspeed.md on clipping
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(base))
    (tmp_path / "single").mkdir()
    (tmp_path / "multi").mkdir()
    single = _steps(_launch(tmp_path / "single", config, 1, 0, 4, _free_port()))
    port = _free_port()
    procs = [_launch(tmp_path / "multi", config, 2, n, 2, port) for n in (0, 1)]
    multi = _steps(procs[0])
    assert _steps(procs[1]) == []  # rank 0 (node 0) prints
    assert [x["step"] for x in multi] == [x["step"] for x in single] == [0, 1, 2, 3]
    for a, b in zip(multi, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-6)
        assert a["max_over_mean_lplb"] == pytest.approx(b["max_over_mean_lplb"], abs=1e-9)
