"""Megatron adapter configuration: ``--lplb-*`` flags and the YAML ``lplb:`` block,
rejected Megatron settings, the spec swap, and the torch state-dict format at EP=1."""

from __future__ import annotations

import argparse
import copy
import functools

import pytest

pytest.importorskip("megatron.core")

import dist_utils  # noqa: E402

from integration.megatron import cpu_shims  # noqa: E402

cpu_shims.apply()

from lplb_plugin import LPLBConfig  # noqa: E402
from lplb_plugin.errors import LPLBConfigError  # noqa: E402
from lplb_plugin.megatron import add_lplb_args, check_megatron_settings, lplb_config_from_args, with_lplb  # noqa: E402
from lplb_plugin.megatron.args import lplb_flags  # noqa: E402


def _parse(argv):
    return add_lplb_args(argparse.ArgumentParser()).parse_args(argv)


def test_flags_cover_every_config_key():
    flags = {f for f, _, _ in lplb_flags()}
    expected = set()
    for key in LPLBConfig().to_dict():
        value = LPLBConfig().to_dict()[key]
        if isinstance(value, dict):
            expected |= {f"--lplb-{key}-{k}".replace("_", "-") for k in value}
        else:
            expected.add(f"--lplb-{key}".replace("_", "-"))
    assert flags == expected


def test_yaml_block_with_cli_overrides():
    block = {"solver": "exact", "placement": {"policy": "topology", "topology": "cube"}}
    args = _parse(["--lplb-solver", "ipm", "--lplb-placement-topology", "ring",
                   "--lplb-placement-topology-shape", "4", "--lplb-placement-redundant-per-rank", "1",
                   "--lplb-ipm-tol", "1e-7", "--lplb-enabled", "true"])
    cfg = lplb_config_from_args(args, block)
    assert cfg.solver == "ipm" and cfg.placement.topology == "ring"
    assert cfg.placement.topology_shape == (4,) and cfg.placement.redundant_per_rank == 1
    assert cfg.ipm.tol == 1e-7 and cfg.enabled
    assert block == {"solver": "exact", "placement": {"policy": "topology", "topology": "cube"}}  # not mutated
    assert lplb_config_from_args(_parse([]), block).solver == "exact"
    assert lplb_config_from_args(_parse([]), None) is None
    assert lplb_config_from_args(_parse(["--lplb-enabled", "false"]), None).enabled is False


def test_cli_errors_name_the_key(tmp_path):
    with pytest.raises(LPLBConfigError, match=r"lplb\.placement\.topology"):
        lplb_config_from_args(_parse(["--lplb-placement-topology", "donut"]), None)
    with pytest.raises(SystemExit):
        _parse(["--lplb-enabled", "maybe"])
    path = tmp_path / "run.yaml"
    path.write_text("model: {num_layers: 2}\nlplb:\n  solver: exact\n")
    cfg = lplb_config_from_args(_parse(["--lplb-config", str(path), "--lplb-solver", "ipm"]))
    assert cfg.solver == "ipm"


def _config(**kw):
    import mcore_utils as mu

    return mu.moe_config(**kw)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor"),
        ({"moe_pad_expert_input_to_capacity": True}, "moe_pad_expert_input_to_capacity"),
        ({"moe_token_dispatcher_type": "nccl_ep"}, "moe_token_dispatcher_type"),
        ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "group-limited"),
        ({"cuda_graph_impl": "transformer_engine", "cuda_graph_modules": ["moe_router"]}, "CUDA graphs"),
        ({"cuda_graph_impl": "local", "cuda_graph_modules": []}, "CUDA graphs"),
    ],
)
def test_rejected_megatron_settings(change, needle):
    cfg = copy.copy(_config())
    check_megatron_settings(cfg)  # the base config is fine
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(LPLBConfigError, match=needle):
        check_megatron_settings(cfg)


def test_cuda_graphs_outside_the_router_are_allowed():
    cfg = copy.copy(_config())
    cfg.cuda_graph_impl, cfg.cuda_graph_modules = "transformer_engine", ["attn"]
    check_megatron_settings(cfg)


