#!/usr/bin/env bash
# Issue 4's GPU row in one go, for a lent GPU machine (one H200 here) with a deadline:
#   1. the ResNet-18 BadNets victim (configs/victims/cifar10_badnets_resnet18.yaml, bf16), shortened
#      to VICTIM_EPOCHS epochs with the learning-rate steps scaled the same way (the seeds' 150 epochs
#      do not fit a 15-minute device lease), written where the full BTI-DBF configs look for it;
#   2. BTI-DBF (P), (U) and (P) with the pretrained purifier at the paper's settings, side by side
#      (benchmarks/sweeps/btidbf_resnet18_gpu.yaml), beside two short fp16 ("16-mixed") runs on the
#      embedded data, which the CPU cannot check (fp16 autocast with a gradient scaler is GPU-only);
#   3. everything small (logs, metrics, figures, summaries) packed into $OUT/results.tar.gz.
# Every stage runs under the deadline (DEADLINE_S seconds from the start): Lightning's max_time ends
# each training run cleanly in time (the rounds already validated are in its metrics.csv), and a
# stage still running at the deadline is sent SIGTERM.
#   LIGHTNING_DEFENSE_DATA=<folder with cifar10-jpeg/> OUT=<folder> bash benchmarks/gpu_resnet18_btidbf.sh
# A smoke run (one victim epoch, one short round of each defense): VICTIM_EPOCHS=1 SMOKE=1; on the CPU
# add VICTIM_ARGS="--trainer.limit_train_batches 4 --trainer.limit_val_batches 2". FP16_CHECKS=0 skips
# the fp16 runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
DEADLINE_S="${DEADLINE_S:-540}"
VICTIM_EPOCHS="${VICTIM_EPOCHS:-30}"
VICTIM_KEEP_S="${VICTIM_KEEP_S:-300}"  # the victim must end this long before the deadline
WORKERS="${WORKERS:-8}"
PYTHON="${PYTHON:-python3}"
work="${WORK:-runs/gpu_resnet18}"
if [ -e runs/cifar10_badnets_resnet18 ]; then  # the full configs read version_0's victim: it must be this run's
  echo "runs/cifar10_badnets_resnet18 exists: move it away first (the BTI-DBF configs would defend its version_0)" >&2
  exit 2
fi
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1

# shellcheck source=benchmarks/gpu/deadline.sh
source benchmarks/gpu/deadline.sh  # left, max_time, until_deadline

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from machine_info import machine; print(machine())"
  "$PYTHON" -c "import lightning, torch, torchmetrics, segmentation_models_pytorch as smp, jsonargparse; \
print('lightning', lightning.__version__, 'torch', torch.__version__, 'torchmetrics', torchmetrics.__version__, \
'smp', smp.__version__, 'jsonargparse', jsonargparse.__version__)"
} >"$work/machine.txt" 2>&1
cat "$work/machine.txt"

# 1. the victim (milestones at 2/3 and 13/15 of the run, as 100 and 130 of the seeds' 150 epochs)
m1=$((VICTIM_EPOCHS * 2 / 3))
m2=$((VICTIM_EPOCHS * 13 / 15))
victim_cmd=("$PYTHON" -m lightning_defense fit --config configs/victims/cifar10_badnets_resnet18.yaml
  --trainer.max_epochs "$VICTIM_EPOCHS" --model.init_args.lr_milestones "[$m1, $m2]"
  --data.init_args.num_workers "$WORKERS" --trainer.logger.init_args.save_dir runs
  --trainer.max_time "$(max_time "$VICTIM_KEEP_S")")
# shellcheck disable=SC2206
victim_cmd+=(${VICTIM_ARGS:-})  # e.g. --trainer.limit_train_batches 4 for a dry run on the CPU
echo "[gpu] victim: ${victim_cmd[*]}" | tee "$work/victim.command"
victim_start=$SECONDS
until_deadline "$((VICTIM_KEEP_S - 20))" "${victim_cmd[@]}" >"$work/victim.log" 2>&1
echo "[gpu] victim exit $? after $((SECONDS - victim_start)) s" | tee -a "$work/victim.command"
tail -3 "$work/victim.log"
victim=runs/cifar10_badnets_resnet18/version_0/victim.safetensors
sha256sum "$victim" >"$work/victim.sha256" 2>&1

# 2. the defenses side by side, and the fp16 checks beside them
# max_time counts from the start of fit, after imports and data loading (~20 s): leave room for them
every_row=(-- --trainer.max_time "$(max_time 90)")
if [ -n "${SMOKE:-}" ]; then
  every_row+=(--model.init_args.rounds 1 --model.init_args.mask_epochs 1 --model.init_args.generator_epochs 1
    --model.init_args.defense_epochs 1 --model.init_args.pretrain_epochs 0 --data.init_args.source.init_args.test_fraction 0.02)
fi
if [ -f "$victim" ]; then
  until_deadline 30 "$PYTHON" benchmarks/sweep.py benchmarks/sweeps/btidbf_resnet18_gpu.yaml --out "$work/btidbf" \
    --jobs 3 --threads 4 "${every_row[@]}" >"$work/btidbf.out" 2>&1 &
  sweep=$!
fi
short=(--model.init_args.rounds 1 --model.init_args.mask_epochs 2 --model.init_args.generator_epochs 2
  --model.init_args.defense_epochs 2)
fp16_runs=(
  "btidbf_p_fp16|fit --config configs/btidbf_p.yaml --trainer.precision 16-mixed ${short[*]}"
  "btidbf_u_fp16|fit --config configs/btidbf_u.yaml --trainer.precision 16-mixed ${short[*]}"
  "refine_fp16|fit --config configs/refine.yaml --trainer.precision 16-mixed --trainer.max_epochs 3"
)
[ "${FP16_CHECKS:-1}" = 1 ] || fp16_runs=()
for run in "${fp16_runs[@]}"; do
  name=${run%%|*}
  # shellcheck disable=SC2086
  until_deadline 40 "$PYTHON" -m lightning_defense ${run#*|} --trainer.logger.init_args.save_dir "$work/fp16" \
    --trainer.logger.init_args.name "$name" >"$work/$name.log" 2>&1
  echo "[gpu] $name exit $?" | tee -a "$work/fp16.exit"
done
[ -n "${sweep:-}" ] && wait "$sweep"
cat "$work/btidbf.out" 2>/dev/null | tail -8
nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null

# 3. the small files back (no checkpoints or weights: the 64 MiB limit and nothing needs them here)
cp -r runs/cifar10_badnets_resnet18 "$work/victim_run" 2>/dev/null
tar -czf "$OUT/results.tar.gz" --exclude='*.ckpt' --exclude='*.safetensors' "$work"
ls -la "$OUT"
echo "[gpu] done after $SECONDS s"
