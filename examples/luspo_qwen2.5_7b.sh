#!/usr/bin/env bash
# LUSPO on Qwen2.5-7B (dense) on 1-2 nodes of 8 x H100: Megatron actors (TP=2 + sequence parallel, DP for the
# rest, bf16, distributed optimizer) on half of the GPUs, vLLM engines (one GPU each) on the other half, driven
# from the first node through Ray.
#
#   sbatch examples/luspo_qwen2.5_7b.sh                                # from the repository root
#   sbatch --nodes=2 examples/luspo_qwen2.5_7b.sh run.steps=1000       # more nodes; dotted config overrides
#   RESUME=1 sbatch examples/luspo_qwen2.5_7b.sh                       # or: sbatch examples/luspo_qwen2.5_7b.sh --resume
#   DRY_RUN=1 bash examples/luspo_qwen2.5_7b.sh                        # print the commands of a 1-node job
#   scancel --batch --signal=TERM <jobid>                             # stop cleanly: finish the step, checkpoint
#
# Arguments: --resume, --dry-run, --help, and any number of dotted config overrides (key=value, passed to
# `megatron-rl train` after everything below, so they win).
#
# Settings (environment variables; sbatch passes your environment to the job):
#   Allocation: the #SBATCH lines below (nodes, GPUs, time); change them with sbatch flags, e.g. --nodes=2.
#   NODES=1              nodes (inside a job: the allocation's; outside, e.g. with DRY_RUN, this value)
#   GPUS_PER_NODE=8      GPUs per node given to Ray (0 = a CPU-only job: the config's own resources are used)
#   CPUS_PER_NODE        CPUs per node given to Ray (default: the allocation's SLURM_CPUS_ON_NODE; 64 in a dry run)
#   ACTOR_GPUS           GPUs for the Megatron ranks (= resources.actor_ranks; default half of NODES x GPUS_PER_NODE);
#                        the rest run vLLM engines of ENGINE_TP GPUs each (rollout.num_engines)
#   ENGINE_TP=1          tensor parallel size of one vLLM engine (rollout.engine.tensor_parallel_size)
#   CONFIG=examples/configs/qwen2.5_7b_luspo.yaml   the YAML config (relative to REPO_DIR / the container workdir)
#   MODEL_PATH, TRAIN_DATA, VAL_DATA   override model.path, data.train.path, data.val.path (default: the config's)
#   OUTPUT_DIR=$REPO_DIR/runs   shared directory (all nodes) for the run: $OUTPUT_DIR/$RUN_NAME holds metrics.jsonl,
#                        TensorBoard events, checkpoints/ and logs/job_<id>/ (Ray head and worker logs)
#   RUN_NAME             run folder (default: the config's file name); keep it to resume
#   RESUME=0             1: continue from the latest complete checkpoint of the run (a fresh start when none);
#                        a requeued job (SLURM_RESTART_COUNT > 0) always does
#   REQUEUE=1            on the time limit's SIGUSR1: checkpoint, then `scontrol requeue` the job (0: just stop)
#   EXTRA_OVERRIDES      space-separated config overrides (no spaces inside one; use arguments for those)
#   CONTAINER_IMAGE      run every step in this image through Slurm's pyxis plugin (--container-image); e.g. an
#                        enroot .sqsh made from docker/Dockerfile.gpu. Empty: the software on the nodes is used
#   CONTAINER_MOUNTS=$OUTPUT_DIR:$OUTPUT_DIR,/tmp:/tmp   pyxis --container-mounts (/tmp: the Ray session sockets
#                        shared by the Ray head and the trainer, two containers on the head node)
#   CONTAINER_WORKDIR=/workspace/megatron_rl   the repository inside the image (where CONFIG is looked up)
#   RAY_PORT=6379  RAY_TMPDIR=/tmp/ray_<jobid>
#   RAY_JOIN_TIMEOUT=600 (seconds for all nodes to join)  RAY_STOP_TIMEOUT=10 (seconds from SIGTERM to SIGKILL)
#   RAY_HEAD_IP          the head's address (default: the first non-loopback one `hostname --ip-address` prints on
#                        the first node; a loopback address is refused when NODES > 1)
#   RAY_LOOPBACK=0       1: Ray on 127.0.0.1 only (single-node jobs; the local Slurm tests use it)
#   RAY_OBJECT_STORE_BYTES   Ray object store per node (default: Ray's, 30% of memory)
#   REPO_DIR             the repository (default: the directory sbatch was called from)
#   PYTHON=python3  MEGATRON_RL=megatron-rl   the commands run on the nodes
#   DRY_RUN=0            1: print the commands instead of running them (works outside Slurm, no side effects)
#
# Signals: the batch shell forwards SIGTERM (scancel --batch --signal=TERM) to the trainer, which finishes its step,
# saves a checkpoint and exits; then Ray is torn down. The time limit sends SIGUSR1 15 minutes ahead (--signal
# below): the same clean stop, then the job requeues itself (REQUEUE=1) and continues where it stopped. A requeued
# or preempted job (--requeue; SLURM_RESTART_COUNT > 0) always resumes from the latest complete checkpoint. A plain
# `scancel` stops every step at once: resume later with RESUME=1 from the last complete checkpoint.
#SBATCH --job-name=luspo-qwen2.5-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${NODES:=1}" "${GPUS_PER_NODE:=8}" "${ENGINE_TP:=1}" "${CONFIG:=examples/configs/qwen2.5_7b_luspo.yaml}"
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f $REPO_DIR/examples/lib/ray_cluster.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy
[[ -f $REPO_DIR/examples/lib/ray_cluster.sh ]] \
  || { echo "error: $REPO_DIR is not the megatron_rl repository: sbatch from its root, or set REPO_DIR" >&2; exit 2; }
# shellcheck source-path=SCRIPTDIR source=lib/ray_cluster.sh
source "$REPO_DIR/examples/lib/ray_cluster.sh"
mrl_main "$@"
