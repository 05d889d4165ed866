#!/usr/bin/env bash
# Sets up .venv (first run: a few minutes) and runs the main job: a real PEFT fine-tuning run
# on a real model and real data, offline, on this CPU; prints a results table.
# Extra arguments are config overrides, e.g. --config.train.steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec peft-jax train --config configs/main_sst2.py "$@"
