"""Checkpoints both ways between LPLB and plain DeepSpeed MoE, resume with optimizer
states, and balance metrics through DeepSpeed's CSV monitor.  ws=2, ep=2, gloo."""

from __future__ import annotations

import csv
import os

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
from ds_harness import run_workers  # noqa: E402

N_EXPERTS = 4
RING = {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [2], "redundant_per_rank": 1}}
EPLB = {"placement": {"policy": "eplb", "redundant_per_rank": 1}}


def _engine(rank, block, stage, extra=None):
    from deepspeed.moe.utils import configure_moe_param_groups
    from ds_models import TinyMoEModel

    import lplb_plugin.deepspeed as lplb_ds

    model = TinyMoEModel(N_EXPERTS, ep_size=2, k=2, ep_rank=rank % 2)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    config.update(extra or {})
    if block is not None:
        config["lplb"] = block
    engine, *_ = lplb_ds.initialize(
        model=model, config=config, model_parameters=model.parameters(),
        optimizer=lambda ps: torch.optim.AdamW(configure_moe_param_groups(list(ps)), lr=1e-2))
    return engine


def _train(engine, rank, steps, start=0):
    from ds_models import HIDDEN

    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(4, 8, HIDDEN, generator=g), torch.randn(4, 8, HIDDEN, generator=g)
        torch.manual_seed(step)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _logical(engine):
    import lplb_plugin.deepspeed as lplb_ds

    lplb_ds.prepare_save(engine.module)
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def _identical(engine):
    import lplb_plugin.deepspeed as lplb_ds

    return [m.lplb_experts.replicas_identical() for m in lplb_ds.lplb_layers(engine.module)]


def _ckpt_worker(rank, world_size, root):
    from lplb_plugin.errors import LPLBInputError

    out = {}
    monitor = {"csv_monitor": {"enabled": True, "output_path": os.path.join(root, "csv"), "job_name": "lplb"}}
    for name, block, stage in (("ring", RING, 1), ("eplb", EPLB, 0)):
        # LPLB -> plain (module only: the optimizer states are in the physical layout)
        src = _engine(rank, block, stage, monitor if name == "ring" else None)
        _train(src, rank, 3)
        src.save_checkpoint(os.path.join(root, name), tag="lplb")
        dst = _engine(rank, None, stage)
        dst.load_checkpoint(os.path.join(root, name), tag="lplb", load_module_only=True)
        out[f"{name}/lplb_to_plain"] = (_logical(src), _logical(dst))

        # LPLB -> LPLB with optimizer states: resuming equals continuing
        again = _engine(rank, block, stage)
        _, client_state = again.load_checkpoint(os.path.join(root, name), tag="lplb")
        out[f"{name}/client_state"] = client_state["lplb"]
        out[f"{name}/resume"] = (_train(src, rank, 2, start=3), _train(again, rank, 2, start=3),
                                 _identical(again))

        # plain -> LPLB: module only; optimizer states are refused with a clear error
        plain = _engine(rank, None, stage)
        _train(plain, rank, 3)
        plain.save_checkpoint(os.path.join(root, name), tag="plain")
        lplb = _engine(rank, block, stage)
        try:
            lplb.load_checkpoint(os.path.join(root, name), tag="plain")
            out[f"{name}/refused"] = None
        except LPLBInputError as e:
            out[f"{name}/refused"] = str(e)
        lplb.load_checkpoint(os.path.join(root, name), tag="plain", load_module_only=True)
        out[f"{name}/plain_to_lplb"] = (_logical(plain), _logical(lplb), _identical(lplb))
        # training on from there (fresh optimizer both sides) matches plain DeepSpeed
        plain2 = _engine(rank, None, stage)
        plain2.load_checkpoint(os.path.join(root, name), tag="plain", load_module_only=True)
        out[f"{name}/plain_to_lplb_train"] = (_train(plain2, rank, 2, start=3), _train(lplb, rank, 2, start=3))
    return out


@pytest.fixture(scope="module")
def ckpt_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds_ckpt"))
    return root, run_workers(_ckpt_worker, 2, root)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["ring", "eplb"])
def test_lplb_checkpoint_loads_into_plain(ckpt_runs, name):
    root, runs = ckpt_runs
    for res in runs:
        src, dst = res[f"{name}/lplb_to_plain"]
        assert any("deepspeed_experts" in k for k in src)
        _same_state(src, dst)
    # the expert files are DeepSpeed's plain layout: one per logical expert
    files = sorted(f for f in os.listdir(os.path.join(root, name, "lplb")) if f.startswith("layer_0_expert_"))
    assert files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(N_EXPERTS)]


@pytest.mark.parametrize("name", ["ring", "eplb"])
def test_lplb_checkpoint_resumes_exactly(ckpt_runs, name):
    _, runs = ckpt_runs
    for res in runs:
        continued, resumed, identical = res[f"{name}/resume"]
        assert resumed == continued
        assert identical == [True]
        meta = res[f"{name}/client_state"]
        assert meta["layers"][0]["n_logical"] == N_EXPERTS and len(meta["layers"][0]["phy2log"]) == N_EXPERTS + 2


@pytest.mark.parametrize("name", ["ring", "eplb"])
def test_plain_checkpoint_loads_into_lplb(ckpt_runs, name):
    _, runs = ckpt_runs
    for res in runs:
        plain, lplb, identical = res[f"{name}/plain_to_lplb"]
        _same_state(plain, lplb)
        assert identical == [True]
        want, got = res[f"{name}/plain_to_lplb_train"]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
        assert "written without LPLB" in res[f"{name}/refused"]
        assert "load_module_only=True" in res[f"{name}/refused"]


def test_balance_metrics_in_csv_monitor(ckpt_runs):
    root, _ = ckpt_runs
    log_dir = os.path.join(root, "csv", "lplb")
    for key in ("max_over_mean", "max_over_mean_plain", "solve_ms", "fallbacks"):
        path = os.path.join(log_dir, f"Train_lplb_layer0_{key}.csv")
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        assert len(rows) == 1 + 5, path  # header + one row per optimizer step (3 + 2 resumed)
        values = [float(r[1]) for r in rows[1:]]
        if key.startswith("max_over_mean"):
            assert all(v >= 1.0 for v in values)
    lplb = [float(r[1]) for r in csv.reader(open(os.path.join(log_dir, "Train_lplb_layer0_max_over_mean.csv")))
            if r[0].isdigit()]
    plain = [float(r[1]) for r in csv.reader(open(os.path.join(log_dir, "Train_lplb_layer0_max_over_mean_plain.csv")))
             if r[0].isdigit()]
    assert all(a <= b + 1e-12 for a, b in zip(lplb, plain))
