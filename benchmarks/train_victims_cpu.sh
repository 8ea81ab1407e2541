#!/usr/bin/env bash
# Train the BadNets, Blended and WaNet CIFAR-10 victims (ResNet-20, CPU recipe) side by side,
# one thread each (on 2 cores three single-thread runs beat one run on both), then tabulate.
#   LIGHTNING_DEFENSE_DATA=<folder holding cifar10-jpeg/> bash benchmarks/train_victims_cpu.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT_DIR:-$repo/benchmarks/logs}"
mkdir -p "$out"
for attack in badnets blended wanet; do
  OMP_NUM_THREADS=1 /usr/bin/time -v lightning fit --config "$repo/configs/victims/cifar10_$attack.yaml" \
    >"$out/cifar10_$attack.log" 2>&1 &
done
wait
python "$repo/benchmarks/victim_table.py" "$out"/cifar10_*.log
