#!/usr/bin/env bash
# The GPU check (megatron_rl/benchmarks/gpu_check.py): bf16 logits vs transformers, CUDA IPC between two processes,
# bf16 train steps and MFU, the nccl weight transport (two GPUs and vLLM, else skipped); one Markdown report. Needs
# only a Python with CUDA torch, megatron-core and transformers (no install step: the repository is put on
# PYTHONPATH). Under 10 minutes on one H100.
#   bash tools/gpu_check.sh --report tools/GPU_CHECK.md
#   bash tools/gpu_check.sh --dry-run --report /tmp/gpu_check_plan.md     # no GPU: import, plan, skip
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m megatron_rl.benchmarks.gpu_check "$@"
