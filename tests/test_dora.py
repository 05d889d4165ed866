"""DoRA: parity with HF PEFT 0.21 ``LoraConfig(use_dora=True)`` on tiny random BERT and Llama.

Forward parity both ways (an adapter exported by peft_jax loads with ``PeftModel`` and gives
our outputs; an adapter saved by HF PEFT imports and gives HF's), the magnitude's init, the
dropout path, merge against HF's merged weights, one step's gradients against torch, and a
run of the runner (``--config.peft.methods=dora``) with its ``peft-jax params`` lines.
"""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train_fixtures import config_file, write_task, write_tiny_bert  # noqa: E402
from test_hf_peft_io import _assert_bit_exact, _peft_from, fam_bert, fam_llama  # noqa: E402,F401

from peft_jax import cli  # noqa: E402
from peft_jax.models.layers import Dense  # noqa: E402
from peft_jax.models.slots import Slots  # noqa: E402
from peft_jax.peft import LoRA, hf_peft as H, merge, tree  # noqa: E402
from peft_jax.peft.dora import DoRA, column_norm  # noqa: E402
from peft_jax.peft.method import NotSupported  # noqa: E402

TOL = 1e-5
TARGETS = {"bert": (r".*/(query|value|up)$", ["query", "value", "intermediate.dense"]),
           "llama": (r".*/(query|value|down)$", ["q_proj", "v_proj", "down_proj"])}


