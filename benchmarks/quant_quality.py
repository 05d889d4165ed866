"""Frozen-base storage vs quality: SmolLM2-135M stored fp32 / bf16 / int8 (weight-only, scales
per group of 64 input rows, the default, and per output channel), same fp32 compute,
next-token logits on real SST-2 sentences.

Prints base bytes per storage, and per storage against fp32 and against bf16: the max and
mean absolute logit difference (and relative to the logits' std), top-1 agreement of the
next token, and the mean KL divergence of the next-token distributions. ::

    python benchmarks/quant_quality.py [--sentences 64] [--model smollm2]

The main job's accuracy with an int8 base is measured by the runner itself:
``peft-jax train --config configs/main_sst2.py --config.model.quantize=int8``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STORAGES = {"fp32": dict(param_dtype="float32"), "bf16": dict(param_dtype="bfloat16"),
            "int8": dict(param_dtype="bfloat16", quantize="int8"),                 # groups of 64
            "int8-chan": dict(param_dtype="bfloat16", quantize="int8", quantize_group=0)}


def sentences(n: int) -> list[str]:
    from peft_jax.data import get_task

    rows = get_task("sst2").load("dev")
    return [r["sentence"] for r in rows[:n]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sentences", type=int, default=64)
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from peft_jax.models.registry import load_pretrained

    texts = sentences(a.sentences)
    logits, sizes, tok = {}, {}, None
    for name, opts in STORAGES.items():
        pre = load_pretrained(a.model, with_tokenizer=tok is None, **opts)
        tok = tok or pre.tokenizer
        sizes[name] = sum(x.nbytes for x in jax.tree.leaves(pre.base))
        enc = tok(texts, padding=True, return_tensors="np")
        batch = {"input_ids": jnp.asarray(enc["input_ids"]),
                 "attention_mask": jnp.asarray(enc["attention_mask"])}
        model = pre.build()
        run = jax.jit(lambda b, x: pre.family.apply(model, {"params": b}, x)["logits"])
        out = np.asarray(run(pre.base, batch), np.float32)
        mask = enc["attention_mask"].astype(bool)
        logits[name] = out[mask]                                   # [tokens, vocab]
        del pre
    rows = []
    for ref in ("fp32", "bf16"):
        for name in STORAGES:
            if name == ref:
                continue
            a_, b_ = logits[ref], logits[name]
            d = np.abs(a_ - b_)
            la = a_ - np.max(a_, -1, keepdims=True)
            lb = b_ - np.max(b_, -1, keepdims=True)
            pa = np.exp(la) / np.exp(la).sum(-1, keepdims=True)
            kl = np.sum(pa * ((la - np.log(np.exp(la).sum(-1, keepdims=True)))
                              - (lb - np.log(np.exp(lb).sum(-1, keepdims=True)))), -1)
            rows.append(dict(storage=name, vs=ref, max_abs=float(d.max()), mean_abs=float(d.mean()),
                             mean_abs_over_std=float(d.mean() / a_.std()),
                             top1_agree=float(np.mean(a_.argmax(-1) == b_.argmax(-1))),
                             mean_kl=float(kl.mean()), tokens=int(a_.shape[0])))
    print(f"base bytes: " + ", ".join(f"{k} {v / 2 ** 20:.1f} MB ({v / sizes['fp32']:.3f}x fp32)"
                                      for k, v in sizes.items()))
    print(f"{'storage':<8} {'vs':<5} {'max|dlogit|':>11} {'mean|dlogit|':>12} {'/std':>7} "
          f"{'top-1 agree':>11} {'mean KL':>9}")
    for r in rows:
        print(f"{r['storage']:<8} {r['vs']:<5} {r['max_abs']:>11.4f} {r['mean_abs']:>12.5f} "
              f"{r['mean_abs_over_std']:>7.4f} {r['top1_agree']:>11.4f} {r['mean_kl']:>9.5f}")
    common.emit(dict(model=a.model, sentences=len(texts), bytes=sizes, rows=rows))


if __name__ == "__main__":
    main()
