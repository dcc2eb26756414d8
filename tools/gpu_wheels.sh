#!/usr/bin/env bash
# The wheels the GPU check needs on a GPU machine that cannot reach a package index, downloaded here into .whl/
# (git-ignored). The lent device machines (docs/benchmarks.md, "The GPU check") have CUDA torch, transformers,
# safetensors, numpy, psutil and pyyaml, but no megatron-core; vLLM's GPU wheel is too large to carry, so the checks
# that need it skip there. gpu_check.sh installs whatever .whl/ holds into a private folder before it runs.
#
#   bash tools/gpu_wheels.sh                           # for that machine's Python (3.12)
#   GPU_PYTHON_VERSION=3.11 bash tools/gpu_wheels.sh   # for another Python
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_version="${GPU_PYTHON_VERSION:-3.12}"
# the version setup.py pins, so that the GPU runs the same megatron-core as CI
megatron_core="$(sed -n 's/.*"\(megatron-core==[^"]*\)".*/\1/p' "${repo}/setup.py")"
if [[ -z "${megatron_core}" ]]; then
  echo "[gpu_wheels] setup.py pins no megatron-core version" >&2
  exit 1
fi
mkdir -p "${repo}/.whl"
echo "[gpu_wheels] ${megatron_core} for CPython ${python_version} (manylinux x86-64) into .whl/" >&2
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${python_version}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "${repo}/.whl" "${megatron_core}"
ls -l "${repo}/.whl" >&2
