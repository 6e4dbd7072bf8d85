"""The DeepSpeed engine with LPLB trains exactly like plain DeepSpeed MoE.

ws=4, ep=2 (two EP groups, expert-data-parallel size 2), ZeRO 0, 1 and 2, torch AdamW,
fp32, 10 steps, DeepSpeed's default gradient clipping (1.0): per-step losses equal the plain run's, every replica is bit-identical to
its home copy at the end, and the final logical expert weights match.  Also: an EPLB
placement with gradient accumulation (ZeRO 2).  A negative
control with the replica gradient sum switched off shows the check can fail.
"""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
from ds_harness import run_workers  # noqa: E402

N_EXPERTS = 4
STEPS = 10
OPT = lambda groups: torch.optim.AdamW(groups, lr=1e-2)
LPLB = {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [2], "redundant_per_rank": 1}}


EPLB = {"placement": {"policy": "eplb", "redundant_per_rank": 1}}


def _train(rank, stage, block, sum_grads=True, steps=STEPS, extra=None):
    from deepspeed.moe.utils import configure_moe_param_groups
    from ds_models import HIDDEN, TinyMoEModel

    import lplb_plugin.deepspeed as lplb_ds

    model = TinyMoEModel(N_EXPERTS, ep_size=2, k=2, ep_rank=rank % 2)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    config.update(extra or {})
    if block is not None:
        config["lplb"] = block
    engine, *_ = lplb_ds.initialize(
        model=model, config=config, model_parameters=model.parameters(),
        optimizer=lambda ps: OPT(configure_moe_param_groups(list(ps))))
    layers = lplb_ds.lplb_layers(engine.module)
    for layer in layers:
        layer.lplb_experts.sum_replica_grads = sum_grads
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(4, 8, HIDDEN, generator=g)
        y = torch.randn(4, 8, HIDDEN, generator=g)
        torch.manual_seed(step)  # top-2 gate noise
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    lplb_ds.prepare_save(engine.module)  # EPLB: fetch owned experts held on other ranks
    sd = {k: v.clone() for k, v in engine.module.state_dict().items() if "deepspeed_experts" in k}
    identical = [layer.lplb_experts.replicas_identical() for layer in layers]
    return {"losses": losses, "experts": sd, "identical": identical}


def _engine_worker(rank, world_size, stages, negative_stage):
    out = {}
    for stage in stages:
        out[stage] = {"plain": _train(rank, stage, None), "lplb": _train(rank, stage, LPLB)}
    # EPLB placement (replicas of other ranks' experts, no home on the owner rank),
    # gradient accumulation over 2 micro-batches, clipping off.
    extra = {"gradient_accumulation_steps": 2, "gradient_clipping": 0.0}
    out["eplb"] = {"plain": _train(rank, 2, None, extra=extra), "lplb": _train(rank, 2, EPLB, extra=extra)}
    out["negative"] = _train(rank, negative_stage, LPLB, sum_grads=False)
    return out


@pytest.fixture(scope="module")
def engine_runs():
    return run_workers(_engine_worker, 4, (0, 1, 2), 2)


@pytest.mark.parametrize("stage", [0, 1, 2, "eplb"])
def test_engine_matches_plain(engine_runs, stage):
    for rank, res in enumerate(engine_runs):
        plain, lplb = res[stage]["plain"], res[stage]["lplb"]
        torch.testing.assert_close(torch.tensor(lplb["losses"]), torch.tensor(plain["losses"]),
                                   rtol=1e-5, atol=1e-6, msg=f"rank {rank} losses")
        assert lplb["identical"] == [True]
        assert plain["experts"].keys() == lplb["experts"].keys()
        for key, want in plain["experts"].items():
            torch.testing.assert_close(lplb["experts"][key], want, rtol=1e-4, atol=1e-5, msg=key)


def test_negative_control_replicas_drift(engine_runs):
    """Without the replica gradient sum the copies diverge and the losses differ."""
    plain = [res[2]["plain"]["losses"] for res in engine_runs]
    negative = [res["negative"]["losses"] for res in engine_runs]
    assert all(res["negative"]["identical"] == [False] for res in engine_runs)
    assert not torch.allclose(torch.tensor(negative), torch.tensor(plain), rtol=1e-5, atol=1e-6)
