"""Calibration table: accuracy and ECE with / without contextual calibration (Zhao et al.
2021; content-free inputs "N/A", "", "[MASK]") for zero-shot, in-context and prompt-based
fine-tuned SmolLM2 (and MiniLM head fine-tuning: ECE only), mean (std) over seeds, from the
``peft-jax fewshot`` rows; plus a reliability diagram pooled over seeds.

    peft-jax fewshot --task lmbff/sst2 --method zeroshot,incontext,prompt --seeds 13,21,42 \
        --workdir runs/tutorial_fewshot
    python benchmarks/calibration_table.py --workdir runs/tutorial_fewshot
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

METRICS = ("accuracy", "ece", "accuracy_cc", "ece_cc")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join("runs", "tutorial_fewshot"))
    p.add_argument("--plot", default=None, help="reliability diagram PNG (default: WORKDIR/reliability.png)")
    a = p.parse_args(argv)
    from peft_jax import report
    from peft_jax.fewshot.calibration import plot_reliability, pool_bins
    from peft_jax.fewshot.cli import method_rows

    rows = method_rows(report.collect(a.workdir))
    groups: dict = {}
    for r in rows:
        c = r["config"]
        groups.setdefault((c["task.name"], c["fewshot.method"], c["model.name"]), []).append(r)
    print("| task | method | model | seeds | accuracy | ECE | accuracy (calibrated) | ECE (calibrated) |")
    print("|---|---|---|---|---|---|---|---|")
    curves = []
    for (task, method, model), rs in sorted(groups.items()):
        cells = []
        for m in METRICS:
            v = np.array([r["metrics"][m] for r in rs if m in r["metrics"]], np.float64)
            scale = 100 if m.startswith("accuracy") else 1
            fmt = "{:.1f} ({:.1f})" if scale == 100 else "{:.3f} ({:.3f})"
            cells.append(fmt.format(scale * v.mean(), scale * v.std()) if len(v) else "-")
        print(f"| {task} | {method} | {model} | {len(rs)} | " + " | ".join(cells) + " |")
        rel = [r["reliability"] for r in rs if r.get("reliability")]
        if rel:
            curves.append((f"{method}", pool_bins([x["raw"] for x in rel])))
            if all("calibrated" in x for x in rel):
                curves.append((f"{method} + CC", pool_bins([x["calibrated"] for x in rel])))
    if curves:
        path = a.plot or os.path.join(a.workdir, "reliability.png")
        plot_reliability(curves, path, title="reliability (pooled over seeds)")
        print(f"\nreliability diagram: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
