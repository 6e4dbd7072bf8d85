"""The ds_config "lplb" block and the layer checks: clear errors, no process group
needed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402
from ds_models import HIDDEN, MLP  # noqa: E402

import lplb_plugin.deepspeed as lplb_ds  # noqa: E402
from lplb_plugin import LPLBConfig  # noqa: E402
from lplb_plugin.errors import LPLBConfigError, LPLBInputError  # noqa: E402

RING = {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [2], "redundant_per_rank": 1}}


class Net(torch.nn.Module):
    def __init__(self, **moe_kwargs):
        super().__init__()
        kwargs = dict(num_experts=4, ep_size=2, k=2, drop_tokens=False)
        kwargs.update(moe_kwargs)
        self.moe = MoE(HIDDEN, MLP(), **kwargs)


def ds(block, **extra):
    return {"train_micro_batch_size_per_gpu": 1, "lplb": block, **extra}


def test_block_read_from_dict_and_json_file(tmp_path):
    assert lplb_ds.lplb_config_from_ds_config({"train_batch_size": 8}) is None
    cfg = lplb_ds.lplb_config_from_ds_config(ds(RING))
    assert cfg.placement.topology == "ring" and cfg.placement.redundant_per_rank == 1
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds(RING)))
    assert lplb_ds.lplb_config_from_ds_config(str(path)) == cfg


def test_unknown_key_in_block_is_an_error():
    with pytest.raises(LPLBConfigError, match=r"lplb\.placment"):
        lplb_ds.lplb_config_from_ds_config(ds({"placment": {}}))
    with pytest.raises(LPLBConfigError, match=r"lplb\.placement\.topology"):
        lplb_ds.lplb_config_from_ds_config(ds({"placement": {"topology": "cubes"}}))


def test_deepep_count_source_rejected():
    with pytest.raises(LPLBConfigError, match=r"lplb\.stats\.source.*'deepep'"):
        lplb_ds.lplb_config_from_ds_config(ds({**RING, "stats": {"source": "deepep"}}))


def test_zero3_rejected():
    with pytest.raises(LPLBConfigError, match=r"zero_optimization\.stage.*got 3"):
        lplb_ds.lplb_config_from_ds_config(ds(RING, zero_optimization={"stage": 3}))
    # disabled block: nothing to reject
    assert not lplb_ds.lplb_config_from_ds_config(ds(False, zero_optimization={"stage": 3})).enabled


def test_apply_swaps_every_moe_and_keeps_logical_width():
    net = Net()
    gate_w = net.moe.deepspeed_moe.gate.wg.weight.detach().clone()
    layers = lplb_ds.apply(net, ds(RING))
    assert layers == [net.moe] and isinstance(net.moe, lplb_ds.LPLBMoE)
    assert isinstance(net.moe.deepspeed_moe.gate, lplb_ds.LPLBTopKGate)
    assert torch.equal(net.moe.deepspeed_moe.gate.wg.weight, gate_w)  # router stays logical
    assert net.moe.num_experts == 4 and net.moe.num_local_experts == 2  # checkpoint layout: logical
    assert net.moe.num_physical_experts == 6 and net.moe.deepspeed_moe.num_local_experts == 3
    assert len(net.moe.deepspeed_moe.experts.deepspeed_experts) == 3
    # before the EP group exists the state dict is the plain one, and no buffer or
    # parameter name outside the experts mentions "expert" (DeepSpeed treats those as weights)
    plain = Net().state_dict()
    assert net.state_dict().keys() == plain.keys()


def test_apply_disabled_or_absent_leaves_model_alone():
    net = Net()
    assert lplb_ds.apply(net, ds(False)) == []
    assert lplb_ds.apply(net, {"train_batch_size": 1}) == []
    assert type(net.moe) is MoE


def test_layer_errors_name_the_problem():
    with pytest.raises(LPLBConfigError, match="drop_tokens=True"):
        lplb_ds.apply(Net(drop_tokens=True), ds(RING))
    with pytest.raises(LPLBConfigError, match="expert tensor parallelism"):
        lplb_ds.apply(Net(enable_expert_tensor_parallelism=True), ds(RING))
    with pytest.raises(LPLBConfigError, match="no deepspeed.moe.layer.MoE"):
        lplb_ds.apply(torch.nn.Linear(2, 2), ds(RING))
    # the placement must fit the layer: cube groups 8 EP ranks
    with pytest.raises(LPLBConfigError, match=r"lplb\.placement\.topology='cube'.*ep_size=2"):
        lplb_ds.apply(Net(), ds({"placement": {"topology": "cube"}}))
    # a failed conversion leaves the layer a plain MoE
    net = Net(drop_tokens=True)
    with pytest.raises(LPLBConfigError):
        lplb_ds.apply(net, ds(RING))
    assert type(net.moe) is MoE


def test_optimizer_built_on_plain_experts_is_rejected():
    net = Net()
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(LPLBConfigError, match="optimizer: it was built on the plain MoE experts"):
        lplb_ds.initialize(model=net, config=ds(RING), optimizer=opt)
    # the block is also read from DeepSpeed's other config arguments
    net = Net()
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(LPLBConfigError, match="optimizer: it was built on the plain MoE experts"):
        lplb_ds.initialize(model=net, config_params=ds(RING), optimizer=opt)


def test_forward_before_ep_group_is_a_clear_error():
    net = Net()
    lplb_ds.apply(net, ds(RING))
    with pytest.raises(LPLBInputError, match="no planner yet"):
        net.moe(torch.randn(2, 4, HIDDEN))


def test_lplb_moe_constructor_needs_dropless():
    cfg = LPLBConfig.from_dict(RING)
    moe = lplb_ds.LPLBMoE(HIDDEN, MLP(), num_experts=4, ep_size=2, k=1, lplb=cfg)
    assert moe.num_physical_experts == 6
    with pytest.raises(LPLBConfigError, match="drop_tokens=True"):
        lplb_ds.LPLBMoE(HIDDEN, MLP(), num_experts=4, ep_size=2, drop_tokens=True, lplb=cfg)
