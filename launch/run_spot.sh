#!/usr/bin/env bash
# SPoT soft prompt transfer, all-MiniLM-L6-v2 + linear head, prompt length 20 (configs/spot_prompt.py).
# 1. source prompts on sst2, mr, subj, trec (512 examples, 40 steps) -> prompt library (spot add)
# 2. brief (5-step) target prompts on lmbff/cr, lmbff/mpqa (16-shot train-13) -> target library
# 3. spot rank (mean_cosine and token_cosine) of the sources for each target
# 4. targets trained 20 steps from random init and from each source prompt (init=file)
# 5. gains CSV, spot eval-retrieval (both measures), report table + transfer heat map
# Expected wall time here (2-core CPU shared with other jobs, load ~18, --parallel 2): ~35 min
# (16 runs: the 4 source runs took 5.5 min each at this load; the rest are shorter).
# Resume-safe. Usage: launch/run_spot.sh [ROOT]   (default runs/spot)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ROOT=$(mkdir -p "${1:-runs/spot}" && cd "${1:-runs/spot}" && pwd)
PAR=${PARALLEL:-2}
CFG=configs/spot_prompt.py
PROMPTS=$ROOT/prompts

peft-jax sweep --config $CFG:source --workdir "$ROOT/source" --parallel "$PAR"
python launch/spot_tools.py export-prompts "$ROOT/source" "$PROMPTS" | while read -r wd npy; do
  t=$(basename "$npy" .npy)
  peft-jax spot add "$ROOT/library" "$t" --from-run "$wd" --prompt "$npy" --metric accuracy --overwrite
done
peft-jax spot list "$ROOT/library"

peft-jax sweep --config $CFG:probe:$PROMPTS --workdir "$ROOT/probe" --parallel "$PAR"
python launch/spot_tools.py export-prompts "$ROOT/probe" "$ROOT/probe_prompts" | while read -r wd npy; do
  t=$(basename "$npy" .npy)
  peft-jax spot add "$ROOT/targets" "$t" --from-run "$wd" --prompt "$npy" --metric accuracy --overwrite
done
for t in lmbff_cr lmbff_mpqa; do
  for m in mean_cosine token_cosine; do
    echo "== rank for $t ($m)"
    peft-jax spot rank "$ROOT/library" --target "$t" --target-library "$ROOT/targets" --method $m
  done
done

peft-jax sweep --config $CFG:target:$PROMPTS --workdir "$ROOT/target" --parallel "$PAR" || true
python launch/spot_tools.py gains "$ROOT/target" "$ROOT/gains.csv"
for m in mean_cosine token_cosine; do
  echo "== eval-retrieval ($m)"
  peft-jax spot eval-retrieval --gains "$ROOT/gains.csv" --library "$ROOT/library" --targets "$ROOT/targets" \
    --method $m --k 1 --k 3 --out "$ROOT/retrieval_$m.json"
done
peft-jax report "$ROOT/target" --group-by task.name --group-by peft.prompt.file --seed-key seed \
  --metric accuracy --scale 100 --digits 1 --md "$ROOT/report.md" \
  --heatmap "$ROOT/transfer_heatmap.png" --source-key peft.prompt.file --relative
