"""``peft-jax fewshot``: one few-shot method over the LM-BFF seeds, one result.json per run.

Each run is the config-driven runner (:func:`peft_jax.experiment.run_experiment`) with the
method's overrides; rows land in ``<workdir>/<task>/<method>/seed<k>/result.json`` and
``peft-jax report`` aggregates them into mean (std) over seeds.

Methods (``--method``):
- ``zeroshot``: verbalizer scoring of the task's template, no training (the runner's setup,
  then one evaluation of the untrained model; the LoRA delta starts at zero so the model is
  the base model).
- ``prompt``: prompt-based fine-tuning (LM-BFF, verbalizer format) with LoRA.
- ``head``: standard fine-tuning, classification head (+ LoRA) on pooled states.
- ``protoverb``: ProtoVerb prototypes + projection on the frozen encoder's mean-pooled
  states (:mod:`peft_jax.fewshot.protoverb_frozen`), best step on ``dev-<seed>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from peft_jax.data.builtin import LMBFF_SEEDS

METHODS = ("head", "protoverb", "zeroshot", "prompt")
DEFAULT_MODEL = {"zeroshot": "smollm2", "prompt": "smollm2", "head": "minilm", "protoverb": "minilm"}


def method_config(method: str, task: str, seed: int, model: str, steps: int,
                  eval_examples: int, workdir: str, lr: float):
    """The runner config of one (method, task, seed) run."""
    from peft_jax.defaults import base_config

    if method not in METHODS:
        raise ValueError(f"--method {method!r}; choose from {list(METHODS)}")
    c = base_config()
    c.seed = seed
    c.model.name = model
    c.task.name = task
    c.task.train_split = f"train-{seed}"
    c.task.eval_split = "test"         # a random subset of the test file (max_eval_examples)
    c.task.max_eval_examples = eval_examples
    c.task.max_length = 64
    c.task.format = "classification" if method == "head" else "verbalizer"
    c.peft.methods = "head,lora" if method == "head" else "lora"
    c.optim.lr = lr
    c.optim.warmup_steps = 0
    c.train.steps = 1 if method == "zeroshot" else steps
    c.train.batch_size = 8
    c.train.log_every = max(1, steps // 4)
    c.train.eval_batch_size = 32
    c.train.buckets = (64,)
    c.train.resume = False
    c.train.progress = False
    c.train.baseline = method == "zeroshot"
    c.name = f"fewshot_{task.replace('/', '_')}_{method}_{model}"
    c.workdir = os.path.join(workdir, task.replace("/", "_"), f"{method}_{model}", f"seed{seed}")
    return c


def zero_shot_row(cfg, pre) -> dict:
    """Evaluate the untrained model (verbalizer scores of the template) with no train step."""
    from peft_jax.experiment import _flat_config, setup
    from peft_jax.peft.partition import tree_size

    t0 = time.perf_counter()
    s = setup(cfg, pre)
    metrics = s.evaluate(s.state.trainable)
    return {"name": cfg.name, "status": "finished", "config": _flat_config(cfg),
            "metrics": metrics, "baseline": metrics, "steps": 0, "trainable_params": 0,
            "base_params": int(tree_size(pre.base)), "wall_s": time.perf_counter() - t0}


def run_method(method: str, task: str, seeds: Sequence[int], model: str, steps: int,
               eval_examples: int, workdir: str, lr: float) -> list[dict]:
    from peft_jax.experiment import _write_json, run_experiment
    from peft_jax.models.registry import load_pretrained

    if method == "protoverb":
        return run_protoverb(task, seeds, model, eval_examples, workdir)
    pre = load_pretrained(model)
    rows = []
    for seed in seeds:
        cfg = method_config(method, task, seed, model, steps, eval_examples, workdir, lr)
        cfg_row_method = method
        t0 = time.perf_counter()
        if method == "zeroshot":
            row = zero_shot_row(cfg, pre)
        else:
            res = run_experiment(cfg, pretrained=pre)
            row = {k: v for k, v in res.items() if k not in ("state", "frozen")}
        row["config"]["fewshot.method"] = cfg_row_method
        row["wall_s"] = time.perf_counter() - t0
        os.makedirs(cfg.workdir, exist_ok=True)
        _write_json(os.path.join(cfg.workdir, "result.json"), row)
        rows.append(row)
        print(json.dumps({"seed": seed, "method": method, "metrics": row["metrics"],
                          "wall_s": round(row["wall_s"], 1)}), flush=True)
    return rows


def run_protoverb(task: str, seeds: Sequence[int], model: str, eval_examples: int,
                  workdir: str) -> list[dict]:
    from peft_jax.contrastive.embed import load_embedder
    from peft_jax.experiment import _flat_config, _write_json
    from peft_jax.fewshot import protoverb_frozen

    embed = load_embedder(model, pooling="mean", max_length=64, batch_size=32)
    rows = []
    for seed in seeds:
        cfg = method_config("head", task, seed, model, 200, eval_examples, workdir, 1e-2)
        cfg.name = cfg.name.replace("_head_", "_protoverb_")
        cfg.workdir = cfg.workdir.replace(f"head_{model}", f"protoverb_{model}")
        res = protoverb_frozen.run(task, seed, embed, eval_examples)
        row = {"name": cfg.name, "status": "finished", "config": _flat_config(cfg),
               "steps": 200, "base_params": 0, **res}
        row["config"]["fewshot.method"] = "protoverb"
        os.makedirs(cfg.workdir, exist_ok=True)
        _write_json(os.path.join(cfg.workdir, "result.json"), row)
        rows.append(row)
        print(json.dumps({"seed": seed, "method": "protoverb", "metrics": row["metrics"],
                          "wall_s": round(row["wall_s"], 1)}), flush=True)
    return rows


def fewshot_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="peft-jax fewshot", description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--task", default="lmbff/sst2")
    p.add_argument("--model", default="", help="default: smollm2 for LM methods, minilm for head")
    p.add_argument("--seeds", default=",".join(str(s) for s in LMBFF_SEEDS))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--workdir", default="runs/fewshot")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    run_method(a.method, a.task, seeds, a.model or DEFAULT_MODEL[a.method], a.steps,
               a.eval_examples, a.workdir, a.lr)
    return 0


if __name__ == "__main__":
    sys.exit(fewshot_main())
