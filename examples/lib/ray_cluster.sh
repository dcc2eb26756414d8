# shellcheck shell=bash
# The shared body of the Slurm launch scripts (examples/luspo_*.sh): a Ray cluster over the job's nodes, the trainer
# on the head node, signal forwarding and teardown. A launch script sets its defaults and calls `mrl_main "$@"`;
# every setting is documented at the top of the launch scripts.
#
# What one job does (DRY_RUN=1 prints exactly these commands instead of running them):
#   1. the head node's IP (the first non-loopback address of srun hostname --ip-address on the first node; RAY_HEAD_IP
#      or RAY_LOOPBACK=1 skip it; a loopback address is refused for multi-node jobs);
#   2. `ray start --head --block` on the first node, as a background srun step (step name ray-head);
#   3. examples/lib/wait_for_ray.py until the head answers, then `ray start --address=... --block` on the other
#      nodes (one background step, ray-workers), then wait_for_ray.py until every node and GPU has joined;
#   4. `megatron-rl train --config $CONFIG ... resources.ray_address=auto` on the head node (step
#      megatron-rl-trainer, RAY_ADDRESS naming this job's head so "auto" cannot pick another cluster);
#   5. on exit (done, failed, or cancelled), the Ray steps are stopped: SIGTERM, then SIGKILL after RAY_STOP_TIMEOUT.
# Signals: SIGTERM/SIGINT to the batch shell (`scancel --batch --signal=TERM JOB`, and the time limit's
# `#SBATCH --signal=B:TERM@...`) are forwarded once to the trainer step with `scancel --signal=TERM JOB.STEP`,
# so the trainer finishes its step, writes a checkpoint and exits, then Ray is torn down. (Sending the signal
# to srun itself would not do: srun answers SIGTERM by killing its tasks at once.) A plain `scancel JOB` signals
# every step at the same moment, Ray included, so the last complete checkpoint is the one to resume from.
# All steps use --overlap: they share the allocation (the Ray daemons hold no CPUs away from the trainer).

MRL_TRAINER_STEP=megatron-rl-trainer
MRL_HEAD_STEP=ray-head
MRL_WORKERS_STEP=ray-workers

mrl_log() { echo "[launch $(date +%H:%M:%S)] $*" >&2; }
mrl_die() { mrl_log "ERROR: $*"; exit 2; }

# A command as one line a shell reads back as the same words (what DRY_RUN prints; copy-pasteable): words made of
# plain characters as they are, anything else in single quotes.
mrl_quote() {
  local out=() arg q="'"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//$q/$q\\$q$q}'")
    fi
  done
  echo "${out[*]}"
}

# Run a command in the foreground (DRY_RUN: print it).
mrl_run() {
  if [[ $DRY_RUN == 1 ]]; then
    mrl_quote "$@"
  else
    "$@"
  fi
}

# Start a command in the background and store its pid in the variable named $1 (DRY_RUN: print it with " &").
mrl_spawn() {
  local var=$1
  shift
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(mrl_quote "$@") &"
    printf -v "$var" '%s' 0
  else
    "$@" &
    printf -v "$var" '%s' "$!"
  fi
}

# Wait for a background pid; returns its exit status. A trapped signal interrupts `wait`: wait again while the
# process is still there, so the trap can forward the signal and we still collect the real status.
mrl_wait() {
  local pid=$1 rc=0
  while true; do
    rc=0
    wait "$pid" || rc=$?
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    return "$rc"
  done
}

mrl_usage() {
  sed -n '2,/^set -euo pipefail/p' "$MRL_SCRIPT" | sed -e '/^set -euo pipefail/d' -e 's/^# //' -e 's/^#$//'
}

# Flags and overrides: --resume, --dry-run, --help, and dotted key=value config overrides (passed to the trainer).
mrl_parse_args() {
  MRL_ARG_OVERRIDES=()
  while (($#)); do
    case "$1" in
      --resume) RESUME=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) mrl_usage; exit 0 ;;
      --*) mrl_die "unknown flag $1 (flags: --resume, --dry-run, --help; config overrides are key=value)" ;;
      *=*) MRL_ARG_OVERRIDES+=("$1") ;;
      *) mrl_die "unexpected argument '$1': config overrides are dotted key=value pairs (e.g. run.steps=100)" ;;
    esac
    shift
  done
}