def _randomize(delta, seed):
    """Non-zero LoRA factors; magnitudes scattered around their init (the column norms)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for p, x in tree.flatten(delta).items():
        x = np.asarray(x)
        noise = rng.normal(size=x.shape).astype(np.float32)
        flat[p] = x * (1 + 0.3 * noise) if tree.leaf_name(p) == "lora_magnitude" else 0.3 * noise
    return tree.unflatten(flat)


def _lora_only(delta):
    return tree.unflatten({p: v for p, v in tree.flatten(delta).items()
                           if tree.leaf_name(p) != "lora_magnitude"})


def _kernels(base, paths):
    return {p: np.asarray(tree.get(base, p + "/kernel")) for p in paths}


# ----------------------------------------------------------------------------- init


def test_magnitude_init_is_the_column_norm_and_a_fresh_delta_is_the_identity(fam_bert):
    f = fam_bert
    dora = DoRA(targets=TARGETS["bert"][0], rank=4)
    delta = f.init([dora])
    mags = tree.leaves_named(delta, "lora_magnitude")
    assert len(mags) == 6
    for p, m in mags.items():
        k = np.asarray(tree.get(f.base, tree.parent(p) + "/kernel"))
        np.testing.assert_allclose(m, np.linalg.norm(k, axis=0), rtol=1e-6)
    plain = f.ours([], {})
    assert np.max(np.abs(f.ours([dora], delta) - plain)) <= 1e-6
    # HF PEFT initializes the magnitude to the same norms
    pm = peft.get_peft_model(f.hf_model(), peft.LoraConfig(
        r=4, target_modules=TARGETS["bert"][1], use_dora=True))
    hf_mag = pm.base_model.model.encoder.layer[1].intermediate.dense.lora_magnitude_vector
    np.testing.assert_allclose(hf_mag["default"].weight.detach().numpy(),
                               mags["encoder/layer_1/mlp/up/lora_magnitude"], rtol=1e-6)


# ----------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dora_exported_by_us_loads_in_hf_peft(family, request, tmp_path):
    f = request.getfixturevalue(f"fam_{family}")
    dora = DoRA(targets=TARGETS[family][0], rank=4, alpha=16.0, use_rslora=True,
                rank_pattern={"(up|down)": 2})
    delta = _randomize(f.init([dora]), 7)
    folder = H.export_method(str(tmp_path / "a"), delta, dora, hf_module_name=f.names)
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    n_mag = sum(k.endswith(".lora_magnitude_vector") for k in H.read_adapter(folder)[1])
    assert n_mag == 6
    pm = _peft_from(f.hf_model(), folder)
    assert pm.peft_config["default"].use_dora
    theirs, ours = f.theirs(pm), f.ours([dora], delta)
    assert np.max(np.abs(theirs - f.theirs(f.hf_model()))) > 1e-2   # the adapter acts
    # the magnitudes matter: plain LoRA with the same factors is far off
    assert np.max(np.abs(f.ours([LoRA(targets=dora.targets, rank=4, alpha=16.0, use_rslora=True,
                                      rank_pattern=dora.rank_pattern)], _lora_only(delta))
                         - ours)) > 1e-2
    assert f.compare(ours, theirs) <= TOL


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dora_saved_by_hf_peft_imports(family, request, tmp_path):
    f = request.getfixturevalue(f"fam_{family}")
    targets = TARGETS[family][1]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          use_dora=True, rank_pattern={targets[1]: 2},
                          alpha_pattern={targets[0]: 3})
    torch.manual_seed(0)
    pm = peft.get_peft_model(f.hf_model(), cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # magnitudes away from ||W + sBA|| (where DoRA equals LoRA)
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "a"))
    delta, info = H.import_hf_peft(str(tmp_path / "a"), base=f.base,
                                   hf_module_name=f.names)
    dora = info["method"]
    assert isinstance(dora, DoRA) and info["kind"] == "dora"
    assert len(tree.leaves_named(delta, "lora_magnitude")) == 6
    assert f.compare(f.ours([dora], delta), f.theirs(pm)) <= TOL
    # and back: our export of the import is bit-identical on re-import
    H.export_method(str(tmp_path / "b"), delta, dora, hf_module_name=f.names)
    again, info2 = H.import_hf_peft(str(tmp_path / "b"), base=f.base,
                                    hf_module_name=f.names)
    _assert_bit_exact(delta, again)
    assert info2["method"] == dora


def test_lora_adapter_is_not_read_as_dora_and_missing_magnitudes_are_refused(fam_bert, tmp_path):
    f = fam_bert
    lora = LoRA(rank=2)
    delta = _randomize(f.init([lora]), 3)
    H.export_method(str(tmp_path / "lora"), delta, lora, hf_module_name=f.names)
    _, info = H.import_hf_peft(str(tmp_path / "lora"), base=f.base,
                               hf_module_name=f.names)
    assert type(info["method"]) is LoRA
    path = tmp_path / "lora" / "adapter_config.json"
    json.dump(dict(json.load(open(path)), use_dora=True), open(path, "w"))
    with pytest.raises(H.CheckpointError, match="use_dora=true but no magnitude vector"):
        H.import_hf_peft(str(tmp_path / "lora"), base=f.base, hf_module_name=f.names)


# ----------------------------------------------------------------------------- dropout path


def test_dropout_path_rescales_the_dropped_input_not_the_bias():
    """Training with LoRA dropout: ``y - base(x) = d(x) @ ((g - 1) W + g s a b)`` with ``d(x)``
    the dropped-out input (HF's ``base_result=None`` path): solving for ``d(x)`` gives, in
    every entry, either 0 or ``x / (1 - p)``, both present."""
    n, p = 8, 0.5
    dora = DoRA(targets=".*", rank=2, alpha=4.0, dropout=p)
    layer = Dense(n, slots=Slots((dora,)))
    x = jax.random.normal(jax.random.key(0), (16, n))
    v = layer.init({"params": jax.random.key(1)}, x)
    rng = np.random.default_rng(0)
    params = {"kernel": np.asarray(rng.normal(size=(n, n)), np.float32),
              "bias": np.asarray(rng.normal(size=(n,)), np.float32)}
    pe = {"lora_a": np.asarray(rng.normal(size=(n, 2)), np.float32),
          "lora_b": np.asarray(rng.normal(size=(2, n)), np.float32),
          "lora_magnitude": np.asarray(rng.uniform(1, 3, size=(n,)), np.float32)}
    assert set(pe) == set(v["peft"])
    y = layer.apply({"params": params, "peft": pe}, x, deterministic=False,
                    rngs={"dropout": jax.random.key(2)})
    base = np.asarray(x) @ params["kernel"] + params["bias"]
    upd = 2.0 * pe["lora_a"] @ pe["lora_b"]
    g = pe["lora_magnitude"] / np.linalg.norm(params["kernel"] + upd, axis=0)
    m = (g - 1) * params["kernel"] + g * upd
    dx = (np.asarray(y, np.float64) - base) @ np.linalg.inv(m)
    kept = np.isclose(dx, np.asarray(x) / (1 - p), atol=1e-3)
    dropped = np.isclose(dx, 0.0, atol=1e-3)
    assert (kept | dropped).all() and kept.any() and dropped.any()
    # eval: no dropout, the bias is not rescaled
    y_eval = layer.apply({"params": params, "peft": pe}, x)
    want = g * (np.asarray(x) @ (params["kernel"] + upd)) + params["bias"]
    np.testing.assert_allclose(y_eval, want, atol=1e-4)


# ----------------------------------------------------------------------------- merge


def test_merged_equals_unmerged_and_hf_merged_weights(fam_bert, tmp_path):
    f = fam_bert
    dora = DoRA(targets=TARGETS["bert"][0], rank=4, alpha=8.0)
    delta = _randomize(f.init([dora]), 11)
    merged = merge(f.base, delta, [dora])
    out = f.model_cls(f.config).apply({"params": merged}, jnp.asarray(f.ids), jnp.asarray(f.mask))
    err = f.compare(np.asarray(out["hidden_states"]), f.ours([dora], delta))
    print(f"\nDoRA merged vs unmerged: max abs err {err:.2e}")
    assert err <= TOL
    with pytest.raises(NotSupported, match="cannot be unmerged"):
        dora.unmerge(merged, delta)
    # the merged kernels equal HF PEFT's merge_and_unload of the exported adapter
    folder = H.export_method(str(tmp_path / "a"), delta, dora, hf_module_name=f.names)
    hf_merged = _peft_from(f.hf_model(), folder).merge_and_unload().state_dict()
    paths = [p for p, _ in tree.modules_with(delta, "lora_magnitude")]
    for p, k in _kernels(merged, paths).items():
        w = hf_merged[f.names(p) + ".weight"].numpy().T
        assert np.max(np.abs(k - w)) <= 1e-6, p
        assert np.max(np.abs(k - np.asarray(tree.get(f.base, p + "/kernel")))) > 1e-3


# ----------------------------------------------------------------------------- gradients


def test_one_step_gradients_match_torch(fam_bert, tmp_path):
    """d(loss)/d(magnitude, lora_A, lora_B) with the norm detached, as HF PEFT: one
    backward pass of ``sum(out * R)`` over real tokens, ours (jax.grad) vs torch."""
    f = fam_bert
    dora = DoRA(targets=TARGETS["bert"][0], rank=4, alpha=8.0)
    delta = _randomize(f.init([dora]), 13)
    folder = H.export_method(str(tmp_path / "a"), delta, dora, hf_module_name=f.names)
    pm = _peft_from(f.hf_model(), folder)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
    weights = np.random.default_rng(0).normal(size=f.ours([dora], delta).shape).astype(np.float32)
    weights *= f.mask[..., None]
    out = pm(input_ids=torch.tensor(f.ids), attention_mask=torch.tensor(f.mask)).last_hidden_state
    (out * torch.tensor(weights)).sum().backward()

    model = f.model_cls(f.config, slots=Slots((dora,)))

    def loss(d):
        h = model.apply({"params": f.base, "peft": d}, jnp.asarray(f.ids),
                        jnp.asarray(f.mask))["hidden_states"]
        return jnp.sum(h * weights)

    grads = tree.flatten(jax.grad(loss)(jax.tree.map(jnp.asarray, delta)))
    hf_params = dict(pm.named_parameters())
    names = {"lora_a": ("lora_A.default.weight", True), "lora_b": ("lora_B.default.weight", True),
             "lora_magnitude": ("lora_magnitude_vector.default.weight", False)}
    worst = {}
    for p, gr in grads.items():
        leaf, mod = tree.leaf_name(p), tree.parent(p)
        suffix, transpose = names[leaf]
        hg = hf_params[f"base_model.model.{f.names(mod)}.{suffix}"].grad.numpy()
        hg = hg.T if transpose else hg
        scale = max(1.0, float(np.max(np.abs(hg))))
        err = float(np.max(np.abs(np.asarray(gr) - hg))) / scale
        worst[leaf] = max(worst.get(leaf, 0.0), err)
        assert np.max(np.abs(hg)) > 1e-4, p   # a real gradient
    print(f"\nDoRA gradient max abs err (relative to max(1, |grad|)): {worst}")
    assert max(worst.values()) <= TOL


# ----------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("dora_run")
    model = write_tiny_bert(str(root / "model"), minilm_path)
    task = write_task(str(root / "data"))
    cfg = config_file(str(root / "cfg.py"), model, task, str(root / "wd"), "dora",
                      **{"peft.dora.rank": 4, "peft.dora.dropout": 0.1})
    return cfg, root


@pytest.mark.slow
def test_runner_trains_dora_and_params_reports_it(tiny_run, capsys):
    cfg, root = tiny_run
    assert cli.main(["train", "--config", cfg]) == 0
    res = json.load(open(root / "wd" / "result.json"))
    assert res["status"] == "finished" and res["steps"] == 4
    from peft_jax.peft.delta_io import load_delta
    saved, meta = load_delta(str(root / "wd" / "delta"))
    assert [m["type"].rsplit(".", 1)[-1] for m in meta["methods"]] == ["DoRA", "Head"]
    from peft_jax.models.registry import load_pretrained
    base = load_pretrained(os.path.join(root, "model")).base
    n_dora = 0
    for p, m in tree.leaves_named(saved["peft"], "lora_magnitude").items():
        mod = tree.get(saved["peft"], tree.parent(p))
        k = np.asarray(tree.get(base, tree.parent(p) + "/kernel"))
        assert np.asarray(mod["lora_b"]).any()      # trained away from zero
        assert np.max(np.abs(m - np.linalg.norm(k, axis=0))) > 1e-5   # the magnitude trained
        n_dora += sum(np.size(x) for x in mod.values())
    assert n_dora == 4 * (4 * (32 + 32) + 32)      # query, value x 2 layers: r(in+out) + out
    capsys.readouterr()
    assert cli.main(["params", "--config", cfg]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("dora ")]
    assert len(row) == 1 and f"{n_dora:,}" in row[0], out
