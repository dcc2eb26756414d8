#!/usr/bin/env bash
# The GPU check (megatron_rl/benchmarks/gpu_check.py): bf16 logits vs transformers, CUDA IPC between two processes,
# bf16 train steps and MFU, the nccl weight transport (two GPUs and vLLM, else skipped); one Markdown report. Needs
# only a Python with CUDA torch, megatron-core and transformers (no install step: the repository is put on
# PYTHONPATH). Under 10 minutes on one H100.
#   bash tools/gpu_check.sh --report tools/GPU_CHECK.md
#   bash tools/gpu_check.sh --dry-run --report /tmp/gpu_check_plan.md     # no GPU: import, plan, skip
# On a machine that cannot reach a package index: run tools/gpu_wheels.sh first, where one can, and carry .whl/
# along (or name another folder in GPU_CHECK_WHEELS); its wheels for this Python are installed here into a private
# folder (no dependencies resolved: the machine has them).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python)}"  # the device machines have python3 only
# the carried wheels built for this Python (cpXY) or for any Python 3
tag="$("${python}" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
wheel_dir="${GPU_CHECK_WHEELS:-${repo}/.whl}"
mapfile -t wheels < <(compgen -G "${wheel_dir}/*-${tag}-*.whl"; compgen -G "${wheel_dir}/*-py3-none-any.whl"
                      compgen -G "${wheel_dir}/*-py2.py3-none-any.whl" || true)
if ((${#wheels[@]})); then
  site="${TMPDIR:-/tmp}/megatron_rl_gpu_site"
  echo "[gpu_check] installing ${#wheels[@]} carried wheel(s) from ${wheel_dir} into ${site}" >&2
  "${python}" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${site}" \
    "${wheels[@]}"
  export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
fi
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${python}" -m megatron_rl.benchmarks.gpu_check "$@"
