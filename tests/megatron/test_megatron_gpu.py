"""GPU parity (skipped without >= 2 CUDA devices): the layer parity test of
``test_megatron_layer.py`` over NCCL with the alltoall and allgather dispatchers, at
EP=2 and, with 4 GPUs, EP=4; and the 20-step training parity at EP=2 over NCCL.

Run on a GPU machine with megatron-core 0.19.2 installed:
``python -m pytest -q tests/megatron/test_megatron_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

import dist_utils  # noqa: E402
import test_megatron_layer as layer_tests  # noqa: E402
import test_megatron_training as training_tests  # noqa: E402

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs = lambda n: pytest.mark.skipif(N_GPUS < n, reason=f"needs {n} CUDA devices, found {N_GPUS}")  # noqa: E731

EP4_CFG = {"placement": {"policy": "topology", "topology": "ring", "topology_shape": [4], "redundant_per_rank": 1}}


@needs(2)
def test_gpu_layer_parity_ep2():
    reports = dist_utils.run(layer_tests._layer_parity, 2, layer_tests.EP2_CFG, "cuda", backend="nccl")
    layer_tests.check_reports(reports)


@needs(4)
def test_gpu_layer_parity_ep4():
    reports = dist_utils.run(layer_tests._layer_parity, 4, EP4_CFG, "cuda", backend="nccl")
    layer_tests.check_reports(reports, n_physical=12)  # 8 logical + 4 copies


@needs(2)
def test_gpu_training_parity_ep2():
    results = dist_utils.run(training_tests._train_parity, 2, 20, None, backend="nccl")
    training_tests.check_training(results)
