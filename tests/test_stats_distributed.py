"""Token statistics across real multi-process EP groups (gloo on CPU; NCCL and
NVSHMEM on GPUs when present): global counts, identical splits, errors."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers as W

N_LOGICAL = 32


def topology_config(world):
    shape = {2: [2], 4: [4]}[world]
    return {"placement": {"topology": "ring", "topology_shape": shape, "redundant_per_rank": 2}}


def eplb_config(world):
    return {"placement": {"policy": "eplb", "redundant_per_rank": 3}}


def spawn(fn, world, *args):
    mp.start_processes(fn, args=(world, W.free_port(), *args), nprocs=world, start_method="spawn", join=True)


def run_split(tmp_path, world, backend, scenario, config, seed=0, extra=None):
    cfg = dict(config)
    if extra:
        cfg.update(extra)
    spawn(W.split_worker, world, backend, str(tmp_path), scenario, cfg, seed, N_LOGICAL)
    errors = [p.read_text() for p in tmp_path.glob("rank*.err")]
    assert not errors, errors[0]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def check_results(results, world, scenario, seed=0):
    idx = [W.rank_idx(seed, r, world, scenario, N_LOGICAL) for r in range(world)]
    expected = torch.zeros(N_LOGICAL, dtype=torch.int64)
    for t in idx:
        t = t.reshape(-1).long()
        expected += torch.bincount(t[t >= 0], minlength=N_LOGICAL)
    x0 = results[0]["x"]
    received = torch.zeros(results[0]["phy2log"].numel(), dtype=torch.int64)
    for r, res in enumerate(results):
        # exact global counts, int32, on every rank
        assert res["global_counts"].dtype == torch.int32
        assert torch.equal(res["global_counts"].long(), expected)
        # bitwise-identical split on every rank
        assert res["x"].numpy().tobytes() == x0.numpy().tobytes()
        assert res["optimal"]
        # tokens go to a copy of their own expert; -1 stays; run() agrees
        phys, t = res["phys"], idx[r]
        assert phys.shape == t.shape and phys.dtype == t.dtype
        assert torch.equal(phys < 0, t < 0)
        live = t >= 0
        assert torch.equal(res["phy2log"][phys[live].long()], t[live].long())
        assert torch.equal(res["phys_run"], phys)
        received += torch.bincount(phys[live].long(), minlength=received.numel())
    # summed over ranks, each slot receives its planned share within one token per rank
    assert int(received.sum()) == int(expected.sum())
    assert float((received.double() - x0).abs().max()) < world


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", ["uniform", "skewed", "empty", "dropped"])
def test_gloo_counts_and_identical_splits(tmp_path, world, scenario):
    config = topology_config(world) if scenario != "skewed" else eplb_config(world)
    results = run_split(tmp_path, world, "gloo", scenario, config)
    assert results[0]["reducer"] == "torch"
    check_results(results, world, scenario)


def test_mismatched_configs_fail_clearly_on_every_rank(tmp_path):
    configs = [topology_config(2), {"placement": {"topology": "ring", "topology_shape": [2], "redundant_per_rank": 4}}]
    spawn(W.mismatch_worker, 2, str(tmp_path), configs, [N_LOGICAL, N_LOGICAL])
    for r in range(2):
        msg = (tmp_path / f"rank{r}.msg").read_text()
        assert msg.startswith("LPLBConfigError"), msg
        assert "configured differently" in msg and "n_physical differs" in msg
        assert "rank 0: 36" in msg and "rank 1: 40" in msg


def test_mismatched_expert_counts_fail_instead_of_hanging(tmp_path):
    configs = [topology_config(2), topology_config(2)]
    spawn(W.mismatch_worker, 2, str(tmp_path), configs, [N_LOGICAL, 2 * N_LOGICAL])
    for r in range(2):
        msg = (tmp_path / f"rank{r}.msg").read_text()
        assert "n_logical differs across EP ranks" in msg, msg


def test_absent_rank_is_reported_within_the_timeout(tmp_path):
    spawn(W.absent_rank_worker, 2, str(tmp_path), 3.0)
    msg = (tmp_path / "rank0.msg").read_text()
    assert msg.startswith("LPLBConfigError after"), msg
    assert "not every EP rank reached the configuration check within 3 s" in msg
    assert float(msg.split("after ")[1].split("s:")[0]) < 20


def _gpus(n):
    return torch.cuda.is_available() and torch.cuda.device_count() >= n


@pytest.mark.skipif(not _gpus(2), reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("scenario", ["uniform", "skewed", "empty", "dropped"])
def test_nccl_counts_and_identical_splits(tmp_path, scenario):
    config = topology_config(2) if scenario != "skewed" else eplb_config(2)
    results = run_split(tmp_path, 2, "nccl", scenario, config)
    assert results[0]["reducer"] == "torch"
    check_results(results, 2, scenario)


def _has_nvshmem():
    try:
        import nvshmem.core  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not (_gpus(2) and _has_nvshmem()), reason="needs 2 CUDA GPUs and nvshmem4py")
@pytest.mark.parametrize("scenario", ["uniform", "dropped"])
def test_nvshmem_counts_and_identical_splits(tmp_path, scenario):
    results = run_split(tmp_path, 2, "nccl", scenario, topology_config(2), extra={"stats": {"comm": "nvshmem"}})
    assert results[0]["reducer"] == "nvshmem"
    check_results(results, 2, scenario)
