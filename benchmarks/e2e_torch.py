"""The few-shot protocol with transformers + Hugging Face PEFT (PyTorch), in its own process;
prints ``RESULT {json}``. Run by ``e2e_fewshot.py``, which writes the protocol file.

What an HF user writes for peft_jax's ``fewshot --method head`` run: ``BertModel`` (no
pooler) + ``peft.get_peft_model(LoraConfig(...))``, mean pooling over the attention mask,
``Dropout -> Linear`` head (N(0, 0.02) kernel, zero bias), cross-entropy, global gradient
clipping, ``torch.optim.AdamW`` (fused, transformers' default), dynamic padding per batch
(``tokenizer.pad``), dev accuracy every ``eval_every`` steps with the best step's trainable
weights kept in memory (ties: the later step, as peft_jax's best checkpoint), test accuracy
of that step. The base is loaded once; every seed trains a fresh LoRA + head on a copy.

The protocol file gives, per seed, the training batches of every step, the dev set and the
test subset as ``[text, label]`` rows (peft_jax's data loading, done by the parent); this
worker tokenizes them itself and reports the content ids (``common.example_id``) of what it
fed, so the parent can check that both stacks saw the same examples and tokens.
"""

from __future__ import annotations

import time

T_START = time.time()   # the interpreter is up (the parent measures from the launch)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from torch_worker import make_optimizer  # noqa: E402


class Classifier:
    """LoRA encoder + mean pooling + dropout/linear head (a plain callable holding modules)."""

    def __init__(self, encoder, head):
        self.encoder, self.head = encoder, head

    def parameters(self) -> list:
        return [p for m in (self.encoder, self.head) for p in m.parameters() if p.requires_grad]

    def train(self, on: bool = True) -> None:
        self.encoder.train(on)
        self.head.train(on)

    def __call__(self, batch: dict):
        import torch
        hidden = self.encoder(**batch).last_hidden_state                 # [b, l, d]
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)       # [b, l, 1]
        pooled = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)   # [b, d]
        return self.head(pooled)                                         # [b, C]


def build(base, hp: dict, num_labels: int, seed: int) -> Classifier:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=hp["lora_rank"], lora_alpha=hp["lora_alpha"],
                      lora_dropout=hp["lora_dropout"], target_modules=hp["lora_targets"])
    encoder = get_peft_model(copy.deepcopy(base), lora)
    linear = torch.nn.Linear(base.config.hidden_size, num_labels)
    torch.nn.init.normal_(linear.weight, std=hp["head_init_std"])
    torch.nn.init.zeros_(linear.bias)
    head = torch.nn.Sequential(torch.nn.Dropout(hp["head_dropout"]), linear)
    model = Classifier(encoder, head)
    model.train()
    return model


def tokenize(tok, rows: list, max_length: int) -> list[dict]:
    """``[[text, label]]`` -> unpadded encodings (``input_ids``, ``token_type_ids``, ...)."""
    enc = tok([r[0] for r in rows], truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc.keys()} for i in range(len(rows))]


def collate(tok, encs: list[dict], labels: list[int]) -> tuple[dict, object]:
    """Dynamic padding to the longest row of the batch (DataCollatorWithPadding)."""
    import torch
    batch = tok.pad(encs, return_tensors="pt")
    return dict(batch), torch.tensor(labels, dtype=torch.long)


def accuracy(model: Classifier, tok, encs: list[dict], labels: list[int], bs: int) -> float:
    import torch
    model.train(False)
    hits = 0
    with torch.inference_mode():
        for s in range(0, len(encs), bs):
            batch, y = collate(tok, encs[s:s + bs], labels[s:s + bs])
            hits += int((model(batch).argmax(-1) == y).sum())
    model.train(True)
    return hits / len(encs)


def ids_of(encs: list[dict], labels: list[int]) -> list[str]:
    return [common.example_id(y, e["input_ids"]) for e, y in zip(encs, labels)]


def run(a) -> dict:
    marks = {"start": T_START}
    import torch
    import peft  # noqa: F401
    from transformers import AutoTokenizer, BertModel
    marks["imports"] = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    proto = json.load(open(a.protocol))
    hp = proto["hparams"]
    tok = AutoTokenizer.from_pretrained(proto["model_folder"])
    base = BertModel.from_pretrained(proto["model_folder"], add_pooling_layer=False)
    marks["load"] = time.time()
    seeds, totals = [], dict(encode_s=0.0, build_s=0.0, train_s=0.0, dev_s=0.0, test_s=0.0)
    for sp in proto["seeds"]:
        t = time.perf_counter()
        # every distinct text once (the HF way: tokenize the dataset, pad per batch)
        train_rows = {r[0]: r for step in sp["train"] for r in step}
        enc = dict(zip(train_rows, tokenize(tok, list(train_rows.values()), hp["max_length"])))
        dev_y, test_y = [r[1] for r in sp["dev"]], [r[1] for r in sp["test"]]
        dev = tokenize(tok, sp["dev"], hp["max_length"])
        test = tokenize(tok, sp["test"], hp["max_length"])
        totals["encode_s"] += time.perf_counter() - t
        t = time.perf_counter()
        model = build(base, hp, proto["num_labels"], sp["seed"])
        params = model.parameters()
        opt = make_optimizer(params, hp["lr"])
        for g in opt.param_groups:
            g.update(betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["weight_decay"])
        totals["build_s"] += time.perf_counter() - t
        history, best, best_state, train_ids = [], -1.0, None, []
        for step, rows in enumerate(sp["train"], 1):
            t = time.perf_counter()
            encs, y = [enc[r[0]] for r in rows], [r[1] for r in rows]
            train_ids.append(ids_of(encs, y))
            batch, labels = collate(tok, encs, y)
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hp["clip_norm"]:
                torch.nn.utils.clip_grad_norm_(params, hp["clip_norm"])
            opt.step()
            totals["train_s"] += time.perf_counter() - t
            if step % hp["eval_every"] == 0 or step == len(sp["train"]):
                t = time.perf_counter()
                acc = accuracy(model, tok, dev, dev_y, hp["eval_batch_size"])
                history.append([step, acc])
                if acc >= best:   # ties: the later step
                    best = acc
                    best_state = (step, [p.detach().clone() for p in params])
                totals["dev_s"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            for p, v in zip(params, best_state[1]):
                p.copy_(v)
        test_acc = accuracy(model, tok, test, test_y, hp["eval_batch_size"])
        totals["test_s"] += time.perf_counter() - t
        seeds.append(dict(seed=sp["seed"], test_accuracy=test_acc, dev_accuracy=best,
                          selected_step=best_state[0], dev_history=history,
                          final_loss=float(loss), trainable_params=sum(p.numel() for p in params),
                          ids={"train": train_ids, "dev": ids_of(dev, dev_y),
                               "test": ids_of(test, test_y)}))
    marks["end"] = time.time()
    return dict(stack="torch+hf_peft", seeds=seeds, marks=marks, phases=totals,
                threads=torch.get_num_threads(), versions={
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                    "peft": __import__("peft").__version__},
                peak_rss_mb=common.peak_rss_mb())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", required=True, help="JSON written by e2e_fewshot.py")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    common.run_guarded(lambda: run(a), stack="torch+hf_peft")


if __name__ == "__main__":
    main()