def _spec_swap(rank, ws):
    import mcore_utils as mu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from lplb_plugin.megatron import LPLBMoELayer

    mu.init_parallel(1)
    cfg = _config(num_layers=3, mtp_num_layers=1)
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    mtp = get_gpt_mtp_block_spec(cfg, block, use_transformer_engine=False)
    lcfg = LPLBConfig()

    def builders(spec):
        found = []

        def walk(o, seen):
            if id(o) in seen:
                return
            seen.add(id(o))
            if isinstance(o, functools.partial):
                found.append(o.func)
            elif hasattr(o, "module") and hasattr(o, "submodules"):  # ModuleSpec
                found.append(o.module)
                walk(o.submodules, seen)
            elif isinstance(o, (list, tuple)):
                for x in o:
                    walk(x, seen)
            elif hasattr(o, "__dataclass_fields__"):
                for name in o.__dataclass_fields__:
                    walk(getattr(o, name), seen)

        walk(spec, set())
        return found

    out = {}
    for name, spec in (("block", block), ("mtp", mtp)):
        swapped = with_lplb(spec, lcfg)
        before, after = builders(spec), builders(swapped)
        out[name] = (before.count(MoELayer), after.count(MoELayer), after.count(LPLBMoELayer),
                     builders(spec).count(MoELayer))
    out["disabled_is_same"] = with_lplb(block, LPLBConfig(enabled=False)) is block
    dense = get_gpt_decoder_block_spec(
        _config(num_moe_experts=None, moe_ffn_hidden_size=None, moe_aux_loss_coeff=0.0), use_transformer_engine=False
    )
    try:
        with_lplb(dense, lcfg)
        out["dense_error"] = None
    except LPLBConfigError as e:
        out["dense_error"] = str(e)
    return out


def test_spec_swap_covers_block_and_mtp():
    (r,) = dist_utils.run(_spec_swap, 1)
    for name in ("block", "mtp"):
        n_moe, left, swapped, still = r[name]
        assert n_moe >= 1 and left == 0 and swapped >= 1 and still == n_moe, (name, r)
    assert r["disabled_is_same"]
    assert r["dense_error"] and "no MoELayer" in r["dense_error"]


def _torch_state_dict_ep1(rank, ws):
    import torch
    import mcore_utils as mu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    mu.init_parallel(1)
    cfg = mu.moe_config()
    builder = get_gpt_layer_local_spec(num_experts=8).submodules.mlp
    lcfg = LPLBConfig.from_dict({"placement": {"policy": "eplb", "redundant_per_rank": 3}})
    lplb = with_lplb(builder, lcfg)(config=cfg)
    sd = lplb.state_dict()
    expert_keys = sorted({k.split(".")[2] for k in sd if k.startswith("experts.local_experts.")}, key=int)
    plain = builder(config=cfg)
    plain.load_state_dict(sd, strict=True)  # LPLB -> plain
    x = torch.randn(12, 2, 16)
    same = float((plain(x)[0] - lplb(x)[0]).abs().max())
    other = builder(config=cfg)  # plain -> LPLB
    with torch.no_grad():
        for p in lplb.parameters():
            p.normal_()
    lplb.load_state_dict(other.state_dict(), strict=True)
    back = float((other(x)[0] - lplb(x)[0]).abs().max())
    return {"expert_keys": expert_keys, "same": same, "back": back, "diff": lplb.replica_max_abs_diff(),
            "n_slots": len(lplb.experts.local_experts)}


def test_torch_state_dict_ep1():
    (r,) = dist_utils.run(_torch_state_dict_ep1, 1)
    assert r["n_slots"] == 11
    assert r["expert_keys"] == [str(e) for e in range(8)], r
    assert r["same"] <= 1e-6 and r["back"] <= 1e-6 and r["diff"] == 0.0, r


def _overlap_rejected(rank, ws):
    import torch

    import test_megatron_training as tt
    from lplb_plugin.errors import LPLBConfigError

    pg, model, train, _ = tt._setup(ws)
    lplb = LPLBConfig.from_dict({"placement": {"policy": "eplb", "redundant_per_rank": 1}})
    ddp, opt, config = pg.build(model, train, lplb, ws, overlap_grad_reduce=True, use_distributed_optimizer=True)
    try:
        pg.train_step(ddp, opt, config, pg.batch(1, 0, train, torch.device("cpu")))
    except LPLBConfigError as e:
        return str(e)
    return None


def test_overlap_grad_reduce_with_distributed_optimizer_is_rejected():
    (msg,) = dist_utils.run(_overlap_rejected, 1)
    assert msg and "overlap_grad_reduce=True with use_distributed_optimizer=True" in msg
