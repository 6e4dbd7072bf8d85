"""Argument checks of the CUDA wrappers that run before any kernel (so they run here)."""

import pytest
import torch

from lplb_plugin.errors import LPLBInputError
from lplb_plugin.kernels import _check_totals


def test_totals_must_be_int64_on_the_device_with_enough_entries():
    cpu = torch.device("cpu")
    _check_totals(None, cpu, 1)
    _check_totals(torch.zeros(2, dtype=torch.int64), cpu, 1)
    with pytest.raises(LPLBInputError, match=r"int64 tensor of at least 2 entries on cpu, got torch.int32 \[2\]"):
        _check_totals(torch.zeros(2, dtype=torch.int32), cpu, 1)
    with pytest.raises(LPLBInputError, match=r"at least 2 entries"):
        _check_totals(torch.zeros(1, dtype=torch.int64), cpu, 1)
    with pytest.raises(LPLBInputError, match="got list"):
        _check_totals([0, 0], cpu, 0)
    with pytest.raises(LPLBInputError, match="contiguous"):
        _check_totals(torch.zeros(4, dtype=torch.int64)[::2], cpu, 0)
