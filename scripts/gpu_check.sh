#!/usr/bin/env bash
# GPU check (`make gpu-check`): how fast is dist-alexnet on this machine? On CUDA, within 8 minutes:
#   1. dist-alexnet benchmark at 224, bf16, batch 512 and 256, each without and with --compile
#   2. a 3-epoch training run with launch/configs/fast.yaml on the synthetic set of Fashion-MNIST's size
#      (60,000 training images), with every visible GPU
#   3. the scaling model's input measured on one GPU (scaling-model --measure, bf16, batch 512) and, with
#      several GPUs, benchmark --processes <GPUs> --parallelism ddp hybrid (weak, and strong at a global batch
#      of 1024): the measured scaling in the node; and a 1-epoch run of fast.yaml with --parallelism hybrid
#      (--parallelism hybrid needs 2 processes or more: with one GPU these are left out)
# Results, as JSON files in $GPU_CHECK_DIR (default ./gpu-check), with each step's log beside its file:
#   benchmark-b<batch>.json, benchmark-b<batch>-compile.json   what `benchmark --json` writes
#   train-metrics.json                                         the training run's metrics.json
#   scaling-model.json, scaling-benchmark.json                 the step profile and predicted table; the
#   scaling-benchmark-strong.json, train-hybrid-metrics.json   measured n-GPU scaling, hybrid's run (several
#                                                              GPUs only)
#   summary.json                                               the figures the targets name, met or not
# Without CUDA the same steps run at toy sizes on the CPU (the tests do that): it proves the script, not
# the speed. Exit status: 0 when every step ran, 1 otherwise (unmet targets show in summary.json).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${GPU_CHECK_DIR:-./gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))  # the steps share one time budget, in seconds

GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$GPUS" -gt 0 ]; then
    BENCH=(--image-size 224 --mixed-precision bf16 --steps 20 --windows 5 --warmup 5)
    BATCHES=(512 256)
    TRAIN=(--synthetic-train-size 60000 --synthetic-test-size 10000 --log-every 20)
    SCALING=(--batch-size 512)
    if [ "$GPUS" -gt 1 ]; then
        LAUNCH=(accelerate launch --config_file "$REPO/launch/accelerate/one_node.yaml" --num_processes "$GPUS")
    else
        LAUNCH=(accelerate launch --config_file "$REPO/launch/accelerate/one_gpu.yaml")
    fi
    LAUNCH+=(-m dist_alexnet.cli)
else
    echo "no CUDA GPU: running the check at toy sizes on the CPU (this checks the script, not the speed)"
    BENCH=(--image-size 64 --model-width 0.125 --mixed-precision bf16 --steps 2 --windows 2 --warmup 1 --num-workers 1)
    BATCHES=(16)
    TRAIN=(--synthetic-train-size 512 --synthetic-test-size 101 --image-size 64 --model-width 0.125 --batch-size 32
           --log-every 4)
    SCALING=(--batch-size 4 --image-size 64 --model-width 0.125)
    LAUNCH=("$PYTHON" -m dist_alexnet.cli)
fi

failed=0
step() {  # step NAME COMMAND...: run it within the time left, its output shown and saved to NAME.log
    local name=$1 left=$((DEADLINE - SECONDS))
    shift
    if [ "$left" -le 10 ]; then
        echo "== $name: skipped, out of time"; failed=1; return
    fi
    echo "== $name (at most ${left}s): $*"
    timeout --kill-after 10 "$left" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "== $name: FAILED with exit status $status (log: $OUT/$name.log)"; failed=1
    fi
}

# Most telling first, so that a slow machine loses the least important steps to the deadline.
bench() {  # bench BATCH [--compile]
    local name="benchmark-b$1${2:+-compile}"
    step "$name" "$PYTHON" -m dist_alexnet.cli benchmark "${BENCH[@]}" --batch-size "$1" ${2:+"$2"} --json "$OUT/$name.json"
}
bench "${BATCHES[0]}"
rm -rf "$OUT/train-run"
step train "${LAUNCH[@]}" train --config "$REPO/launch/configs/fast.yaml" --dataset synthetic "${TRAIN[@]}" --epochs 3 \
    --data-dir "$OUT/data" --output-dir "$OUT/train-run" --resume none
cp "$OUT/train-run/metrics.json" "$OUT/train-metrics.json" 2>/dev/null
step scaling-model "$PYTHON" -m dist_alexnet.cli scaling-model --measure "${SCALING[@]}" --json "$OUT/scaling-model.json"
if [ "$GPUS" -gt 1 ]; then
    step scaling-benchmark "$PYTHON" -m dist_alexnet.cli benchmark --processes "$GPUS" "${BENCH[@]}" --batch-size 512 \
        --parallelism ddp hybrid --ddp-comm-hook none bf16 --json "$OUT/scaling-benchmark.json"
    step scaling-benchmark-strong "$PYTHON" -m dist_alexnet.cli benchmark --processes "$GPUS" "${BENCH[@]}" \
        --global-batch-size 1024 --parallelism ddp hybrid --json "$OUT/scaling-benchmark-strong.json"
    rm -rf "$OUT/train-hybrid-run"
    step train-hybrid "${LAUNCH[@]}" train --config "$REPO/launch/configs/fast.yaml" --dataset synthetic "${TRAIN[@]}" \
        --epochs 1 --parallelism hybrid --data-dir "$OUT/data" --output-dir "$OUT/train-hybrid-run" --resume none
    cp "$OUT/train-hybrid-run/metrics.json" "$OUT/train-hybrid-metrics.json" 2>/dev/null
fi
for batch in "${BATCHES[@]:1}"; do bench "$batch"; done
for batch in "${BATCHES[@]}"; do bench "$batch" --compile; done

"$PYTHON" "$REPO/scripts/gpu_check_summary.py" "$OUT" || failed=1
echo "results: $OUT"
exit $failed
