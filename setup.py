"""lplb_plugin: per-batch LP load balancing of redundant MoE experts for Megatron-core
and DeepSpeed."""

import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def cuda_build() -> tuple[list, dict]:
    """Build lplb_plugin._C when a CUDA torch and nvcc are present (LPLB_BUILD_CUDA=0/1
    forces it off/on).  The build must see torch: pip install --no-build-isolation.
    Without it, the kernels are JIT-compiled on first GPU use (lplb_plugin/kernels.py)."""
    flag = os.environ.get("LPLB_BUILD_CUDA")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("LPLB_BUILD_CUDA=1 needs torch in the build environment (pip install --no-build-isolation)")
        return [], {}
    if flag != "1" and (torch.version.cuda is None or CUDA_HOME is None):
        return [], {}
    ext = CUDAExtension(
        "lplb_plugin._C",
        ["csrc/binding.cpp", "csrc/lplb_kernels.cu", "csrc/lplb_solve.cu"],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = cuda_build()

setup(
    name="lplb_plugin",
    version="0.1.0",
    description="Exact per-batch LP load balancing of redundant MoE experts (Megatron-core, DeepSpeed)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lplb_plugin", "lplb_plugin.*"]) + ["lplb_plugin.csrc"],
    # the CUDA sources ship inside the package so a GPU machine can JIT-compile them
    package_dir={"lplb_plugin.csrc": "csrc"},
    package_data={"lplb_plugin.data": ["*.json", "*.md"], "lplb_plugin.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    install_requires=[
        # the torch wheel is the user's choice (CPU or CUDA); any 2.x from 2.4 works
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        # framework adapters (installed separately on Python 3.11: see docs)
        "megatron": ["megatron-core>=0.16.1"],
        "deepspeed": ["deepspeed>=0.19.4"],
        # NVSHMEM count reduction (lplb.stats.comm: nvshmem): pick your CUDA major
        "nvshmem": ["nvshmem4py-cu12>=0.4"],
        "nvshmem-cu13": ["nvshmem4py-cu13>=0.4"],
        "test": ["pytest>=8", "hypothesis>=6.100", "scipy>=1.11", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["lplb=lplb_plugin.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
