"""Count stage: histogram and per-chunk prefix sums (torch reference)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lplb_plugin.counting import count_tokens


@settings(deadline=None, max_examples=150)
@given(
    n=st.integers(0, 300),
    L=st.integers(1, 40),
    chunks=st.integers(1, 9),
    dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_counts_and_prefix_sums(n, L, chunks, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, L, (n,), generator=gen).to(dtype)
    counts, prefix = count_tokens(idx.view(-1, 1) if n else idx, L, chunks)
    valid = idx[idx >= 0].long()
    assert counts.dtype == torch.int32 and prefix.dtype == torch.int32
    assert torch.equal(counts.long(), torch.bincount(valid, minlength=L))
    assert prefix.shape == (chunks, L)
    # chunk c covers entries [ceil(c*n/chunks), ...): recompute each prefix directly
    for c in range(chunks):
        end = sum(1 for i in range(n) if i * chunks // n <= c) if n else 0
        part = idx[:end]
        assert torch.equal(prefix[c].long(), torch.bincount(part[part >= 0].long(), minlength=L))
