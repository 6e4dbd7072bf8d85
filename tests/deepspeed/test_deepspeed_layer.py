"""LPLB MoE layer vs DeepSpeed's plain MoE layer: same outputs, aux loss, input and gate
gradients, and each logical expert's gradient equals the (summed) gradient of each of
its copies.  Real deepspeed 0.19.8, real gloo process groups (ws=1, ws=2 / ep=2),
k = 1, 2, 3, dropless."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
from ds_harness import run_workers  # noqa: E402

N_EXPERTS = 4
RING2 = {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [2], "redundant_per_rank": 1}}
EPLB1 = {"placement": {"policy": "eplb", "redundant_per_rank": 1}, "solver": "exact"}
EPLB2 = {"placement": {"policy": "eplb", "redundant_per_rank": 2}}
IPM1 = {"placement": {"policy": "eplb", "redundant_per_rank": 1}, "solver": "ipm"}


def _run_layer(m, rank, routes, mask_tokens=False):
    from ds_models import HIDDEN

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 16, HIDDEN, generator=g).requires_grad_()
    w = torch.randn(3, 16, HIDDEN, generator=g)
    # int64: DeepSpeed's dropless top-1 turns a float mask into a float top-k size and fails
    used = (torch.rand(48, generator=g) > 0.25).long() if mask_tokens else None
    torch.manual_seed(55)  # DeepSpeed's gate noise (Jitter, RSample, RTS, top-2 sampling) draws from it
    out, l_aux, counts = m(x, used)
    (out * w).sum().add(3.0 * l_aux).backward()
    return {"out": out.detach(), "l_aux": l_aux.detach(), "counts": counts.clone(), "x_grad": x.grad,
            "wg_grad": m.deepspeed_moe.gate.wg.weight.grad.clone(), "routes": routes}


def _layer_worker(rank, world_size, ep, k, block, options=None):
    from ds_models import make_moe

    from lplb_plugin import LPLBConfig
    from lplb_plugin.deepspeed import LPLBMoE

    ep_rank = rank % ep
    options = dict(options or {})
    mask_tokens = options.pop("mask_tokens", False)
    plain = make_moe(N_EXPERTS, ep, k, ep_rank, **options)
    lplb = LPLBMoE.from_moe(copy.deepcopy(plain), LPLBConfig.from_dict(block))
    plain.set_deepspeed_parallelism()
    lplb.set_deepspeed_parallelism()

    routes = []
    lplb.deepspeed_moe.gate.register_forward_hook(lambda mod, inp, out: routes.append(out[3].clone()))
    res_plain = _run_layer(plain, rank, None, mask_tokens)
    res_lplb = _run_layer(lplb, rank, routes, mask_tokens)
    nl = plain.num_local_experts
    res_plain["expert_grads"] = {
        ep_rank * nl + j: [p.grad.clone() for p in e.parameters()]
        for j, e in enumerate(plain.deepspeed_moe.experts.deepspeed_experts)
    }
    slot_expert = lplb.lplb_experts.slot_expert
    res_lplb["slot_grads"] = [
        (int(slot_expert[s]), [p.grad.clone() for p in e.parameters()])
        for s, e in enumerate(lplb.deepspeed_moe.experts.deepspeed_experts)
    ]
    res_lplb["log2phy"] = lplb.placement.log2phy
    res_lplb["identical"] = lplb.lplb_experts.replicas_identical()
    return res_plain, res_lplb


def _check(results):
    expert_grads = {}
    for res_plain, _ in results:
        expert_grads.update(res_plain["expert_grads"])
    assert sorted(expert_grads) == list(range(N_EXPERTS))
    moved = 0
    for res_plain, res_lplb in results:
        for key in ("out", "l_aux", "x_grad", "wg_grad"):
            torch.testing.assert_close(res_lplb[key], res_plain[key], rtol=1e-5, atol=1e-5, msg=key)
        assert torch.equal(res_lplb["counts"], res_plain["counts"])  # logical exp_counts
        for e, grads in res_lplb["slot_grads"]:
            for got, want in zip(grads, expert_grads[e]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert res_lplb["identical"]
        log2phy = res_lplb["log2phy"]
        (routes,) = res_lplb["routes"]
        homes = set(log2phy[:, 0].tolist())
        moved += sum(int((routes == s).sum()) for s in range(log2phy.max() + 1) if s not in homes)
    # the test means something only if the LP sent tokens to replicas
    assert moved > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_layer_parity_ws1(k):
    _check(run_workers(_layer_worker, 1, 1, k, EPLB2))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("block", [RING2, EPLB1], ids=["ring2", "eplb"])
def test_layer_parity_ws2_ep2(k, block):
    _check(run_workers(_layer_worker, 2, 2, k, block))


@pytest.mark.parametrize("options", [
    {"noisy_gate_policy": "Jitter", "use_rts": True},
    {"noisy_gate_policy": "RSample", "mask_tokens": True},
], ids=["jitter-rts", "rsample-used_token"])
def test_layer_parity_top1_noise_policies(options):
    _check(run_workers(_layer_worker, 2, 2, 1, RING2, options))


def test_layer_parity_ipm_solver():
    _check(run_workers(_layer_worker, 2, 2, 2, IPM1))


def _dense_worker(rank, world_size):
    from ds_models import HIDDEN, make_moe

    from lplb_plugin import LPLBConfig
    from lplb_plugin.deepspeed import LPLBMoE

    plain = make_moe(N_EXPERTS, 2, 2, rank)
    lplb = LPLBMoE.from_moe(copy.deepcopy(plain), LPLBConfig.from_dict(RING2))
    plain.set_deepspeed_parallelism()
    lplb.set_deepspeed_parallelism()
    x = torch.randn(48, HIDDEN, generator=torch.Generator().manual_seed(rank))
    torch.manual_seed(3)
    l_aux_p, combine_p, mask_p, counts_p = plain.deepspeed_moe.gate(x)
    torch.manual_seed(3)
    l_aux, combine, mask, counts = lplb.deepspeed_moe.gate(x)
    torch.manual_seed(3)
    sparse = lplb.deepspeed_moe.gate(x, None, True)
    return {"plain": (l_aux_p, combine_p, mask_p, counts_p), "lplb": (l_aux, combine, mask, counts),
            "sparse": sparse, "phy2log": lplb.placement.phy2log}


def test_dense_tuple_for_direct_callers():
    """gate(x) returns the dense 4-tuple over P physical experts: the same gate weight per
    (token, logical expert) as plain DeepSpeed's, one buffer slot per route, the same
    routes as the sparse form."""
    for res in run_workers(_dense_worker, 2):
        l_aux_p, combine_p, mask_p, counts_p = res["plain"]
        l_aux, combine, mask, counts = res["lplb"]
        l_aux_s, capacity, n_phys, idx, loc, gates, counts_s = res["sparse"]
        phy2log = res["phy2log"]
        assert n_phys == 6 and combine.shape == (48, 6, int(capacity)) and torch.equal(mask, combine.bool())
        torch.testing.assert_close(l_aux, l_aux_p)
        assert torch.equal(counts, counts_p)
        per_logical = torch.zeros(48, N_EXPERTS).index_add_(1, phy2log, combine.sum(2))
        torch.testing.assert_close(per_logical, combine_p.sum(2))
        assert int(mask.sum()) == int(mask_p.sum()) == 2 * 48
        # the dense form holds exactly the sparse routes
        rebuilt = torch.zeros_like(combine)
        for r in range(idx.shape[0]):
            rebuilt[torch.arange(48), idx[r].long(), loc[r].long()] += gates[r]
        torch.testing.assert_close(rebuilt, combine)
