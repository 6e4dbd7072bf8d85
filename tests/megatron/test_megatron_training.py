"""Training a tiny GPT-MoE with LPLB (real megatron-core 0.19.2: GPTModel, Megatron DDP,
finalize_model_grads, distributed checkpointing; CPU, gloo, 2 processes, EP=2).

- 20 steps with LPLB equal the plain run step by step (loss within 1e-5) when both start
  from the same weights; the replicas are bit-identical at the end; under injected skew
  the per-rank max/mean token load that the dispatcher actually delivers is lower with
  LPLB, and the logged metrics agree.
- Checkpoints: an LPLB run's distributed checkpoint loads into a plain Megatron model and
  gives the same loss on the next batch; a plain checkpoint loads into an LPLB model
  likewise (every copy gets its expert's weights).
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import dist_utils  # noqa: E402

CONFIG = str(dist_utils.ROOT / "configs" / "megatron_tiny_moe.yaml")
TOL = 1e-5


def _setup(ws, ep=None):
    from integration.megatron import pretrain_gpt_moe as pg
    from lplb_plugin import LPLBConfig

    raw = pg.read_config(CONFIG)
    train = {**pg.TRAIN_DEFAULTS, **raw["train"]}
    pg.init_distributed(ep or ws, train["seed"])
    return pg, raw["model"], train, LPLBConfig.from_dict(raw["lplb"])


def _copy_plain_into_lplb(plain_ddp, lplb_ddp):
    """Same weights: non-expert tensors by name, each expert copy from the plain expert
    of its logical id (gathered over EP)."""
    import re

    import torch
    import mcore_utils as mu
    from megatron.core import parallel_state

    from lplb_plugin.megatron import lplb_layers

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    pat = re.compile(r"(.*\.experts\.local_experts\.)(\d+)(\..*)")
    plain_sd = {k: v for k, v in plain_ddp.module.state_dict().items() if isinstance(v, torch.Tensor)}
    n_local = {}
    for k in plain_sd:
        m = pat.match(k)
        if m:
            n_local[m.group(1)] = max(n_local.get(m.group(1), 0), int(m.group(2)) + 1)
    mine = {}
    for k, v in plain_sd.items():
        m = pat.match(k)
        if m:
            mine[(m.group(1), ep_rank * n_local[m.group(1)] + int(m.group(2)), m.group(3))] = v.detach().cpu().clone()
    experts = {}
    for d in mu.gather_objects(mine):
        experts.update(d)
    layers = set(lplb_layers(lplb_ddp))
    slot_expert = {}  # "<layer>.experts.local_experts." -> logical id of each local slot
    for name, module in lplb_ddp.module.named_modules():
        if module in layers:
            S = module.placement.slots_per_rank
            slot_expert[name + ".experts.local_experts."] = [
                int(module.placement.phy2log[ep_rank * S + i]) for i in range(S)
            ]
    # at EP>1 the LPLB layer's torch state_dict keeps its physical local slots
    lplb_sd = {k: v for k, v in lplb_ddp.module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for k, t in lplb_sd.items():
            m = pat.match(k)
            if m:
                src = experts[(m.group(1), slot_expert[m.group(1)][int(m.group(2))], m.group(3))]
            else:
                src = plain_sd[k]
            t.copy_(src)


def _rank_load_hook(store, n_ranks, slot_rank=None):
    """Forward hook on a router: accumulate this rank's tokens per EP rank."""
    import torch

    def hook(module, args, output):
        _, routing_map = output
        per_expert = routing_map.sum(0).to("cpu", torch.float64)
        E = per_expert.numel()
        owner = slot_rank if slot_rank is not None else torch.arange(E) // (E // n_ranks)
        loads = torch.zeros(n_ranks, dtype=torch.float64).index_add_(0, owner, per_expert)
        store.append(loads)

    return hook


