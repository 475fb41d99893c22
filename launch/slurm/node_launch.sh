#!/bin/bash
# Runs on every node of a Slurm job, started there by `srun` from train.sbatch or multinode.sbatch:
# one `accelerate launch` that starts this node's training processes. Not meant to be run by hand.
#
# Everything node-specific is evaluated here, on the node (not in the batch shell on the head):
# the machine rank (SLURM_NODEID) and the GPUs this node sees. From the batch script it takes
#   MAIN_PROCESS_IP, MAIN_PROCESS_PORT  where the head node's rank 0 listens
#   NPROC_PER_NODE                      processes per node (default: one per visible GPU; 1 without GPUs)
#   ACCELERATE_CONFIG                   accelerate config file (default: chosen below)
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

# The batch script forwards the preemption signal (SIGUSR1) to every process of this job step. The
# training processes handle it; the launcher must not die of it, so it ignores it (an ignored signal
# stays ignored across exec; the training processes install their own handler).
trap '' USR1
exec accelerate launch --config_file "$config" \
    --num_machines "$nodes" --machine_rank "$rank" --num_processes $(( nodes * nproc )) \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    -m dist_alexnet.cli train "$@"
