"""Node awareness: lp.scope keeps replicas inside nodes; a job launched as two
torchrun "nodes" on this machine agrees with the single-node launch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_workers import free_port
from lplb_plugin import LPLBConfig
from lplb_plugin.data import load_profile
from lplb_plugin.errors import LPLBConfigError
from lplb_plugin.planner import placement_from_config
from lplb_plugin.report import ReportSpec, run_report, write_report

ROOT = Path(__file__).resolve().parent.parent
PROFILE = load_profile("prefill")


def nodes_of_copies(placement, n_nodes):
    per_node = placement.n_ranks // n_nodes
    node_of_slot = placement.slot_rank // per_node
    return [set(node_of_slot[placement.log2phy[e, : placement.logcnt[e]]].tolist()) for e in range(placement.n_logical)]


@pytest.mark.parametrize("groups", [8, 3])  # 3: routing groups that cannot be spread over nodes
@pytest.mark.parametrize("ep, nodes", [(16, 2), (32, 4), (64, 8)])
def test_node_scope_keeps_every_copy_in_one_node(ep, nodes, groups):
    cfg = LPLBConfig.from_dict(
        {"placement": {"policy": "eplb", "num_nodes": nodes, "num_groups": groups, "redundant_per_rank": 2}}
    )
    assert cfg.lp.scope == "node"
    n_logical = 256 if groups == 8 else 192  # 192 = 3 * 64: groups of 3 fit, nodes do not divide 3
    p = placement_from_config(cfg, n_logical, ep, PROFILE[9, :n_logical])
    assert all(len(s) == 1 for s in nodes_of_copies(p, nodes))
    assert int((p.logcnt > 1).sum()) > 0


def test_global_scope_crosses_nodes_and_balances_better():
    base = {"policy": "eplb", "num_nodes": 4, "num_groups": 8, "redundant_per_rank": 2}
    node = placement_from_config(LPLBConfig.from_dict({"placement": base}), 256, 32, PROFILE[20])
    glob = placement_from_config(LPLBConfig.from_dict({"placement": base, "lp": {"scope": "global"}}), 256, 32, PROFILE[20])
    assert any(len(s) > 1 for s in nodes_of_copies(glob, 4))

    def static_max(p):  # even split over copies, on the placement's own profile
        share = PROFILE[20][p.phy2log] / p.logcnt[p.phy2log]
        loads = share.view(32, -1).sum(1)
        return float(loads.max() / loads.mean())

    assert static_max(glob) <= static_max(node)


def test_topology_must_fit_a_node_under_node_scope():
    cfg = {"placement": {"topology": "torus", "topology_shape": [8, 4], "num_nodes": 4}}
    with pytest.raises(LPLBConfigError, match=r"groups 32 ranks, which must fit in a node of 8 ranks"):
        placement_from_config(LPLBConfig.from_dict(cfg), 256, 32)
    ok = placement_from_config(LPLBConfig.from_dict({**cfg, "lp": {"scope": "global"}}), 256, 32)
    assert ok.n_ranks == 32
    # cube groups of 8 fit nodes of 8
    placement_from_config(LPLBConfig.from_dict({"placement": {"topology": "cube", "num_nodes": 4}}), 256, 32)
    with pytest.raises(LPLBConfigError, match="ep_size=30 must be a multiple of it"):
        LPLBConfig.from_dict({"placement": {"policy": "eplb", "num_nodes": 4}}).validate_for(240, 30)


def _torchrun(args, env, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("scope", ["node", "global"])
def test_two_node_launch_agrees_with_single_node(tmp_path, scope):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    job = str(ROOT / "integration" / "multinode" / "planner_job.py")
    single, multi = tmp_path / "single", tmp_path / "multi"
    p = _torchrun(["--standalone", "--nnodes", "1", "--nproc_per_node", "4", job, "--out", str(single),
                   "--num-nodes", "2", "--scope", scope], env, ROOT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    port = str(free_port())
    procs = [
        _torchrun(["--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", port, job, "--out", str(multi), "--num-nodes", "2", "--scope", scope], env, ROOT)
        for n in (0, 1)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    ref = [torch.load(single / f"rank{r}.pt") for r in range(4)]
    got = [torch.load(multi / f"rank{r}.pt") for r in range(4)]
    assert [g["node_local_rank"] for g in got] == [0, 1, 0, 1]  # really two launches
    for r in range(4):
        assert torch.equal(got[r]["phy2log"], ref[0]["phy2log"])
        for step in range(len(ref[0]["x"])):
            # the same split on every rank, bitwise, and the same as the single-node run
            assert got[r]["x"][step].numpy().tobytes() == ref[0]["x"][step].numpy().tobytes()
            assert torch.equal(got[r]["phys"][step], ref[r]["phys"][step])
    if scope == "node":
        from lplb_plugin.layout import ExpertPlacement

        placement = ExpertPlacement.from_phy2log(ref[0]["phy2log"], 4)
        assert all(len(s) == 1 for s in nodes_of_copies(placement, 2))


def test_report_small_run_writes_files(tmp_path):
    spec = ReportSpec(ep_sizes=(16,), batches=2, tokens_per_rank=256)
    report = run_report(spec, progress=False)
    policies = {r["policy"] for r in report["results"]}
    assert policies == set(spec.policies)
    by = {(r["policy"], r["drift"]): r for r in report["results"]}
    # no drift, global replicas and an exact split: close to perfect balance
    assert by[("exact/global", False)]["max_over_mean"] < 1.05
    assert by[("exact/global", False)]["max_over_mean"] <= by[("eplb/global", False)]["max_over_mean"] + 1e-9
    assert by[("none", True)]["max_over_mean"] > by[("exact-cube/node", True)]["max_over_mean"]
    paths = write_report(report, tmp_path / "rep")
    assert [p.name for p in paths] == ["report.md", "report.json", "max_over_mean.png"]
    assert "| exact/global |" in paths[0].read_text()


def test_report_cli_errors(capsys):
    from lplb_plugin.cli import main

    assert main(["report", "--ep", "12", "--no-progress", "--out", "/tmp/unused-lplb-report"]) == 2
    assert "--ep 12: must be a multiple of --gpus-per-node=8" in capsys.readouterr().err
    assert main(["report", "--policies", "magic", "--no-progress", "--out", "/tmp/unused-lplb-report"]) == 2
    assert "unknown ['magic']" in capsys.readouterr().err
