"""Test / CPU-run support: the few patches megatron-core 0.19.2 needs to run on a CPU.

Megatron-core assumes a CUDA device in a handful of places that have nothing to do with
the maths of an MoE layer.  On a CPU-only machine (CI, the gloo run of
``integration/megatron/pretrain_gpt_moe.py``) :func:`apply` patches exactly those, and
nothing else; it never touches ``lplb_plugin``.  On a machine with CUDA it does nothing.

Each patch, and why (REFERENCE.md §5):

1. ``torch.cuda.current_device`` -> ``"cpu"``.  ``Router.gating`` moves the gate weight
   to ``torch.cuda.current_device()``; the router's expert-bias buffers and the
   collective output buffers of ``tensor_parallel/mappings.py`` and ``utils.py`` are
   allocated there.  Returning the CPU device keeps all of them on the CPU.
2. ``torch.cuda.Stream`` / ``current_stream`` / ``stream``: the alltoall dispatcher makes
   a ``torch.cuda.Stream`` in ``__init__`` and moves its split sizes to the host on that
   stream, recording and waiting on an event.  On the CPU there is one "stream": the
   stand-in stream is a singleton whose ``wait_stream`` / ``record_event`` /
   ``synchronize`` do nothing (host code is already ordered), so the dispatcher sees no
   side stream and copies synchronously.  ``torch.cuda.synchronize`` (called by the
   distributed-checkpoint writer before it copies tensors) is a no-op for the same reason.
3. ``megatron.core.transformer.utils.get_default_causal_mask`` (and the name imported by
   ``fusions/fused_softmax.py``) hard-codes ``device="cuda"``; the patched version builds
   the same upper-triangular mask on the CPU.
4. ``token_dispatcher.maybe_move_tensor_to_cpu``: on a GPU the alltoall dispatcher's
   split sizes start as CUDA tensors and this helper turns them into host numpy arrays
   (``as_numpy=True``), which ``all_to_all_single`` accepts as split lists.  On a CPU the
   helper returns the tensor unchanged (it only converts CUDA tensors) and
   ``all_to_all_single`` rejects a tensor of split sizes; the patched helper applies the
   same conversion to CPU tensors.
5. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` and
   ``torch.cuda.get_rng_state``: Megatron's RNG tracker (``model_parallel_cuda_manual_seed``,
   the ``fork()`` around attention dropout) and activation recompute
   (``tensor_parallel.checkpoint``, used by MoE recompute) save and restore the CUDA RNG
   state, which a CPU build of torch cannot query.  On the CPU there is no CUDA RNG; the
   patched functions return / accept a placeholder (the CPU RNG state is still saved and
   restored by Megatron itself).

Not a patch, a setting: ``add_bias_linear=False`` (with biases, the EP=1 expert MLP hits an
in-place-on-view error on CPU), and ``TORCHDYNAMO_DISABLE=1`` (Megatron's jit fuser is
``torch.compile``: 17 s instead of 0.4 s per fused function on a CPU).  ``triton`` must be
importable (``import megatron.core`` imports it): ``pip install triton`` works on CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

_applied = False


class _HostEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _HostStream:
    """The single host "stream"; every CUDA stream call on it is a no-op."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _HostEvent()

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def apply() -> bool:
    """Install the CPU patches once (no-op when CUDA is available).

    Returns:
        True if the patches are (now) installed.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    torch.cuda.current_device = lambda: torch.device("cpu")  # 1.
    torch.cuda.Stream = lambda *a, **k: _HOST_STREAM  # 2.
    torch.cuda.current_stream = lambda *a, **k: _HOST_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.Event = lambda *a, **k: _HostEvent()
    torch.cuda.synchronize = lambda *a, **k: None

    import megatron.core.fusions.fused_softmax as fused_softmax  # 3.
    import megatron.core.transformer.utils as tutils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    tutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher  # 4.

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().to("cpu").numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    import megatron.core.tensor_parallel.random as mrandom  # 5.

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    _applied = True
    return True
