#!/usr/bin/env bash
# Prompt-tuning ablation (length x init x seed) on SST-2 with all-MiniLM-L6-v2 + linear head.
# 27 runs (lengths 2/5/20 x inits uniform/sampled_vocab/class_labels x seeds 0/1/2), then
# `peft-jax report` -> mean (std) table over seeds + accuracy-vs-length plot.
# Expected wall time here (2-core CPU shared with other jobs, load ~18, --parallel 2): ~2.5-3 min per
# run -> ~40 min for the 27 runs (~6 min on an idle 2-core machine: ~25 s per run).
# Resume-safe: rerunning skips finished runs.
# Usage: launch/run_ablation.sh [ROOT]   (default runs/ablation_prompt)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ROOT=${1:-runs/ablation_prompt}
PAR=${PARALLEL:-2}
peft-jax sweep --config configs/ablation_prompt.py --workdir "$ROOT" --parallel "$PAR" || true
peft-jax report "$ROOT" --group-by peft.prompt.length --group-by peft.prompt.init \
  --seed-key seed --metric accuracy,baseline.accuracy --scale 100 --digits 1 \
  --md "$ROOT/report.md" --csv "$ROOT/report.csv" --plot-ablation "$ROOT/ablation.png"
