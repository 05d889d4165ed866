"""``task.format=text_to_text`` through the runner and the CLI, on a tiny random T5 (v1.0,
v1.1 = the LM-adapted architecture) and a tiny random Llama, on SST-2 sentences.

End to end: Lester et al.'s prompt-tuning config on a local T5 folder (train, resume ==
uninterrupted, eval == the run's metrics, export hf-peft reloaded by ``peft.PeftModel`` with
task_type SEQ_2_SEQ_LM, SPoT transfer of the trained prompt), LoRA on the Llama (export
reloaded as CAUSAL_LM), every PEFT method on T5 (prompt on the encoder input, prefixes on
encoder self / decoder self / cross attention, LoRA, adapters, IA3), pure prompt tuning (no
head) vs the classification format's head, ``peft-jax zeroshot``, ``fewshot`` with a T5 and
``--template``, a sweep.
"""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _seq2seq_fixtures as F  # noqa: E402

from peft_jax.cli import main as cli  # noqa: E402
from peft_jax.peft.delta_io import flatten_delta  # noqa: E402

LESTER = str(HERE.parent / "configs" / "prompt_tuning_t5.py")
# the recipe's own settings, scaled to a tiny model and a 2-core CPU
SMALL = ["--config.task.max_train_examples=64", "--config.task.max_eval_examples=16",
         "--config.task.max_length=48", "--config.train.buckets=(48,)",
         "--config.train.batch_size=8", "--config.train.eval_batch_size=16",
         "--config.peft.prompt.length=4", "--config.train.eval_every=0",
         "--config.train.ckpt_every=2", "--config.train.progress=False", "--config.mesh.data=1",
         "--config.train.baseline=False"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_data):
    return F.write_all(str(tmp_path_factory.mktemp("seq2seq_runner_models")))


def _args(model, *extra):
    return ["--config", LESTER, f"--config.model.name={model}", *SMALL, *extra]


def _cfg(model, *extra):
    from peft_jax.config import apply_overrides, load_config_file
    cfg = load_config_file(LESTER)
    apply_overrides(cfg, [a[len("--config."):] for a in _args(model, *extra) if a.startswith("--config.")])
    return cfg


def _result(workdir):
    return json.load(open(os.path.join(workdir, "result.json")))


def _metrics(stdout: str) -> dict:
    line = [ln for ln in stdout.strip().splitlines() if "=" in ln][-1]
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split())}


def _trained(workdir):
    """The run's saved delta (``delta/``) as flat numpy."""
    from peft_jax.peft.delta_io import load_delta
    delta, _ = load_delta(os.path.join(workdir, "delta"))
    return flatten_delta(delta)


# ----------------------------------------------------------------------------- T5, Lester


