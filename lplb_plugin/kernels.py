"""The CUDA path of the count and map stages (``lplb_plugin._C``).

``setup.py`` builds ``lplb_plugin._C`` when a CUDA build of torch and nvcc are present
at install time (``LPLB_BUILD_CUDA=0/1`` forces it off/on; it needs
``pip install --no-build-isolation`` so the build sees torch).  Otherwise the first
use on a GPU JIT-compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` into
``$LPLB_CACHE_DIR`` (default ``~/.cache/lplb_plugin``), logging one line.  On a
machine without a GPU, or with ``LPLB_DISABLE_CUDA=1``, :func:`get` returns ``None``
and the torch path runs.  Both paths give bit-identical results (tests/gpu).

The solve stage still runs on the host in this release.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

__all__ = ["get", "count_tokens", "map_tokens", "csrc_dir"]

log = logging.getLogger("lplb_plugin")
_module = None
_tried = False


def csrc_dir() -> Path | None:
    """The CUDA sources: packaged next to the modules, or the repository's csrc/."""
    for cand in (Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc"):
        if (cand / "lplb_kernels.cu").exists():
            return cand
    return None


def get():
    """The compiled extension, or ``None`` when the torch path must be used."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("LPLB_DISABLE_CUDA") == "1" or not torch.cuda.is_available():
        return None
    try:
        from . import _C  # built by setup.py

        _module = _C
        return _module
    except ImportError:
        pass
    src = csrc_dir()
    if src is None:
        log.warning("lplb: no compiled CUDA kernels and no csrc/ sources found; using the torch path")
        return None
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("LPLB_CACHE_DIR", Path.home() / ".cache" / "lplb_plugin")) / (
        f"torch{torch.__version__.replace('+', '_')}"
    )
    build.mkdir(parents=True, exist_ok=True)
    log.info("lplb: JIT-compiling the CUDA kernels into %s (first use only)", build)
    try:
        _module = load(
            name="lplb_plugin_C",
            sources=[str(src / "binding.cpp"), str(src / "lplb_kernels.cu")],
            build_directory=str(build),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-std=c++17"],
            verbose=False,
        )
    except Exception as exc:  # a broken toolchain must not stop training: torch path
        log.warning("lplb: CUDA kernels failed to compile (%s); using the torch path", exc)
        _module = None
    return _module


def count_tokens(idx: torch.Tensor, n_logical: int, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA count stage; same contract as :func:`lplb_plugin.counting.count_tokens`."""
    return get().count(idx, n_logical, n_chunks)


def map_tokens(
    idx: torch.Tensor, prefix: torch.Tensor, counts: torch.Tensor, cum_frac: torch.Tensor, log2phy: torch.Tensor
) -> torch.Tensor:
    """CUDA map stage; same result as :func:`lplb_plugin.redirect.redirect` (with the
    count stage's ``prefix`` and ``counts`` of the same ``idx``)."""
    return get().map(idx, prefix, counts, cum_frac, log2phy)
