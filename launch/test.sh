#!/usr/bin/env bash
# Sets up .venv (first run: a few minutes) and runs the test suite.
#   bash launch/test.sh            # default suite (slow tests deselected)
#   PEFT_JAX_SLOW=1 bash launch/test.sh   # everything, including slow end-to-end tests
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${PEFT_JAX_SLOW:-0}" = "1" ]; then MARK=(); else MARK=(-m "not slow"); fi
exec python -m pytest -q -ra --durations=15 "${MARK[@]}" "$@"
