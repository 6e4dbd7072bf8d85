"""lplb_plugin: per-batch LP load balancing of redundant MoE experts for Megatron-core
and DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

setup(
    name="lplb_plugin",
    version="0.1.0",
    description="Exact per-batch LP load balancing of redundant MoE experts (Megatron-core, DeepSpeed)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lplb_plugin", "lplb_plugin.*"]),
    package_data={"lplb_plugin.data": ["*.json", "*.md"]},
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