def _train_parity(rank, ws, steps, lplb_override=None, overlap=False, ep=None):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lplb_plugin.megatron import balance_metrics, lplb_layers
    from lplb_plugin.megatron.router import LPLBRouter

    ep = ep or ws
    pg, model, train, lplb = _setup(ws, ep)
    if lplb_override is not None:
        from lplb_plugin import LPLBConfig

        lplb = LPLBConfig.from_dict(lplb_override)
    plain = pg.build(model, train, None, ep, overlap_grad_reduce=overlap)
    with_lplb = pg.build(model, train, lplb, ep, overlap_grad_reduce=overlap)
    _copy_plain_into_lplb(plain[0], with_lplb[0])
    layers = lplb_layers(with_lplb[0])
    init_diff = max(layer.replica_max_abs_diff() for layer in layers)
    loads = {"plain": [], "lplb": []}
    for name, ddp in (("plain", plain[0]), ("lplb", with_lplb[0])):
        for m in ddp.modules():
            if hasattr(m, "expert_bias") and hasattr(m, "topk"):
                slot_rank = None
                if isinstance(m, LPLBRouter):
                    slot_rank = m._lplb_balancer.placement.slot_rank
                m.register_forward_hook(_rank_load_hook(loads[name], ep, slot_rank))
    dp_rank = parallel_state.get_data_parallel_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    losses = {"plain": [], "lplb": []}
    for step in range(1, steps + 1):
        tokens = pg.batch(step, dp_rank, train, device)
        losses["plain"].append(pg.train_step(*plain, tokens))
        losses["lplb"].append(pg.train_step(*with_lplb, tokens))
    metrics = balance_metrics(with_lplb[0])
    final_diff = max(layer.replica_max_abs_diff() for layer in layers)
    ratio = {}
    for name, per_call in loads.items():
        total = torch.stack(per_call).to(device)  # [calls, ranks], this rank's tokens
        dist.all_reduce(total)  # tokens each EP rank received, per layer call
        total = total.cpu()
        ratio[name] = float((total.max(1).values / total.mean(1)).mean())
    return {
        "losses": losses, "metrics": metrics, "init_diff": init_diff, "final_diff": final_diff,
        "ratio": ratio, "n_layers": len(layers),
    }


EP4_RING = {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [4], "redundant_per_rank": 1}}


@pytest.mark.parametrize(
    "ws,ep,override,overlap",
    [(2, 2, None, False), (4, 4, EP4_RING, False), (4, 2, None, True)],
    ids=["ep2", "ep4", "dp4-ep2-overlap-grad-reduce"],
)
def test_training_parity(ws, ep, override, overlap):
    """``dp4-ep2``: 4 ranks, EP=2, so each expert is also reduced over an
    expert-data-parallel group of 2, with Megatron's overlapped grad reduce."""
    check_training(dist_utils.run(_train_parity, ws, 20, override, overlap, ep))


def check_training(results):
    for rank, r in enumerate(results):
        assert r["n_layers"] == 2
        lp, ll = r["losses"]["plain"], r["losses"]["lplb"]
        assert len(lp) == 20
        worst = max(abs(a - b) for a, b in zip(lp, ll))
        assert worst <= TOL, f"rank {rank}: loss curves differ by {worst}: {lp} vs {ll}"
        assert lp[0] != lp[-1]  # it trained
        assert r["init_diff"] == 0.0 and r["final_diff"] == 0.0, r
        # skewed routing: LPLB delivers a lower max/mean rank load than plain
        assert r["ratio"]["plain"] > 1.2, r["ratio"]
        assert r["ratio"]["lplb"] < r["ratio"]["plain"] - 0.2, r["ratio"]
        m = r["metrics"]
        assert m["lplb/all/max_over_mean_after"] < m["lplb/all/max_over_mean_before"], m
        assert abs(m["lplb/all/max_over_mean_before"] - r["ratio"]["plain"]) < 0.1, (m, r["ratio"])
        assert m["lplb/all/optimal_fraction"] == 1.0
        assert {"lplb/layer_1/max_over_mean_after", "lplb/layer_2/max_over_mean_after"} <= set(m)


