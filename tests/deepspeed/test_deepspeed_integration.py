"""integration/deepspeed/train_tiny_moe.py runs under torchrun (2 CPU processes, gloo)
with configs/deepspeed_tiny_moe.json: it trains, LPLB's planned balance is never worse
than plain DeepSpeed's layout (the ring placement keeps every expert's home copy on its
plain rank), replicas stay identical, metrics reach the CSV monitor and a checkpoint is
written in the plain layout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

from ds_harness import EXT_DIR, REPO, _free_port  # noqa: E402


def test_tiny_moe_training_script(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "integration" / "deepspeed" / "train_tiny_moe.py"),
           "--config", str(REPO / "configs" / "deepspeed_tiny_moe.json"), "--steps", "4",
           "--save-dir", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    steps = [x for x in lines if "step" in x]
    assert [x["step"] for x in steps] == [0, 1, 2, 3]
    for x in steps:
        assert math.isfinite(x["loss"])
        assert all(a <= b + 1e-9 for a, b in zip(x["max_over_mean_lplb"], x["max_over_mean_plain"]))
    assert lines[-1] == {"replicas_identical": [True, True]}
    assert (tmp_path / "runs" / "tiny_moe_lplb" / "Train_lplb_layer1_max_over_mean.csv").is_file()
    ckpt = tmp_path / "ckpt" / "global_step4"
    assert sorted(p.name for p in ckpt.glob("layer_1_expert_*")) == [
        f"layer_1_expert_{e}_mp_rank_00_model_states.pt" for e in range(8)]
