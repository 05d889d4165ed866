#!/usr/bin/env bash
# Writes an sbatch script for a multi-node GPU run (srun, one process per GPU or per node)
# and submits it.
#   bash launch/slurm_gpu.sh --nodes 2 --gpus-per-node 8 [--partition gpu] [--dry-run] \
#        -- train --config configs/main_sst2.py
# Options: python -m peft_jax.launchers slurm --help
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=python3; [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m peft_jax.launchers slurm "$@"