def _checkpoint_round_trips(rank, ws, tmp):
    import json
    import os

    import torch
    from megatron.core import parallel_state

    from lplb_plugin.megatron import lplb_layers

    pg, model, train, lplb = _setup(ws)
    dp_rank = parallel_state.get_data_parallel_rank()
    cpu = torch.device("cpu")
    next_batch = pg.batch(99, dp_rank, train, cpu)
    out = {}

    # LPLB run -> save -> plain model
    src = pg.build(model, train, lplb, ws)
    for step in range(1, 4):
        pg.train_step(*src, pg.batch(step, dp_rank, train, cpu))
    pg.save_checkpoint(src[0], os.path.join(tmp, "lplb_ckpt"))
    dst = pg.build(model, train, None, ws)
    out["plain_fresh"] = pg.evaluate(dst[0], next_batch)
    pg.load_checkpoint(dst[0], os.path.join(tmp, "lplb_ckpt"))
    out["lplb_src"] = pg.evaluate(src[0], next_batch)
    out["plain_loaded"] = pg.evaluate(dst[0], next_batch)
    with open(os.path.join(tmp, "lplb_ckpt", "lplb_placement.json")) as f:
        out["placement_layers"] = sorted(json.load(f)["layers"])

    # plain run -> save -> LPLB model
    src = pg.build(model, train, None, ws)
    for step in range(1, 4):
        pg.train_step(*src, pg.batch(step, dp_rank, train, cpu))
    pg.save_checkpoint(src[0], os.path.join(tmp, "plain_ckpt"))
    dst = pg.build(model, train, lplb, ws)
    out["lplb_fresh"] = pg.evaluate(dst[0], next_batch)
    # scramble the copies so the load (not the init sync) must make them right
    with torch.no_grad():
        for layer in lplb_layers(dst[0]):
            for params in layer.local_slot_params():
                for p in params:
                    p.normal_()
    pg.load_checkpoint(dst[0], os.path.join(tmp, "plain_ckpt"))
    out["plain_src"] = pg.evaluate(src[0], next_batch)
    out["lplb_loaded"] = pg.evaluate(dst[0], next_batch)
    out["replica_diff"] = max(layer.replica_max_abs_diff() for layer in lplb_layers(dst[0]))
    # keep training after the load, both with a fresh Adam (the checkpoint holds the
    # model only): the LPLB model follows the plain run
    src = (src[0], torch.optim.Adam(src[0].parameters(), lr=train["lr"]), src[2])
    for step in range(4, 7):
        tokens = pg.batch(step, dp_rank, train, cpu)
        out.setdefault("continued", []).append((pg.train_step(*src, tokens), pg.train_step(*dst, tokens)))
    return out


def test_checkpoint_round_trips(tmp_path):
    results = dist_utils.run(_checkpoint_round_trips, 2, str(tmp_path))
    for rank, r in enumerate(results):
        where = f"rank {rank}: {r}"
        assert abs(r["plain_loaded"] - r["lplb_src"]) <= TOL, where
        assert abs(r["plain_fresh"] - r["lplb_src"]) > 10 * TOL, where  # the load did something
        assert abs(r["lplb_loaded"] - r["plain_src"]) <= TOL, where
        assert abs(r["lplb_fresh"] - r["plain_src"]) > 10 * TOL, where
        assert r["replica_diff"] == 0.0, where
        assert r["placement_layers"] == ["layer_1", "layer_2"], where
        assert max(abs(a - b) for a, b in r["continued"]) <= TOL, where


def test_pretrain_script_under_torchrun(tmp_path):
    """The integration script as a user runs it: torchrun, 2 ranks, LPLB on, save; then
    plain Megatron loading that checkpoint."""
    import json
    import os
    import subprocess
    import sys

    script = str(dist_utils.ROOT / "integration" / "megatron" / "pretrain_gpt_moe.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(dist_utils.free_port()), script, "--config", CONFIG, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    ckpt = str(tmp_path / "ckpt")
    lines = torchrun("--steps", "5", "--save", ckpt)
    assert [ln["step"] for ln in lines] == [5]
    assert lines[0]["lplb/all/max_over_mean_after"] < lines[0]["lplb/all/max_over_mean_before"]
    placement = json.loads((tmp_path / "ckpt" / "lplb_placement.json").read_text())
    assert placement["lplb"]["placement"]["topology"] == "ring" and len(placement["layers"]) == 2
    plain = torchrun("--steps", "1", "--load", ckpt, "--lplb-enabled", "false")
    assert len(plain) == 1 and not any(k.startswith("lplb/") for k in plain[0])
