"""DeepSpeed test hygiene.

On CPU, DeepSpeed's shm communication op creates ``/dev/shm/deepspeed_allreduce_buffer_*``
segments (tens of MB each, per rank and port) and never unlinks them.  Dozens of
spawned DeepSpeed processes per run would otherwise fill /dev/shm, which is RAM, until
the machine runs out of memory.  Each test removes the segments its processes created
(they have exited by then)."""

from __future__ import annotations

import glob
import os

import pytest

_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(autouse=True)
def _remove_deepspeed_shm_segments():
    before = set(glob.glob(_PATTERN))
    yield
    for path in set(glob.glob(_PATTERN)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