def test_lester_recipe_config(folders):
    """The config is the paper's recipe: T5 text-to-text, prompt length 100 with class-label
    init on the encoder, Adafactor lr 0.3 constant (decay rate 0.8, weight decay 1e-5, no
    parameter scaling: the updates equal GroupConfig.lester's), batch 32 for 30,000 steps,
    no head."""

    from peft_jax.config import load_config_file
    from peft_jax.defaults import validate
    from peft_jax.peft import PromptTuning
    from peft_jax.peft.optim import GroupConfig, make_optimizer, optimizer_from_config

    c = load_config_file(LESTER)
    validate(c)
    assert (c.task.format, c.peft.methods, c.peft.prompt.length, c.peft.prompt.init) == \
        ("text_to_text", "prompt", 100, "class_labels")
    assert (c.optim.optimizer, c.optim.lr, c.optim.schedule, c.optim.weight_decay) == \
        ("adafactor", 0.3, "constant", 1e-5)
    assert (c.train.batch_size, c.train.steps) == (32, 30000)
    tr = {"peft": {"prompt": np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32)}}
    ours = optimizer_from_config(c.optim, tr, (PromptTuning(length=100),), c.train.steps)
    ref = make_optimizer({"prompt": GroupConfig.lester()}, {"peft": {"prompt": "prompt"}})
    s1, s2 = ours.init(tr), ref.init(tr)
    for k in range(3):
        g = jax.tree.map(lambda x: np.random.default_rng(k + 1).normal(size=x.shape).astype(np.float32), tr)
        u1, s1 = ours.update(g, s1, tr)
        u2, s2 = ref.update(g, s2, tr)
        np.testing.assert_allclose(u1["peft"]["prompt"], u2["peft"]["prompt"], rtol=1e-6, atol=1e-9)
    assert float(np.max(np.abs(u1["peft"]["prompt"]))) > 0


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_t5_prompt_tuning_cli_train_resume_eval_export_spot(folders, tmp_path, capsys):
    """peft-jax train on a local T5 folder with configs/prompt_tuning_t5.py: only the prompt
    trains; a run resumed at step 2 ends where an uninterrupted one does; eval reproduces the
    run's metrics; the hf-peft export (SEQ_2_SEQ_LM) reloaded in PeftModel gives our logits;
    the prompt exported as .npy enters a SPoT library and initializes a target run."""
    t5 = folders["t5_v1.1"]
    wd, ref_wd = str(tmp_path / "run"), str(tmp_path / "ref")
    assert cli(["train", *_args(t5, "--config.train.steps=2"), "--workdir", wd]) == 0
    assert cli(["train", *_args(t5, "--config.train.steps=4"), "--workdir", wd]) == 0
    res = _result(wd)
    assert res["resumed_from"] == 2 and res["steps"] == 4
    assert set(res["metrics"]) == {"accuracy", "exact_match"}
    assert cli(["train", *_args(t5, "--config.train.steps=4"), "--workdir", ref_wd]) == 0
    resumed, straight = _trained(wd), _trained(ref_wd)
    assert sorted(resumed) == ["peft/prompt"]                    # no head: pure prompt tuning
    np.testing.assert_allclose(resumed["peft/prompt"], straight["peft/prompt"], rtol=0, atol=1e-6)
    capsys.readouterr()

    assert cli(["eval", *_args(t5), "--workdir", wd]) == 0
    got = _metrics(capsys.readouterr().out)
    assert got == pytest.approx(res["metrics"], abs=1e-4)

    # hf-peft export -> PeftModel (SEQ_2_SEQ_LM) on transformers' T5 == our logits
    out = str(tmp_path / "hf")
    assert cli(["export", *_args(t5), "--format", "hf-peft", "--out", out, "--workdir", wd]) == 0
    acfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (acfg["peft_type"], acfg["task_type"], acfg["num_virtual_tokens"]) == \
        ("PROMPT_TUNING", "SEQ_2_SEQ_LM", 4)
    pm = peft.PeftModel.from_pretrained(
        transformers.T5ForConditionalGeneration.from_pretrained(t5), out).eval()
    F.compare_to_peft_model(_cfg(t5, f"--config.workdir={wd}"), resumed, pm)

    # SPoT: the trained T5 prompt -> library -> a target run starting from it
    npy_dir = os.path.join(wd, "export")
    assert cli(["export", *_args(t5), "--format", "npy", "--out", npy_dir, "--workdir", wd]) == 0
    lib = str(tmp_path / "library")
    assert cli(["spot", "add", lib, "sst2_t5", "--from-run", wd]) == 0
    assert cli(["spot", "list", lib]) == 0
    assert "sst2_t5" in capsys.readouterr().out
    stored = np.load(os.path.join(lib, "sst2_t5.npy"))
    np.testing.assert_array_equal(stored, resumed["peft/prompt"])
    from peft_jax.runner import setup
    tgt = _cfg(t5, "--config.peft.prompt.init=file", f"--config.peft.prompt.file={lib}/sst2_t5.npy",
               "--config.task.name=mr", "--config.task.train_split=all", "--config.task.eval_split=all",
               f"--config.workdir={tmp_path / 'target'}")
    s = setup(tgt)
    np.testing.assert_array_equal(np.asarray(s.state.trainable["peft"]["prompt"]), stored)


# ----------------------------------------------------------------------------- Llama


