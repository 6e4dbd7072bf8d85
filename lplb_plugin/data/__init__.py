"""Expert-load profiles shipped with the package (see ATTRIBUTION.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["PROFILES", "load_profile"]

_DIR = Path(__file__).resolve().parent

#: Shipped profiles by short name.
PROFILES = {
    "prefill": _DIR / "deepseek_v3_prefill_in4096.json",
    "decode": _DIR / "deepseek_v3_decode_in1000out1000.json",
}


def load_profile(name_or_path: str | Path) -> torch.Tensor:
    """Load an expert-load file ``{"logical_count": [[...] x layers]}``.

    Args:
        name_or_path: a shipped profile name (``prefill``, ``decode``) or a file path.

    Returns:
        float64 ``[layers, experts]`` with all-zero (dense) layers removed.
    """
    path = PROFILES.get(str(name_or_path), Path(name_or_path))
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "logical_count" not in data:
        raise ValueError(f"{path}: expected a JSON object with key 'logical_count'")
    counts = torch.tensor(data["logical_count"], dtype=torch.float64)
    if counts.dim() != 2 or counts.numel() == 0:
        raise ValueError(f"{path}: 'logical_count' must be a non-empty [layers, experts] list of lists")
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"{path}: 'logical_count' must hold finite non-negative counts")
    return counts[counts.sum(1) > 0]
