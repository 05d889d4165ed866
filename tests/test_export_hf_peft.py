"""``peft-jax export --format hf-peft`` of every method HF PEFT can hold, through the runner.

A tiny random Llama (a HF folder with a BPE tokenizer trained on SST-2 sentences) trains each
method for 2 steps with the text-to-text format (no head); the export's ``adapter_config.json``
carries ``task_type`` (CAUSAL_LM, from the model kind) and ``base_model_name_or_path``, and
``peft.PeftModel.from_pretrained`` on transformers' LlamaForCausalLM gives the run's logits
(virtual-token positions included). What an adapter cannot carry is refused, naming it:
bottleneck adapters (no HF PEFT type), a task head, trained base weights (full, BitFit).
(T5 / SEQ_2_SEQ_LM: ``tests/test_seq2seq_runner.py``; method-level parity both ways:
``tests/test_hf_peft_io.py``, ``test_dora.py``, ``test_vera.py``.)
"""

import json
import os
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _seq2seq_fixtures as F  # noqa: E402

from peft_jax.cli import main as cli  # noqa: E402

CONFIG = str(HERE.parent / "configs" / "prompt_tuning_t5.py")
SMALL = ["--config.task.max_train_examples=32", "--config.task.max_eval_examples=8",
         "--config.task.max_length=48", "--config.train.buckets=(48,)",
         "--config.train.batch_size=4", "--config.train.eval_batch_size=8",
         "--config.peft.prompt.length=3", "--config.peft.prefix.length=3",
         "--config.train.eval_every=0", "--config.train.progress=False", "--config.mesh.data=1",
         "--config.train.baseline=False", "--config.train.steps=2",
         "--config.optim.optimizer=adamw", "--config.optim.lr=0.05", "--config.optim.prompt_lr=0.05",
         "--config.task.template={sentence} It was {mask}."]
# method -> (HF peft_type, extra adapter_config fields that must hold)
EXPORTED = {"prompt": ("PROMPT_TUNING", {"num_virtual_tokens": 3}),
            "prefix": ("PREFIX_TUNING", {"num_virtual_tokens": 3}),
            "lora": ("LORA", {"r": 4}),
            "dora": ("LORA", {"use_dora": True}),
            "ia3": ("IA3", {}),
            "vera": ("VERA", {})}


@pytest.fixture(scope="module")
def llama(tmp_path_factory, shared_data):
    return F.tiny_llama_folder(str(tmp_path_factory.mktemp("export_llama")))


def _args(model, method, *extra):
    return ["--config", CONFIG, f"--config.model.name={model}", *SMALL,
            f"--config.peft.methods={method}", "--config.peft.lora.rank=4", *extra]


def _cfg(args, workdir):
    from peft_jax.config import apply_overrides, load_config_file
    cfg = load_config_file(CONFIG)
    apply_overrides(cfg, [a[len("--config."):] for a in args if a.startswith("--config.")]
                    + [f"workdir={workdir}"])
    return cfg


def _trained(workdir):
    from peft_jax.peft.delta_io import flatten_delta, load_delta
    delta, _ = load_delta(os.path.join(workdir, "delta"))
    return flatten_delta(delta)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(EXPORTED))
def test_every_method_exports_loads_in_peft_model_and_matches(llama, method, tmp_path):
    wd, out = str(tmp_path / "run"), str(tmp_path / "hf")
    args = _args(llama, method)
    assert cli(["train", *args, "--workdir", wd]) == 0
    assert cli(["export", *args, "--format", "hf-peft", "--out", out, "--workdir", wd]) == 0
    acfg = json.load(open(os.path.join(out, "adapter_config.json")))
    peft_type, fields = EXPORTED[method]
    assert (acfg["peft_type"], acfg["task_type"]) == (peft_type, "CAUSAL_LM")
    assert acfg["base_model_name_or_path"] == llama and not acfg["modules_to_save"]
    assert {k: acfg[k] for k in fields} == fields
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(llama), out).eval()
    assert type(pm).__name__ == "PeftModelForCausalLM"
    F.compare_to_peft_model(_cfg(args, wd), _trained(wd), pm)


@pytest.mark.parametrize("method,why", [
    ("adapter", "HF PEFT has no format for this method"),
    ("full", "cannot carry trained base weights"),
    ("lora+head", "cannot carry the task head ['head']"),
])
def test_export_refuses_what_an_adapter_cannot_carry(llama, method, why, tmp_path, capsys):
    wd, out = str(tmp_path / "run"), str(tmp_path / "hf")
    extra = ["--config.train.steps=1"]
    if method == "lora+head":
        method, extra = "lora", extra + ["--config.task.format=classification"]
    args = _args(llama, method, *extra)
    assert cli(["train", *args, "--workdir", wd]) == 0
    capsys.readouterr()
    assert cli(["export", *args, "--format", "hf-peft", "--out", out, "--workdir", wd]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error: " in err and why in err, err
    assert not os.path.exists(out)
