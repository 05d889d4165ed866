"""Per-layer probing table: linear probes on every layer of a frozen model (mean-pooled and
at the prompt's answer position), downstream tasks beside SentEval-style surface tasks.

    python benchmarks/probe_layers.py --models minilm,smollm2

Each (model, task) is cached in ``--out/<model>/<task>.json`` and skipped when present; the
table (test accuracy x100 per layer; bold: the dev-selected layer) and a plot per model are
printed / written at the end. Sizes per model are in ``SIZES`` (SmolLM2's forward is ~10x
MiniLM's on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peft_jax.probing import cli  # noqa: E402

SIZES = {"minilm": {"train": 1000, "dev": 200, "test": 500},
         "smollm2": {"train": 300, "dev": 100, "test": 200}}
TASKS = "sst2,trec,surface:length,surface:wc"
SURFACE_TEXT = "sst2:train"   # 67k SST phrases: enough sentences per mid-frequency word
TEMPLATES = {"minilm": "{sentence} It was {mask} .", "smollm2": "{sentence} It was"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--readouts", default="mean,answer")
    p.add_argument("--probes", default="linear")
    p.add_argument("--out", default=os.path.join("runs", "probe_layers"))
    p.add_argument("--sizes", default="", help="train,dev,test override, e.g. 200,50,100")
    a = p.parse_args(argv)
    if a.sizes:
        n = [int(x) for x in a.sizes.split(",")]
        for k in SIZES:
            SIZES[k] = dict(zip(("train", "dev", "test"), n))
    for name in (m for m in a.models.split(",") if m):
        folder = os.path.join(a.out, name)
        os.makedirs(folder, exist_ok=True)
        rows, pre = [], None
        for task in (t for t in a.tasks.split(",") if t):
            path = os.path.join(folder, task.replace("/", "_").replace(":", "_") + ".json")
            if not os.path.exists(path):
                if pre is None:
                    from peft_jax.models.registry import load_pretrained
                    pre = load_pretrained(name)
                pt = cli.load_probe_task(task, SIZES[name], SURFACE_TEXT, seed=0)
                res = cli.probe_model(pre, [pt], a.readouts.split(","), a.probes.split(","),
                                      TEMPLATES[name], max_length=64, batch_size=32)
                with open(path, "w") as f:
                    json.dump(res, f, indent=1)
            with open(path) as f:
                rows += json.load(f)
        print(f"\n### {name} (sizes {SIZES[name]})\n")
        print(cli.table(rows))
        cli.plot(rows, os.path.join(folder, "probe.png"), title=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
