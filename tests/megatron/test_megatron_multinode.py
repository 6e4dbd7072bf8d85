"""The tiny Megatron GPT-MoE job with LPLB on, launched as two torchrun "nodes" on this
machine (``--nnodes 2 --node_rank 0|1``, localhost rendezvous, gloo): it trains exactly
like the single-node launch with the same world size, for replicas kept inside a node
and allowed across nodes."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

import dist_utils  # noqa: E402

SCRIPT = str(dist_utils.ROOT / "integration" / "megatron" / "pretrain_gpt_moe.py")
CONFIG = str(dist_utils.ROOT / "configs" / "megatron_tiny_moe.yaml")


def _launch(nnodes: int, node_rank: int, nproc: int, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
           SCRIPT, "--config", CONFIG, "--steps", "6", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    "placement",
    [
        ["--lplb-lp-scope", "node"],  # the YAML's ring of 2: groups fit a node of 2
        ["--lplb-lp-scope", "global", "--lplb-placement-policy", "eplb", "--lplb-placement-redundant-per-rank", "2"],
    ],
)
def test_two_node_launch_trains_like_one_node(placement):
    # EP = 4 ranks over 2 "nodes" of 2
    extra = ["--lplb-placement-num-nodes", "2", *placement]
    single = _lines(_launch(1, 0, 4, dist_utils.free_port(), extra))
    port = dist_utils.free_port()
    procs = [_launch(2, n, 2, port, extra) for n in (0, 1)]
    node0 = _lines(procs[0])  # rank 0 lives on node 0 and prints the log
    assert _lines(procs[1]) == []
    assert [ln["step"] for ln in node0] == [ln["step"] for ln in single] == [5, 6]
    for a, b in zip(node0, single):
        # same batches, same placement, same split on every rank: the same training
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-6)
        assert a["lplb/all/max_over_mean_after"] == pytest.approx(b["lplb/all/max_over_mean_after"], abs=1e-9)
        assert a["lplb/all/max_over_mean_after"] <= a["lplb/all/max_over_mean_before"] + 1e-9