# The job's nodes, one per line: the allocation's, or (DRY_RUN outside Slurm) node001..nodeNNN.
mrl_node_list() {
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    scontrol show hostnames "$SLURM_JOB_NODELIST"
  else
    local i
    for ((i = 1; i <= NODES; i++)); do
      printf 'node%03d\n' "$i"
    done
  fi
}

mrl_is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# The first non-loopback address among the words read from stdin (the first address when all are loopback).
mrl_first_address() {
  awk '{ for (i = 1; i <= NF; i++) { if (first == "") first = $i; if ($i !~ /^127\./ && $i != "::1") { print $i; found = 1; exit } } }
       END { if (!found && first != "") print first }'
}

# A multi-node job needs a head address the other nodes can reach: refuse a loopback one (`hostname --ip-address`
# gives 127.0.1.1 where /etc/hosts maps the host name to it, as Debian's default does).
mrl_check_head_ip() {
  if ((NODES > 1)) && [[ $1 == 127.* || $1 == ::1 || $1 == localhost ]]; then
    mrl_die "the Ray head address $1 (node $MRL_HEAD_NODE) is a loopback address: the other $((NODES - 1)) node(s)" \
      "cannot reach it. Set RAY_HEAD_IP to the head node's address on the cluster network (see \`hostname -I\` there)"
  fi
}

