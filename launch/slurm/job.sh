#!/bin/bash
# The body both batch scripts share (train.sbatch: one node; multinode.sbatch: several), sourced by them
# after they set MAIN_PROCESS_IP, the address of rank 0. It finds the virtualenv, chooses the run directory,
# bounds the requeues, starts one launcher per node with srun (launch/slurm/node_launch.sh) and forwards
# the preemption signal. Everything after the batch script's name goes to `dist-alexnet train`.
#
# Preemption and requeue: Slurm sends SIGUSR1 to the batch script 120 s before the time limit (or an
# admin or test sends it: `scancel --signal=USR1 --batch <job>`); it is forwarded to every training
# process on every node, which all stop at the same step, save a checkpoint, and rank 0 requeues the
# job. The requeued job runs the script again with the same run directory and resumes from the newest
# checkpoint (`--resume auto`). A requeued job starts after 120 s (Slurm's BeginTime), or at once with
# `scontrol update JobId=<job> StartTime=now`.
#
# Output: the Slurm log slurm-<job>.out (arrays: slurm-<array job>_<task>.out) in the submit directory,
# appended to across requeues; the run directory (checkpoints, TensorBoard, metrics.json) is
# runs/slurm-<job>, the same across requeues.
#
# Environment (set before sbatch; sbatch passes your environment to the job):
#   DIST_ALEXNET_HOME  the repository                      (default: the submit directory)
#   DIST_ALEXNET_VENV  virtualenv with dist-alexnet        (default: $DIST_ALEXNET_HOME/.venv, else your PATH)
#   RUN_DIR            run directory; --output-dir wins     (default: runs/slurm-<job>)
#   NPROC_PER_NODE     training processes per node          (default: one per GPU; 1 without GPUs)
#   MAX_RESTARTS       requeues after which a preempted job saves and stops instead (default: 10)
#   WORKER_RESTARTS    restarts of the worker group inside the allocation after a crash (default: 3)
#   NCCL_DEBUG         e.g. INFO: NCCL's own log, for a hang or a slow start (default: unset)
#   MAIN_PROCESS_PORT  rank 0's port                        (default: a free one on the first node)
#   ACCELERATE_CONFIG  accelerate config file               (default: launch/accelerate/multi_node.yaml,
#                                                             one_node.yaml on one node, cpu_2proc.yaml without GPUs)

venv=${DIST_ALEXNET_VENV:-$repo/.venv}
if [[ -x $venv/bin/accelerate ]]; then
    export PATH=$venv/bin:$PATH
elif ! command -v accelerate >/dev/null; then
    echo "error: no accelerate in $venv nor on PATH; run \`make install\` in $repo or export DIST_ALEXNET_VENV" >&2
    exit 2
fi

# The same run directory on every (re)start of this job: that is what makes `--resume auto` resume.
job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}  # array task: <array job>_<task>
job=${job:-$SLURM_JOB_ID}
run_dir=${RUN_DIR:-runs/slurm-$job}

# Bound the requeues: from the MAX_RESTARTS-th restart on, a preempted job saves but does not requeue.
restarts=${SLURM_RESTART_COUNT:-0}
max_restarts=${MAX_RESTARTS:-10}
requeue=()
if (( restarts >= max_restarts )); then
    echo "restart $restarts: MAX_RESTARTS=$max_restarts reached, a preemption now saves a checkpoint and stops"
    requeue=(--no-requeue-on-preempt)
fi

# Two bounds, two kinds of trouble. A crash (a worker killed, out of memory, a GPU error) or a hung rank (it
# times out after --collective-timeout) is recovered inside the allocation: the launchers restart the worker
# group, at most WORKER_RESTARTS times, and it resumes from the newest checkpoint. A preemption or the time
# limit ends the allocation: the job saves, requeues itself and resumes, at most MAX_RESTARTS times.
#
# What NCCL users need to diagnose a hang: on a collective timeout each rank dumps its flight recorder (its
# last 2000 collectives) into <run directory>/nccl-trace/ (read it with `python -m
# torch.distributed.flight_recorder.fr_trace <run directory>/nccl-trace -p rank_`); NCCL_DEBUG=INFO, exported
# before sbatch, logs NCCL. torch 2.14's names (TORCH_NCCL_TRACE_BUFFER_SIZE / _DEBUG_INFO_TEMP_FILE are the old).
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$run_dir/nccl-trace/rank_}
mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"

# Rank 0 runs on the first node of the allocation, where this script runs: a port free here is free there.
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
export MAIN_PROCESS_IP MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$(free_port)}
echo "job $job (restart $restarts) on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)," \
     "head $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT: run directory $run_dir; up to ${WORKER_RESTARTS:-3} worker restarts"

# Slurm signals only the batch shell (B:USR1). Pass SIGUSR1 on to every process of the training step on
# every node (scancel without --batch signals all job steps, not this script); the launchers ignore it
# and the training processes save and stop. On SIGTERM (cancel, preemption) Slurm signals every process
# itself: keep waiting so the training processes can finish saving.
trap 'echo "got SIGUSR1: forwarding it to the training processes"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
trap 'echo "got SIGTERM: waiting for the training processes to save"' TERM

srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$repo/launch/slurm/node_launch.sh" --output-dir "$run_dir" "${requeue[@]}" "$@" &
launcher=$!
# `wait` returns early when a trapped signal arrives: wait again until the step has really ended.
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher" || true; done
wait "$launcher"
