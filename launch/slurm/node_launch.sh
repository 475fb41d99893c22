#!/bin/bash
# Runs on every node of a Slurm job, started there by `srun` from train.sbatch or multinode.sbatch:
# one `accelerate launch` that starts this node's training processes. Not meant to be run by hand.
#
# Everything node-specific is evaluated here, on the node (not in the batch shell on the head):
# the machine rank (SLURM_NODEID) and the GPUs this node sees. From the batch script it takes
#   MAIN_PROCESS_IP, MAIN_PROCESS_PORT  where the head node's rank 0 listens
#   NPROC_PER_NODE                      processes per node (default: one per visible GPU; 1 without GPUs)
#   ACCELERATE_CONFIG                   accelerate config file (default: chosen below)
#   WORKER_RESTARTS                     restarts of the worker group after a crash (default: 3)
# Its arguments go to `dist-alexnet train`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
nodes=${SLURM_NNODES:-1}
rank=${SLURM_NODEID:-0}
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')

if (( gpus > 0 )); then
    nproc=${NPROC_PER_NODE:-$gpus}
    if (( nodes > 1 )); then default_config=multi_node.yaml; else default_config=one_node.yaml; fi
else
    # No GPU: DDP over gloo on the CPU (the trainer falls back to the CPU when CUDA is absent).
    nproc=${NPROC_PER_NODE:-1}
    default_config=cpu_2proc.yaml
fi
config=${ACCELERATE_CONFIG:-$repo/launch/accelerate/$default_config}

echo "node ${SLURMD_NODENAME:-$(hostname -s)}: machine rank $rank of $nodes, $nproc process(es) on $gpus GPU(s)," \
     "head $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT, config $config"

# Restarts after a crash: the configs use c10d rendezvous, at rank 0's address and port for every node. When a
# worker dies (or stops with an error, e.g. after a hung peer's --collective-timeout), this node's launcher
# stops its group and starts it again, up to WORKER_RESTARTS times, and the other nodes' launchers follow; the
# new workers resume from the newest checkpoint (--resume auto) in the same run directory.
# Each round of the rendezvous gets a fresh store for its workers: with the one the launchers share by default,
# a restarted group can read the dead workers' addresses left there and fail to connect.
export PET_RDZV_ENDPOINT=${PET_RDZV_ENDPOINT:-$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT}
export PET_RDZV_ID=${PET_RDZV_ID:-dist-alexnet-${SLURM_JOB_ID:-local}}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# The batch script forwards the preemption signal (SIGUSR1) to every process of this job step. The
# training processes handle it; the launcher must not die of it, so it ignores it (an ignored signal
# stays ignored in its children; the training processes install their own handler).
trap '' USR1
status=0
# The head (machine rank 0) hosts the rendezvous store, the other nodes only connect to it: left to itself,
# torch guesses from host names, and two nodes on one machine would both try to host it.
accelerate launch --config_file "$config" --rdzv_backend c10d --rdzv_conf "is_host=$(( rank == 0 ))" \
    --max_restarts "${WORKER_RESTARTS:-3}" \
    --num_machines "$nodes" --machine_rank "$rank" --num_processes $(( nodes * nproc )) \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    -m dist_alexnet.cli train "$@" || status=$?
if (( status != 0 )); then
    echo "error: node ${SLURMD_NODENAME:-$(hostname -s)} (machine rank $rank): its launcher exited with status" \
         "$status: its workers failed after ${WORKER_RESTARTS:-3} restart(s), or it was stopped" >&2
fi
exit "$status"