# Defaults, checks, the node list and derived sizes (nothing is run here).
mrl_settings() {
  : "${NODES:?}" "${GPUS_PER_NODE:?}" "${ENGINE_TP:?}" "${CONFIG:?}" "${REPO_DIR:?}"  # the launch script's defaults
  : "${DRY_RUN:=0}" "${RESUME:=0}" "${REQUEUE:=1}"
  if ((${SLURM_RESTART_COUNT:-0} > 0)); then  # a requeued job (time limit, preemption, scontrol requeue)
    mrl_log "restart ${SLURM_RESTART_COUNT} of job ${SLURM_JOB_ID:-dryrun}: resuming from the run's latest complete checkpoint"
    RESUME=1
  fi
  if [[ -z ${SLURM_JOB_ID:-} && $DRY_RUN != 1 ]]; then
    mrl_die "not inside a Slurm job: submit with sbatch (sbatch $MRL_SCRIPT_NAME), or DRY_RUN=1 to print the commands"
  fi
  MRL_IN_SLURM=0
  if [[ -n ${SLURM_JOB_ID:-} ]]; then MRL_IN_SLURM=1; fi
  JOB_ID=${SLURM_JOB_ID:-dryrun}
  if ((MRL_IN_SLURM)); then
    NODES=${SLURM_JOB_NUM_NODES:-$NODES}  # the allocation decides; `sbatch --nodes=N` changes it
    : "${CPUS_PER_NODE:=${SLURM_CPUS_ON_NODE:-1}}"
  fi
  : "${CPUS_PER_NODE:=64}"
  : "${OUTPUT_DIR:=$REPO_DIR/runs}"
  : "${RUN_NAME:=$(basename "${CONFIG%.*}")}"
  : "${RAY_PORT:=6379}" "${RAY_TMPDIR:=/tmp/ray_$JOB_ID}" "${RAY_JOIN_TIMEOUT:=600}" "${RAY_STOP_TIMEOUT:=10}"
  : "${RAY_LOOPBACK:=0}"
  : "${RAY_OBJECT_STORE_BYTES:=}" "${RAY_HEAD_IP:=}" "${MODEL_PATH:=}" "${TRAIN_DATA:=}" "${VAL_DATA:=}"
  : "${EXTRA_OVERRIDES:=}" "${CONTAINER_IMAGE:=}" "${CONTAINER_WORKDIR:=/workspace/megatron_rl}"
  : "${CONTAINER_MOUNTS:=$OUTPUT_DIR:$OUTPUT_DIR,/tmp:/tmp}" "${PYTHON:=python3}" "${MEGATRON_RL:=megatron-rl}"
  local name
  for name in NODES GPUS_PER_NODE CPUS_PER_NODE RAY_PORT RAY_JOIN_TIMEOUT RAY_STOP_TIMEOUT ENGINE_TP; do
    mrl_is_uint "${!name}" || mrl_die "$name must be a whole number, got '${!name}'"
  done
  ((NODES >= 1)) || mrl_die "NODES must be >= 1"
  [[ -f $REPO_DIR/$CONFIG || -f $CONFIG || -n $CONTAINER_IMAGE ]] \
    || mrl_die "CONFIG=$CONFIG not found (relative paths are relative to REPO_DIR=$REPO_DIR)"

  mapfile -t MRL_NODES < <(mrl_node_list)
  ((${#MRL_NODES[@]} == NODES)) || mrl_die "the node list has ${#MRL_NODES[@]} nodes, expected $NODES"
  MRL_HEAD_NODE=${MRL_NODES[0]}
  MRL_WORKER_NODES=("${MRL_NODES[@]:1}")
  if [[ $RAY_LOOPBACK == 1 ]]; then
    ((NODES == 1)) || mrl_die "RAY_LOOPBACK=1 keeps Ray on 127.0.0.1: single-node jobs only (this one has $NODES)"
    RAY_HEAD_IP=127.0.0.1
    # Ray 2.60 otherwise replaces 127.0.0.1 by the machine's routable address (see megatron_rl/cluster/ray_cluster.py)
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  fi
  if [[ -n $RAY_HEAD_IP ]]; then mrl_check_head_ip "$RAY_HEAD_IP"; fi
  MRL_LOG_DIR=$OUTPUT_DIR/$RUN_NAME/logs/job_$JOB_ID

  # GPU jobs: the GPUs are split between the Megatron ranks (ACTOR_GPUS) and the vLLM engines (the rest).
  MRL_RESOURCE_OVERRIDES=()
  if ((GPUS_PER_NODE > 0)); then
    local total=$((NODES * GPUS_PER_NODE))
    : "${ACTOR_GPUS:=$((total / 2))}"
    mrl_is_uint "$ACTOR_GPUS" || mrl_die "ACTOR_GPUS must be a whole number, got '$ACTOR_GPUS'"
    local rollout_gpus=$((total - ACTOR_GPUS))
    ((ACTOR_GPUS >= 1 && rollout_gpus >= ENGINE_TP && ENGINE_TP >= 1)) \
      || mrl_die "ACTOR_GPUS=$ACTOR_GPUS leaves $rollout_gpus of $total GPUs for engines of ENGINE_TP=$ENGINE_TP GPUs"
    ((rollout_gpus % ENGINE_TP == 0)) \
      || mrl_die "the $rollout_gpus rollout GPUs (NODES x GPUS_PER_NODE - ACTOR_GPUS) are not a multiple of ENGINE_TP=$ENGINE_TP"
    MRL_RESOURCE_OVERRIDES=(resources.device=gpu "resources.num_gpus=$total" "resources.actor_ranks=$ACTOR_GPUS"
      "rollout.num_engines=$((rollout_gpus / ENGINE_TP))" "rollout.engine.tensor_parallel_size=$ENGINE_TP")
  fi
  MRL_DATA_OVERRIDES=()
  if [[ -n $MODEL_PATH ]]; then MRL_DATA_OVERRIDES+=("model.path=$MODEL_PATH"); fi
  if [[ -n $TRAIN_DATA ]]; then MRL_DATA_OVERRIDES+=("data.train.path=$TRAIN_DATA"); fi
  if [[ -n $VAL_DATA ]]; then MRL_DATA_OVERRIDES+=("data.val.path=$VAL_DATA"); fi
}

# Every command line of the job, from the settings (RAY_HEAD_IP may still be unknown: a placeholder then).
mrl_commands() {
  local extra=()
  read -r -a extra <<<"$EXTRA_OVERRIDES"
  MRL_CONTAINER_ARGS=()
  if [[ -n $CONTAINER_IMAGE ]]; then  # Slurm's pyxis plugin
    MRL_CONTAINER_ARGS=("--container-image=$CONTAINER_IMAGE" "--container-mounts=$CONTAINER_MOUNTS"
      "--container-workdir=$CONTAINER_WORKDIR")
  fi
  local step_args=(--overlap --ntasks-per-node=1 "--cpus-per-task=$CPUS_PER_NODE" --mem=0)
  local ray_gpus=()
  if ((GPUS_PER_NODE > 0)); then ray_gpus=("--gpus-per-node=$GPUS_PER_NODE"); fi
  local object_store=()
  if [[ -n $RAY_OBJECT_STORE_BYTES ]]; then object_store=("--object-store-memory=$RAY_OBJECT_STORE_BYTES"); fi
  local ray_node_args=("--num-cpus=$CPUS_PER_NODE" "--num-gpus=$GPUS_PER_NODE" "--temp-dir=$RAY_TMPDIR"
    "${object_store[@]}" --disable-usage-stats --block)
  local head_ip=${RAY_HEAD_IP:-HEAD_IP}
  MRL_RAY_ADDRESS=$head_ip:$RAY_PORT

  MRL_IP_CMD=(srun --overlap --nodes=1 --ntasks=1 "--nodelist=$MRL_HEAD_NODE" hostname --ip-address)
  MRL_HEAD_CMD=(srun "${step_args[@]}" --nodes=1 --ntasks=1 "--nodelist=$MRL_HEAD_NODE" "--job-name=$MRL_HEAD_STEP"
    "${ray_gpus[@]}" "--output=$MRL_LOG_DIR/ray-head.log" "${MRL_CONTAINER_ARGS[@]}"
    ray start --head "--node-ip-address=$head_ip" "--port=$RAY_PORT" --include-dashboard=false "${ray_node_args[@]}")
  local workers_csv
  workers_csv=$(IFS=,; echo "${MRL_WORKER_NODES[*]}")
  MRL_WORKERS_CMD=(srun "${step_args[@]}" "--nodes=$((NODES - 1))" "--ntasks=$((NODES - 1))"
    "--nodelist=$workers_csv" "--job-name=$MRL_WORKERS_STEP" "${ray_gpus[@]}" "--output=$MRL_LOG_DIR/ray-worker-%N.log"
    "${MRL_CONTAINER_ARGS[@]}" ray start "--address=$MRL_RAY_ADDRESS" "${ray_node_args[@]}")
  local on_head=(srun "${step_args[@]}" --nodes=1 --ntasks=1 "--nodelist=$MRL_HEAD_NODE")
  MRL_WAIT_HEAD_CMD=("${on_head[@]}" --job-name=wait-for-ray "${MRL_CONTAINER_ARGS[@]}" "$PYTHON"
    examples/lib/wait_for_ray.py "--address=$MRL_RAY_ADDRESS" --nodes=1 "--gpus=$GPUS_PER_NODE"
    "--timeout=$RAY_JOIN_TIMEOUT")
  MRL_WAIT_ALL_CMD=("${on_head[@]}" --job-name=wait-for-ray "${MRL_CONTAINER_ARGS[@]}" "$PYTHON"
    examples/lib/wait_for_ray.py "--address=$MRL_RAY_ADDRESS" "--nodes=$NODES" "--gpus=$((NODES * GPUS_PER_NODE))"
    "--timeout=$RAY_JOIN_TIMEOUT")
  local resume=()
  if [[ $RESUME == 1 ]]; then resume=(--resume); fi
  MRL_TRAIN_CMD=("${on_head[@]}" "--job-name=$MRL_TRAINER_STEP" "${MRL_CONTAINER_ARGS[@]}"
    env "RAY_ADDRESS=$MRL_RAY_ADDRESS" "$MEGATRON_RL" train --config "$CONFIG"
    "run.output_dir=$OUTPUT_DIR" "run.name=$RUN_NAME" resources.ray_address=auto "${MRL_RESOURCE_OVERRIDES[@]}"
    "${MRL_DATA_OVERRIDES[@]}" "${extra[@]}" "${MRL_ARG_OVERRIDES[@]}" "${resume[@]}")
}

mrl_print_plan() {
  mrl_log "job $JOB_ID: $NODES node(s) [${MRL_NODES[*]}], head $MRL_HEAD_NODE, $GPUS_PER_NODE GPU(s) and $CPUS_PER_NODE CPU(s) per node"
  mrl_log "config $CONFIG, run dir $OUTPUT_DIR/$RUN_NAME (metrics.jsonl, checkpoints/), logs $MRL_LOG_DIR"
  mrl_log "container: ${CONTAINER_IMAGE:-none}; resume: $([[ $RESUME == 1 ]] && echo yes || echo no)"
}

# The id (JOB.STEP) of this job's running step named $1; empty when there is none.
mrl_step_id() {
  squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk -v name="$1" '$2 == name { print $1; exit }'
}

mrl_on_signal() {
  local sig=$1 step
  if [[ $sig == USR1 ]]; then  # the time limit is near (#SBATCH --signal=B:USR1@...): checkpoint, then requeue
    MRL_REQUEUE_AFTER_STOP=$REQUEUE
  fi
  if [[ -n ${MRL_TRAINER_PID:-} ]] && kill -0 "$MRL_TRAINER_PID" 2>/dev/null; then
    step=$(mrl_step_id "$MRL_TRAINER_STEP")
    if [[ -n $step ]]; then
      mrl_log "SIG$sig: forwarding SIGTERM to the trainer (step $step): it finishes the step, checkpoints, exits"
      scancel --signal=TERM "$step" || mrl_log "scancel --signal=TERM $step failed"
    else
      mrl_log "SIG$sig: the trainer step is not registered yet; stopping"
      exit 143
    fi
  else
    mrl_log "SIG$sig before the trainer started: tearing down"
    exit 143
  fi
}

# Print (DRY_RUN) what the signal and exit handlers would run.
mrl_print_handlers() {
  echo "# on SIGTERM/SIGINT of the batch shell (scancel --batch --signal=TERM $JOB_ID):"
  echo "#   scancel --signal=TERM $JOB_ID.<step $MRL_TRAINER_STEP>   (the trainer checkpoints and exits)"
  echo "# on SIGUSR1 (the time limit's #SBATCH --signal=B:USR1@...): the same, then (REQUEUE=$REQUEUE)"
  echo "#   scontrol requeue $JOB_ID   (the job restarts with --resume and continues from that checkpoint)"
  echo "# on exit: scancel $JOB_ID.<step $MRL_WORKERS_STEP> $JOB_ID.<step $MRL_HEAD_STEP>   (Ray stops)"
}

# Stop the Ray steps: SIGTERM to every process of them, SIGKILL (scancel) after RAY_STOP_TIMEOUT seconds.
mrl_stop_ray() {
  local ids=() name id pid deadline=$((SECONDS + RAY_STOP_TIMEOUT))
  for name in "$MRL_WORKERS_STEP" "$MRL_HEAD_STEP"; do
    id=$(mrl_step_id "$name")
    if [[ -n $id ]]; then ids+=("$id"); fi
  done
  ((${#ids[@]})) || return 0
  mrl_log "stopping Ray (steps ${ids[*]}): SIGTERM, SIGKILL after ${RAY_STOP_TIMEOUT}s"
  scancel --signal=TERM "${ids[@]}" || true
  for pid in ${MRL_WORKERS_PID:-} ${MRL_HEAD_PID:-}; do
    while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do
      sleep 1
    done
  done
  scancel "${ids[@]}" 2>/dev/null || true
}

mrl_teardown_quietly() {
  local step pid
  trap - TERM INT USR1
  if [[ -n ${MRL_TRAINER_PID:-} ]] && kill -0 "$MRL_TRAINER_PID" 2>/dev/null; then
    mrl_log "the trainer is still running at exit: cancelling its step"
    step=$(mrl_step_id "$MRL_TRAINER_STEP")
    if [[ -n $step ]]; then scancel "$step" || true; else kill "$MRL_TRAINER_PID" || true; fi
  fi
  mrl_stop_ray
  for pid in ${MRL_WORKERS_PID:-} ${MRL_HEAD_PID:-} ${MRL_TRAINER_PID:-}; do
    wait "$pid" 2>/dev/null || true
  done
}

mrl_teardown() {
  local rc=$?
  mrl_teardown_quietly
  mrl_log "done (exit status $rc)"
  exit "$rc"
}


# Run a step in the foreground, interruptibly (a trapped signal is handled while it runs); its exit status.
# DRY_RUN: print it.
mrl_step() {
  if [[ $DRY_RUN == 1 ]]; then
    mrl_quote "$@"
    return 0
  fi
  local pid
  mrl_spawn pid "$@"
  mrl_wait "$pid"
}

mrl_main() {
  MRL_SCRIPT=${MRL_SCRIPT:-$0}
  MRL_SCRIPT_NAME=$(basename "$MRL_SCRIPT")
  mrl_parse_args "$@"
  mrl_settings
  mrl_commands
  mrl_print_plan
  cd "$REPO_DIR" || mrl_die "cannot cd to REPO_DIR=$REPO_DIR"
  MRL_HEAD_PID="" MRL_WORKERS_PID="" MRL_TRAINER_PID=""
  # Ray 2.60 token authentication: one random token per job, in the environment every step inherits (a token in
  # ~/.ray/auth_token would have to be on every node, and an explicit address does not read it).
  : "${RAY_AUTH_MODE:=token}"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# DRY_RUN: the commands of a $NODES-node job (outside Slurm the job id, node names and CPU count are examples)"
    if [[ $RAY_LOOPBACK == 1 ]]; then echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"; fi
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
      printf '%s\n' "export RAY_AUTH_TOKEN=\$(od -An -tx1 -N32 /dev/urandom | tr -d ' \\n')   # a new random token per job"
    fi
  else
    export RAY_AUTH_MODE
    if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
      RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
      export RAY_AUTH_TOKEN
    fi
    trap mrl_teardown EXIT
    trap 'mrl_on_signal TERM' TERM
    trap 'mrl_on_signal INT' INT
    trap 'mrl_on_signal USR1' USR1
  fi
  mrl_run mkdir -p "$MRL_LOG_DIR"

  if [[ -z $RAY_HEAD_IP ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      echo "$(mrl_quote "${MRL_IP_CMD[@]}")   # HEAD_IP below = the first non-loopback address it prints"
    else
      RAY_HEAD_IP=$("${MRL_IP_CMD[@]}" | mrl_first_address)
      [[ -n $RAY_HEAD_IP ]] || mrl_die "could not resolve the IP of $MRL_HEAD_NODE; set RAY_HEAD_IP"
      mrl_check_head_ip "$RAY_HEAD_IP"
      mrl_commands
    fi
  fi
  mrl_log "Ray head: $MRL_RAY_ADDRESS (temp dir $RAY_TMPDIR)"
  mrl_spawn MRL_HEAD_PID "${MRL_HEAD_CMD[@]}"
  mrl_step "${MRL_WAIT_HEAD_CMD[@]}" || mrl_die "the Ray head did not come up (see $MRL_LOG_DIR/ray-head.log)"
  if ((NODES > 1)); then
    mrl_spawn MRL_WORKERS_PID "${MRL_WORKERS_CMD[@]}"
    mrl_step "${MRL_WAIT_ALL_CMD[@]}" || mrl_die "not every node joined the Ray cluster (see $MRL_LOG_DIR/ray-worker-*.log)"
  fi

  mrl_log "starting the trainer on $MRL_HEAD_NODE"
  if [[ $DRY_RUN == 1 ]]; then
    mrl_quote "${MRL_TRAIN_CMD[@]}"
    mrl_print_handlers
    return 0
  fi
  local rc=0
  mrl_spawn MRL_TRAINER_PID "${MRL_TRAIN_CMD[@]}"
  mrl_wait "$MRL_TRAINER_PID" || rc=$?
  mrl_log "the trainer exited with status $rc"
  if [[ ${MRL_REQUEUE_AFTER_STOP:-0} == 1 && $rc == 0 ]]; then
    trap - EXIT
    mrl_teardown_quietly
    mrl_log "requeueing job $SLURM_JOB_ID: it restarts with --resume from the checkpoint just written"
    scontrol requeue "$SLURM_JOB_ID" || mrl_log "scontrol requeue $SLURM_JOB_ID failed: resubmit with RESUME=1"
  fi
  exit "$rc"
}