def test_llama_lora_text_to_text_cli_and_hf_export(folders, tmp_path, capsys):
    """Decoder-only text-to-text: train reports rank-classification accuracy and exact match;
    eval reproduces them; the LoRA export (CAUSAL_LM) reloaded in PeftModel gives our logits;
    zeroshot equals the untrained baseline (LoRA's B = 0 leaves the model unchanged)."""
    llama = folders["llama"]
    wd = str(tmp_path / "llama")
    args = _args(llama, "--config.peft.methods=lora", "--config.peft.lora.rank=4",
                 "--config.optim.optimizer=adamw", "--config.optim.lr=0.01",
                 "--config.task.template={sentence} It was {mask}.",
                 "--config.train.steps=3", "--config.train.baseline=True")
    assert cli(["train", *args, "--workdir", wd]) == 0
    res = _result(wd)
    assert set(res["metrics"]) == {"accuracy", "exact_match"} and res["steps"] == 3
    trained = _trained(wd)
    assert trained and all("lora_" in k for k in trained)
    capsys.readouterr()
    assert cli(["eval", *args, "--workdir", wd]) == 0
    assert _metrics(capsys.readouterr().out) == pytest.approx(res["metrics"], abs=1e-4)
    assert cli(["zeroshot", *args]) == 0
    assert _metrics(capsys.readouterr().out) == pytest.approx(res["baseline"], abs=1e-6)

    out = str(tmp_path / "hf")
    assert cli(["export", *args, "--format", "hf-peft", "--out", out, "--workdir", wd]) == 0
    acfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (acfg["peft_type"], acfg["task_type"]) == ("LORA", "CAUSAL_LM")
    pm = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(llama), out).eval()
    F.compare_to_peft_model(_cfg(llama, *[a for a in args[2:] if a.startswith("--config.")],
                                f"--config.workdir={wd}"), trained, pm)


# ----------------------------------------------------------------------------- methods


def _leaf_changes(cfg):
    """Run ``cfg``; (trainable paths, paths whose value changed, base unchanged)."""
    from peft_jax.runner import run_experiment, setup
    s = setup(cfg)
    before = flatten_delta(jax.device_get(s.state.trainable))
    base = jax.tree.map(np.array, s.exp.pre.base)
    res = run_experiment(cfg, pretrained=s.exp.pre)
    after = flatten_delta(jax.device_get(res.state.trainable))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    same_base = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base),
                                                          jax.tree.leaves(res.session.exp.pre.base)))
    return set(before), changed, same_base, res


@pytest.mark.parametrize("version,methods,extra", [
    pytest.param("t5_v1.0", "prompt,lora", ["--config.peft.lora.targets=.*/(query|value)$"],
                 marks=pytest.mark.slow),
    ("t5_v1.1", "prefix,adapter,ia3", ["--config.peft.prefix.length=2",
                                      "--config.peft.prefix.targets=.*/(attention|cross_attention)",
                                      "--config.peft.adapter.bottleneck=4"]),
])
def test_every_method_trains_on_t5_text_to_text(folders, tmp_path, version, methods, extra):
    """Every PEFT method composes with text_to_text on T5 (prompt on the encoder input;
    prefixes on encoder self, decoder self and cross attention; LoRA; adapters; IA3):
    each of their leaves trains, nothing else does (no head), the base is untouched."""
    cfg = _cfg(folders[version], f"--config.peft.methods={methods}", "--config.optim.optimizer=adamw",
               "--config.optim.lr=0.01", "--config.train.steps=2", "--config.task.eval_mode=rank",
               f"--config.workdir={tmp_path / 'run'}", *extra)
    paths, changed, same_base, res = _leaf_changes(cfg)
    assert changed == paths, sorted(paths - changed)
    assert not any(p.startswith("peft/head") for p in paths)
    assert same_base
    if "prefix" in methods:
        for where in ("encoder/layer_0/attention", "decoder/layer_0/attention",
                      "decoder/layer_0/cross_attention"):
            assert f"peft/{where}/prefix_key" in paths, where
    assert np.isfinite(res.row["metrics"]["accuracy"])


def test_pure_prompt_tuning_has_no_head_and_classification_says_it_has_one(folders, tmp_path):
    """With the label-word formats (text_to_text on T5 / the Llama, verbalizer on the Llama)
    peft.methods=prompt trains the prompt alone; the classification format adds a head, and
    peft-jax params says so."""
    from peft_jax.runner import parameter_report, setup
    for model, fmt in ((folders["t5_v1.0"], "text_to_text"), (folders["llama"], "text_to_text"),
                       (folders["llama"], "verbalizer")):
        s = setup(_cfg(model, f"--config.task.format={fmt}", "--config.peft.prompt.init=uniform",
                       f"--config.workdir={tmp_path / 'x'}"))
        assert sorted(flatten_delta(jax.device_get(s.state.trainable))) == ["peft/prompt"], (model, fmt)
    cfg = _cfg(folders["t5_v1.0"], "--config.task.format=classification",
               "--config.peft.prompt.init=uniform", f"--config.workdir={tmp_path / 'y'}")
    rep = parameter_report(cfg)
    assert "head" in rep and "trains a task head" in rep and "Lester" in rep
    cfg = _cfg(folders["t5_v1.0"], f"--config.workdir={tmp_path / 'z'}")
    assert "task head" not in parameter_report(cfg)


