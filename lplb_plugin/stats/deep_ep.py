"""Detect the installed DeepEP through its public API.

DeepEP is built from source by its users; the PyPI name ``deep-ep`` is an unrelated
package, so we never depend on it and never trust a version string alone: the
generation is read off the classes the import actually exposes.  ``import deep_ep``
can raise (it checks NCCL at import), hence the broad ``except``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeepEPInfo", "detect_deep_ep", "buffer_generation"]


@dataclass(frozen=True)
class DeepEPInfo:
    """What the installed DeepEP offers.

    Attributes:
        available: ``import deep_ep`` worked and exposed a known buffer class.
        generation: ``"v1"`` (``Buffer``), ``"v2"`` (``ElasticBuffer``), ``"v2.5"``
            (``EPBuffer``), or ``None``.
        version: ``deep_ep.__version__`` if present.
        reason: why it is not available (import error text), else ``""``.
    """

    available: bool
    generation: str | None
    version: str | None
    reason: str = ""


def detect_deep_ep() -> DeepEPInfo:
    """Import DeepEP if it is there and report its generation (never raises)."""
    try:
        import deep_ep  # noqa: F401
    except Exception as exc:  # DeepEP's import runs NCCL checks that can raise anything
        return DeepEPInfo(False, None, None, f"import deep_ep failed: {type(exc).__name__}: {exc}")
    version = getattr(deep_ep, "__version__", None)
    for name, gen in (("EPBuffer", "v2.5"), ("ElasticBuffer", "v2"), ("Buffer", "v1")):
        if hasattr(deep_ep, name):
            return DeepEPInfo(True, gen, version)
    return DeepEPInfo(False, None, version, "deep_ep has none of Buffer, ElasticBuffer, EPBuffer: not DeepEP")


def buffer_generation(buffer) -> str | None:
    """Generation of a DeepEP buffer object by its class (``None`` if it is not one)."""
    try:
        import deep_ep
    except Exception:
        return None
    for name, gen in (("EPBuffer", "v2.5"), ("ElasticBuffer", "v2"), ("Buffer", "v1")):
        cls = getattr(deep_ep, name, None)
        if cls is not None and isinstance(buffer, cls):
            return gen
    return None
