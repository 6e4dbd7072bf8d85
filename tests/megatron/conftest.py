"""Megatron test setup: Megatron's jit fuser is torch.compile (17 s instead of 0.4 s per
fused function on a CPU), so dynamo is disabled before torch / megatron are imported here
and in the spawned workers (which inherit the environment).  With
``LPLB_REQUIRE_MEGATRON=1`` (set by ``.ci/run``) a missing megatron-core fails the run
instead of skipping these tests."""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if os.environ.get("LPLB_REQUIRE_MEGATRON") == "1" and importlib.util.find_spec("megatron.core") is None:
    raise RuntimeError(
        "LPLB_REQUIRE_MEGATRON=1 but megatron-core is not installed: "
        "pip install --no-deps --ignore-requires-python megatron-core==0.19.2 && pip install triton psutil"
    )
