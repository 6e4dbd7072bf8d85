"""One Megatron MoE layer with LPLB vs the plain layer (real megatron-core 0.19.2, CPU,
gloo, EP=1 in one process and EP=2 in two).

With the LPLB layer's copies loaded from the plain layer's experts, the same gate and
the same tokens, the LPLB layer must give the plain layer's output, input gradient and
router gradient (fp32, 1e-5), and the gradients of an expert's copies must sum to the
plain expert's gradient.  Routing is skewed (a hot expert) so that copies really receive
tokens; the test checks that they did.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import dist_utils  # noqa: E402

TOL = 1e-5
EP1_CFG = {"placement": {"policy": "eplb", "redundant_per_rank": 2}}
EP2_CFG = {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [2], "redundant_per_rank": 1}}


def _build_pair(ws, dispatcher, lplb_dict, device="cpu", **cfg_kw):
    import torch
    import mcore_utils as mu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from lplb_plugin import LPLBConfig
    from lplb_plugin.megatron import with_lplb

    cfg = mu.moe_config(ep=ws, dispatcher=dispatcher)
    builder = get_gpt_layer_local_spec(num_experts=8).submodules.mlp
    torch.manual_seed(7)
    plain = builder(config=cfg)
    lplb_cfg = mu.moe_config(ep=ws, dispatcher=dispatcher, **cfg_kw)
    layer = with_lplb(builder, LPLBConfig.from_dict(lplb_dict))(config=lplb_cfg)
    plain.to(device)
    layer.to(device)
    with torch.no_grad():
        plain.router.weight[0] += 0.6  # hot expert 0 (inputs carry a +1 offset)
        layer.router.weight.copy_(plain.router.weight)
        # every copy of expert e gets plain expert e's weights (gathered over EP)
        n_local = len(plain.experts.local_experts)
        mine = {plain.local_expert_indices[i]: [p.detach().cpu().clone() for p in ex.parameters()]
                for i, ex in enumerate(plain.experts.local_experts)}
        experts = {}
        for d in mu.gather_objects(mine):
            experts.update(d)
        S = layer.placement.slots_per_rank
        for i, params in enumerate(layer.local_slot_params()):
            e = int(layer.placement.phy2log[layer.ep_rank * S + i])
            for p, src in zip(params, experts[e]):
                p.copy_(src)
    assert len(experts) == 8 and n_local == 8 // ws
    return plain, layer, experts


def _run(module, x, w):
    x = x.clone().requires_grad_(True)
    out, _ = module(x)
    (out * w).sum().backward()
    return out.detach(), x.grad


def _layer_parity(rank, ws, lplb_dict, device="cpu", dispatchers=("alltoall", "allgather")):
    import torch
    import mcore_utils as mu

    mu.init_parallel(ws)
    report = {}
    if device == "cuda":
        device = f"cuda:{rank}"
    for dispatcher in dispatchers:
        for recompute in (False, True):
            kw = dict(recompute_granularity="selective", recompute_modules=["moe"]) if recompute else {}
            plain, layer, experts = _build_pair(ws, dispatcher, lplb_dict, device, **kw)
            assert layer.moe_layer_recompute == recompute
            torch.manual_seed(100 + rank)
            x = (torch.randn(24, 2, 16) + 1.0).to(device)
            w = torch.randn(24, 2, 16).to(device)
            out_p, gx_p = _run(plain, x, w)
            out_l, gx_l = _run(layer, x, w)
            key = f"{dispatcher}{'+recompute' if recompute else ''}"
            r = report[key] = {}
            r["out"] = float((out_p - out_l).abs().max())
            r["x_grad"] = float((gx_p - gx_l).abs().max())
            r["router_grad"] = float((plain.router.weight.grad - layer.router.weight.grad).abs().max())
            r["router_grad_norm"] = float(plain.router.weight.grad.norm())
            # planned exactly once per micro-batch, also under recompute (replayed)
            r["batches"] = layer.balancer.stats.batches
            # replica gradient sums vs plain expert gradients
            S = layer.placement.slots_per_rank
            slot_grads = {layer.ep_rank * S + i: [p.grad.cpu().clone() for p in params]
                          for i, params in enumerate(layer.local_slot_params())}
            plain_grads = {plain.local_expert_indices[i]: [p.grad.cpu().clone() for p in ex.parameters()]
                           for i, ex in enumerate(plain.experts.local_experts)}
            all_slots, all_plain = {}, {}
            for d in mu.gather_objects(slot_grads):
                all_slots.update(d)
            for d in mu.gather_objects(plain_grads):
                all_plain.update(d)
            pl = layer.placement
            diff, copy_grad = 0.0, 0.0
            for e in range(pl.n_logical):
                slots = [int(s) for s in pl.log2phy[e] if s >= 0]
                for j in range(len(all_plain[e])):
                    total = sum(all_slots[s][j] for s in slots)
                    diff = max(diff, float((total - all_plain[e][j]).abs().max()))
                for s in slots[1:]:
                    copy_grad = max(copy_grad, float(all_slots[s][0].abs().max()))
            r["replica_grad_sum"] = diff
            r["max_nonhome_copy_grad"] = copy_grad
            r["n_physical"] = pl.n_physical
    return report


def check_reports(reports, n_physical=10):
    for rank, report in enumerate(reports):
        for case, r in report.items():
            where = f"rank {rank} {case}: {r}"
            assert r["n_physical"] == n_physical, where
            assert r["out"] <= TOL and r["x_grad"] <= TOL and r["router_grad"] <= TOL, where
            assert r["router_grad_norm"] > 0, where
            assert r["replica_grad_sum"] <= TOL, where
            # copies really took part: some non-home copy got tokens, hence a gradient
            assert r["max_nonhome_copy_grad"] > 0, where
            assert r["batches"] == 1, where


@pytest.mark.parametrize("ws,lplb_dict", [(1, EP1_CFG), (2, EP2_CFG)], ids=["ep1", "ep2"])
def test_layer_parity(ws, lplb_dict):
    check_reports(dist_utils.run(_layer_parity, ws, lplb_dict))
