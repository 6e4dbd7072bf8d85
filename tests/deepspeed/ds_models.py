"""Tiny models for the DeepSpeed tests (fp32, CPU)."""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from torch import nn

HIDDEN = 8
FFN = 16


class MLP(nn.Module):
    def __init__(self, hidden: int = HIDDEN, ffn: int = FFN):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def reinit_experts(moe: MoE, ep_rank: int, seed: int = 1234) -> None:
    """Give every logical expert its own weights (DeepSpeed deep-copies one expert into
    all local slots): expert ``e`` gets weights seeded by ``seed + e``, on every rank."""
    nl = moe.num_local_experts
    for j, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        g = torch.Generator().manual_seed(seed + ep_rank * nl + j)
        with torch.no_grad():
            for p in expert.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def skew_gate(moe: MoE, seed: int = 7) -> None:
    """Gate weights that make a few experts hot (so replicas get tokens)."""
    g = torch.Generator().manual_seed(seed)
    w = moe.deepspeed_moe.gate.wg.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        w[0] += 0.6
        w[1] += 0.3


def make_moe(n_experts: int, ep_size: int, k: int, ep_rank: int, **kwargs) -> MoE:
    kwargs = {"use_rts": False, **kwargs}
    moe = MoE(HIDDEN, MLP(), num_experts=n_experts, ep_size=ep_size, k=k, drop_tokens=False,
              min_capacity=0, **kwargs)
    reinit_experts(moe, ep_rank)
    skew_gate(moe)
    return moe


class TinyMoEModel(nn.Module):
    """x -> Linear -> MoE -> Linear -> mean squared error against a target."""

    def __init__(self, n_experts: int, ep_size: int, k: int, ep_rank: int):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.moe = make_moe(n_experts, ep_size, k, ep_rank)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, y):
        h, l_aux, _ = self.moe(self.inp(x))
        return torch.nn.functional.mse_loss(self.out(h), y) + 0.01 * l_aux
