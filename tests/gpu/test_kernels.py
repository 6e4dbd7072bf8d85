"""CUDA count and map kernels against the torch reference (skipped without CUDA)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lplb_plugin import kernels
from lplb_plugin.counting import count_tokens
from lplb_plugin.errors import LPLBInputError
from lplb_plugin.layout import ExpertPlacement
from lplb_plugin.redirect import copy_fractions, redirect

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ext():
    ext = kernels.get()
    assert ext is not None, "CUDA is available but the kernels did not build"
    return ext


def test_extension_check_raises_not_crashes():
    """A TORCH_CHECK failing inside the extension reaches Python as a RuntimeError with
    its message.  In a child process: an exception that does not cross the extension's
    boundary would end the process, and should fail this test, not the whole session.
    (Suspected on the device image in the sixth session of 2026-11-28: a check failing
    inside solve() ended Python with a segmentation fault.)"""
    _ext()  # build (or load) the extension here, so that the child finds it cached
    code = (
        "import torch\n"
        "from lplb_plugin import kernels\n"
        "idx = torch.zeros(16, dtype=torch.float32, device='cuda')\n"
        "try:\n"
        "    kernels.get().count(idx, 256, 4)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "idx must be int32 or int64" in r.stdout, (r.stdout, r.stderr[-3000:])


def random_case(gen, n_tokens, topk, n_logical, n_ranks, per_rank, dtype, drop=0.05, hot=None):
    n_phys = n_ranks * per_rank
    base = torch.randperm(n_logical, generator=gen)
    rest = torch.randint(0, n_logical, (n_phys - n_logical,), generator=gen)
    phy2log = torch.cat([base, rest])[torch.randperm(n_phys, generator=gen)]
    p = ExpertPlacement.from_phy2log(phy2log, n_ranks, n_logical)
    if hot is None:
        idx = torch.randint(0, n_logical, (n_tokens, topk), generator=gen)
    else:
        idx = torch.full((n_tokens, topk), hot, dtype=torch.int64)
    idx[torch.rand(n_tokens, topk, generator=gen) < drop] = -1
    x = torch.rand(n_phys, generator=gen, dtype=torch.float64) * 100
    x[torch.rand(n_phys, generator=gen) < 0.1] = 0.0
    cum = copy_fractions(x, p.log2phy, p.logcnt)
    return idx.to(dtype), p, cum


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "n_tokens, topk, n_logical, n_ranks, per_rank, chunks",
    [(4096, 8, 256, 32, 10, 132), (37, 3, 16, 4, 6, 7), (0, 8, 64, 8, 9, 16), (1, 1, 8, 2, 5, 132),
     (1 << 20, 8, 256, 32, 9, 132), (5000, 8, 4096, 64, 72, 64)],
)
def test_kernels_match_torch_reference(dtype, n_tokens, topk, n_logical, n_ranks, per_rank, chunks):
    gen = torch.Generator().manual_seed(n_tokens + n_logical)
    idx, p, cum = random_case(gen, n_tokens, topk, n_logical, n_ranks, per_rank, dtype)
    ext = _ext()
    d = idx.cuda()
    counts, prefix, invalid = ext.count(d, n_logical, chunks)
    assert int(invalid) == 0
    ref_counts, ref_prefix = count_tokens(idx, n_logical, chunks)
    assert torch.equal(counts.cpu(), ref_counts) and torch.equal(prefix.cpu(), ref_prefix)
    out = ext.map(d, prefix, counts, cum.cuda(), p.log2phy.cuda())
    ref = redirect(idx, cum, p.log2phy)
    assert out.dtype == dtype and out.shape == idx.shape
    assert torch.equal(out.cpu(), ref)
    # deterministic across runs
    assert torch.equal(ext.map(d, prefix, counts, cum.cuda(), p.log2phy.cuda()), out)


def test_all_tokens_on_one_expert():
    gen = torch.Generator().manual_seed(3)
    idx, p, cum = random_case(gen, 200_000, 4, 256, 32, 10, torch.int64, drop=0.0, hot=17)
    ext = _ext()
    counts, prefix, _ = ext.count(idx.cuda(), 256, 132)
    out = ext.map(idx.cuda(), prefix, counts, cum.cuda(), p.log2phy.cuda())
    assert torch.equal(out.cpu(), redirect(idx, cum, p.log2phy))


def test_cuda_graph_capture_replays_with_new_inputs():
    gen = torch.Generator().manual_seed(5)
    idx, p, cum = random_case(gen, 8192, 8, 256, 32, 10, torch.int64)
    ext = _ext()
    static_idx = idx.cuda()
    cum_d, l2p = cum.cuda(), p.log2phy.cuda()
    for _ in range(2):  # warm-up outside the graph
        c, pre, _ = ext.count(static_idx, 256, 132)
        ext.map(static_idx, pre, c, cum_d, l2p)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c, pre, _ = ext.count(static_idx, 256, 132)
        static_out = ext.map(static_idx, pre, c, cum_d, l2p)
    for seed in range(3):
        new = torch.randint(-1, 256, idx.shape, generator=torch.Generator().manual_seed(seed))
        static_idx.copy_(new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out.cpu(), redirect(new, cum, p.log2phy))


def test_planner_uses_kernels_and_matches_cpu():
    from lplb_plugin import Planner, topology

    planner = Planner(topology.cube(), 320, 256, ep_size=32)
    idx = torch.randint(-1, 256, (4096, 8), generator=torch.Generator().manual_seed(1))
    out = planner.run(idx.cuda())
    split = planner.check_last_run()
    # the GPU solve's shares equal the host solve's to float64 rounding; the rewrite is
    # the reference rewrite of those shares, bit for bit
    cpu_plan = planner.plan(planner.count_workload(idx)[0])
    assert torch.allclose(split.cum_frac.cpu(), cpu_plan.cum_frac, rtol=0, atol=1e-12)
    assert torch.equal(out.cpu(), redirect(idx, split.cum_frac.cpu(), planner.log2phy))
    c_gpu, by_sm = planner.count_workload(idx.cuda())
    c_cpu, _ = planner.count_workload(idx, by_sm.shape[0])
    assert torch.equal(c_gpu.cpu(), c_cpu)


def test_count_kernel_counts_invalid_ids():
    ext = _ext()
    idx = torch.tensor([[0, 5, -1], [7, 8, -2], [300, 2, 1]], dtype=torch.int64).cuda()
    counts, _, invalid = ext.count(idx, 8, 4)
    assert int(invalid) == 3  # 8, -2, 300
    assert counts.cpu().tolist() == [1, 1, 1, 0, 0, 1, 0, 1]


def test_count_kernel_adds_invalid_ids_to_running_total():
    ext = _ext()
    idx = torch.tensor([[0, 5, -1], [7, 8, -2], [300, 2, 1]], dtype=torch.int32).cuda()
    totals = torch.tensor([10, 4], dtype=torch.int64).cuda()
    for _ in range(2):
        _, _, invalid = ext.count(idx, 8, 2, totals)
        assert int(invalid) == 3
    assert totals.cpu().tolist() == [16, 4]  # only slot 0, once per call
    with pytest.raises(LPLBInputError, match="totals must be a contiguous int64 tensor"):
        kernels.count_tokens_checked(idx, 8, 2, totals.to(torch.int32))
    with pytest.raises(LPLBInputError, match="on cuda"):
        kernels.count_tokens_checked(idx, 8, 2, totals.cpu())
