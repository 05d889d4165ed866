"""One PyTorch + Hugging Face PEFT run (model x method) in its own process; prints a
``RESULT {json}`` line. The baseline does what an HF user does: ``*ForSequenceClassification``
(MiniLM; classifier on the pooled output) or ``*ForCausalLM`` (SmolLM2; next-token loss
via ``labels``), ``peft.get_peft_model`` for LoRA / prompt tuning / prefix tuning,
``torch.optim.AdamW`` (fused, as transformers' default ``adamw_torch_fused``), eager mode,
``torch.set_num_threads(--threads)``. HF PEFT has no bottleneck adapters: ``adapter`` adds
the same adapters as peft_jax (``h + up(relu(down(h)))`` on each attention / FFN output
before its residual add) with forward hooks on the frozen model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import prepare as prep  # noqa: E402


def _adapter_module(d: int, r: int):
    import torch

    class Bottleneck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Linear(d, r)
            self.up = torch.nn.Linear(r, d)
            torch.nn.init.normal_(self.down.weight, std=0.02)
            torch.nn.init.zeros_(self.down.bias)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, h):
            return h + self.up(torch.relu(self.down(h)))

    return Bottleneck()


def add_adapters(model, kind: str, d: int, r: int):
    """Freeze ``model`` and hook a trainable bottleneck adapter after every attention and
    FFN output (before the residual add). Returns the adapters (a ModuleList)."""
    import torch

    sites = []
    for name, mod in model.named_modules():
        if kind == "encoder" and (name.endswith("attention.output.dropout")
                                  or (name.endswith("output.dropout") and "attention" not in name)):
            sites.append(mod)
        if kind == "decoder" and (name.endswith("self_attn.o_proj") or name.endswith("mlp.down_proj")):
            sites.append(mod)
    adapters = torch.nn.ModuleList(_adapter_module(d, r) for _ in sites)
    for site, ad in zip(sites, adapters):
        site.register_forward_hook(lambda m, inp, out, ad=ad: ad(out))
    model.add_module("bench_adapters", adapters)
    return adapters


def build(folder: str, spec: dict, method: str, hp: common.MethodHParams):
    """(model, trainable parameters) with the method applied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kind = spec["kind"]
    if kind == "encoder":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    if method in ("lora", "prompt", "prefix", "ia3"):
        from peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType,
                          get_peft_model)
        task = TaskType.SEQ_CLS if kind == "encoder" else TaskType.CAUSAL_LM
        if method == "lora":
            cfg = LoraConfig(task_type=task, r=hp.lora_r, lora_alpha=hp.lora_alpha,
                             lora_dropout=0.0, target_modules=list(hp.lora_targets(kind)))
        elif method == "prompt":
            cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens)
        elif method == "ia3":   # the modules peft_jax's IA3() scales (tests/test_peft_parity.py)
            cfg = IA3Config(task_type=task, target_modules=hp.ia3_targets(kind),
                            feedforward_modules=hp.ia3_feedforward(kind))
        else:
            cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens)
        model = get_peft_model(model, cfg)
    elif method == "adapter":
        for p in model.parameters():
            p.requires_grad_(False)
        add_adapters(model, kind, spec["d"], hp.adapter_dim)
        if kind == "encoder":
            for p in model.classifier.parameters():
                p.requires_grad_(True)
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; known: {list(common.METHODS)}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def make_optimizer(params, lr: float):
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def to_torch(batch: dict, kind: str) -> dict:
    import torch

    ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
    mask = torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))
    if kind == "encoder":
        labels = torch.from_numpy(np.asarray(batch["labels"], np.int64))
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_step(model, opt, batch: dict, bf16: bool) -> float:
    import contextlib

    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    opt.zero_grad(set_to_none=True)
    with ctx:
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    return loss.detach()


def opt_state_bytes(opt) -> int:
    import torch

    return int(sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if torch.is_tensor(v)))


def step_setup(a) -> tuple:
    """(spec, hp, model, trainable params, optimizer, the fixed batch) of ``--mode step``:
    ``a.threads`` torch threads, seed 0, the first ``a.batch`` prepared rows padded to
    ``a.seq``."""
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    hp = common.MethodHParams()
    spec = prep.load_spec(a.folder)
    rows, labels = prep.load_tokens(a.folder)
    ids, mask = common.pad_batch(rows[: a.batch], a.seq, spec["pad_id"])
    batch = to_torch({"input_ids": ids, "attention_mask": mask, "labels": labels[: a.batch]},
                     spec["kind"])
    model, params = build(a.folder, spec, a.method, hp)
    return spec, hp, model, params, make_optimizer(params, hp.learning_rate), batch


def run_steps(a) -> dict:
    spec, hp, model, params, opt, batch = step_setup(a)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, batch, a.bf16)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = common.median(times)
    return dict(framework="torch+hf_peft", model=spec["model"], method=a.method, step_s=med,
                step_min_s=min(times), examples_per_s=a.batch / med, compile_s=None,
                compiles=None, flops=common.step_flops(spec, a.method, hp, a.batch, a.seq),
                loss=float(loss), peak_rss_mb=common.peak_rss_mb(),
                opt_state_bytes=opt_state_bytes(opt),
                trainable_params=int(sum(p.numel() for p in params)))


def run_epoch(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    hp = common.MethodHParams()
    spec = prep.load_spec(a.folder)
    rows, labels = prep.load_tokens(a.folder)
    rows, labels = rows[: a.max_examples], labels[: a.max_examples]
    model, params = build(a.folder, spec, a.method, hp)
    opt = make_optimizer(params, hp.learning_rate)
    order = np.random.default_rng(0).permutation(len(rows))
    t0 = time.perf_counter()
    padded, n_batches = 0, 0
    for s in range(0, len(order), a.batch):
        idx = order[s: s + a.batch]
        length = max(len(rows[i]) for i in idx)  # dynamic padding (DataCollatorWithPadding)
        ids, mask = common.pad_batch([rows[i] for i in idx], length, spec["pad_id"])
        loss = train_step(model, opt, to_torch({"input_ids": ids, "attention_mask": mask,
                                                "labels": labels[idx]}, spec["kind"]), a.bf16)
        padded += ids.size
        n_batches += 1
    wall = time.perf_counter() - t0
    tokens = int(sum(len(r) for r in rows))
    return dict(framework="torch+hf_peft", model=spec["model"], method=a.method,
                examples=len(rows), batches=n_batches, wall_s=wall, tokens=tokens,
                padded_tokens=padded, tokens_per_s=tokens / wall, compiles=None,
                loss=float(loss), peak_rss_mb=common.peak_rss_mb(),
                opt_state_bytes=opt_state_bytes(opt),
                trainable_params=int(sum(p.numel() for p in params)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", required=True, help="written by prepare.py")
    p.add_argument("--method", choices=common.METHODS, required=True)
    p.add_argument("--mode", choices=["step", "epoch"], default="step")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--max-examples", type=int, default=4000)
    a, _ = p.parse_known_args(argv)  # jax-only options (--remat, --buckets) are ignored
    common.run_guarded(lambda: run_steps(a) if a.mode == "step" else run_epoch(a),
                       framework="torch+hf_peft", method=a.method)


if __name__ == "__main__":
    main()
