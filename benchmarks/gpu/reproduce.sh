#!/usr/bin/env bash
# Issue 33, part 3: the GPU reproduction in one command, for a lent GPU (one H100: about 8 minutes of
# device time). It runs benchmarks/sweeps/gpu_reproduction.yaml:
#   1. the ResNet-18 BadNets victim, shortened to VICTIM_EPOCHS epochs with the learning-rate steps
#      scaled alike (the seeds' 150 epochs do not fit the lease), ending VICTIM_KEEP_S before the deadline;
#   2. REFINE at the paper's recipe and BTI-DBF (U) at the paper's settings on that victim, side by side;
#   3. their summaries (BA / ASR / RA / ASR-any, wall times) and images/s into $OUT.
# bf16 and channels_last come from `precision: auto`; the data stays in memory as uint8 and REFINE
# augments on the device. Every run stops cleanly at the deadline (Lightning's max_time) and writes
# last.ckpt every few epochs; a second call of the script skips the finished rows and resumes the
# others from their last.ckpt (the sweep's resume), so a second lease continues the first.
#   LIGHTNING_DEFENSE_DATA=<folder with cifar10-jpeg/> bash benchmarks/gpu/reproduce.sh
# A rehearsal on the CPU (tests/test_gpu_reproduction.py runs it on fixture data):
#   SMOKE=1 VICTIM_EPOCHS=1 DEADLINE_S=900 OUT=/tmp/out WORK=/tmp/work bash benchmarks/gpu/reproduce.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results/gpu_reproduction}"
WORK="${WORK:-runs/gpu_reproduction}"
DEADLINE_S="${DEADLINE_S:-480}"
VICTIM_EPOCHS="${VICTIM_EPOCHS:-30}"
VICTIM_KEEP_S="${VICTIM_KEEP_S:-330}"  # REFINE's 150 epochs and BTI-DBF (U) need this long after the victim
WORKERS="${WORKERS:-8}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# shellcheck source=benchmarks/gpu/deadline.sh
source benchmarks/gpu/deadline.sh  # left, max_time, until_deadline

"$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from machine_info import machine; print(machine())" \
  >"$WORK/machine.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$WORK/machine.txt" 2>/dev/null

sweep=("$PYTHON" benchmarks/sweep.py benchmarks/sweeps/gpu_reproduction.yaml --out "$WORK" --threads 4)
smoke=()
if [ -n "${SMOKE:-}" ]; then  # a few batches of everything: the rehearsal checks the plumbing, not the numbers
  smoke=(--trainer.limit_train_batches 2 --trainer.limit_val_batches 1 --data.init_args.batch_size 8)
fi

# 1. the victim (milestones at 2/3 and 13/15 of the run, as 100 and 130 of the seeds' 150 epochs)
victim_args=(--trainer.max_epochs "$VICTIM_EPOCHS" --model.init_args.lr_milestones
  "[$((VICTIM_EPOCHS * 2 / 3)), $((VICTIM_EPOCHS * 13 / 15))]" --data.init_args.num_workers "$WORKERS"
  --trainer.max_time "$(max_time "$VICTIM_KEEP_S")" "${smoke[@]}")
until_deadline "$((VICTIM_KEEP_S - 20))" "${sweep[@]}" --only victim -- "${victim_args[@]}" >"$WORK/victim.out" 2>&1
echo "[gpu] victim: exit $? at $SECONDS s"
victim=$(ls -d "$WORK"/runs/victim/version_*/victim.safetensors 2>/dev/null | tail -1)
if [ -z "$victim" ]; then
  echo "[gpu] no victim file: see $WORK/victim.out and $WORK/logs/victim.log" >&2
  exit 1
fi

# 2. the defenses side by side on the victim; max_time counts from the start of fit, after imports
defense_args=(--model.init_args.victim "$victim" --trainer.max_time "$(max_time 60)" "${smoke[@]}")
if [ -n "${SMOKE:-}" ]; then  # BTI-DBF's epochs follow from its rounds and phases
  defense_args+=(--model.init_args.rounds 1 --model.init_args.mask_epochs 1 --model.init_args.generator_epochs 1
    --model.init_args.defense_epochs 1)
fi
# options a row's model does not have are refused by its parser: REFINE gets the common ones only
until_deadline 30 "${sweep[@]}" --only btidbf_u_full -- "${defense_args[@]}" >"$WORK/btidbf.out" 2>&1 &
btidbf=$!
refine_args=(--model.init_args.victim "$victim" --trainer.max_time "$(max_time 60)" "${smoke[@]}")
[ -n "${SMOKE:-}" ] && refine_args+=(--trainer.max_epochs 1)
until_deadline 30 "${sweep[@]}" --only refine_full -- "${refine_args[@]}" >"$WORK/refine.out" 2>&1
echo "[gpu] REFINE: exit $? at $SECONDS s"
wait "$btidbf"
echo "[gpu] BTI-DBF (U): exit $? at $SECONDS s"

# 3. one table of the finished rows, and images/s from their epochs and wall times
"${sweep[@]}" --summary-only >"$WORK/summary.out" 2>&1
cp "$WORK/summary.json" "$WORK/summary.md" "$WORK/machine.txt" "$OUT"/ 2>/dev/null
"$PYTHON" benchmarks/gpu/throughput.py "$WORK/summary.json" --out "$OUT/throughput.json"
echo "[gpu] done after $SECONDS s: $OUT"
