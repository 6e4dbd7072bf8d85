"""Token statistics, single process: sources, reducers, DeepEP detection, errors."""

import pytest
import torch

from lplb_plugin import LPLBConfig, Planner
from lplb_plugin.errors import LPLBConfigError, LPLBInputError
from lplb_plugin.stats import (
    NoReduce,
    RecvStatsDelta,
    RouterSource,
    TokenStats,
    config_fingerprint,
    detect_deep_ep,
    make_reducer,
)


def test_router_source_counts_and_skips_dropped():
    idx = torch.tensor([[0, 3], [-1, 3], [2, -1]], dtype=torch.int32)
    counts = RouterSource(4).counts(idx)
    assert counts.dtype == torch.int32 and counts.tolist() == [1, 0, 1, 2]


def test_group_of_one_needs_no_communication():
    stats = TokenStats(4)
    assert isinstance(stats.reducer, NoReduce)
    c = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    assert stats.reduce(c) is c
    assert isinstance(make_reducer("nvshmem", None, 4), NoReduce)  # no group: nothing to sum


def test_make_reducer_rejects_unknown_comm():
    with pytest.raises(LPLBConfigError, match="lplb.stats.comm: expected one of"):
        make_reducer("mpi", None, 4)


def test_deep_ep_detection_never_raises():
    info = detect_deep_ep()
    assert info.available in (True, False)
    if not info.available:
        assert info.reason


@pytest.mark.skipif(detect_deep_ep().available, reason="DeepEP installed: the absent path is not reachable")
def test_init_from_deep_ep_without_deep_ep_is_a_clear_error():
    planner = Planner.from_config(LPLBConfig.from_dict({}), 64, ep_size=8)
    with pytest.raises(LPLBConfigError, match="is not a DeepEP buffer.*lplb.stats.source='router'"):
        planner.init_from_deep_ep(object())
    # the planner still works on the router path
    out = planner.run(torch.randint(0, 64, (16, 2)))
    assert out.shape == (16, 2)


def test_router_source_config_ignores_the_buffer():
    cfg = LPLBConfig.from_dict({"stats": {"source": "router"}})
    planner = Planner.from_config(cfg, 64, ep_size=8)
    assert "not used for counts" in planner.init_from_deep_ep(object())


def test_deepep_source_without_buffer_is_a_clear_error():
    cfg = LPLBConfig.from_dict({"stats": {"source": "deepep"}})
    planner = Planner.from_config(cfg, 64, ep_size=8)
    with pytest.raises(LPLBConfigError, match=r"needs a DeepEP buffer: call Planner.init_from_deep_ep"):
        planner.run(torch.randint(0, 64, (16, 2)))


def test_recv_stats_delta_folds_copies_per_step():
    phy2log = torch.tensor([0, 1, 2, 0])  # expert 0 has two slots
    counter = torch.zeros(4, dtype=torch.int32)
    delta = RecvStatsDelta(counter, phy2log)
    counter += torch.tensor([5, 1, 0, 2], dtype=torch.int32)  # what DeepEP accumulates
    assert delta.step().tolist() == [7, 1, 0]
    counter += torch.tensor([1, 0, 4, 0], dtype=torch.int32)
    assert delta.step().tolist() == [1, 0, 4]
    with pytest.raises(LPLBInputError, match="recv_stats must be 1-D with P / ep_size = 4"):
        RecvStatsDelta(torch.zeros(3, dtype=torch.int32), phy2log)


def test_fingerprint_hashes_tensors():
    a = config_fingerprint(n=3, phy2log=torch.arange(8))
    b = config_fingerprint(n=3, phy2log=torch.arange(8))
    c = config_fingerprint(n=3, phy2log=torch.arange(8).flip(0))
    assert a == b and a != c and isinstance(a["phy2log"], str)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nvshmem_without_gpu_is_a_clear_error():
    import datetime

    import torch.distributed as dist

    from dist_workers import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        group = dist.new_group([0])
        # a group of one never communicates; the GPU check applies from two ranks up
        assert isinstance(make_reducer("nvshmem", group, 4), NoReduce)
        from lplb_plugin.stats import NvshmemReducer

        with pytest.raises(LPLBConfigError, match="needs a CUDA GPU"):
            NvshmemReducer(group, 4)
    finally:
        dist.destroy_process_group()