# ----------------------------------------------------------------------------- zeroshot / fewshot


@pytest.mark.slow  # > 40 s on 2 busy cores; runs in CI (PEFT_JAX_SLOW=1)
def test_zeroshot_cli_needs_no_training_and_any_format(folders, capsys):
    """peft-jax zeroshot evaluates the base model on a split with a template and label words;
    the verbalizer and text_to_text formats run on the Llama, text_to_text on T5."""
    for model, fmt in ((folders["llama"], "verbalizer"), (folders["llama"], "text_to_text"),
                       (folders["t5_v1.0"], "text_to_text")):
        assert cli(["zeroshot", *_args(model, f"--config.task.format={fmt}",
                                       "--config.task.template=Review: {sentence} Sentiment: {mask}",
                                       "--config.task.label_words=bad,good"),
                    "--split", "dev"]) == 0
        m = _metrics(capsys.readouterr().out)
        assert 0.0 <= m["accuracy"] <= 1.0
        assert ("exact_match" in m) == (fmt == "text_to_text")


def test_fewshot_template_is_honoured_or_refused(folders, tmp_path, capsys):
    """fewshot --template reaches the LM methods' configs (and the T5 run uses text_to_text);
    methods that use no template refuse it instead of ignoring it."""
    from peft_jax.fewshot.cli import fewshot_main
    from peft_jax.fewshot.methods import Budget, method_config

    tmpl = "Review: {sentence} Sentiment: {mask}"
    b = Budget(template=tmpl, label_words="bad,good")
    c = method_config("prompt", "lmbff/sst2", 13, folders["t5_v1.0"], b, str(tmp_path))
    assert (c.task.template, c.task.label_words, c.task.format) == (tmpl, "bad,good", "text_to_text")
    c = method_config("prompt", "lmbff/sst2", 13, folders["llama"], b, str(tmp_path))
    assert (c.task.template, c.task.format) == (tmpl, "verbalizer")
    with pytest.raises(SystemExit):
        fewshot_main(["--method", "zeroshot,head", "--template", tmpl])
    assert "--template applies to" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fewshot_main(["--method", "prompt", "--label-words", "bad,good"])
    assert "--label-words needs --template" in capsys.readouterr().err
    wd = str(tmp_path / "fs")
    assert fewshot_main(["--method", "zeroshot", "--model", folders["t5_v1.0"], "--seeds", "13",
                         "--template", tmpl, "--label-words", "bad,good", "--test-examples", "16",
                         "--max-length", "48", "--workdir", wd, "--compile-cache", ""]) == 0
    row = json.load(open(next(pathlib.Path(wd).rglob("result.json"))))
    assert row["config"]["task.template"] == tmpl and row["config"]["task.format"] == "text_to_text"
    assert set(row["metrics"]) == {"accuracy", "exact_match", "ece"}


@pytest.mark.slow
def test_sweep_over_prompt_length_on_t5(folders, tmp_path):
    """peft-jax sweep with the Lester config on a local T5 folder: one run per prompt length."""
    from peft_jax.sweep import sweep_main
    cfg = tmp_path / "sweep_cfg.py"
    cfg.write_text("import sys\n"
                   f"sys.path.insert(0, {str(HERE.parent / 'configs')!r})\n"
                   "from prompt_tuning_t5 import get_config as base\n"
                   "def get_config(arg=None):\n"
                   "    c = base(arg)\n"
                   "    c.sweep = {'peft': {'prompt': {'length': [2, 4]}}}\n"
                   "    return c\n")
    root = str(tmp_path / "sweep")
    extra = [a for a in _args(folders["t5_v1.1"], "--config.train.steps=2")[2:]
             if "prompt.length" not in a]
    assert sweep_main(["--config", str(cfg), "--workdir", root, *extra]) == 0
    rows = [json.load(open(p)) for p in pathlib.Path(root).rglob("result.json")]
    assert sorted(r["config"]["peft.prompt.length"] for r in rows) == [2, 4]
    assert all(r["status"] == "finished" and "exact_match" in r["metrics"] for r in rows)
