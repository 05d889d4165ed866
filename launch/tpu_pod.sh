#!/usr/bin/env bash
# Runs a peft-jax command on every host of a TPU VM pod slice (setup, then the job).
#   bash launch/tpu_pod.sh --name my-v4-32 --zone us-central2-b [--git-url URL] [--dry-run] \
#        -- train --config configs/main_sst2.py --config.train.steps=1000
# Options: python -m peft_jax.launchers tpu --help
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=python3; [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m peft_jax.launchers tpu "$@"
